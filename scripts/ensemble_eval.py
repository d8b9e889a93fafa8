"""Measure a score ensemble of bundles on an MVTec-layout dataset (issue 13's multi-resolution
lever), before any of it goes into the product.

    python scripts/ensemble_eval.py --data ../shared/datasets/mtd B288 B224 [B352 ...]

Each member scores every test image (exact maps); its image scores and maps are normalised by
its own good test images' scores, z = (s - mean_good) / std_good (optimistic, as evaluate's
recall at a false-reject rate: set on the test set's good images), maps resized to the first
member's input size, and combined by mean and by max. Prints each member and both
combinations as evaluate's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.tools.dataset import GOOD, test_samples
from edge_agent.tools.evaluate import Scored, compute_metrics, score_dataset


def _normalised(scored: Scored, good: np.ndarray, size: tuple[int, int]) -> Scored:
    mean, std = float(scored.scores[good].mean()), float(scored.scores[good].std()) or 1.0
    h, w = size
    maps = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in scored.maps])
    masks = np.stack(
        [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
         for m in scored.masks]
    )  # fmt: skip
    return Scored(scored.samples, [], (scored.scores - mean) / std, (maps - mean) / std, masks, 0.0)


def _row(name: str, metrics: dict) -> dict:
    r = metrics["recall_at_frr"]
    print(
        f"{name:<28} R@0.1% {r['0.001']:.3f} R@1% {r['0.01']:.3f} R@5% {r['0.05']:.3f} "
        f"image {metrics['image_auroc']:.4f} pixel {metrics['pixel_auroc']:.4f} "
        f"PRO {metrics['pro']:.4f}"
    )
    return {"name": name, **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pro")}, **r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("bundles", type=Path, nargs="+")
    args = p.parse_args()
    samples = test_samples(args.data)
    good = np.array([s.defect_type == GOOD for s in samples])
    members, rows = [], []
    size: tuple[int, int] | None = None
    for path in args.bundles:
        scorer = Scorer(load_bundle(path), device="cpu")
        scored = score_dataset(scorer, samples, 8, "all")
        assert len(scored.samples) == len(samples), "an unreadable test image"
        rows.append(_row(f"{path.name} {scorer.input_size}", compute_metrics(scored)))
        size = size or scorer.input_size
        members.append(_normalised(scored, good, size))
    for how, combine in (("mean", np.mean), ("max", np.max)):
        ensemble = Scored(
            samples,
            [],
            combine(np.stack([m.scores for m in members]), axis=0),
            combine(np.stack([m.maps for m in members]), axis=0),
            members[0].masks,
            0.0,
        )
        rows.append(_row(f"ensemble ({how})", compute_metrics(ensemble)))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
