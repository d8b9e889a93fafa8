"""Real video files and network streams for capture tests, made from MTD tiles.

- `write_video`: an MJPEG .avi (cv2.VideoWriter) or H.264 .mp4 (ffmpeg, libx264) of MTD tiles,
  with a JSON sidecar saying which tile (good or which defect) each frame is.
- `MjpegHttpServer`: ffmpeg serving the video as an HTTP multipart-JPEG stream on a loopback
  port, the way IP cameras serve ``/video.mjpg``::

      ffmpeg -re -stream_loop -1 -i VIDEO -an -c:v mjpeg -q:v 3 \
             -f mpjpeg -listen 1 http://127.0.0.1:PORT/stream

  ``-listen 1`` makes ffmpeg a one-client HTTP server; `stop()` kills it (the stream drops),
  `start()` again serves on the same port.
- `RtspServer`: Debian's ``rtsp-server-perl`` (a small RTSP relay) with ffmpeg publishing
  H.264 into it::

      rtsp-server-perl --clientport CPORT --serverport SPORT
      ffmpeg -re -stream_loop -1 -i VIDEO -an -c:v libx264 -preset ultrafast -tune zerolatency \
             -g 10 -f rtsp rtsp://127.0.0.1:SPORT/cam

  Clients read ``rtsp://127.0.0.1:CPORT/cam``; `stop()` kills both and `start()` brings them
  back on the same ports. That server only does RTP over UDP, while
  OpenCV asks for TCP by default, so the reader needs
  ``OPENCV_FFMPEG_CAPTURE_OPTIONS=rtsp_transport;udp`` (see `RTSP_UDP_ENV`).

Every process is started by the helper and killed by it (use them as context managers).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .conftest import MTD

FFMPEG = shutil.which("ffmpeg")
RTSP_SERVER = shutil.which("rtsp-server-perl")
RTSP_UDP_ENV = ("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;udp")


@dataclass(frozen=True)
class VideoFrameInfo:
    """What frame `index` of a test video shows."""

    index: int
    source: str  # the MTD file name
    label: str  # "good" or the defect type


def mtd_tiles(
    n_good: int, n_defect: int, mtd: Path = MTD, *, min_diff: float = 6.0
) -> list[tuple[Path, str]]:
    """`n_good` good test tiles, then `n_defect` defect tiles taken in turn from each type.

    MTD holds near-duplicate consecutive shots; a tile whose mean absolute difference (at
    64x64, 0-255) to one already picked is below `min_diff` is skipped, so every frame of a
    video made from them can be told apart from the others even after lossy coding.
    """
    defects = sorted(p.name for p in (mtd / "test").iterdir() if p.name != "good")
    queues = {d: sorted((mtd / "test" / d).iterdir()) for d in ["good", *defects]}
    picked: list[tuple[Path, str]] = []
    thumbs: list[np.ndarray] = []

    def take(label: str) -> bool:
        while queues[label]:
            path = queues[label].pop(0)
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            thumb = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
            if all(np.abs(thumb - t).mean() >= min_diff for t in thumbs):
                picked.append((path, label))
                thumbs.append(thumb)
                return True
        return False

    for _ in range(n_good):
        if not take("good"):
            raise ValueError(f"{mtd}: fewer than {n_good} distinct good tiles")
    i = 0
    while len(picked) < n_good + n_defect:
        if not any(queues[d] for d in defects):
            raise ValueError(f"{mtd}: fewer than {n_defect} distinct defect tiles")
        take(defects[i % len(defects)])
        i += 1
    return picked


def tile_frames(tiles: list[tuple[Path, str]], size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """The tiles as uint8 BGR frames [N, H, W, 3] at `size` (height, width)."""
    h, w = size
    frames = [
        cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (w, h), interpolation=cv2.INTER_AREA)
        for p, _ in tiles
    ]
    return np.stack(frames)


def write_video(
    path: Path,
    tiles: list[tuple[Path, str]],
    *,
    codec: str = "mjpeg",
    fps: int = 10,
    size: tuple[int, int] = (224, 224),
) -> list[VideoFrameInfo]:
    """Write the tiles as a video, one frame each; returns (and writes as JSON) the frame list.

    codec "mjpeg" -> .avi via cv2.VideoWriter (every frame a keyframe); "h264" -> .mp4 via
    ffmpeg/libx264 (a keyframe every second, so decoders must handle P-frames).
    """
    frames = tile_frames(tiles, size)
    h, w = size
    if codec == "mjpeg":
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"cv2.VideoWriter cannot write {path}")
        for frame in frames:
            writer.write(frame)
        writer.release()
    elif codec == "h264":
        if FFMPEG is None:
            raise RuntimeError("ffmpeg not found")
        cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo"]
        cmd += ["-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-"]
        cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
        cmd += ["-g", str(fps), str(path)]
        subprocess.run(cmd, input=frames.tobytes(), check=True, timeout=60)
    else:
        raise ValueError(f"codec must be mjpeg or h264, got {codec!r}")
    infos = [VideoFrameInfo(i, p.name, label) for i, (p, label) in enumerate(tiles)]
    path.with_suffix(".json").write_text(json.dumps([asdict(x) for x in infos], indent=1))
    return infos


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (TCP), read from /proc so that no probe
    connection takes the one client slot of an ``-listen 1`` ffmpeg."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}  # 127.0.0.1 or 0.0.0.0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] in wanted and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s} s")
        time.sleep(0.05)


class _Process:
    """One child process, killed for sure on stop."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class MjpegHttpServer:
    """ffmpeg serving `video` as HTTP multipart JPEG at `url`, one client at a time."""

    def __init__(self, video: Path, port: int | None = None, log_dir: Path | None = None) -> None:
        if FFMPEG is None:
            raise RuntimeError("ffmpeg not found")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/stream"
        cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin"]
        cmd += ["-re", "-stream_loop", "-1", "-i", str(video), "-an"]
        cmd += ["-c:v", "mjpeg", "-q:v", "3", "-f", "mpjpeg", "-listen", "1", self.url]
        self._proc = _Process(cmd, (log_dir or video.parent) / f"ffmpeg-http-{self.port}.log")

    def start(self, timeout_s: float = 10.0, *, wait: bool = True) -> MjpegHttpServer:
        """Start serving and (with `wait`) wait until the port listens.

        Don't wait when a client is already retrying: ffmpeg serves one client and stops
        listening as soon as it connects, which can be before the LISTEN state is seen."""
        self._proc.start()
        if wait:
            _wait(lambda: is_listening(self.port), timeout_s, f"ffmpeg on port {self.port}")
        return self

    def stop(self) -> None:
        """Kill ffmpeg: a client sees the connection close (the camera went away)."""
        self._proc.stop()

    def pause(self) -> None:
        """SIGSTOP ffmpeg: the connection stays open but no bytes come (a hung camera)."""
        self._proc.pause()

    def resume(self) -> None:
        self._proc.resume()

    def __enter__(self) -> MjpegHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._proc.alive():
            self.resume()
        self.stop()


