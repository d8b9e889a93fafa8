"""Measure a global term beside the patch score (issue 13), before any of it goes into the
product.

    python scripts/global_score_eval.py --data ../shared/datasets/mtd B [--sample 250]

The global term: each image's patch features pooled to their mean and standard deviation
(2 D values), standardised by the training images', and its Mahalanobis distance
    m(x) = sqrt(z^T S^-1 z),   S = (1 - lam) C + lam I
to the training images' correlation C, shrunk towards the identity by Ledoit and Wolf's
estimate of lam (or the --lam given). Uneven and cracked tiles change a tile's whole texture
statistics more than any one patch.

A sum needs both terms in comparable units, from good images the bundle has not seen, which
fit does not have. Both come from the training images themselves:
- the patch score of a training image with every bank row that came from it left out (the
  bank rows' source images found by an exact match against the training features): the
  image as if it had not been fitted on (leave one image out; --sample images of it);
- the global term of each of 10 folds from a model of the other 9.
Then score = (p - mean_p) / sd_p + w (m - mean_m) / sd_m. Prints the patch score alone, the
global term alone and the sums, as evaluate's metrics (the test set's goods set the
thresholds, optimistic as evaluate's recall_at_frr), with the held-out estimates beside the
test goods' own mean and spread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_agent.images import list_images, read_image
from edge_agent.model import scoring
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.tools.accuracy import recall_at_frr, roc_auc
from edge_agent.tools.dataset import GOOD, test_samples

RATES = (0.001, 0.01, 0.05)


def features(scorer: Scorer, paths: list[Path]) -> np.ndarray:
    """[N, h*w, D] patch features, as the bank's."""
    out = []
    for i in range(0, len(paths), 8):
        batch = np.stack([scorer.prepare(read_image(p)) for p in paths[i : i + 8]])
        out.append(scorer.features(batch))
    return np.concatenate(out)


def pooled(feats: np.ndarray) -> np.ndarray:
    return np.concatenate([feats.mean(axis=1), feats.std(axis=1)], axis=1).astype(np.float64)


def ledoit_wolf(z: np.ndarray) -> float:
    """Ledoit-Wolf (2004) shrinkage of the sample covariance of `z` [n, p] towards mu I."""
    n, p = z.shape
    s = z.T @ z / n
    mu = np.trace(s) / p
    delta2 = ((s - mu * np.eye(p)) ** 2).sum() / p
    beta2 = ((np.einsum("ij,ij->i", z, z) ** 2).sum() - n * (s**2).sum()) / (n * n) / p
    return float(min(beta2, delta2) / delta2)


