"""Camera capture: one thread per camera reads frames and puts them on the shared FrameQueue.

Sources (``kind``, chosen from ``source`` when "auto"):

- ``usb``: an int or digit string is a device index, a ``/dev/...`` path a V4L2 device.
- ``stream``: any ``scheme://`` URL (RTSP, HTTP MJPEG, ...), read by OpenCV's FFMPEG backend
  with open and read timeouts so that a dead peer ends a read instead of hanging it.
- ``folder``: every image file in sorted order, one frame each. An unreadable file still yields
  a frame, with an EMPTY image and the reason in ``Frame.error``, so the inference side answers
  it as an ERROR verdict saying why and every file gets exactly one verdict. A file whose header
  declares more than ``max_megapixels`` is refused before it is decoded (images.py).
- ``file``: a video file, every decoded frame once and in order.
- ``genicam``: a GigE Vision or USB3 Vision camera through Aravis (source ``genicam:<device
  id>``; edge_agent/capture/genicam.py: settings, trigger, timestamps, lost frames). With
  ``genicam.trigger: software`` the service hands each part id to `trigger`, which fires the
  camera, so the frame it takes is that part's.

A capture thread never dies of one frame: a frame that cannot be read, decoded or is larger
than ``max_megapixels`` (any source kind) becomes an ERROR frame with its reason. Should the
thread die of anything else, the capture records it (``failed``, ``last_error``, not
``connected``, one ERROR line) and the service stops with exit 1 so that systemd restarts it.

Live sources (usb, stream, genicam) never stop on their own: an open or read failure starts an
outage, logged once, and the thread retries with exponential back-off plus jitter until it is
back (logged once more) or the capture is stopped. A file that cannot be opened or a folder without
images is a configuration error (UserError at start), not an outage.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from edge_agent.capture.frame_queue import Frame, FrameQueue
from edge_agent.capture.genicam import (
    PREFIX as GENICAM_PREFIX,
)
from edge_agent.capture.genicam import (
    SOFTWARE,
    GenicamCamera,
    GenicamLost,
    GenicamSettings,
    Grab,
    aravis,
    device_id,
)
from edge_agent.errors import UserError
from edge_agent.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    check_pixels,
    cv_reason,
    decode_image,
    list_images,
    max_file_bytes,
    read_image_bytes,
)

log = logging.getLogger(__name__)

KINDS = ("auto", "usb", "stream", "file", "folder", "genicam")
OVERFLOWS = ("auto", "drop_oldest", "block")
MODES = ("continuous", "trigger")
LIVE_KINDS = ("usb", "stream", "genicam")
GENICAM_POLL_S = 0.1  # longest a quiet GenICam stream keeps stop() and trigger misses waiting

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def empty_image() -> np.ndarray:
    """The image of a frame that could not be read: the inference side rejects it as bad."""
    return np.empty((0, 0, 3), np.uint8)


@dataclass(frozen=True)
class CameraSettings:
    """One camera as configured; see the module docstring for the source kinds."""

    id: str
    source: str | int
    kind: str = "auto"
    overflow: str = "auto"  # auto: file/folder -> block, live -> drop_oldest
    fps_limit: float | None = None  # live sources: emit at most this many frames per second
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    loop: bool = False  # file/folder: start again at the end (demos)
    mode: str = "continuous"  # or "trigger": the service decides what to inspect
    open_timeout_s: float = 10.0  # streams: give up connecting after this long
    read_timeout_s: float = 5.0  # streams: a read that waits longer counts as a lost stream
    # Frames above this many megapixels are ERROR frames; image files are refused from their
    # header, before decoding (a decompression bomb costs nothing). images.DEFAULT_MAX_PIXELS.
    max_megapixels: float = DEFAULT_MAX_PIXELS / 1e6
    genicam: GenicamSettings | None = None  # kind genicam only; None: the camera's own values

    def __post_init__(self) -> None:
        where = f"camera {self.id!r}"
        for key, value, choices in (
            ("kind", self.kind, KINDS),
            ("overflow", self.overflow, OVERFLOWS),
            ("mode", self.mode, MODES),
        ):
            if value not in choices:
                raise UserError(
                    f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}"
                )
        if self.fps_limit is not None and not self.fps_limit > 0:
            raise UserError(f"{where}: fps_limit must be above 0, got {self.fps_limit}")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise UserError(
                f"{where}: need 0 < reconnect_initial_s <= reconnect_max_s, got "
                f"{self.reconnect_initial_s} and {self.reconnect_max_s}"
            )
        if not (self.open_timeout_s > 0 and self.read_timeout_s > 0):
            raise UserError(f"{where}: open_timeout_s and read_timeout_s must be above 0")
        if not self.max_megapixels > 0:
            raise UserError(f"{where}: max_megapixels must be above 0, got {self.max_megapixels}")
        genicam = self.resolved_kind() == "genicam"
        if self.genicam is not None and not genicam:
            raise UserError(f"{where}: genicam settings need a genicam: source")
        if genicam and self.genicam_settings().trigger == SOFTWARE and self.mode != "trigger":
            # Nothing would fire the camera: only trigger-mode cameras are handed part ids.
            raise UserError(f"{where}: genicam.trigger software needs mode: trigger")

    def genicam_settings(self) -> GenicamSettings:
        return self.genicam if self.genicam is not None else GenicamSettings()

    def resolved_kind(self) -> str:
        """The source kind, with "auto" decided from the source."""
        if self.kind != "auto":
            return self.kind
        source = self.source
        if isinstance(source, str) and source.startswith(GENICAM_PREFIX):
            return "genicam"
        if isinstance(source, int) or source.isdigit() or source.startswith("/dev/"):
            return "usb"
        if _URL.match(source):
            return "stream"
        return "folder" if Path(source).is_dir() else "file"

    def blocks(self) -> bool:
        """True for back-pressure, False for drop-oldest (the overflow policy resolved)."""
        if self.overflow == "auto":
            return self.resolved_kind() not in LIVE_KINDS
        return self.overflow == "block"


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame: where a failure happened, in the one log line."""
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "unknown"