class RtspServer:
    """rtsp-server-perl relaying an H.264 stream that ffmpeg publishes from `video`."""

    def __init__(self, video: Path, log_dir: Path | None = None) -> None:
        if FFMPEG is None or RTSP_SERVER is None:
            raise RuntimeError("needs ffmpeg and rtsp-server-perl")
        self.client_port = free_port()
        self.source_port = free_port()
        self.url = f"rtsp://127.0.0.1:{self.client_port}/cam"
        logs = log_dir or video.parent
        server = [RTSP_SERVER, "--clientport", str(self.client_port)]
        server += ["--serverport", str(self.source_port), "--loglevel", "1"]
        self._server = _Process(server, logs / f"rtsp-server-{self.client_port}.log")
        pub = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin"]
        pub += ["-re", "-stream_loop", "-1", "-i", str(video), "-an"]
        pub += ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "10"]
        pub += ["-f", "rtsp", f"rtsp://127.0.0.1:{self.source_port}/cam"]
        self._publisher = _Process(pub, logs / f"rtsp-publisher-{self.client_port}.log")

    def start(self, timeout_s: float = 15.0) -> RtspServer:
        """Start the relay and the publisher (again, on the same ports, after `stop`)."""
        self._server.start()
        _wait(
            lambda: is_listening(self.client_port) and is_listening(self.source_port),
            timeout_s,
            "rtsp-server-perl",
        )
        self._publisher.start()
        return self

    def stop(self) -> None:
        """Kill publisher and relay: the camera went away. (Killing only the publisher is not
        enough to simulate a drop: the relay keeps the stale mount and refuses a new
        publisher with 403.)"""
        self._publisher.stop()
        self._server.stop()

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
