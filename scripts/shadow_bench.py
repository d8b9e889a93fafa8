#!/usr/bin/env python3
"""Production verdicts/s with and without a shadow candidate, side by side in one agent run.

    .venv/bin/python scripts/shadow_bench.py --bundle B [--candidate C] --data DIR
        [--phase-s 20] [--rounds 3] [--max-share 0.25] [--json OUT]

One real `edge-agent run` on a Mosquitto broker (a free loopback port), a folder camera over
--data, looped with back-pressure (the agent runs flat out: verdicts/s is its throughput).
Phases alternate within that one process: without a shadow, then with --candidate (default: a
copy of --bundle, the same cost as production) shadowing at --max-share, stopped, and so on,
--rounds times. Each phase's production verdicts/s is counted from the verdicts' arrival over
its last (phase - settle) seconds, so the change of state settles first. Alternating in one
run cancels the drift of a shared machine's load as far as it can be cancelled; report the
ratio, not the absolute figures, when the machine is loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.tools import broker as brokers  # noqa: E402

PREFIX, LINE, CAMERA = "edge-agent", "bench", "cam1"
SETTLE_S = 3.0


class Line:
    """Counts verdict arrivals and keeps the latest shadow report; sends lifecycle commands."""

    def __init__(self, port: int) -> None:
        self.arrivals: list[float] = []
        self.shadow: dict[str, Any] | None = None
        self.outcomes: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="shadow-bench")
        topics = [
            (f"{PREFIX}/{LINE}/{CAMERA}/verdict", 1),
            (f"{PREFIX}/{LINE}/shadow", 1),
            (f"{PREFIX}/{LINE}/lifecycle", 1),
        ]
        self.client.on_connect = lambda c, *_: c.subscribe(topics)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        with self.lock:
            if m.topic.endswith("/verdict"):
                self.arrivals.append(now)
            elif m.topic.endswith("/shadow"):
                self.shadow = json.loads(m.payload)
            else:
                self.outcomes.append(json.loads(m.payload))

    def rate(self, start: float, end: float) -> float:
        with self.lock:
            n = sum(1 for t in self.arrivals if start <= t < end)
        return n / (end - start)

    def command(self, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        body = {**body, "who": "shadow-bench", "request_id": request_id}
        self.client.publish(f"{PREFIX}/{LINE}/lifecycle/set", json.dumps(body), qos=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                done = [
                    o
                    for o in self.outcomes
                    if o.get("request_id") == request_id and o["result"] != "accepted"
                ]
            if done:
                if done[0]["result"] != "ok":
                    raise SystemExit(f"{body['action']}: {done[0]['result']}: {done[0]['reason']}")
                return done[0]
            time.sleep(0.05)
        raise SystemExit(f"{body['action']}: no answer from the agent")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="production bundle (calibrated)")
    p.add_argument("--candidate", type=Path, help="the shadow candidate (default: --bundle)")
    p.add_argument("--data", type=Path, required=True, help="folder of images, looped")
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-share", type=float, default=0.25)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    candidate = args.candidate
    if candidate is None:  # its own folder: the shadow must not share production's Scorer
        candidate = work / "candidate"
        shutil.copytree(args.bundle, candidate, ignore=shutil.ignore_patterns(".*"))
    broker = brokers.choose_broker("shadow_bench")
    phases: list[dict[str, Any]] = []
    with brokers.mqtt_broker(broker, work) as port:
        config = work / "agent.yaml"
        shadow = {"enabled": True, "max_share": args.max_share, "report_interval_s": 1.0}
        config.write_text(
            f"bundle: {args.bundle.resolve()}\n"
            f"device: {args.device}\n"
            f"batching: {{max_batch: {args.max_batch}, max_wait_ms: 0, queue_size: 16}}\n"
            f"cameras:\n  - {{id: {CAMERA}, source: {args.data.resolve()}, loop: true}}\n"
            f"mqtt: {{port: {port}, prefix: {PREFIX}, line: {LINE}, spool_dir: {work / 's'}}}\n"
            "metrics: {port: null}\n"
            f"shadow: {json.dumps(shadow)}\n"
        )
        line = Line(port)
        log = (work / "agent.log").open("w")
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while len(line.arrivals) < 4 * args.max_batch:  # loaded and warm
                if agent.poll() is not None:
                    raise SystemExit(f"the agent exited: see {work / 'agent.log'}")
                time.sleep(0.2)
            for _ in range(args.rounds):
                for with_shadow in (False, True):
                    if with_shadow:
                        line.command(
                            {
                                "action": "shadow_start",
                                "inspection": CAMERA,
                                "bundle": str(candidate.resolve()),
                            }
                        )
                    start = time.monotonic() + SETTLE_S
                    time.sleep(args.phase_s)
                    end = time.monotonic()
                    phase = {"shadow": with_shadow, "verdicts_per_s": line.rate(start, end)}
                    if with_shadow:
                        time.sleep(1.2)  # one more report
                        report = (line.shadow or {}).get("shadows", [{}])[0]
                        phase["compared"] = report.get("frames")
                        phase["skipped"] = report.get("skipped")
                        line.command({"action": "shadow_stop", "inspection": CAMERA})
                    phases.append(phase)
                    print(json.dumps(phase), flush=True)
        finally:
            agent.terminate()
            agent.wait(60)
            line.client.loop_stop()
    off = [p["verdicts_per_s"] for p in phases if not p["shadow"]]
    on = [p["verdicts_per_s"] for p in phases if p["shadow"]]
    taken = [p["compared"] / (p["compared"] + p["skipped"]) for p in phases if p["shadow"]]
    summary = {
        "without_shadow": statistics.median(off),
        "with_shadow": statistics.median(on),
        "ratio": statistics.median(on) / statistics.median(off),
        "share_of_frames_compared": statistics.median(taken),
        "max_share": args.max_share,
        "phases": phases,
    }
    print(
        f"production verdicts/s: {summary['without_shadow']:.1f} without a shadow, "
        f"{summary['with_shadow']:.1f} with one at max_share {args.max_share} "
        f"(ratio {summary['ratio']:.3f}; the candidate compared "
        f"{summary['share_of_frames_compared']:.0%} of the frames)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
