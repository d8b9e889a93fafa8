"""The reject archive: each NG frame as a JPEG (original | heat-map overlay) plus a JSON sidecar
holding its verdict, under DIR/YYYY-MM-DD/ (UTC date of capture), bounded by a disk quota.

Writing happens in one background thread behind a small bounded queue, so a slow or stalled
disk never slows inspection: when the queue is full the frame is not archived (counted, and
its verdict says reject_image null). Each file is written to a temporary name, fsynced and
renamed, so a reader (or a power cut) never sees half a JPEG; the sidecar is written after the
JPEG, so a sidecar always has its image. A failing disk (full, read-only) is counted and
logged once per streak, never raised: the agent keeps inspecting.

The quota deletes the oldest entries (image + sidecar) first; the newest entry is always
kept, so the archive exceeds the quota by at most one entry.

The free-space floor (``min_free_mb``) keeps the archive from filling the disk it shares with
the MQTT spool and the system: before each write the oldest entries are deleted until the
filesystem keeps at least that much free after the write, and a frame is not archived at all
when even an empty archive could not keep it (logged once per episode, counted as skipped).

What a verdict's ``reject_image`` promises: a path is returned only when the writer accepted
the job AND the floor held at submit time (judged from the free space the writer last saw,
so the inference thread never touches the disk); otherwise None. The write itself happens
just after; should it still fail (the disk filled up meanwhile, an I/O error), that is logged
and counted in ``errors``, and neither the image nor its sidecar exists under the path: a
sidecar never names an image that was not written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.decide.overlay import SEPARATOR_BGR, SEPARATOR_PX, heatmap_overlay, side_by_side
from edge_agent.fileio import atomic_write

log = logging.getLogger(__name__)

QUEUE_SIZE = 32
FREE_REFRESH_S = 1.0  # the writer re-reads the free space at least this often when idle
MB = 1024 * 1024
# No dots: the stem must not grow a suffix that with_suffix() would replace.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ArchiveSettings:
    dir: Path
    quota_mb: float = 1024.0
    save_ok: bool = False  # also keep OK frames (original only), e.g. to collect training data
    jpeg_quality: int = 90
    # Keep at least this much free on the archive's filesystem: the spool's default bound
    # (mqtt.spool_max_bytes, 256 MB) plus room for the journal and the system. Raise it with
    # the spool's bound when both are on one disk.
    min_free_mb: float = 300.0


@dataclass(frozen=True)
class Heat:
    """One heat-map panel beside the original: a model's anomaly map at the frame's size, its
    colour scale, the pixel threshold it outlines and a caption."""

    amap: np.ndarray
    vmin: float = 0.0
    vmax: float = 1.0
    pixel_threshold: float = float(np.inf)
    label: str = ""


@dataclass(frozen=True)
class _Job:
    stem: Path  # DIR/YYYY-MM-DD/<name> without suffix
    frame: np.ndarray  # uint8 BGR, original size
    heats: tuple[Heat, ...]  # overlays beside the original (none: the original only)
    sidecar: dict[str, Any]
    estimate: int  # bytes reserved at submit time, released when written or failed


class _DiskFull(OSError):
    """Writing would leave less than the floor free, even with the archive emptied."""


class RejectArchive:
    def __init__(self, settings: ArchiveSettings) -> None:
        self.settings = settings
        self.root = Path(settings.dir)
        self.quota_bytes = int(settings.quota_mb * MB)
        self.min_free_bytes = int(settings.min_free_mb * MB)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._entries: deque[tuple[Path, int]] = deque()  # (stem, bytes), oldest first
        self._bytes = 0
        self._free = 0  # free bytes on the archive's filesystem, as the writer last saw them
        self._free_problem: str | None = None  # why the free space could not be read
        self._queued_bytes = 0  # estimated size of the jobs queued and not yet written
        self._low_disk = False  # an episode of frames refused for the floor is being logged
        self._failing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="archive", daemon=True)
        self.saved = 0
        self.errors = 0  # failed writes
        self.skipped = 0  # not archived: the writer was behind, or the disk below the floor
        self.skipped_low_disk = 0  # of those, for the floor

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Index what is on disk (so the quota counts earlier runs) and start the writer."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._fail(f"cannot create {self.root}: {exc.strerror}")
        self._scan()
        self._enforce_quota(keep=None)
        self._refresh_free()
        self._thread.start()
        log.info(
            "reject archive in %s: %d entries, %.1f of %.0f MB",
            self.root,
            len(self._entries),
            self._bytes / 1048576,
            self.settings.quota_mb,
        )

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("reject archive: writer still busy after %.0f s, leaving", timeout_s)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "saved": self.saved,
                "errors": self.errors,
                "skipped": self.skipped,
                "skipped_low_disk": self.skipped_low_disk,
                "entries": len(self._entries),
                "bytes": self._bytes,
            }

    # -- producer side (the inference thread) -----------------------------------------------

    def wants(self, verdict: str) -> bool:
        return verdict == "NG" or (verdict == "OK" and self.settings.save_ok)

    def submit(
        self,
        frame_bgr: np.ndarray,
        verdict: dict[str, Any],
        *,
        amap: np.ndarray | None = None,
        vmin: float = 0.0,
        vmax: float = 1.0,
        pixel_threshold: float | None = None,
        more: Sequence[Heat] = (),
        tag: str | None = None,
    ) -> str | None:
        """Queue one frame; returns the image path it will have, or None if not archived
        (the writer is behind, or the disk is below the floor: see the module docstring).

        `verdict` is the verdict message (its `reject_image` is filled in here for the
        sidecar); `amap` is the anomaly map at the frame's size for an overlay, None to keep
        the original only. ``more``: further panels after it (a shadow candidate's map beside
        production's); ``tag`` ends the entry's name (``_shadow``). The sidecar's ``panels``
        says how many images the JPEG holds side by side, the original first.
        """
        heats: list[Heat] = []
        if amap is not None:
            score = verdict.get("score")
            label = f"{verdict.get('verdict')} {score:.3f}" if isinstance(score, float) else ""
            threshold = float(pixel_threshold if pixel_threshold is not None else np.inf)
            heats.append(Heat(amap, float(vmin), float(vmax), threshold, label))
        heats.extend(more)
        estimate = self._estimate(frame_bgr, len(heats))
        if not self._reserve(estimate):
            return None
        stem = self._stem(verdict, tag)
        image_path = str(stem.with_suffix(".jpg"))
        sidecar = {**verdict, "reject_image": image_path, "panels": 1 + len(heats)}
        job = _Job(stem, frame_bgr, tuple(heats), sidecar, estimate)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._queued_bytes -= estimate
                self.skipped += 1
                first = self.skipped - self.skipped_low_disk == 1
            if first:
                log.warning("reject archive: writer is behind, frames are not being archived")
            return None
        return image_path

    def _estimate(self, frame: np.ndarray, overlays: int) -> int:
        """Bytes an entry will take: the average of those written (scaled to its panels), or,
        before any, the raw frame once per panel: JPEG is smaller, so this errs on the safe
        side."""
        with self._lock:
            if self._entries:
                return max(1, self._bytes // len(self._entries)) * max(1, overlays)
        return int(frame.nbytes) * (1 + overlays)

    def _reserve(self, estimate: int) -> bool:
        """Whether the floor allows one more entry; reserves its bytes if so. The archive's
        own entries count as room: the writer deletes the oldest to keep the floor."""
        with self._lock:
            room = self._free + self._bytes - self._queued_bytes - self.min_free_bytes
            if room >= estimate:
                self._queued_bytes += estimate
                if self._low_disk:
                    self._low_disk = False
                    log.info("reject archive: enough free disk space again, archiving")
                return True
            self.skipped += 1
            self.skipped_low_disk += 1
            first = not self._low_disk
            self._low_disk = True
            free, problem = self._free, self._free_problem
        if first and problem is not None:
            log.error(
                "reject archive: cannot read the free space of %s (%s): frames are not "
                "archived until it can (their verdicts say reject_image null)",
                self.root,
                problem,
            )
        elif first:
            log.error(
                "reject archive: %s has %.1f MB free, below the floor of %.0f MB "
                "(archive.min_free_mb): frames are not archived until there is room "
                "(their verdicts say reject_image null)",
                self.root,
                free / MB,
                self.min_free_bytes / MB,
            )
        return False

    def _stem(self, verdict: dict[str, Any], tag: str | None = None) -> Path:
        ts_ms = int(verdict.get("timestamp") or time.time() * 1000)
        when = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
        camera = _UNSAFE.sub("_", str(verdict.get("camera", "camera")))
        name = (
            f"{when:%H%M%S}{ts_ms % 1000:03d}_{camera}_{int(verdict.get('sequence', 0)):08d}"
            f"_{verdict.get('verdict', 'NG')}"
        )
        if tag:
            name += "_" + _UNSAFE.sub("_", tag)
        return self.root / f"{when:%Y-%m-%d}" / name

    # -- writer thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=FREE_REFRESH_S)
            except queue.Empty:
                self._refresh_free()  # the spool or others may have freed or filled the disk
                continue
            if job is None:
                return
            try:
                size = self._write(job)
            except OSError as exc:
                self._fail(f"cannot write {job.stem}.jpg: {exc.strerror or exc}")
                continue
            except Exception:  # a rendering bug must not kill the writer thread
                log.exception("reject archive: cannot render %s", job.stem.name)
                with self._lock:
                    self.errors += 1
                continue
            finally:
                with self._lock:
                    self._queued_bytes -= job.estimate
                self._refresh_free()
            with self._lock:
                self.saved += 1
                self._entries.append((job.stem, size))
                self._bytes += size
            if self._failing:
                self._failing = False
                log.info("reject archive: writing again")
            self._enforce_quota(keep=job.stem)

    def _write(self, job: _Job) -> int:
        image = job.frame
        if job.heats:
            overlays = [
                heatmap_overlay(
                    job.frame,
                    h.amap,
                    vmin=h.vmin,
                    vmax=h.vmax,
                    mask=h.amap >= h.pixel_threshold,
                    label=h.label or None,
                )
                for h in job.heats
            ]
            image = side_by_side(job.frame, *overlays)
        ok, encoded = cv2.imencode(
            ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(self.settings.jpeg_quality)]
        )
        if not ok:
            raise OSError("JPEG encoding failed")
        job.stem.parent.mkdir(parents=True, exist_ok=True)
        jpeg = job.stem.with_suffix(".jpg")
        sidecar = job.stem.with_suffix(".json")
        data = json.dumps(job.sidecar, indent=1).encode()
        self._make_room(len(encoded) + len(data))
        atomic_write(jpeg, encoded.tobytes())
        try:
            atomic_write(sidecar, data)
        except OSError:
            jpeg.unlink(missing_ok=True)
            raise
        return len(encoded) + len(data)

    def _fail(self, message: str) -> None:
        with self._lock:
            self.errors += 1
        if not self._failing:
            self._failing = True
            log.error("reject archive: %s (counting further failures silently)", message)

    # -- quota and free-space floor ---------------------------------------------------------

    def _refresh_free(self) -> None:
        problem = None
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            free, problem = 0, exc.strerror or str(exc)  # cannot tell: promise nothing
        with self._lock:
            self._free, self._free_problem = free, problem

    def _make_room(self, need: int) -> None:
        """Delete the oldest entries until writing `need` bytes keeps the floor free;
        _DiskFull if the archive runs out of entries first."""
        while True:
            free = shutil.disk_usage(self.root).free
            if free - need >= self.min_free_bytes:
                return
            if not self._drop_oldest():
                raise _DiskFull(
                    f"{free / MB:.1f} MB free, below the floor of {self.min_free_bytes / MB:.0f} "
                    "MB (archive.min_free_mb) with the archive empty"
                )

    def _drop_oldest(self) -> bool:
        with self._lock:
            if not self._entries:
                return False
            stem, size = self._entries.popleft()
            self._bytes -= size
        self._delete(stem)
        return True

    def _delete(self, stem: Path) -> None:
        for suffix in (".jpg", ".json"):
            try:
                stem.with_suffix(suffix).unlink(missing_ok=True)
            except OSError as exc:
                log.debug("reject archive: cannot delete %s: %s", stem, exc)
        _remove_if_empty(stem.parent)

    def _scan(self) -> None:
        sizes: dict[Path, int] = {}
        if self.root.is_dir():
            for day in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for f in day.iterdir():
                    if f.suffix in (".jpg", ".json") and not f.name.startswith("."):
                        try:
                            sizes[f.with_suffix("")] = sizes.get(f.with_suffix(""), 0) + (
                                f.stat().st_size
                            )
                        except OSError:
                            continue
        # Names start with the capture time and folders with the date: sorted = oldest first.
        self._entries = deque(sorted(sizes.items()))
        self._bytes = sum(sizes.values())

    def _enforce_quota(self, keep: Path | None) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.quota_bytes or not self._entries:
                    return
                stem, size = self._entries[0]
                if stem == keep:
                    return
                self._entries.popleft()
                self._bytes -= size
            self._delete(stem)


def original_of(bgr: np.ndarray, panels: int = 2) -> np.ndarray | None:
    """The original frame of an archived image of ``panels`` side by side (original | 4 px
    gray bar | overlay ..., all one size), or None if ``bgr`` is not laid out like that."""
    if panels <= 1:
        return bgr if panels == 1 else None
    w, odd = divmod(bgr.shape[1] - SEPARATOR_PX * (panels - 1), panels)
    if w < 1 or odd:
        return None
    bar = bgr[:, w : w + SEPARATOR_PX].astype(np.float64)
    if np.abs(bar - SEPARATOR_BGR).mean() > 24.0:  # JPEG blurs the bar's edges, a little
        return None
    return bgr[:, :w]


def _remove_if_empty(folder: Path) -> None:
    # Not empty (the usual case) or already gone: both fine.
    with contextlib.suppress(OSError):
        folder.rmdir()
