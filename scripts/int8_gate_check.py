"""Does the int8 gate (quantize.MAX_DEVIATION, feature RMS) refuse graphs that score worse?
(issue 34)

Builds a set whose int8 features deviate past the gate (tests/test_quantize.py's faint
surface: grey 128 with one grey level of per-pixel noise, 128x128) with faint spots painted
on the defective test images (discs of 4-8 px radius, --depth grey levels off, 3 unless
set), fits it with the
gate lifted as int8 and as float32, and evaluates both: if int8 scores as well, the gate costs
only speed where it falls back; if worse, it is what keeps auto safe.

    .venv/bin/python scripts/int8_gate_check.py /tmp/gate [--backbone B] [--depth GREY]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

SIDE = 128
N_TRAIN, N_GOOD, N_DEFECT = 60, 30, 30
NOISE = 1.0  # grey levels
SPOT_RADIUS = (4, 8)  # px
SPOT_DEPTH = 3.0  # grey levels


def surface(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(128, NOISE, (SIDE, SIDE))


def build(out: Path, depth: float = SPOT_DEPTH, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    for rel in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (out / rel).mkdir(parents=True)

    def save(path: Path, grey: np.ndarray) -> None:
        cv2.imwrite(str(path), np.clip(grey, 0, 255).round().astype(np.uint8))

    for i in range(N_TRAIN):
        save(out / "train/good" / f"{i:03d}.png", surface(rng))
    for i in range(N_GOOD):
        save(out / "test/good" / f"{i:03d}.png", surface(rng))
    for i in range(N_DEFECT):
        mask = np.zeros((SIDE, SIDE), np.uint8)
        r = int(rng.integers(*SPOT_RADIUS, endpoint=True))
        cy, cx = (int(v) for v in rng.integers(16, SIDE - 16, 2))
        cv2.circle(mask, (cx, cy), r, 255, -1)
        sign = 1 if rng.random() < 0.5 else -1
        save(out / "test/spot" / f"{i:03d}.png", surface(rng) + sign * depth * (mask > 0))
        cv2.imwrite(str(out / "ground_truth/spot" / f"{i:03d}_mask.png"), mask)


def main(argv: list[str] | None = None) -> int:
    from edge_agent.export import fit as fit_module
    from edge_agent.tools.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="work folder (replaced)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--depth", type=float, default=SPOT_DEPTH, help="spots' grey levels")
    args = p.parse_args(argv)
    build(args.out / "data", args.depth)
    fit_module.MAX_DEVIATION = math.inf  # measure int8 where the gate would refuse it
    for precision in ("float32", "int8"):
        bundle = args.out / precision
        opts = fit_module.FitOptions(
            backbone=args.backbone, image_size=(SIDE, SIDE), precision=precision, progress=False
        )
        manifest = fit_module.fit(args.out / "data", bundle, opts, force=True)
        result, _ = evaluate(bundle, args.out / "data")
        row = {
            "backbone": args.backbone,
            "precision": precision,
            "int8_deviation": manifest["features"].get("int8_deviation"),
            **{k: round(result[k], 4) for k in ("image_auroc", "pixel_auroc", "pro")},
            "recall_at_frr": result["recall_at_frr"],
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
