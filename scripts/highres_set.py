"""Build a high-resolution small-defect set (MVTec layout) from MTD's good images (issue 34).

A camera that sees a part at 1024x1024 while the model input is 288x288 shrinks every defect
3.6 times. This set reproduces that case from public data:

- frames: an MTD good image, its largest centred square cut out, resized to SIDE x SIDE
  (cubic), in grey, plus per-pixel Gaussian grain of GRAIN grey levels (a speckled surface:
  texture finer than a 288 px input can keep);
- defects, painted on other MTD good images than the training ones, at the frame's resolution:
  half are pits (filled ellipses, PIT_DIAMETER px across), half short scratches (SCRATCH_LENGTH
  px long, SCRATCH_WIDTH px wide), each DEPTH grey levels darker or lighter than the surface,
  edges softened by a 1 px Gaussian; the mask is where the painted weight is at least 0.5.

    train/good         N_TRAIN frames from MTD train/good[0:N_TRAIN]
    test/good          N_GOOD frames from MTD test/good[0:N_GOOD]
    test/pit, scratch  N_DEFECT frames in all, from MTD train/good[N_TRAIN:N_TRAIN+N_DEFECT]
    ground_truth/<type>/<name>_mask.png

Every random draw comes from one seeded generator, so a run rebuilds the same set:

    .venv/bin/python scripts/highres_set.py ../shared/datasets/mtd /tmp/highres
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

SIDE = 1024
GRAIN = 6.0  # grey levels, per pixel
PIT_DIAMETER = (16, 40)  # px, at SIDE
SCRATCH_LENGTH = (30, 70)
SCRATCH_WIDTH = 3
DEPTH = (30, 55)  # grey levels
MARGIN = 64  # px kept clear of the frame's edge
N_TRAIN, N_GOOD, N_DEFECT = 120, 50, 80


def frame(path: Path, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """[side, side] uint8: the image's centred square, resized, with grain."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise SystemExit(f"{path}: not a readable image")
    h, w = grey.shape
    s = min(h, w)
    square = grey[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    big = cv2.resize(square, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    big += rng.normal(0.0, GRAIN, big.shape).astype(np.float32)
    return np.clip(big, 0, 255).round().astype(np.uint8)


def defect_weight(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[H, W] float32 in [0, 1]: how much of the defect each pixel carries."""
    h, w = shape
    canvas = np.zeros(shape, np.uint8)
    cy, cx = int(rng.integers(MARGIN, h - MARGIN)), int(rng.integers(MARGIN, w - MARGIN))
    angle = float(rng.uniform(0, 180))
    if kind == "pit":
        a = float(rng.uniform(*PIT_DIAMETER)) / 2
        b = a * float(rng.uniform(0.5, 1.0))
        cv2.ellipse(canvas, (cx, cy), (round(a), round(b)), angle, 0, 360, 255, -1, cv2.LINE_AA)
    else:
        half = float(rng.uniform(*SCRATCH_LENGTH)) / 2
        dy, dx = half * np.sin(np.radians(angle)), half * np.cos(np.radians(angle))
        p0, p1 = (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy))
        cv2.line(canvas, p0, p1, 255, SCRATCH_WIDTH, cv2.LINE_AA)
    return cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 1.0)


def paint(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(defective image, uint8 mask 0/255)."""
    weight = defect_weight(kind, image.shape, rng)
    depth = float(rng.uniform(*DEPTH)) * (1 if rng.random() < 0.5 else -1)
    out = np.clip(image.astype(np.float32) + depth * weight, 0, 255).round().astype(np.uint8)
    return out, np.where(weight >= 0.5, 255, 0).astype(np.uint8)


def build(mtd: Path, out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    train = sorted((mtd / "train" / "good").iterdir())
    good = sorted((mtd / "test" / "good").iterdir())
    if len(train) < N_TRAIN + N_DEFECT or len(good) < N_GOOD:
        raise SystemExit(f"{mtd}: too few good images for this set")
    if out.exists():
        shutil.rmtree(out)
    for rel in ("train/good", "test/good", "test/pit", "test/scratch"):
        (out / rel).mkdir(parents=True)
    for rel in ("ground_truth/pit", "ground_truth/scratch"):
        (out / rel).mkdir(parents=True)
    for path in train[:N_TRAIN]:
        cv2.imwrite(str(out / "train/good" / f"{path.stem}.png"), frame(path, rng))
    for path in good[:N_GOOD]:
        cv2.imwrite(str(out / "test/good" / f"{path.stem}.png"), frame(path, rng))
    for i, path in enumerate(train[N_TRAIN : N_TRAIN + N_DEFECT]):
        kind = "pit" if i % 2 == 0 else "scratch"
        image, mask = paint(frame(path, rng), kind, rng)
        cv2.imwrite(str(out / "test" / kind / f"{path.stem}.png"), image)
        cv2.imwrite(str(out / "ground_truth" / kind / f"{path.stem}_mask.png"), mask)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mtd", type=Path, help="the MTD dataset (MVTec layout)")
    p.add_argument("out", type=Path, help="folder to write (replaced)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build(args.mtd, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
