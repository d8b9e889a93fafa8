"""Build the elongated datasets of BENCHMARKS.md "Elongated frames and tiles", MVTec layout.

    strips DATA OUT   MTD tiles (resized to 192x192) laid side by side in threes: 576x192
                      strips; a defective strip is one defective tile between two good ones,
                      its mask the tile's mask at its place
    scan OUT          synthetic 1024x128 line-scan strips of a stationary texture; test
                      strips carry a 3 px dark vertical scratch (as tests/test_tiling.py)

Every strip has the same shape, so `fit` with no size option keeps their aspect ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_agent.images import list_images, read_image

SIDE = 192


def _tile(path: Path) -> np.ndarray:
    return cv2.resize(read_image(path), (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def _mask(path: Path | None) -> np.ndarray:
    if path is None:
        return np.zeros((SIDE, SIDE), np.uint8)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(mask, (SIDE, SIDE), interpolation=cv2.INTER_NEAREST)


def strips(data: Path, out: Path) -> None:
    rng = np.random.default_rng(0)
    train = list_images(data / "train" / "good")
    (out / "train" / "good").mkdir(parents=True)
    for i in range(0, len(train) - 2, 3):
        row = np.hstack([_tile(p) for p in train[i : i + 3]])
        cv2.imwrite(str(out / "train" / "good" / f"{i:04d}.png"), row)
    goods = list_images(data / "test" / "good")
    (out / "test" / "good").mkdir(parents=True)
    for i in range(0, len(goods) - 2, 3):
        row = np.hstack([_tile(p) for p in goods[i : i + 3]])
        cv2.imwrite(str(out / "test" / "good" / f"{i:04d}.png"), row)
    for kind in sorted(p.name for p in (data / "test").iterdir() if p.name != "good"):
        (out / "test" / kind).mkdir(parents=True)
        (out / "ground_truth" / kind).mkdir(parents=True)
        for path in list_images(data / "test" / kind):
            neighbours = [goods[j] for j in rng.choice(len(goods), 2, replace=False)]
            at = int(rng.integers(3))
            tiles = [_tile(p) for p in neighbours]
            tiles.insert(at, _tile(path))
            masks = [_mask(None), _mask(None)]
            masks.insert(at, _mask(data / "ground_truth" / kind / f"{path.stem}_mask.png"))
            cv2.imwrite(str(out / "test" / kind / f"{path.stem}.png"), np.hstack(tiles))
            cv2.imwrite(
                str(out / "ground_truth" / kind / f"{path.stem}_mask.png"), np.hstack(masks)
            )


def scan(out: Path, n_train: int = 64, n_test: int = 40) -> None:
    h, w, width = 128, 1024, 3
    rng = np.random.default_rng(0)

    def texture() -> np.ndarray:
        t = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2.0)
        t = 128 + 40 * t / t.std()
        return cv2.cvtColor(np.clip(t, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)

    for d in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (out / d).mkdir(parents=True)
    for i in range(n_train):
        cv2.imwrite(str(out / "train" / "good" / f"{i:03d}.png"), texture())
    for i in range(n_test):
        cv2.imwrite(str(out / "test" / "good" / f"{i:03d}.png"), texture())
    for i in range(n_test):
        frame = texture()
        x, y0 = int(rng.integers(w // 10, w - w // 10)), int(rng.integers(h // 8, h // 2))
        mask = np.zeros((h, w), np.uint8)
        cv2.line(mask, (x, y0), (x, y0 + h // 3), 255, width)
        frame[mask > 0] = (frame[mask > 0] * 0.3).astype(np.uint8)
        cv2.imwrite(str(out / "test" / "scratch" / f"{i:03d}.png"), frame)
        cv2.imwrite(str(out / "ground_truth" / "scratch" / f"{i:03d}_mask.png"), mask)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("strips")
    s.add_argument("data", type=Path)
    s.add_argument("out", type=Path)
    sc = sub.add_parser("scan")
    sc.add_argument("out", type=Path)
    args = p.parse_args()
    if args.out.exists():
        print(f"{args.out} exists", file=sys.stderr)
        return 2
    if args.kind == "strips":
        strips(args.data, args.out)
    else:
        scan(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
