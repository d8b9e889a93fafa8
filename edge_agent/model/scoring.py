"""From nearest-neighbour distances to scores, maps and regions (PatchCore's scoring).

- patch score: distance to the nearest bank feature (mean of the k nearest if k > 1);
- image score: the largest patch score, optionally reweighted as in the paper's Eq. 7;
- anomaly map: the patch grid upsampled bilinearly, then Gaussian-smoothed (sigma 4);
- regions: connected components of the thresholded map.
"""

from __future__ import annotations

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
