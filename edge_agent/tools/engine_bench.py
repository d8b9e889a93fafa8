"""The engine's timing, shared by `bench` (edge_agent/tools/bench.py) and `bench --agent`
(edge_agent/tools/agent_bench.py): which images, and each stage of the run-time path timed on
the same code the agent runs (bench.py's docstring says what each stage and the latency are).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.decide.decision import NG, decide, resolve_thresholds, verdict_for
from edge_agent.errors import UserError
from edge_agent.images import decode_image, list_images
from edge_agent.model import scoring
from edge_agent.model.scorer import Scorer

STAGES = ("decode", "prepare", "onnx", "knn", "score", "map", "regions")


def image_paths(data: Path, limit: int | None) -> list[Path]:
    """The images bench uses, in order: every image under `data` (masks of an MVTec dataset
    root left out), at most `limit`; a UserError when there are none."""
    paths = list_images(data, recursive=True)
    # Skip ground-truth masks when pointed at an MVTec dataset root.
    paths = [p for p in paths if "ground_truth" not in p.parts][:limit]
    if not paths:
        raise UserError(f"{data}: no images to benchmark (besides ground-truth masks)")
    return paths


def load_files(data: Path, limit: int | None) -> list[bytes]:
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
