"""From nearest-neighbour distances to scores, maps and regions (PatchCore's scoring).

- patch score: distance to the nearest bank feature (mean of the k nearest if k > 1);
- image score: the largest patch score, optionally reweighted as in the paper's Eq. 7, or
  (``image_sigma`` > 0) the largest value of the patch grid smoothed by a Gaussian of that many
  cells (`smoothed_max`): one spurious patch on a good part no longer sets the score alone;
- anomaly map: the patch grid upsampled bilinearly, then Gaussian-smoothed (sigma 4);
- regions: connected components of the thresholded map.

With an approximate index (knn.py, ivf-exact) patch scores start as upper bounds of the exact
ones; `recheck_max` and `recheck_smoothed_max` find exact image scores from them and
`map_support`/`cells_for` tell which patches a part of the map depends on, so only those are
searched exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


def gaussian_ksize(sigma: float) -> int:
    """Kernel width matching scipy.ndimage.gaussian_filter's default truncation at 4 sigma."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_map(patch_scores: np.ndarray, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """[h, w] patch scores -> [H, W] float32 map: bilinear upsample, then Gaussian blur.

    BORDER_REFLECT is scipy's default 'reflect' mode, so this equals the reference's
    gaussian_filter up to float32 rounding, many times faster.
    """
    height, width = size
    up = cv2.resize(
        np.ascontiguousarray(patch_scores, dtype=np.float32),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    if sigma <= 0:
        return up
    k = gaussian_ksize(sigma)
    return cv2.GaussianBlur(up, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def map_support(
    grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Which patch cells each map pixel depends on, per axis: (rows [H, h], cols [W, w]) bool,
    rows[Y, j] true when map row Y takes a nonzero weight from grid row j (likewise cols).

    anomaly_map is linear, separable (bilinear resize, then a Gaussian blur) and its weights
    are non-negative, so map[Y, X] = sum_{j,i} R[Y, j] C[X, i] patch[j, i] with R, C >= 0 and
    pixel (Y, X) depends on cell (j, i) iff rows[Y, j] and cols[X, i]. The weights are read
    from anomaly_map itself (one grid row or column of ones at a time), so they are OpenCV's
    own, border handling included; a weight of exactly 0 contributes exactly 0.
    """
    return _map_support(tuple(grid), tuple(size), float(sigma))


