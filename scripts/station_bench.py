"""The station's costs, measured on the real agent over a real broker (BENCHMARKS.md, "Station"):

- changeover latency: a recipe/set command sent -> the first verdict decided under the new
  recipe arriving at a subscriber, with 3 recipes of copies of one bundle, `preload: true`
  (every switch) and `preload: false` (the first switch to each recipe loads its bundle);
- memory per loaded recipe: the agent's resident memory with 3 recipes loaded against 1;
- verdicts per second with 2 inspections per frame (two half-frame ROIs, one bundle, so one
  batch) against 1 (the whole frame), in one run, alternated.

    .venv/bin/python scripts/station_bench.py --bundle BUNDLE --data DIR [--json OUT]

The bundle must be calibrated (its thresholds decide). Frames are the images under DIR
(ground-truth masks left out), resized to one size so that the half-frame ROIs fit every one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.images import list_images, read_image
from edge_agent.tools.broker import choose_broker, mqtt_broker

PREFIX = "edge-agent/line1"
SIZE = (256, 256)  # width, height of every frame
RECIPES = ("r1", "r2", "r3")


class Listener:
    """Every verdict and recipe state, with its arrival time (monotonic)."""

    def __init__(self, port: int) -> None:
        self.verdicts: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/+/verdict", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.verdicts.append((time.monotonic(), json.loads(message.payload)))

    def count(self) -> int:
        with self.lock:
            return len(self.verdicts)

    def first_under(self, recipe: str, since: float) -> float | None:
        with self.lock:
            return next(
                (t for t, v in self.verdicts if t >= since and v.get("recipe") == recipe), None
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def frames(data: Path, folder: Path, limit: int) -> Path:
    folder.mkdir()
    paths = [p for p in list_images(data, recursive=True) if "ground_truth" not in p.parts]
    for i, path in enumerate(paths[:limit]):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.resize(read_image(path), SIZE))
    return folder


def write_config(
    path: Path, port: int, source: Path, recipes: str, *, loop: bool, queue: int = 16
) -> Path:
    path.write_text(
        "device: cpu\n"
        f"batching: {{max_batch: 8, max_wait_ms: 0, queue_size: {queue}}}\n"
        f"cameras:\n  - {{id: cam, source: {source}, loop: {str(loop).lower()}}}\n"
        f"recipes:\n{recipes}"
        f"mqtt: {{port: {port}, spool_dir: {path.parent / 'spool'}}}\n"
        "metrics: {port: null}\n"
    )
    shutil.rmtree(path.parent / "spool", ignore_errors=True)  # no remembered recipe
    return path


def start(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"station_bench: timed out waiting for {what}")
        time.sleep(0.01)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def changeover(
    work: Path,
    port: int,
    source: Path,
    bundles: list[Path],
    preload: bool,
    switches: int,
    queue: int,
) -> dict[str, Any]:
    recipes = f"  preload: {str(preload).lower()}\n" + "".join(
        f"  {name}:\n    number: {i + 1}\n"
        f"    inspections: [{{id: whole, camera: cam, bundle: {bundle}}}]\n"
        for i, (name, bundle) in enumerate(zip(RECIPES, bundles, strict=True))
    )
    name = f"changeover-{preload}.yaml"
    config = write_config(work / name, port, source, recipes, loop=True, queue=queue)
    listener = Listener(port)
    proc = start(config)
    try:
        wait(lambda: listener.count() >= 10, 120, "the first verdicts")
        rss = rss_mb(proc.pid)
        cold: list[float] = []
        warm: list[float] = []
        loaded = {RECIPES[0]}
        for k in range(1, switches + 1):
            target = RECIPES[k % len(RECIPES)]
            sent = time.monotonic()
            payload = json.dumps({"number": RECIPES.index(target) + 1})
            listener.client.publish(f"{PREFIX}/recipe/set", payload, qos=1)
            wait(lambda t=target, s=sent: listener.first_under(t, s) is not None, 120, target)
            arrived = listener.first_under(target, sent)
            assert arrived is not None
            (warm if preload or target in loaded else cold).append((arrived - sent) * 1000)
            loaded.add(target)
            time.sleep(0.3)
        return {"preload": preload, "rss_mb": round(rss, 1), "switches_ms": warm, "loads_ms": cold}
    finally:
        stop(proc)
        listener.close()


def throughput(work: Path, port: int, source: Path, bundle: Path, split: bool) -> float:
    w, h = SIZE
    if split:
        inspections = (
            f"      - {{id: left, camera: cam, roi: [0, 0, {w // 2}, {h}], bundle: {bundle}}}\n"
            f"      - {{id: right, camera: cam, roi: [{w // 2}, 0, {w - w // 2}, {h}], "
            f"bundle: {bundle}}}\n"
        )
    else:
        inspections = f"      - {{id: whole, camera: cam, bundle: {bundle}}}\n"
    recipes = f"  one:\n    number: 1\n    inspections:\n{inspections}"
    config = write_config(work / f"throughput-{split}.yaml", port, source, recipes, loop=False)
    listener = Listener(port)
    n = len(list(source.iterdir()))
    try:
        proc = start(config, "--exit-when-done")
        wait(lambda: listener.count() >= n, 600, "every verdict")
        proc.wait(timeout=120)
        with listener.lock:
            times = [t for t, _ in listener.verdicts]
        warm = times[8:]  # the first batch pays ONNX Runtime's first-run allocations
        return (len(warm) - 1) / (warm[-1] - warm[0])
    finally:
        listener.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--frames", type=int, default=200, help="frames for the throughput runs")
    p.add_argument("--switches", type=int, default=20, help="changeovers with preload true")
    p.add_argument("--rounds", type=int, default=2, help="alternated throughput rounds")
    p.add_argument(
        "--queue",
        type=int,
        default=2,
        help="the changeover runs' queue_size: a folder source keeps the queue full, and "
        "frames captured before a command are decided under the old recipe, so a change waits "
        "for them (a live camera's queue is near empty while inference keeps up)",
    )
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="station-bench-") as tmp:
        work = Path(tmp)
        source = frames(args.data, work / "frames", args.frames)
        bundles = []
        for name in RECIPES:  # three recipes, three bundles: loaded (and held) apart
            shutil.copytree(args.bundle, work / name)
            bundles.append(work / name)
        with mqtt_broker(choose_broker("station_bench"), work, quiet=True) as port:
            hot = changeover(work, port, source, bundles, True, args.switches, args.queue)
            cold = [changeover(work, port, source, bundles, False, 4, args.queue) for _ in range(3)]
            rates: dict[str, list[float]] = {"1": [], "2": []}
            for _ in range(args.rounds):
                for split in (False, True):
                    rates["2" if split else "1"].append(
                        throughput(work, port, source, args.bundle, split)
                    )
    switches = np.array(hot["switches_ms"])
    loads = np.array([x for c in cold for x in c["loads_ms"]])
    one_recipe_rss = statistics.median(c["rss_mb"] for c in cold)
    result = {
        "queue_size": args.queue,
        "changeover_preload_ms": {
            "p50": float(np.percentile(switches, 50)),
            "p99": float(np.percentile(switches, 99)),
            "n": len(switches),
        },
        "changeover_first_load_ms": {
            "p50": float(np.percentile(loads, 50)),
            "max": float(loads.max()),
            "n": len(loads),
        },
        "rss_mb_3_recipes": hot["rss_mb"],
        "rss_mb_1_recipe": one_recipe_rss,
        "mb_per_loaded_recipe": round((hot["rss_mb"] - one_recipe_rss) / 2, 1),
        "verdicts_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "inspections_per_s_2_over_1": round(
            2 * statistics.median(rates["2"]) / statistics.median(rates["1"]), 2
        ),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
