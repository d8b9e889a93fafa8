"""Soak the real agent: N minutes on a looping folder with hostile frames mixed in.

    .venv/bin/python scripts/soak.py [--minutes 10] [--bundle BUNDLE] [--data MTD] [--json]

Runs `edge-agent run` as a child process against a real Mosquitto on a free loopback port,
with one folder camera (`loop: true`) holding real MTD tiles (good and defective) and the bad
frames a hostile tester sent: corrupt and truncated files, a decompression bomb (1.1 MB PNG,
20000x20000), header lies (PNG, JPEG, BMP, WebP, TIFF), a 16-bit PNG, an empty file, text, a
1x1 image. The reject archive is on. A subscriber counts every verdict.

Reports, and exits 1 if any check fails:

- no thread died: verdicts kept coming (never a gap over --stall-s), sequence numbers have no
  gaps, the agent is alive at the end, then exits 0 on SIGTERM;
- memory: VmRSS from /proc/PID/status every few seconds; after a warm-up (10% of the run,
  at least 30 s), start vs end, flat when within 5%;
- every frame answered: frames_in from the agent's final log line == verdicts received;
- verdicts are stable: each file gets the same verdict on every pass (ERROR for every bad
  frame, with its reason; OK/NG for the valid ones, the 16-bit PNG included).

Without --bundle a small bundle is fitted first from --data (needs the `train` extra: torch).
Not part of the test suite; a run of 2 minutes takes about 3 on a 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.brokers (real Mosquitto) and the hostile-file builders

from edge_agent.images import read_image  # noqa: E402
from edge_agent.model.bundle import load_bundle  # noqa: E402
from edge_agent.model.scorer import Scorer  # noqa: E402
from tests.brokers import Broker, Subscriber  # noqa: E402
from tests.test_hostile_frames import hostile_files  # noqa: E402

PREFIX = "edge-agent/line1"
SAMPLE_S = 5.0
FLAT = 0.05


def rss_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def fit_bundle(data: Path, out: Path) -> Path:
    """A small bundle as the tests fit one: 60 good tiles, 224x224, 5% coreset."""
    from edge_agent.export.fit import FitOptions, fit

    train = out.parent / "train"
    train.mkdir(parents=True)
    for f in sorted((data / "train" / "good").iterdir())[:60]:
        shutil.copy(f, train / f.name)
    fit(train, out, FitOptions(image_size=(224, 224), coreset=0.05, progress=False))
    return out


def build_folder(folder: Path, data: Path, n_good: int) -> tuple[dict[str, str], list[str]]:
    """MTD test tiles plus the hostile files; returns (bad name -> reason phrase, good names)."""
    folder.mkdir(parents=True)
    reasons = hostile_files(folder)
    valid: list[str] = []
    types = sorted(p for p in (data / "test").iterdir() if p.is_dir())
    per_type = max(1, n_good // len(types))
    for type_dir in types:
        for f in sorted(type_dir.iterdir())[:per_type]:
            name = f"t_{type_dir.name}_{f.name}"
            shutil.copy(f, folder / name)
            valid.append(name)
    tile = cv2.imread(str(folder / valid[0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "v_16bit.png"), tile.astype(np.uint16) * 257)
    valid.append("v_16bit.png")
    cv2.imwrite(str(folder / "h_tiny.png"), tile[:1, :1])
    reasons["h_tiny.png"] = "frame too small"
    return reasons, valid


def thresholds_for(bundle: Path, folder: Path, names: list[str]) -> float:
    """An image threshold between two scores of the valid files: OK and NG verdicts both."""
    scorer = Scorer(load_bundle(bundle), device="cpu", threads=2)
    scores = sorted(scorer.score_frames([read_image(folder / n) for n in names]).image_scores)
    mid = len(scores) // 2
    return float((scores[mid - 1] + scores[mid]) / 2)


def write_config(work: Path, bundle: Path, folder: Path, port: int, image_t: float) -> Path:
    path = work / "agent.yaml"
    path.write_text(
        f"bundle: {bundle}\n"
        "device: cpu\n"
        "threads: 2\n"
        f"thresholds: {{image: {image_t}, pixel: {0.95 * image_t}}}\n"
        "batching: {max_batch: 8, max_wait_ms: 20, queue_size: 16}\n"
        f"cameras:\n  - {{id: soak, source: {folder}, loop: true}}\n"
        "mqtt:\n"
        f"  port: {port}\n"
        f"  spool_dir: {work / 'spool'}\n"
        "  health_interval_s: 2\n"
        f"archive: {{dir: {work / 'archive'}, quota_mb: 20, min_free_mb: 0}}\n"
        "metrics: {port: null}\n"
    )
    return path


def final_counts(log: str) -> dict[str, int]:
    line = next((ln for ln in log.splitlines() if "stopped after" in ln), None)
    if line is None:
        return {}
    frame_part = line.split(" s: ", 1)[1].split(";")[0]
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", frame_part)}


def soak(args: argparse.Namespace, work: Path) -> dict:
    data = args.data
    bundle = args.bundle or fit_bundle(data, work / "bundle")
    folder = work / "frames"
    reasons, valid = build_folder(folder, data, args.good)
    n_files = len([p for p in folder.iterdir() if p.is_file()])
    image_t = thresholds_for(bundle, folder, valid)
    log_path = work / "agent.log"
    result: dict = {"minutes": args.minutes, "files_per_pass": n_files, "checks": {}}
    with Broker(work / "broker") as broker, Subscriber(broker.port, f"{PREFIX}/+/verdict") as sub:
        config = write_config(work, bundle, folder, broker.port, image_t)
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            samples: list[tuple[float, int, int]] = []  # (seconds, rss kB, verdicts)
            longest_gap = 0.0
            try:
                if not sub.wait_for(lambda m: bool(m), timeout_s=120):
                    raise RuntimeError("no verdict within 120 s:\n" + log_path.read_text()[-2000:])
                t0 = time.monotonic()
                last_count, last_change = 0, t0
                while (now := time.monotonic()) - t0 < args.minutes * 60:
                    if proc.poll() is not None:
                        break
                    count = len(sub.messages)
                    if count != last_count:
                        last_count, last_change = count, now
                    longest_gap = max(longest_gap, now - last_change)
                    rss = rss_kb(proc.pid)
                    if rss is not None:
                        samples.append((now - t0, rss, count))
                    time.sleep(min(SAMPLE_S, max(0.1, args.minutes * 60 - (now - t0))))
                alive = proc.poll() is None
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        log = log_path.read_text()
        counts = final_counts(log)
        # The last verdicts are flushed before the agent exits; give the subscriber a moment.
        sub.wait_for(lambda m: len(m) >= counts.get("frames_in", 0), timeout_s=10)
        verdicts = [json.loads(m.payload) for m in sub.messages]

    warm_s = max(30.0, 0.1 * args.minutes * 60)
    warm = [s for s in samples if s[0] >= warm_s] or samples[-1:]
    rss_start, rss_end = warm[0][1], samples[-1][1]
    drift = (rss_end - rss_start) / rss_start
    by_source: dict[str, Counter] = defaultdict(Counter)
    error_reasons: dict[str, str] = {}
    for v in verdicts:
        by_source[v["source"]][v["verdict"]] += 1
        if v["verdict"] == "ERROR":
            error_reasons[v["source"]] = v["error"]
    sequences = [v["sequence"] for v in verdicts]
    bad_ok = sorted(
        n for n in reasons if set(by_source[n]) != {"ERROR"} or reasons[n] not in error_reasons[n]
    )
    unstable = sorted(n for n in valid if len(by_source[n]) != 1 or "ERROR" in by_source[n])
    checks = {
        "agent alive until SIGTERM": alive,
        "exit 0 on SIGTERM": code == 0,
        f"verdicts never paused over {args.stall_s:g} s": longest_gap <= args.stall_s,
        "sequence without gaps": sequences == list(range(len(sequences))),
        "every frame answered (frames_in == verdicts)": counts.get("frames_in") == len(verdicts),
        "every bad frame ERROR with its reason, every pass": not bad_ok,
        "every valid frame OK/NG, the same every pass": not unstable,
        f"RSS flat within {FLAT:.0%} after warm-up": abs(drift) <= FLAT,
        "no traceback in the log": "Traceback" not in log,
    }
    result.update(
        checks=checks,
        ok=all(checks.values()),
        verdicts=len(verdicts),
        passes=round(len(verdicts) / n_files, 1),
        verdicts_per_s=round(len(verdicts) / max(samples[-1][0], 1e-6), 1) if samples else 0,
        frames_in=counts.get("frames_in"),
        final_counts=counts,
        longest_gap_s=round(longest_gap, 1),
        rss_mb={
            "first": round(samples[0][1] / 1024, 1),
            "after_warmup": round(rss_start / 1024, 1),
            "end": round(rss_end / 1024, 1),
            "max": round(max(s[1] for s in samples) / 1024, 1),
            "drift": round(drift, 4),
            "warmup_s": warm_s,
        },
        verdict_mix=dict(Counter(v["verdict"] for v in verdicts)),
        bad_frames_not_error=bad_ok,
        unstable_valid_frames=unstable,
        error_reasons=error_reasons,
        log=str(log_path),
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--bundle", type=Path, help="default: fit a small one from --data")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("EDGE_AGENT_MTD", ROOT.parent / "shared/datasets/mtd")),
        help="MVTec-layout dataset (MTD): test tiles for the folder, train/good for a fit",
    )
    p.add_argument("--good", type=int, default=24, help="valid tiles per pass (about)")
    p.add_argument("--stall-s", type=float, default=15.0)
    p.add_argument("--keep", type=Path, help="work here and keep it (logs, archive)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = soak(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="edge-agent-soak-") as tmp:
            result = soak(args, Path(tmp))
    if args.json:
        print(json.dumps(result))
    else:
        r = result["rss_mb"]
        print(
            f"soak {result['minutes']:g} min: {result['verdicts']} verdicts "
            f"({result['passes']} passes of {result['files_per_pass']} files, "
            f"{result['verdicts_per_s']}/s), frames_in {result['frames_in']}, "
            f"longest pause {result['longest_gap_s']} s"
        )
        print(
            f"RSS MB: first {r['first']}, after {r['warmup_s']:g} s warm-up {r['after_warmup']}, "
            f"end {r['end']}, max {r['max']} (drift {r['drift']:+.2%})"
        )
        print(f"verdicts: {result['verdict_mix']}")
        for name, passed in result["checks"].items():
            print(f"  [{'ok' if passed else 'FAIL'}] {name}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