@functools.lru_cache(maxsize=8)
def _map_support(
    grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    h, w = grid
    rows = np.empty((size[0], h), dtype=bool)
    cols = np.empty((size[1], w), dtype=bool)
    for j in range(h):
        impulse = np.zeros(grid, dtype=np.float32)
        impulse[j, :] = 1.0
        rows[:, j] = (anomaly_map(impulse, size, sigma) != 0).any(axis=1)
    for i in range(w):
        impulse = np.zeros(grid, dtype=np.float32)
        impulse[:, i] = 1.0
        cols[:, i] = (anomaly_map(impulse, size, sigma) != 0).any(axis=0)
    rows.flags.writeable = cols.flags.writeable = False  # shared by every caller (cache)
    return rows, cols


def cells_for(
    pixels: np.ndarray, support: tuple[np.ndarray, np.ndarray], *, margin: int = 0
) -> np.ndarray:
    """[H, W] bool pixels -> [h, w] bool: the cells that any of them (or any pixel within
    `margin` pixels of one, 8-connected) depends on; `support` from map_support."""
    if margin > 0:
        k = 2 * margin + 1
        pixels = cv2.dilate(pixels.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
    rows, cols = support
    # 0/1 products summed in float32: exact integer counts far below 2**24.
    hits = rows.T.astype(np.float32) @ pixels.astype(np.float32) @ cols.astype(np.float32)
    return hits > 0


def recheck_max(
    bounds: np.ndarray,
    recheck: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    known: np.ndarray | None = None,
    per_round: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact row maxima of values v [B, P] known through upper bounds, with few look-ups.

    bounds [B, P] >= v (inf allowed); where known[b, p], bounds[b, p] is v[b, p] itself.
    recheck(rows, cols) returns v at those positions (one call per round, all rows at once).

    Rule, per row: visit the positions in descending order of bound, rechecking those not yet
    known, and stop at the first bound below the best exact value m found so far. Every
    position left has v <= bound < m, so m = max_p v[b, p]; and every p with v[b, p] = m had
    bound >= m and was visited, so the first of them is np.argmax(v[b]). Each round takes the
    next `per_round` unknown candidates of every unfinished row.

    Returns (values: bounds with exact values where visited, known after, argmax [B]).
    """
    values = np.array(bounds, copy=True)
    known = np.zeros(values.shape, bool) if known is None else np.array(known, copy=True)
    n_rows, n_cols = values.shape
    order = np.argsort(-values, axis=1, kind="stable")
    best = np.where(known, values, -np.inf).max(axis=1, initial=-np.inf)
    pos = np.zeros(n_rows, dtype=np.int64)
    active = np.ones(n_rows, dtype=bool)
    while active.any():
        rows: list[int] = []
        cols: list[int] = []
        for b in np.flatnonzero(active):
            taken = 0
            while pos[b] < n_cols and taken < per_round:
                p = order[b, pos[b]]
                if values[b, p] < best[b]:
                    break
                pos[b] += 1
                if not known[b, p]:
                    rows.append(b)
                    cols.append(p)
                    taken += 1
            if taken == 0:
                active[b] = False
        if not rows:
            break
        r, c = np.asarray(rows), np.asarray(cols)
        exact = recheck(r, c)
        values[r, c] = exact
        known[r, c] = True
        np.maximum.at(best, r, exact)
    argmax = np.where(known, values, -np.inf).argmax(axis=1)
    return values, known, argmax


SCORE_TRUNCATE = 2.0  # the image score's kernel reaches 2 sigma: 5x5 cells at sigma 1


def score_radius(sigma: float) -> int:
    """Cells the image score's kernel reaches from its centre, per axis."""
    return int(SCORE_TRUNCATE * sigma + 0.5)


def smooth_grid(grid: np.ndarray, sigma: float) -> np.ndarray:
    """[h, w] patch scores -> [h, w] float32, Gaussian-smoothed on the patch grid:

        g'[y, x] = sum_{|dy|, |dx| <= r} K[dy] K[dx] g[reflect(y + dy), reflect(x + dx)]

    K the normalised Gaussian of `sigma` cells truncated at r = score_radius(sigma), reflect
    OpenCV's BORDER_REFLECT (scipy's 'reflect'). Weights are non-negative and sum to 1, so
    smoothing upper bounds gives upper bounds, and g' <= max g.
    """
    g = np.ascontiguousarray(grid, dtype=np.float32)
    if sigma <= 0:
        return g
    k = 2 * score_radius(sigma) + 1
    return cv2.GaussianBlur(g, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def smoothed_max(grids: np.ndarray, sigma: float) -> np.ndarray:
    """[B, h, w] patch scores -> [B] image scores: max over cells of smooth_grid."""
    return np.array([smooth_grid(g, sigma).max() for g in grids], dtype=np.float32)


def recheck_smoothed_max(
    bounds: np.ndarray,
    recheck: Callable[[np.ndarray, np.ndarray], np.ndarray],
    sigma: float,
    *,
    known: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """smoothed_max of values v [B, h, w] known through upper bounds, with few look-ups.

    bounds >= v (finite); where known, bounds is v itself. recheck(rows, flat cells) returns
    v there (one call per round, every unfinished image at once).

    Rule, per image: smooth the current values (exact where known, bounds elsewhere); that
    is an upper bound of the smoothed exact grid at every cell (non-negative weights). At its
    argmax c, if every cell c's kernel reads is known, smooth(v)[c] is this value, and every
    other cell's smoothed exact value is at most its bound, hence at most this: the max.
    Otherwise re-check the unknown cells of c's window and repeat. With reflection the cells
    a kernel reads near a border lie inside its window clipped to the grid.

    Returns (values with exact values where visited, known after, image scores [B] float32).
    """
    values = np.array(bounds, dtype=np.float32, copy=True)
    n, h, w = values.shape
    known = np.zeros(values.shape, bool) if known is None else np.array(known, copy=True)
    r = score_radius(sigma)
    scores = np.zeros(n, dtype=np.float32)
    active = list(range(n))
    while active:
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        still: list[int] = []
        for b in active:
            smooth = smooth_grid(values[b], sigma)
            y, x = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
            window = np.zeros((h, w), dtype=bool)
            window[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] = True
            todo = np.flatnonzero(window & ~known[b])
            if todo.size == 0:
                scores[b] = smooth[y, x]
                continue
            rows.append(np.full(todo.size, b))
            cols.append(todo)
            still.append(b)
        if rows:
            r_idx, c_idx = np.concatenate(rows), np.concatenate(cols)
            exact = recheck(r_idx, c_idx)
            values.reshape(n, -1)[r_idx, c_idx] = exact
            known.reshape(n, -1)[r_idx, c_idx] = True
        active = still
    return values, known, scores


def reweighted_scores(
    queries: np.ndarray,
    patch_scores: np.ndarray,
    nearest: np.ndarray,
    bank: np.ndarray,
    bank_knn: np.ndarray,
) -> np.ndarray:
    """Image scores reweighted as in PatchCore's Eq. 7.

    For each image: the most anomalous patch m_test (score s*), its nearest bank feature m*
    and m*'s neighbourhood N_b(m*) in the bank (bank_knn, m* itself first). Then
        s = (1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)) * s*
    so a patch whose nearest neighbour sits in a sparse part of the bank scores higher.

    queries [B, P, D], patch_scores [B, P], nearest [B, P] (bank row of each patch's NN).
    """
    batch = np.arange(queries.shape[0])
    worst = patch_scores.argmax(axis=1)
    s_star = patch_scores[batch, worst]
    m_test = queries[batch, worst]  # [B, D]
    support = bank[bank_knn[nearest[batch, worst]]]  # [B, k, D]
    dists = np.linalg.norm(support - m_test[:, None, :], axis=2).astype(np.float64)
    # softmax of the first entry, shifted by the row max for numerical safety
    shifted = np.exp(dists - dists.max(axis=1, keepdims=True))
    weight = 1.0 - shifted[:, 0] / shifted.sum(axis=1)
    return (weight * s_star).astype(np.float32)


def normalise(score: float | np.ndarray, norm: dict[str, Any] | None) -> float | np.ndarray:
    """Map raw scores to [0, 1] with the calibrated image threshold at exactly 0.5.

    Piecewise linear through (low, 0), (threshold, 0.5), (high, 1), clipped; `low`/`high` are
    set at calibration (e.g. the lowest good score and a high defect-side reference).
    Without calibration there is no meaningful scale: NaN.
    """
    if not norm:
        return np.nan if np.ndim(score) == 0 else np.full_like(score, np.nan, dtype=np.float32)
    low, thr, high = float(norm["low"]), float(norm["threshold"]), float(norm["high"])
    s = np.asarray(score, dtype=np.float64)
    below = 0.5 * (s - low) / max(thr - low, 1e-12)
    above = 0.5 + 0.5 * (s - thr) / max(high - thr, 1e-12)
    out = np.clip(np.where(s <= thr, below, above), 0.0, 1.0)
    return float(out) if out.ndim == 0 else out.astype(np.float32)


@dataclass(frozen=True)
class Region:
    """One connected defect region, in the pixel coordinates of the map it was found in."""

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "bbox": [self.x, self.y, self.width, self.height],
            "area": self.area,
            "peak": round(self.peak, 4),
        }


def find_regions(amap: np.ndarray, threshold: float, *, min_area: int = 1) -> list[Region]:
    """Connected components (8-connected) of amap >= threshold, largest peak first."""
    mask = (amap >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        peak = float(amap[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].max())
        regions.append(Region(x, y, w, h, area, peak))
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions
