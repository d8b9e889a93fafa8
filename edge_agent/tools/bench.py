"""`edge-agent bench`: where the time goes, per stage, and end-to-end throughput and latency.

Stages are those of the run-time path, timed on the same code the agent runs: decode (file
bytes -> BGR), prepare (resize to the input size), onnx (ONNX Runtime), knn (FAISS), score
(image score, Eq. 7 when enabled), map (upsample + Gaussian, with ivf-exact's re-checks), regions
(threshold + connected components). With a calibrated bundle the last two do what the agent does:
only NG frames get a map, exact where the pixel threshold decides (Scorer.exact_map), and
regions at the frame's size (decide); an uncalibrated bundle maps every frame.

A frame's latency is measured from the start of its batch (when the first frame
of the batch is read) to the end of its own regions stage, so larger batches trade latency for
throughput exactly as they do in the agent.

`bench --agent` measures the product instead: the real agent, fed by a camera, publishing over
a real MQTT broker to a subscriber (edge_agent/tools/agent_bench.py), next to this engine
figure at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.cli import add_scorer_options
from edge_agent.decide.decision import NG, decide, resolve_thresholds, verdict_for
from edge_agent.errors import UserError
from edge_agent.images import decode_image, list_images
from edge_agent.model import scoring
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer

STAGES = ("decode", "prepare", "onnx", "knn", "score", "map", "regions")


DEFAULT_BATCHES = (1, 8, 32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    p.add_argument("--data", type=Path, required=True, help="image folder (searched recursively)")
    p.add_argument(
        "--batch", type=int, nargs="+",
        help=f"batch sizes (default: {' '.join(map(str, DEFAULT_BATCHES))}; not with --agent)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument(
        "--warmup", type=int, default=2,
        help="batches run before timing (--agent: the first WARMUP x max-batch verdicts are "
        "left out of its figures)",
    )  # fmt: skip
    add_scorer_options(p, batch_size=False)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    from edge_agent.tools.agent_bench import add_agent_arguments

    add_agent_arguments(p.add_argument_group("the agent end to end (--agent)"))


def image_paths(data: Path, limit: int | None) -> list[Path]:
    """The images bench uses, in order: every image under `data` (masks of an MVTec dataset
    root left out), at most `limit`; a UserError when there are none."""
    paths = list_images(data, recursive=True)
    # Skip ground-truth masks when pointed at an MVTec dataset root.
    paths = [p for p in paths if "ground_truth" not in p.parts][:limit]
    if not paths:
        raise UserError(f"{data}: no images to benchmark (besides ground-truth masks)")
    return paths


def _load_files(data: Path, limit: int | None) -> list[bytes]:
    return [p.read_bytes() for p in image_paths(data, limit)]


def bench_batch(
    scorer: Scorer,
    files: list[bytes],
    batch: int,
    warmup: int,
    image_scores: list[float] | None = None,
) -> dict[str, Any]:
    """Time `files` in batches of `batch` (see the module docstring); with `image_scores`, the
    image score of every timed file is appended to it, in order."""
    thresholds = resolve_thresholds(scorer.bundle.thresholds, None, None)
    stage_s = dict.fromkeys(STAGES, 0.0)
    latencies: list[float] = []
    n_timed = 0
    batches = [files[i : i + batch] for i in range(0, len(files), batch)]
    # Warm-up batches (first ORT runs allocate and tune) are excluded from every figure.
    schedule = [(b, False) for b in batches[:warmup]] + [(b, True) for b in batches]
    wall_started = None
    for chunk, timed in schedule:
        if timed and wall_started is None:
            wall_started = time.perf_counter()
        batch_s: dict[str, float] = {}
        started = time.perf_counter()
        frames = [decode_image(data) for data in chunk]
        t_decoded = time.perf_counter()
        stacked = np.stack([scorer.prepare(f) for f in frames])
        batch_s["decode"] = t_decoded - started
        batch_s["prepare"] = time.perf_counter() - t_decoded
        scores = scorer.score(stacked, batch_s)
        if timed and image_scores is not None:
            image_scores.extend(map(float, scores.image_scores))
        done = []
        for i, g in enumerate(scores.patch_scores):
            t0 = time.perf_counter()
            if thresholds is None:  # uncalibrated: every map (of bounds), regions at its max
                amap = scorer.anomaly_map(g)
                t1 = time.perf_counter()
                scoring.find_regions(amap, float(amap.max()))
            else:  # what the agent does (service._answer): maps and regions of NG frames only
                score = float(scores.image_scores[i])
                ng = verdict_for(score, thresholds) == NG
                amap = scorer.exact_map(scores, i, threshold=thresholds.pixel) if ng else None
                t1 = time.perf_counter()
                decide(score, amap, frames[i].shape[:2], thresholds)
            t2 = time.perf_counter()
            batch_s["map"] = batch_s.get("map", 0.0) + t1 - t0
            batch_s["regions"] = batch_s.get("regions", 0.0) + t2 - t1
            done.append(t2)
        if not timed:
            continue
        for stage, seconds in batch_s.items():
            stage_s[stage] += seconds
        latencies.extend(end - started for end in done)
        n_timed += len(chunk)
    wall = time.perf_counter() - (wall_started or time.perf_counter())
    lat_ms = np.array(latencies) * 1000
    return {
        "batch": batch,
        "images": n_timed,
        "images_per_second": n_timed / wall,
        "latency_ms": {
            "p50": float(np.percentile(lat_ms, 50)),
            "p99": float(np.percentile(lat_ms, 99)),
        },
        "stages": {s: 1000 * v / n_timed for s, v in stage_s.items()},  # ms per image
    }


def run(args: argparse.Namespace) -> int:
    if args.agent:
        from edge_agent.tools.agent_bench import run_agent_bench

        return run_agent_bench(args)
    from edge_agent.tools.agent_bench import refuse_agent_options

    refuse_agent_options(args)
    args.batch = args.batch or list(DEFAULT_BATCHES)
    if min(args.batch) < 1:
        raise UserError("--batch sizes must be at least 1")
    bundle = load_bundle(args.bundle)
    files = _load_files(args.data, args.limit)
    scorer = Scorer(
        bundle, device=args.device, threads=args.threads, index=args.index, ivf_nprobe=args.nprobe
    )
    results = [bench_batch(scorer, files, b, args.warmup) for b in args.batch]
    print(f"{len(files)} images, {scorer.device}, D={bundle.dim}, M={len(bundle.bank)}")
    header = f"{'batch':>5} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7}  " + " ".join(
        f"{s:>7}" for s in STAGES
    )
    print(header + "   (stages: ms per image)")
    for r in results:
        stages = " ".join(f"{r['stages'][s]:7.2f}" for s in STAGES)
        print(
            f"{r['batch']:>5} {r['images_per_second']:7.1f} {r['latency_ms']['p50']:7.1f} "
            f"{r['latency_ms']['p99']:7.1f}  {stages}"
        )
    if args.json:
        best = max(results, key=lambda r: r["images_per_second"])
        print(
            json.dumps(
                {
                    "images_per_second": best["images_per_second"],
                    "latency_ms": best["latency_ms"],
                    "stages": best["stages"],
                    "batch": best["batch"],
                    "by_batch": results,
                    "device": scorer.device,
                    "dim": bundle.dim,
                    "bank_size": len(bundle.bank),
                }
            )
        )
    return 0
