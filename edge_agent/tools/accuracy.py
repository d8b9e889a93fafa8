"""Anomaly-detection metrics as in the MVTec AD evaluation: image AUROC, pixel AUROC and PRO,
plus the one point of the curve a line cares about: recall at a fixed false-reject rate.

All three are exact (no threshold grid): AUROC is the Mann-Whitney statistic with ties counted
half, PRO is integrated over the exact piecewise-linear curve through every distinct threshold.
They are written to handle a full MVTec category (hundreds of 224x224 maps, tens of millions of
pixels) in seconds: the work is a few sorts of float32 arrays, never a float64 copy of all pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "BOOTSTRAP_CONFIDENCE",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "FALSE_REJECT_RATES",
    "pixel_roc_auc",
    "pro_score",
    "recall_at_frr",
    "recall_at_frr_ci",
    "roc_auc",
]

# The false-reject rates evaluate reports recall at (0.1%, 1%, 5% of good parts rejected).
FALSE_REJECT_RATES = (0.001, 0.01, 0.05)
# recall_at_frr_ci: a 95% percentile interval from 2,000 resamples (its Monte-Carlo error on
# MTD's 1% point is ~0.005 at either end, below the 1/392 step of one defect), seeded so that
# two runs on the same scores print the same interval.
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC of `scores` for binary `labels` (bool or 0/1); tied pairs count half.

    Equals the probability that a random positive scores higher than a random negative.
    ValueError if the shapes differ, a score is NaN, or only one class is present.
    """
    y = _as_bool(labels, "labels")
    s = _as_scores(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    y, s = y.ravel(), s.ravel()
    return _auc_split(s[y], s[~y])


def recall_at_frr(labels: np.ndarray, scores: np.ndarray, rate: float) -> tuple[float, float]:
    """(recall, threshold): the best recall of the rule "NG when score >= t" among thresholds
    that reject at most a fraction `rate` of the negatives (good parts).

    With n negatives at most j = floor(rate * n) may score >= t, so t must exceed g_(j+1), the
    (j+1)-th largest negative score, and the smallest such t is the next float above it:
        recall = #{positives with score > g_(j+1)} / #positives
    (j >= n: every threshold qualifies, recall 1). With few negatives, rate * n < 1 means no
    false reject at all. `labels` true for positives (defects).
    """
    y = _as_bool(labels, "labels")
    s = _as_scores(scores, "scores")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be within 0..1, got {rate}")
    # Kept in the scores' own dtype: the threshold is the next float32 (say) above g_(j+1).
    pos, neg = s[y], np.sort(s[~y])[::-1]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("recall at a false-reject rate needs positives and negatives")
    allowed = math.floor(rate * len(neg) + 1e-9)  # 1e-9: 0.01 * 300 is 3, not 2.9999
    if allowed >= len(neg):
        return 1.0, float(min(pos.min(), neg[-1]))
    bar = neg[allowed]
    return float(np.mean(pos > bar)), float(np.nextafter(bar, np.asarray(np.inf, bar.dtype)))


def recall_at_frr_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    rate: float,
    *,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """(low, high): a percentile bootstrap interval of recall_at_frr(labels, scores, rate).

    Goods and defects are resampled separately, each with replacement to its own count (the
    test set fixes how many of each there are), and each resample is scored exactly as
    recall_at_frr scores a test set: its threshold comes from its own goods. At 1% of 203 goods
    the threshold is the third-highest good score, which a resample moves by a few goods: the
    interval shows how far the figure rests on them. Draws: resample b takes goods
    rng.integers(0, n_goods, (resamples, n_goods))[b] and then defects likewise, from
    np.random.default_rng(seed) (the tests replay them one resample at a time).
    """
    y = _as_bool(labels, "labels")
    s = _as_scores(scores, "scores")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if not isinstance(resamples, int | np.integer) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    recall_at_frr(y, s, rate)  # the same argument checks, and both classes present
    y, s = y.ravel(), s.ravel()
    neg, pos = s[~y], s[y]
    rng = np.random.default_rng(seed)
    neg_draw = rng.integers(0, len(neg), size=(resamples, len(neg)))
    pos_draw = rng.integers(0, len(pos), size=(resamples, len(pos)))
    allowed = math.floor(rate * len(neg) + 1e-9)  # as recall_at_frr
    if allowed >= len(neg):
        return 1.0, 1.0
    # The (allowed + 1)-th largest good of each resample, from how often it drew each good:
    # goods sorted descending, the first whose running count exceeds `allowed`.
    order = np.argsort(-neg, kind="stable")
    counts = _row_counts(neg_draw, len(neg))[:, order]
    bars = neg[order][np.argmax(np.cumsum(counts, axis=1) > allowed, axis=1)]
    # Defects above each bar: defects sorted ascending, those after the bar's position.
    pos_sorted = np.sort(pos)
    below = np.zeros((resamples, len(pos) + 1), dtype=np.int64)
    np.cumsum(
        _row_counts(pos_draw, len(pos))[:, np.argsort(pos, kind="stable")], 1, out=below[:, 1:]
    )
    at = np.searchsorted(pos_sorted, bars, side="right")
    recalls = (len(pos) - below[np.arange(resamples), at]) / len(pos)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(recalls, [tail, 1.0 - tail])
    return float(low), float(high)


def _row_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """[R, n] how often each of n items appears in each row of `draws` [R, k]."""
    rows = np.arange(len(draws))[:, None] * n
    return np.bincount((rows + draws).ravel(), minlength=len(draws) * n).reshape(len(draws), n)


def pixel_roc_auc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels: `masks` [N,H,W] bool ground truth, `maps` [N,H,W] scores.

    The same number as `roc_auc(masks.ravel(), maps.ravel())`.
    """
    y, s = _check_pixels(masks, maps)
    return _auc_split(s[y], s[~y])


def pro_score(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the Per-Region-Overlap curve up to `fpr_limit`, normalised to [0, 1].

    Regions are the 8-connected components of each ground-truth mask; PRO(t) is the mean over
    all regions of the fraction of the region with map >= t, FPR(t) the fraction of negative
    pixels with map >= t. The curve through every distinct threshold is integrated with the
    trapezoid rule from FPR 0 to `fpr_limit` (interpolated linearly at the limit) and divided by
    `fpr_limit`, so a perfect map gives 1.0 and a map unrelated to the masks about fpr_limit / 2.
    ValueError if there is no region or no negative pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    y, s = _check_pixels(masks, maps)
    y3 = y.reshape(masks.shape if masks.ndim == 3 else (1, *masks.shape))
    pos_weight = _region_weights(y3)
    neg = s[~y]
    if neg.size == 0:
        raise ValueError("no negative pixels: PRO needs some normal pixels")
    n_neg = neg.size
    top = _top_negatives(neg, fpr_limit)
    del neg
    pos = s[y]
    # PRO_ge(v) / PRO_gt(v): summed weight of positive pixels scoring >= v / > v.
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos[order]
    tail = np.zeros(pos.size + 1)
    tail[:-1] = np.cumsum(pos_weight[order][::-1])[::-1]
    del order, pos, pos_weight

    # Each run of tied negatives is one segment of the curve: FPR goes from a to b while PRO
    # goes linearly from PRO_gt to PRO_ge (positives tied with it are half credited, as in AUC).
    # Positives between two runs only move PRO at constant FPR, which adds no area.
    starts = np.flatnonzero(np.r_[True, top[1:] != top[:-1]])
    values = top[starts]
    fpr_a = starts / n_neg
    fpr_b = np.r_[starts[1:], top.size] / n_neg
    pro_a = tail[np.searchsorted(pos_sorted, values, side="right")]
    pro_b = tail[np.searchsorted(pos_sorted, values, side="left")]
    return _clipped_trapezoid(fpr_a, fpr_b, pro_a, pro_b, fpr_limit) / fpr_limit


def _auc_split(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC from the positive and negative scores (1-D, same dtype)."""
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes; only one is present")
    # Look the smaller class up in the larger so the index arrays stay small. Doubled counts:
    # 2 per correctly ordered pair plus 1 per tie keeps everything in exact integers.
    if n_pos <= n_neg:
        doubled = _doubled_rank_sum(np.sort(pos), np.sort(neg))
    else:
        doubled = 2 * n_pos * n_neg - _doubled_rank_sum(np.sort(neg), np.sort(pos))
    return float(doubled / (2 * n_pos * n_neg))


def _doubled_rank_sum(needles: np.ndarray, haystack: np.ndarray) -> int:
    """Sum over needles of 2*#(haystack < x) + #(haystack == x); both arrays sorted."""
    below = np.searchsorted(haystack, needles, side="left").sum(dtype=np.int64)
    below_or_equal = np.searchsorted(haystack, needles, side="right").sum(dtype=np.int64)
    return int(below) + int(below_or_equal)


def _top_negatives(neg: np.ndarray, fpr_limit: float) -> np.ndarray:
    """The negatives that can lie on the curve below `fpr_limit`, sorted descending.

    That is the ceil(fpr_limit * n) highest (one more against rounding) plus everything tied
    with the lowest of them, so the run crossing the limit is complete. `neg` is a scratch copy
    and gets reordered.
    """
    n = neg.size
    k = min(n, math.ceil(fpr_limit * n) + 1)
    kth = n - k
    neg.partition(kth)
    cut = neg[kth]
    top = neg[neg >= cut]
    top.sort()
    return top[::-1]


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per positive pixel (in C order) 1 / (number of regions * size of its region)."""
    sizes_per_pixel: list[np.ndarray] = []
    n_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(
            mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        sizes = np.bincount(labels.ravel(), minlength=count)
        sizes_per_pixel.append(sizes[labels[mask]])
        n_regions += count - 1
    if n_regions == 0:
        raise ValueError("no anomalous regions in the masks: PRO needs at least one")
    return 1.0 / (n_regions * np.concatenate(sizes_per_pixel).astype(np.float64))


def _clipped_trapezoid(
    x_a: np.ndarray, x_b: np.ndarray, y_a: np.ndarray, y_b: np.ndarray, limit: float
) -> float:
    """Area under the segments (x_a, y_a)-(x_b, y_b), x_a < x_b, cut at x = limit."""
    keep = x_a < limit
    x_a, x_b, y_a, y_b = x_a[keep], x_b[keep], y_a[keep], y_b[keep]
    x_c = np.minimum(x_b, limit)
    y_c = y_a + (y_b - y_a) * (x_c - x_a) / (x_b - x_a)
    return float(np.sum((x_c - x_a) * (y_a + y_c)) / 2.0)


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate [N,H,W] (or [H,W]) masks and maps; flat bool labels and flat scores."""
    y = _as_bool(masks, "masks")
    s = _as_scores(maps, "maps")
    if y.shape != s.shape:
        raise ValueError(f"masks {y.shape} and maps {s.shape} differ in shape")
    if y.ndim not in (2, 3):
        raise ValueError(f"masks and maps must be [N,H,W] or [H,W], got {y.shape}")
    return y.ravel(), s.ravel()


def _as_bool(labels: np.ndarray, name: str) -> np.ndarray:
    """Bool view/copy of 0/1 labels; ValueError for any other value."""
    a = np.asarray(labels)
    if a.dtype == bool:
        return np.ascontiguousarray(a)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {a.dtype}")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must hold only 0 and 1")
    return a != 0


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Real-valued scores without NaN (float16 widened so sorting is native)."""
    s = np.asarray(scores)
    if s.dtype == bool:
        return s.astype(np.uint8)
    if s.dtype == np.float16:
        s = s.astype(np.float32)
    if np.issubdtype(s.dtype, np.floating):
        if np.isnan(s).any():
            raise ValueError(f"{name} contain NaN")
    elif not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"{name} must be real numbers, got dtype {s.dtype}")
    return s
