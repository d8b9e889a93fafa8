"""Coreset selection: our exact fast greedy vs the reference's plain loop, on MTD features.

    .venv/bin/python scripts/coreset_bench.py ../shared/datasets/mtd [--image-size 224]

1. extracts the training patch features (default embedding) and their 128-d projection;
2. times `approximate_greedy_coreset` on all of them at 1%;
3. times the plain loop (`reference_greedy_coreset`) for its first selections and extrapolates
   linearly (every selection is one full pass, so its cost per selection is constant);
4. on every 6th patch, runs both to the end and reports both covering radii (max distance of any
   patch to its nearest bank row) and whether the selections are identical.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import numpy as np

from edge_agent.export.backbones import load_trunk
from edge_agent.export.coreset import (
    approximate_greedy_coreset,
    covering_radius,
    reference_greedy_coreset,
)
from edge_agent.export.extractor import PatchFeatureExtractor
from edge_agent.export.fit import CORESET_PROJ_DIM, FeatureStream, coreset_space
from edge_agent.export.onnx_export import export_onnx
from edge_agent.images import list_images, read_image, resize
from edge_agent.tools.dataset import train_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--ref-selections", type=int, default=300)
    args = p.parse_args()
    size = (args.image_size, args.image_size)
    frames = [resize(read_image(f), size) for f in list_images(train_folder(args.data))]
    ex = PatchFeatureExtractor(load_trunk("efficientnet_lite0"), ["blocks.2", "blocks.4"]).eval()
    model = Path("/tmp/coreset_bench.onnx")
    export_onnx(ex, model, *size)
    stream = FeatureStream(model, frames, 16, "cpu", None)
    x = coreset_space(stream, CORESET_PROJ_DIM, 0, False)
    n = math.ceil(args.fraction * len(x))
    out: dict[str, object] = {"patches": len(x), "selected": n, "dim": x.shape[1]}

    t = time.perf_counter()
    fast = approximate_greedy_coreset(x, n, proj_dim=None)
    out["fast_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ref_head = reference_greedy_coreset(x, args.ref_selections, proj_dim=None)
    per = (time.perf_counter() - t) / args.ref_selections
    out["reference_s_extrapolated"] = per * n
    out["speedup"] = out["reference_s_extrapolated"] / out["fast_s"]
    out["first_selections_identical"] = bool((fast[: len(ref_head)] == ref_head).all())
    out["covering_radius_fast"] = covering_radius(x, x[fast])

    sub = np.ascontiguousarray(x[::6])
    m = math.ceil(args.fraction * len(sub))
    t = time.perf_counter()
    a = approximate_greedy_coreset(sub, m, proj_dim=None)
    out["subsample_fast_s"] = time.perf_counter() - t
    t = time.perf_counter()
    b = reference_greedy_coreset(sub, m, proj_dim=None)
    out["subsample_reference_s"] = time.perf_counter() - t
    out["subsample_identical"] = bool((a == b).all())
    out["subsample_covering_radius_fast"] = covering_radius(sub, sub[a])
    out["subsample_covering_radius_reference"] = covering_radius(sub, sub[b])
    rng = np.random.default_rng(0)
    out["subsample_covering_radius_random"] = covering_radius(
        sub, sub[rng.choice(len(sub), m, replace=False)]
    )
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