class Gaussian:
    def __init__(self, x: np.ndarray, lam: float | None) -> None:
        self.mean, self.scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = (x - self.mean) / self.scale
        self.lam = ledoit_wolf(z - z.mean(axis=0)) if lam is None else lam
        cov = (1 - self.lam) * np.cov(z.T) + self.lam * np.eye(z.shape[1])
        self.precision = np.linalg.inv(cov)

    def distance(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        return np.sqrt(np.einsum("ij,jk,ik->i", z, self.precision, z))


def held_out_global(x: np.ndarray, lam: float | None, folds: int = 10) -> np.ndarray:
    order = np.random.default_rng(0).permutation(len(x))
    out = np.empty(len(x))
    for fold in np.array_split(order, folds):
        out[fold] = Gaussian(x[np.setdiff1d(order, fold)], lam).distance(x[fold])
    return out


def held_out_patch(
    bundle_bank: np.ndarray, grid: tuple[int, int], train: np.ndarray, sigma: float, n: int
) -> np.ndarray:
    """Image scores of `n` training images with their own bank rows left out."""
    images, p, d = train.shape
    bank = np.ascontiguousarray(bundle_bank, dtype=np.float32)
    flat_train = np.ascontiguousarray(train.reshape(-1, d), dtype=np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, 1024)
    ivf.train(flat_train[::10])
    ivf.add(flat_train)
    ivf.nprobe = 4
    sq, idx = ivf.search(bank, 1)
    if (sq[:, 0] > 1e-6).any():
        raise SystemExit("bank rows not found among the training features: another bundle?")
    source = idx[:, 0] // p
    index = faiss.IndexFlatL2(d)
    index.add(bank)
    scores = []
    for i in np.random.default_rng(0).permutation(images)[:n]:
        sq, rows = index.search(np.ascontiguousarray(train[i]), 32)
        other = source[rows] != i
        dist = sq[np.arange(p), other.argmax(axis=1)]
        miss = ~other.any(axis=1)  # all 32 nearest from image i itself: search the rest
        if miss.any():
            rest = bank[source != i]
            dist[miss] = ((train[i][miss][:, None, :] - rest[None]) ** 2).sum(-1).min(axis=1)
        grid_scores = np.sqrt(np.maximum(dist, 0)).reshape(1, *grid).astype(np.float32)
        scores.append(float(scoring.smoothed_max(grid_scores, sigma)[0]))
    return np.array(scores)


def row(name: str, labels: np.ndarray, types: np.ndarray, s: np.ndarray) -> None:
    good = types == GOOD
    per = []
    for t in sorted(set(types) - {GOOD}):
        m = good | (types == t)
        per.append(f"{t} {recall_at_frr(labels[m], s[m], 0.01)[0]:.2f}")
    rates = " ".join(f"R@{100 * r:g}% {recall_at_frr(labels, s, r)[0]:.3f}" for r in RATES)
    print(f"{name:<40} image {roc_auc(labels, s):.4f} {rates} | R@1%: {', '.join(per)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset root")
    p.add_argument("bundle", type=Path)
    p.add_argument("--sample", type=int, default=250, help="training images left out, one by one")
    p.add_argument("--lam", type=float, nargs="*", default=[], help="shrinkages besides LW's")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    sigma = float(bundle.scoring.get("image_sigma", 0.0))
    scorer = Scorer(bundle, device="cpu", index="flat")
    samples = test_samples(args.data)
    types = np.array([s.defect_type for s in samples])
    labels = types != GOOD
    test_feats = features(scorer, [s.path for s in samples])
    train_feats = features(scorer, list_images(args.data / "train" / "good"))
    grids = []
    for i in range(0, len(test_feats), 64):
        d, _ = scorer.index.search(test_feats[i : i + 64].reshape(-1, bundle.dim), 1)
        grids.append(d[:, 0].reshape(-1, *bundle.grid))
    patch = scoring.smoothed_max(np.concatenate(grids), sigma)
    loo = held_out_patch(bundle.bank, bundle.grid, train_feats, sigma, args.sample)
    good = ~labels
    print(
        f"patch score: held out {loo.mean():.2f} +- {loo.std():.2f} ({len(loo)} training images),"
        f" test goods {patch[good].mean():.2f} +- {patch[good].std():.2f}"
    )
    row(f"patch score (sigma {sigma:g})", labels, types, patch)
    x_train, x_test = pooled(train_feats), pooled(test_feats)
    for lam in [None, *args.lam]:
        model = Gaussian(x_train, lam)
        glob = model.distance(x_test)
        ho = held_out_global(x_train, lam)
        name = f"lam {model.lam:.4f}" + (" (Ledoit-Wolf)" if lam is None else "")
        print(
            f"global term, {name}: held out {ho.mean():.2f} +- {ho.std():.2f},"
            f" test goods {glob[good].mean():.2f} +- {glob[good].std():.2f}"
        )
        row(f"global term, {name}", labels, types, glob)
        zp = (patch - loo.mean()) / loo.std()
        zg = (glob - ho.mean()) / ho.std()
        for w in (0.5, 1.0):
            row(f"patch + {w:g} global, {name}", labels, types, zp + w * zg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
