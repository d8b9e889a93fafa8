"""Capture throughput and host CPU per frame: a GenICam camera (Aravis' simulated GigE Vision
camera on loopback) against the OpenCV folder source, through the agent's own capture path
(CameraCapture -> FrameQueue, drained by a consumer that only counts).

    .venv/bin/python scripts/genicam_bench.py [--seconds 5] [--rate 1000] [--sizes 640x480,...]

For each size: the simulated camera in free run at `--rate` frames/s asked (Mono8; what it
took is printed), then a folder of PNG frames of the same size read in a loop (decoding is
the folder source's cost per frame). CPU is the agent process's user+system time over the
window (the simulator is another process and is not counted), per frame delivered; the
simulator's frames lost on the way are counted. The simulator generates frames on the same
cores: on a small machine the camera side is limited by it, not by the capture.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.capture.cameras import CameraCapture, CameraSettings  # noqa: E402
from edge_agent.capture.frame_queue import FrameQueue  # noqa: E402
from edge_agent.capture.genicam import GenicamSettings, list_devices  # noqa: E402

FAKE = shutil.which("arv-fake-gv-camera-0.8") or "/usr/bin/arv-fake-gv-camera-0.8"
SERIAL = "BENCH"
DEVICE = f"Aravis-Fake-{SERIAL}"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def measure(settings: CameraSettings, seconds: float, warmup_s: float = 1.0) -> dict:
    """Frames/s and CPU ms per frame over `seconds`, after `warmup_s` of running."""
    queue = FrameQueue(64)
    capture = CameraCapture(settings, queue)
    counted = [0]
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            counted[0] += len(queue.get_batch(64, 0.0, timeout_s=0.1))

    consumer = threading.Thread(target=drain, daemon=True)
    capture.start()
    consumer.start()
    deadline = time.monotonic() + 30
    while capture.stats["frames_in"] == 0:
        if time.monotonic() > deadline or capture.failed:
            capture.stop()
            raise SystemExit(f"no frames: {capture.stats['last_error']}")
        time.sleep(0.05)
    time.sleep(warmup_s)
    frames0, cpu0, t0 = counted[0], _cpu(), time.monotonic()
    stats0 = capture.stats.get("genicam", {}).get("lost_frames", {})
    time.sleep(seconds)
    frames1, cpu1, t1 = counted[0], _cpu(), time.monotonic()
    stats = capture.stats
    capture.stop()
    stop.set()
    consumer.join(2)
    n = frames1 - frames0
    out = {
        "frames": n,
        "fps": round(n / (t1 - t0), 1),
        "cpu_ms_per_frame": round(1000 * (cpu1 - cpu0) / n, 3) if n else None,
        "cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
    }
    if "genicam" in stats:
        lost = stats["genicam"]["lost_frames"]
        out["lost"] = sum(lost.values()) - sum(stats0.values())
        out["took"] = stats["genicam"]["settings"]
    return out


def fake_camera() -> subprocess.Popen:
    proc = subprocess.Popen(
        [FAKE, "-i", "127.0.0.1", "-s", SERIAL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while DEVICE not in [d["id"] for d in list_devices()]:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the simulated camera did not come up (port 3956 taken?)")
        time.sleep(0.2)
    return proc


def folder_of(width: int, height: int, n: int, where: Path) -> Path:
    """PNG frames like the simulator's (a gradient that moves), for the folder source."""
    folder = where / f"{width}x{height}"
    folder.mkdir()
    ramp = (np.arange(width, dtype=np.uint32)[None, :] + np.arange(height)[:, None]) % 256
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:04d}.png"), ((ramp + i) % 256).astype(np.uint8))
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=1000.0, help="frames/s asked of the camera")
    p.add_argument("--sizes", default="640x480,1920x1200")
    p.add_argument("--json", action="store_true", help="one JSON line per result")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results = []
    proc = fake_camera()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for width, height in sizes:
                g = GenicamSettings(
                    pixel_format="Mono8", roi=(0, 0, width, height), frame_rate=args.rate
                )
                cam = CameraSettings("bench", f"genicam:{DEVICE}", genicam=g)
                results.append(
                    {"source": "genicam", "size": f"{width}x{height}"} | measure(cam, args.seconds)
                )
                folder = folder_of(width, height, 32, Path(tmp))
                files = CameraSettings("bench", str(folder), kind="folder", loop=True)
                results.append(
                    {"source": "folder (PNG)", "size": f"{width}x{height}"}
                    | measure(files, args.seconds)
                )
    finally:
        proc.kill()
        proc.wait(10)
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            extra = f", lost {r['lost']}" if "lost" in r else ""
            print(
                f"{r['source']:>13} {r['size']:>9}: {r['fps']:8.1f} frames/s, "
                f"{r['cpu_ms_per_frame']} ms CPU/frame ({r['cpu_cores']} cores){extra}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