def redact(source: str | int) -> str:
    """The source for logs: user, password and query (tokens) of a URL replaced by ***."""
    text = str(source)
    if not _URL.match(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class CameraCapture:
    """Reads one camera on a daemon thread and puts Frames on `queue`."""

    def __init__(
        self, settings: CameraSettings, queue: FrameQueue, *, run_id: str | None = None
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.kind = settings.resolved_kind()
        self.block = settings.blocks()
        self._prefix = f"{run_id}-{settings.id}" if run_id else settings.id
        self._name = redact(settings.source)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self._sequence = 0
        self._frames_in = 0
        self._reconnects = 0
        self._reconnect_attempts = 0
        self._connected = False
        self._last_error: str | None = None
        self._finished = False
        self._failed = False
        self._max_pixels = max(1, int(settings.max_megapixels * 1e6))
        self._outage_since: float | None = None  # monotonic start of the current outage
        self._ever_connected = False
        self._files: list[Path] = []
        self._video: cv2.VideoCapture | None = None
        self._first: tuple[float, np.ndarray] | None = None
        # GenICam: the open camera (fire() comes from the trigger's thread, hence the lock),
        # software triggers fired and not yet answered by a frame (monotonic times), and the
        # reasons of triggers that could not be fired, each owed an ERROR frame.
        self._genicam = settings.genicam_settings() if self.kind == "genicam" else None
        self._control = threading.Lock()
        self._camera: GenicamCamera | None = None
        self._fired: deque[float] = deque()
        self._misfired: deque[str] = deque()
        self._wake = threading.Event()
        self._took: dict[str, Any] | None = None
        self._lost = {"missing": 0, "incomplete": 0, "unanswered": 0, "not_fired": 0}
        self._fired_total = 0
        self._stream_totals: dict[str, int] = {}

    # -- public ------------------------------------------------------------------------------

    def start(self) -> None:
        """Check a file/folder source (UserError if unusable) and start the capture thread."""
        if self._thread is not None:
            raise RuntimeError(f"camera {self.settings.id}: already started")
        if self.kind == "folder":
            try:
                self._files = list_images(self.settings.source)
            except UserError as exc:
                raise UserError(f"camera {self.settings.id}: {exc}") from None
        elif self.kind == "file":
            self._video, self._first = self._open_file()
        elif self.kind == "genicam":
            try:
                aravis()  # missing Aravis is a configuration error at start, not an outage
            except UserError as exc:
                raise UserError(f"camera {self.settings.id}: {exc}") from None
        target = {
            "folder": self._run_folder,
            "file": self._run_file,
            "usb": self._run_live,
            "stream": self._run_live,
            "genicam": self._run_live,
        }[self.kind]
        policy = "block" if self.block else "drop_oldest"
        log.info(
            "camera %s: capturing %s %s (overflow %s)",
            self.settings.id,
            self.kind,
            self._name,
            policy,
        )
        self._thread = threading.Thread(
            target=self._guarded, args=(target,), name=f"capture-{self.settings.id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; returns within `timeout_s` even if a read is hung (daemon thread)."""
        self._stop.set()
        self._wake.set()
        self.queue.wake()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning(
                "camera %s: capture thread still in a read after %.1f s; leaving it to end",
                self.settings.id,
                timeout_s,
            )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def finished(self) -> bool:
        """A finite source (file/folder without loop) has delivered every frame."""
        return self._finished

    @property
    def failed(self) -> bool:
        """The capture thread ended on its own before its source was done (not stopped): the
        camera delivers nothing more, which must not look like a finished source."""
        return self._failed

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def stats(self) -> dict:
        """Counters for metrics and status.

        frames_in: frames captured (numbered); reconnects: outages recovered (a live camera
        delivering again after failing to open or losing its stream); reconnect_attempts: opens
        tried after the first; connected: delivering frames now; last_error: the latest
        failure (credentials redacted), kept after recovery; dropped: this camera's frames
        the queue dropped; finished: a finite source is done; failed: the capture thread died
        before that (see `failed`); genicam (GenICam cameras only): `genicam_stats`.
        """
        stats: dict[str, Any] = {
            "frames_in": self._frames_in,
            "reconnects": self._reconnects,
            "reconnect_attempts": self._reconnect_attempts,
            "connected": self._connected,
            "last_error": self._last_error,
            "dropped": self.queue.dropped.get(self.settings.id, 0),
            "finished": self._finished,
            "failed": self._failed,
        }
        if self._genicam is not None:
            stats["genicam"] = self.genicam_stats()
        return stats

    def genicam_stats(self) -> dict[str, Any]:
        """settings: what the camera took, read back at the last open (null before one);
        lost_frames: frames lost, by why (missing: frame ids skipped, the camera, network or
        an underrun lost them; incomplete: arrived with packets missing; unanswered: software
        triggers fired without a frame within read_timeout_s or before the camera was lost;
        not_fired: triggers that could not be fired); triggers_fired; stream: Aravis' own
        counters summed over the connections."""
        # Without the lock: a fire() in progress holds it for as long as a lost camera takes
        # to time out, and the service reads these stats on its inference thread.
        camera = self._camera
        current = camera.stream_stats() if camera is not None else {}
        totals = dict(self._stream_totals)
        return {
            "settings": self._took,
            "lost_frames": dict(self._lost),
            "triggers_fired": self._fired_total,
            "stream": {k: totals.get(k, 0) + current.get(k, 0) for k in totals | current},
        }

    def trigger(self, part_id: str) -> None:
        """The service handed this trigger-mode camera a part id (on the trigger's thread, after
        queueing the id): with ``genicam.trigger: software`` fire the camera now, so that the
        frame it takes is that part's. A trigger that cannot be fired is owed an ERROR frame, so
        that the part is answered ERROR and the frames stay in step with the part ids. Other
        cameras take their frames on their own: nothing to do."""
        g = self._genicam
        if g is None or g.trigger != SOFTWARE or self._stop.is_set():
            return
        with self._control:
            camera = self._camera
            if camera is not None:
                try:
                    camera.fire()
                except GenicamLost as exc:
                    reason = str(exc)
                else:
                    self._fired.append(time.monotonic())
                    self._fired_total += 1
                    return
            else:
                reason = f"camera not connected ({self._last_error})"
            self._lost["not_fired"] += 1
            self._misfired.append(f"trigger for part {part_id} not fired: {reason}")
        self._wake.set()

    # -- common ------------------------------------------------------------------------------

    def _guarded(self, target) -> None:
        try:
            target()
        except UserError as exc:  # e.g. a looping video file deleted meanwhile
            self._last_error = str(exc)
            log.error("%s; capture stopped", exc)
        except Exception as exc:  # a bug must not die silently on a daemon thread
            self._last_error = f"capture thread failed: {type(exc).__name__}: {exc}"
            log.error("camera %s: %s (at %s)", self.settings.id, self._last_error, _where(exc))
            log.debug("camera %s: capture thread failure", self.settings.id, exc_info=True)
        finally:
            self._connected = False
            # Set by this thread as it ends, so that a later stop() cannot hide it.
            if not (self._finished or self._stop.is_set() or self.queue.closed):
                self._failed = True

    def _emit(
        self,
        image: np.ndarray,
        captured_at: float,
        source_name: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Number and queue one frame; False when the capture must end (stopped or closed).

        With `error` (or for a decoded frame above the pixel limit) the frame carries an empty
        image and the reason, and is answered as an ERROR verdict.
        """
        if error is None:
            error = self._too_large(image)
        if error is not None:
            image = empty_image()  # a huge frame must not wait in the queue
        seq = self._sequence
        frame = Frame(
            camera=self.settings.id,
            sequence=seq,
            frame_id=f"{self._prefix}-{seq}",
            captured_at=captured_at,
            image=image,
            source_name=source_name,
            error=error,
        )
        self._sequence = seq + 1
        ok = self.queue.put(frame, block=self.block, cancel=self._stop)
        if ok:
            # Count only frames that entered the pipeline: a put cancelled by stop() while
            # waiting on a full queue must not look like a frame that was never answered.
            self._frames_in += 1
        return ok and not self._stop.is_set()

    def _too_large(self, image: np.ndarray) -> str | None:
        shape = getattr(image, "shape", ())
        if len(shape) < 2 or shape[0] * shape[1] <= self._max_pixels:
            return None
        try:
            check_pixels(shape[1], shape[0], self._max_pixels, "frame")
        except BadImage as exc:
            return str(exc)
        return None

    def _retrieve(self, cap: cv2.VideoCapture) -> tuple[np.ndarray, str | None]:
        """The grabbed frame, or an empty image and why it could not be decoded."""
        try:
            ok, image = cap.retrieve()
        except cv2.error as exc:
            return empty_image(), f"cannot decode the frame ({cv_reason(exc)})"
        if not ok or image is None:
            return empty_image(), "cannot decode the frame"
        return image, None

    # -- folder ------------------------------------------------------------------------------

    def _run_folder(self) -> None:
        self._connected = True
        while not self._stop.is_set():
            for path in self._files:
                if self._stop.is_set():
                    return
                image, error = self._read_file(path)
                if not self._emit(image, time.time(), path.name, error):
                    return
            if not self.settings.loop:
                self._finished = True
                log.info("camera %s: folder done, %d files", self.settings.id, len(self._files))
                return

    def _read_file(self, path: Path) -> tuple[np.ndarray, str | None]:
        """One folder file -> (image, None), or (empty image, why) when it is unusable: one
        frame per file either way, so that every file gets a verdict."""
        try:
            data = read_image_bytes(path, max_bytes=max_file_bytes(self._max_pixels))
            return decode_image(data, max_pixels=self._max_pixels), None
        except BadImage as exc:
            error = str(exc)
        except Exception as exc:  # anything else still costs this file only, not the thread
            error = f"cannot read: {type(exc).__name__}: {exc}"
        self._last_error = f"{path.name}: {error}"
        log.warning("camera %s: %s: %s; answered as an ERROR frame", self.settings.id, path, error)
        return empty_image(), error

    # -- video file --------------------------------------------------------------------------

    def _open_file(self) -> tuple[cv2.VideoCapture, tuple[float, np.ndarray]]:
        """Open the video and read its first frame; UserError if either fails."""
        path = Path(str(self.settings.source))
        where = f"camera {self.settings.id}: {path}"
        if not path.exists():
            raise UserError(f"{where}: no such video file")
        if not path.is_file():
            raise UserError(f"{where}: not a file")
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise UserError(f"{where}: cannot open as a video")
        ok, image = cap.read()
        captured_at = time.time()
        if not ok or image is None:
            cap.release()
            raise UserError(f"{where}: no decodable frames")
        return cap, (captured_at, image)

    def _run_file(self) -> None:
        cap, first = self._video, self._first
        self._video = self._first = None
        assert cap is not None and first is not None
        self._connected = True
        try:
            while not self._stop.is_set():
                if not self._emit(first[1], first[0]):
                    return
                n = self._read_to_end(cap) + 1
                if self._stop.is_set():
                    return
                if not self.settings.loop:
                    self._finished = True
                    log.info("camera %s: video done, %d frames", self.settings.id, n)
                    return
                cap.release()
                cap, first = self._open_file()  # reopening is more reliable than seeking
        finally:
            cap.release()

    def _read_to_end(self, cap: cv2.VideoCapture) -> int:
        """Emit frames until the end of the file (or a stop); the number emitted."""
        n = 0
        while not self._stop.is_set():
            if not cap.grab():
                return n
            captured_at = time.time()
            image, error = self._retrieve(cap)
            if not self._emit(image, captured_at, error=error):
                return n
            n += 1
        return n

    # -- live: usb and streams ---------------------------------------------------------------

    def _open_live(self) -> cv2.VideoCapture | None:
        source = self.settings.source
        s = self.settings
        try:
            if self.kind == "usb":
                if isinstance(source, int) or source.isdigit():
                    cap = cv2.VideoCapture(int(source))
                else:
                    cap = cv2.VideoCapture(source, cv2.CAP_V4L2)
            else:
                params = [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                    int(s.open_timeout_s * 1000),
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                    int(s.read_timeout_s * 1000),
                ]
                cap = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)
        except cv2.error as exc:
            self._last_error = f"cannot open {self._name}: {str(exc).strip()}"
            return None
        if not cap.isOpened():
            cap.release()
            self._last_error = f"cannot open {self._name}"
            return None
        return cap

    def _run_live(self) -> None:
        backoff = self.settings.reconnect_initial_s
        attempts = 0
        genicam = self.kind == "genicam"
        while not self._stop.is_set():
            if attempts:
                self._reconnect_attempts += 1
            attempts += 1
            cap = self._open_genicam() if genicam else self._open_live()
            if cap is not None:
                try:
                    delivered = self._read_genicam(cap) if genicam else self._read_live(cap)
                finally:
                    cap.release()
                    self._connected = False
                if self._stop.is_set() or self.queue.closed:
                    return
                if delivered:
                    backoff = self.settings.reconnect_initial_s
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                self._log_lost()
            delay = backoff * (1.0 + 0.25 * self._rng.random())  # jitter: cameras not in step
            backoff = min(backoff * 2.0, self.settings.reconnect_max_s)
            if self._pause(delay):
                return

    def _pause(self, seconds: float) -> bool:
        """Wait out a back-off (True if stopped meanwhile), answering the triggers that could
        not be fired as they come: their parts must not wait for the camera to return."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            if not self._answer_misfires():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._wake.wait(left)
            self._wake.clear()
        return True

    def _read_live(self, cap: cv2.VideoCapture) -> bool:
        """Read until the stream fails, the capture stops or the queue closes.

        Returns whether any frame was delivered; sets last_error when the stream failed. The
        camera counts as back (connected) at its first frame, not when it merely opens.
        """
        fps = self.settings.fps_limit
        interval = 1.0 / fps if fps else 0.0
        next_due = 0.0
        delivered = False
        while not self._stop.is_set():
            # grab() keeps draining the camera even when frames are skipped, so what is
            # retrieved is current rather than a stale buffered frame.
            try:
                grabbed = cap.grab()
            except cv2.error:  # a broken stream, like a failed read: reconnect
                grabbed = False
            if not grabbed:
                self._last_error = f"read from {self._name} failed or timed out"
                return delivered
            captured_at = time.time()
            now = time.monotonic()
            if interval and now < next_due:
                continue
            image, error = self._retrieve(cap)
            if error is not None:
                # The captured frame still gets its (ERROR) verdict; then reconnect, which
                # is what clears a stream that stopped decoding.
                self._last_error = f"{error} from {self._name}"
                self._emit(image, captured_at, error=error)
                return delivered
            next_due = now + interval
            if not delivered:
                delivered = True
                self._on_connected()
            if not self._emit(image, captured_at):
                return delivered
        return delivered

    def _on_connected(self) -> None:
        self._connected = True
        if self._outage_since is not None:
            self._reconnects += 1
            seconds = time.monotonic() - self._outage_since
            verb = "reconnected" if self._ever_connected else "connected"
            log.info("camera %s: %s after %.1f s", self.settings.id, verb, seconds)
            self._outage_since = None
        self._ever_connected = True

    def _log_lost(self) -> None:
        if self._ever_connected:
            log.warning(
                "camera %s: stream lost (%s), reconnecting", self.settings.id, self._last_error
            )
        else:
            log.warning("camera %s: %s, retrying with back-off", self.settings.id, self._last_error)

    # -- genicam -----------------------------------------------------------------------------

    def _open_genicam(self) -> GenicamCamera | None:
        """The camera opened with its settings applied and its stream started, or None (an
        outage: last_error says why). A refused setting raises GenicamRefused (a UserError):
        the capture stops with the camera's own message, as for any configuration error."""
        g = self._genicam
        assert g is not None
        try:
            camera = GenicamCamera(device_id(self.settings.source), g, f"camera {self.settings.id}")
        except GenicamLost as exc:
            self._last_error = str(exc)
            return None
        if camera.read_back != self._took:  # once, and again only if a reopen differs
            took = ", ".join(f"{k}={v}" for k, v in camera.read_back.items())
            log.info("camera %s: the camera took %s", self.settings.id, took)
        with self._control:
            self._took = camera.read_back
        return camera

    def _read_genicam(self, camera: GenicamCamera) -> bool:
        """Stream until the camera is lost, the capture stops or the queue closes; True (the
        camera opened and took its settings: the back-off starts again from its start)."""
        with self._control:
            self._camera = camera
        self._on_connected()  # a triggered camera is up before its first frame
        try:
            if not self._answer_misfires():
                return True
            self._stream_genicam(camera)
        finally:
            with self._control:
                self._camera = None
                for key, value in camera.stream_stats().items():
                    self._stream_totals[key] = self._stream_totals.get(key, 0) + value
                unanswered = len(self._fired)
                self._fired.clear()
            # Fired, and the camera went before their frames came: their parts get ERROR.
            for _ in range(unanswered):
                self._lost["unanswered"] += 1
                self._emit(empty_image(), time.time(), error="camera lost before the frame")
        return True

    def _stream_genicam(self, camera: GenicamCamera) -> None:
        g = self._genicam
        assert g is not None
        s = self.settings
        interval = 1.0 / s.fps_limit if s.fps_limit and not g.triggered else 0.0
        next_due = 0.0
        heard = time.monotonic()
        lost_logged = False
        while not self._stop.is_set():
            grab = camera.grab(GENICAM_POLL_S)
            now = time.monotonic()
            if not self._answer_misfires() or not self._answer_overdue(now):
                return
            if grab is None:
                if now - heard < s.read_timeout_s:
                    continue
                with self._control:
                    alive = camera.alive()
                if not alive:
                    self._last_error = f"camera {camera.device} stopped answering"
                    return
                if not g.triggered:  # a free-running camera that sends nothing is stuck
                    self._last_error = f"no frame from camera {camera.device} for " + (
                        f"{s.read_timeout_s:g} s"
                    )
                    return
                heard = now  # a triggered camera waiting for its trigger
                continue
            heard = now
            lost = grab.missing + (grab.image is None)
            if lost:
                self._lost["missing"] += grab.missing
                self._lost["incomplete"] += grab.image is None
                self._last_error = f"camera {camera.device}: {self._lost_reason(grab)}"
                if not lost_logged:
                    lost_logged = True
                    log.warning(
                        "camera %s: %s (counted in health; logged once per connection)",
                        s.id,
                        self._last_error,
                    )
            if not self._deliver(grab, g.triggered, bool(interval) and now < next_due):
                return
            if grab.image is not None and interval and now >= next_due:
                next_due = now + interval

    @staticmethod
    def _lost_reason(grab: Grab) -> str:
        if grab.image is None:
            return f"frame {grab.frame_id}: {grab.error}"
        return f"{grab.missing} frame(s) lost before frame {grab.frame_id}"

    def _deliver(self, grab: Grab, triggered: bool, skip: bool) -> bool:
        """Queue what one grab owes: for triggered frames an ERROR frame per lost frame (each
        answered a trigger), then the frame itself. False when the capture must end."""
        if triggered:
            for _ in range(grab.missing):
                self._take_fired()
                if not self._emit(empty_image(), time.time(), error="frame lost before arrival"):
                    return False
            if grab.image is None:
                self._take_fired()
                return self._emit(empty_image(), grab.captured_at, error=grab.error)
        if grab.image is None or skip:
            return True  # a lost free-run frame is counted, never passed on
        self._take_fired()
        return self._emit(grab.image, grab.captured_at, str(grab.frame_id))

    def _take_fired(self) -> None:
        with self._control:
            if self._fired:
                self._fired.popleft()

    def _answer_misfires(self) -> bool:
        """An ERROR frame for each trigger that could not be fired; False when the capture
        must end."""
        while True:
            with self._control:
                if not self._misfired:
                    return True
                reason = self._misfired.popleft()
            if not self._emit(empty_image(), time.time(), error=reason):
                return False

    def _answer_overdue(self, now: float) -> bool:
        """An ERROR frame for each software trigger without a frame after read_timeout_s (the
        camera ignored it, e.g. still busy with the last one); False when the capture must
        end."""
        limit = self.settings.read_timeout_s
        while True:
            with self._control:
                if not self._fired or now - self._fired[0] < limit:
                    return True
                self._fired.popleft()
                self._lost["unanswered"] += 1
            error = f"no frame within {limit:g} s of the software trigger"
            if not self._emit(empty_image(), time.time(), error=error):
                return False
