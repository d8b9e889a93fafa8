"""The maths of `edge-agent teach` and of the bank's Eq. 7 table: pure NumPy/FAISS, no torch.

A bundle's bank is a greedy coreset of its training patches. Its covering radius

    r = max_{x in training patches} min_{b in bank} ||x - b||

is how far the coreset lets a good training patch be from the bank. Teaching a good image
continues the coreset's own greedy rule on that image's patches until they are covered as
well as the training patches were (`extend_cover`). fit records r (bank.covering_radius);
for bundles fitted before it did, `estimated_covering_radius` gives a stand-in from the bank.
"""

from __future__ import annotations

import numpy as np

# Relative slack on the radius: a patch at r up to float rounding counts as covered, so that
# teaching the same features twice adds nothing (the second run recomputes the same float64
# distances by a different BLAS path).
RADIUS_RTOL = 1e-6
_CHUNK = 512  # query rows per [chunk, M] float64 distance block (~50 MB at M = 12k)


def bank_neighbours(bank: np.ndarray, k: int) -> np.ndarray:
    """[M, k] int32: each bank row's k nearest bank rows, itself first (Eq. 7's N_b).

    fit and teach both build bank_knn.npy with this one function."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    k = min(k, len(bank))
    _, idx = index.search(bank, k)
    # Duplicated rows can tie with self; the formula needs m* itself in column 0.
    rows = np.arange(len(bank))
    for r in np.nonzero(idx[:, 0] != rows)[0]:
        others = [j for j in idx[r] if j != r][: k - 1]
        idx[r] = [r, *others]
    return idx.astype(np.int32)


def nearest_distances(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[n] float64: d_i = min_j ||q_i - b_j||, exact up to float64 rounding.

    Computed as ||q - c||^2 + ||b - c||^2 - 2 (q - c).(b - c) with c the bank's mean: centring
    keeps the norms, and so the cancellation error, no larger than the spread of the data."""
    q = np.asarray(queries, dtype=np.float64)
    b = np.asarray(bank, dtype=np.float64)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1] or len(b) == 0:
        raise ValueError(f"queries {q.shape} and bank {b.shape} must be [n, D] and [M>0, D]")
    centre = b.mean(axis=0)
    b = b - centre
    b_sq = np.einsum("ij,ij->i", b, b)
    out = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), _CHUNK):
        part = q[start : start + _CHUNK] - centre
        sq = np.einsum("ij,ij->i", part, part)[:, None] + b_sq[None, :] - 2.0 * (part @ b.T)
        out[start : start + len(part)] = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    return out


def extend_cover(features: np.ndarray, bank: np.ndarray, radius: float) -> np.ndarray:
    """Rows of `features` [n, D] to append to `bank` [M, D] so that every feature is within
    `radius` of the grown bank: int64 indices into `features`, in the order chosen.

    The greedy coreset's rule, continued from the existing bank (farthest point first):

        d_i = min_{b in bank} ||f_i - b||
        while max_i d_i > radius * (1 + RADIUS_RTOL):
            i* = argmax_i d_i;  add f_i*;  d_i = min(d_i, ||f_i - f_i*||)

    so a patch within the radius of the bank, or of a row added before it, is not added, and
    added rows are pairwise more than `radius` apart. Afterwards
    max_i min_{b in bank + added} ||f_i - b|| <= radius (1 + RADIUS_RTOL).
    """
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be finite and >= 0, got {radius!r}")
    f = np.asarray(features, dtype=np.float64)
    d = nearest_distances(f, bank)
    limit = radius * (1.0 + RADIUS_RTOL)
    chosen: list[int] = []
    while len(d):
        i = int(np.argmax(d))  # ties: the lowest index, as the coreset's np.argmax
        if d[i] <= limit:
            break
        chosen.append(i)
        diff = f - f[i]
        np.minimum(d, np.sqrt(np.einsum("ij,ij->i", diff, diff)), out=d)
    return np.asarray(chosen, dtype=np.int64)


def estimated_covering_radius(bank: np.ndarray) -> float:
    """A stand-in for r when fit did not record it: the bank's separation

        r_est = min_{b in bank} min_{b' in bank, b' != b, ||b - b'|| > 0} ||b - b'||

    Why: the greedy coreset picks, at step t, the patch farthest from those picked before, at
    distance delta_t, and delta_t never grows. Every pair of bank rows is therefore at least
    delta_M apart (r_est >= delta_M), while every training patch ends within delta_{M+1} <=
    delta_M of the bank. So r_est is an upper bound of r, tight to the last step's shrinkage;
    only approximately, because the coreset ran in a random 128-d projection when D > 128 and
    its start rows are not in the bank. Erring high means teach adds fewer rows: a taught
    image then scores at most r_est rather than r. Zero distances (duplicated rows) are left
    out: a duplicate was picked at delta = 0 only once nothing else was left uncovered.
    """
    import faiss

    b = np.asarray(bank, dtype=np.float32)
    if b.ndim != 2 or len(b) < 2:
        raise ValueError(f"need a bank of at least 2 rows, got shape {b.shape}")
    b = b - b.mean(axis=0, dtype=np.float64).astype(np.float32)
    index = faiss.IndexFlatL2(b.shape[1])
    index.add(b)
    k = min(len(b), 8)  # a few duplicates of a row must not hide its nearest other row
    _, idx = index.search(b, k)
    # FAISS finds the neighbours; their distances are recomputed directly in float64: its
    # |a|^2 + |b|^2 - 2ab leaves noise of ~1e-2 on near-duplicate rows (it varied with the
    # BLAS kernel and thread count), which would pass for the separation.
    b64 = b.astype(np.float64)
    dist = np.stack(
        [np.linalg.norm(b64 - b64[np.clip(idx[:, j], 0, len(b) - 1)], axis=1) for j in range(k)],
        axis=1,
    )
    scale = float(np.sqrt(np.einsum("ij,ij->i", b, b).max())) or 1.0
    positive = dist[dist > 1e-6 * scale]
    if positive.size == 0:
        raise ValueError("every bank row duplicates another: no separation to estimate from")
    return float(positive.min())
