"""Threshold maths for calibration: pure functions on score arrays, no model, no I/O (except
`split_holdout`, which prepares a held-out folder of good images).

The verdict rule is the agent's (edge_agent.decide.decision): NG when score >= threshold.

Image threshold, distribution-free. Sort the n good scores X(1) <= ... <= X(n). Every threshold
chosen here sits just above one of them, t = X(n-j)+ (the next float32 up), so exactly the j
highest good samples are rejected. For a fresh good part with score X, the false-reject rate
FRR = P(X >= t) = 1 - F(X(n-j)) is itself random (it depends on the sample we calibrated on),
and for any continuous F it follows Beta(j + 1, n - j) (the coverage of an order statistic):

    expected FRR     (j + 1) / (n + 1)
    upper bound      Beta(j + 1, n - j).ppf(confidence)   (one-sided, e.g. 95 %)

With ties or a discrete F the true FRR is stochastically smaller, so both stay conservative.
Nothing is assumed about the shape of the score distribution, which is why a small sample
cannot promise a small rate: at the largest of 20 good scores the expected FRR is 1/21 and the
95 % bound is 1 - 0.05^(1/20) = 13.9 %.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta

from edge_agent.errors import UserError
from edge_agent.images import list_images

# Float slack so that a target of exactly (j + 1) / (n + 1) counts as met.
_EPS = 1e-9


def just_above(score: float) -> float:
    """The next float32 above `score`: as a threshold with the `>=` rule it rejects everything
    strictly above `score` and nothing at or below it (the Scorer's scores are float32)."""
    return float(np.nextafter(np.float32(score), np.float32(np.inf)))


# --------------------------------------------------------------------------- false rejects


@dataclass(frozen=True)
class FalseReject:
    """What n good samples say about the false-reject rate of one threshold."""

    n: int  # good samples
    rejected: int  # j: good samples at or above the threshold
    expected: float  # (j + 1) / (n + 1): the mean of the Beta law (1.0 when j = n)
    upper: float  # one-sided upper bound at `confidence`
    confidence: float

    @property
    def observed(self) -> float:
        """Fraction of the calibration samples themselves that are rejected (j / n)."""
        return self.rejected / self.n


def false_reject(n: int, rejected: int, confidence: float) -> FalseReject:
    """Expected false-reject rate and its upper bound for a threshold just above X(n-j).

    The FRR of such a threshold is Beta(j + 1, n - j) distributed; the bound is its
    `confidence` quantile. A threshold at or below every good score (j = n) has no order
    statistic below it to anchor the law: it is reported as 1.0 for both.
    """
    if n < 1:
        raise ValueError("need at least one good score")
    if not 0 <= rejected <= n:
        raise ValueError(f"rejected must be in [0, {n}], got {rejected}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if rejected == n:
        return FalseReject(n, rejected, 1.0, 1.0, confidence)
    upper = float(beta.ppf(confidence, rejected + 1, n - rejected))
    return FalseReject(n, rejected, (rejected + 1) / (n + 1), upper, confidence)


def false_reject_at(good: np.ndarray, threshold: float, confidence: float) -> FalseReject:
    """`false_reject` for any threshold, counting the good scores it rejects (score >= t).

    Exact when the threshold is just above a good score; conservative otherwise, since a
    threshold between X(n-j) and X(n-j+1) rejects no more than one just above X(n-j).
    """
    good = np.asarray(good)
    return false_reject(len(good), int(np.count_nonzero(good >= threshold)), confidence)


def best_upper_bound(n: int, confidence: float) -> float:
    """The smallest FRR bound n good samples can give: at their maximum, 1 - (1-c)^(1/n)."""
    return false_reject(n, 0, confidence).upper


def samples_needed(target: float, confidence: float | None = None) -> int:
    """Fewest good samples for which some order statistic meets `target`.

    Without `confidence`: the expected FRR (1/(n+1) at the maximum) <= target.
    With it: the upper bound (1 - (1-c)^(1/n) at the maximum) <= target.
    """
    _check_rate(target)
    if confidence is None:
        return max(1, math.ceil(1.0 / target - 1.0 - _EPS))
    n = math.ceil(math.log(1.0 - confidence) / math.log1p(-target) - _EPS)
    while best_upper_bound(n, confidence) > target + _EPS:  # guard against rounding
        n += 1
    return max(1, n)


def _check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f"a false-reject rate must be in (0, 1), got {rate}")


def target_rank(n: int, target: float, confidence: float, *, promise: bool = False) -> int | None:
    """The largest j (good samples above the threshold) whose FRR meets `target`.

    promise=False: expected FRR (j + 1)/(n + 1) <= target, i.e. on average the target is met.
    promise=True: the upper bound at `confidence` <= target, i.e. the target is met with that
    confidence. None when even j = 0 (threshold above every good score) does not meet it.
    """
    _check_rate(target)
    top = math.floor(target * (n + 1) + _EPS) - 1  # largest j by expectation
    if top < 0:
        return None
    top = min(top, n - 1)
    if not promise:
        return top
    # The bound exceeds the mean for these right-skewed laws, so j <= top; it grows with j.
    js = np.arange(top + 1)
    ok = beta.ppf(confidence, js + 1, n - js) <= target + _EPS
    return int(js[ok].max()) if ok.any() else None


# --------------------------------------------------------------------------- operating points


@dataclass(frozen=True)
class OperatingPoint:
    """One candidate image threshold and what the samples say about it."""

    name: str  # "target", "f1" or "keep-all"
    threshold: float
    frr: FalseReject
    n_defects: int
    caught: int  # defect samples at or above the threshold

    @property
    def recall(self) -> float | None:
        return self.caught / self.n_defects if self.n_defects else None

    @property
    def precision(self) -> float | None:
        flagged = self.caught + self.frr.rejected
        return self.caught / flagged if self.n_defects and flagged else None

    @property
    def f1(self) -> float | None:
        if not self.n_defects:
            return None
        return f1_score(self.caught, self.frr.rejected, self.n_defects - self.caught)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "false_reject_expected": self.frr.expected,
            "false_reject_upper_bound": self.frr.upper,
            "false_reject_observed": self.frr.observed,
            "good_rejected": self.frr.rejected,
            "defects_caught": self.caught if self.n_defects else None,
            "recall": self.recall,
            "precision": self.precision,
            "f1": self.f1,
        }


def f1_score(tp: int, fp: int, fn: int) -> float:
    """F1 with defects as the positive class; 0.0 when nothing is positive or flagged."""
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def operating_point(
    name: str, good: np.ndarray, defects: np.ndarray, threshold: float, confidence: float
) -> OperatingPoint:
    caught = int(np.count_nonzero(np.asarray(defects) >= threshold))
    return OperatingPoint(
        name, float(threshold), false_reject_at(good, threshold, confidence), len(defects), caught
    )


@dataclass(frozen=True)
class TargetChoice:
    point: OperatingPoint
    reachable: bool  # False: the samples cannot meet the target; the threshold is the maximum


def choose_target(
    good: np.ndarray,
    defects: np.ndarray,
    target: float,
    confidence: float,
    *,
    promise: bool = False,
) -> TargetChoice:
    """Threshold just above the (n-j)-th good score, j = target_rank(...).

    When the target cannot be met with n samples the threshold goes just above the largest
    good score (the best the data can do) and `reachable` is False; the caller must say so.
    """
    ordered = np.sort(np.asarray(good, dtype=np.float64))
    n = len(ordered)
    j = target_rank(n, target, confidence, promise=promise)
    threshold = just_above(ordered[n - 1 - (j if j is not None else 0)])
    point = operating_point("target", ordered, defects, threshold, confidence)
    return TargetChoice(point, j is not None)


def _candidates(good: np.ndarray, defects: np.ndarray) -> np.ndarray:
    """Every threshold that can be best: just above each distinct good score (between two
    good scores, the lowest threshold catches the most defects for the same false rejects),
    plus the lowest score of all (everything rejected)."""
    distinct = np.unique(np.asarray(good, dtype=np.float32))
    above_good = np.nextafter(distinct, np.float32(np.inf)).astype(np.float64)
    lowest = min(float(np.min(good)), float(np.min(defects)))
    return np.concatenate([[lowest], above_good])


def _counts_at(
    good: np.ndarray, defects: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(good rejected, defects caught) for each threshold, rule score >= threshold."""
    g, d = np.sort(good), np.sort(defects)
    fp = len(g) - np.searchsorted(g, thresholds, side="left")
    tp = len(d) - np.searchsorted(d, thresholds, side="left")
    return fp, tp


def choose_f1(good: np.ndarray, defects: np.ndarray, confidence: float) -> OperatingPoint:
    """The threshold with the best F1 on the given samples (ties: the higher threshold, which
    rejects fewer good parts)."""
    good, defects = _require_both(good, defects)
    thresholds = _candidates(good, defects)
    fp, tp = _counts_at(good, defects, thresholds)
    fn = len(defects) - tp
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = np.flatnonzero(f1 >= f1.max() - _EPS).max()  # candidates ascend: max = highest
    return operating_point("f1", good, defects, float(thresholds[best]), confidence)


def choose_keep_all(good: np.ndarray, defects: np.ndarray, confidence: float) -> OperatingPoint:
    """The highest threshold that still catches every given defect.

    Just above the largest good score below the weakest defect (the same good parts are
    rejected as at the weakest defect's score, with the widest margin for defects); the
    weakest defect's score itself when no good score lies below it (all good parts rejected).
    """
    good, defects = _require_both(good, defects)
    weakest = float(np.min(defects))
    below = good[good < weakest]
    threshold = just_above(below.max()) if below.size else weakest
    if threshold > weakest:  # float32 rounding of a float64 defect score
        threshold = weakest
    return operating_point("keep-all", good, defects, threshold, confidence)


def _require_both(good: np.ndarray, defects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    good = np.asarray(good, dtype=np.float64)
    defects = np.asarray(defects, dtype=np.float64)
    if good.size == 0 or defects.size == 0:
        raise ValueError("need good and defect scores")
    return good, defects


# --------------------------------------------------------------------------- pixel, scale


@dataclass(frozen=True)
class PixelThreshold:
    threshold: float
    good_with_mask: float  # fraction of the good samples with any pixel >= threshold
    frr: FalseReject  # the same order-statistic law, for "a fresh good image shows a mask"


def choose_pixel(good_map_maxima: np.ndarray, confidence: float) -> PixelThreshold:
    """Pixel threshold just above the largest value of any good image's smoothed anomaly map.

    So every calibration good image has an empty mask, and a fresh good image shows any masked
    pixel with probability Beta(1, n): expected 1/(n+1), bounded like the image FRR at j = 0.
    No extra margin: the map is in feature-distance units, where a fixed margin would be
    arbitrary, and the agent draws regions only for NG frames anyway.
    """
    maxima = np.asarray(good_map_maxima, dtype=np.float64)
    if maxima.size == 0:
        raise ValueError("need at least one good anomaly map")
    threshold = just_above(maxima.max())
    return PixelThreshold(
        threshold,
        float(np.mean(maxima >= threshold)),
        false_reject_at(maxima, threshold, confidence),
    )


def normalization(good: np.ndarray, threshold: float, defects: np.ndarray) -> dict[str, float]:
    """The scale for edge_agent.model.scoring.normalise: (low, 0), (threshold, 0.5), (high, 1).

    low: the lowest good score (0 if that is not below the threshold; scores are distances);
    high: the highest defect score when defects are given and it lies above the threshold,
    else the threshold mirrored about itself: threshold + (threshold - low).
    """
    low = float(np.min(good))
    if low >= threshold:
        low = 0.0
    defects = np.asarray(defects)
    top = float(np.max(defects)) if defects.size else -math.inf
    high = top if top > threshold else threshold + (threshold - low)
    return {"low": low, "threshold": float(threshold), "high": high}


# --------------------------------------------------------------------------- held-out split


@dataclass(frozen=True)
class HoldoutSplit:
    train_dir: Path  # the rest, to fit a new bundle on (OUT/train/good)
    holdout_dir: Path  # good images the new bundle never sees, for --good (OUT/holdout)
    n_train: int
    n_holdout: int
    linked: bool  # hard links (no extra disk) rather than copies


def split_holdout(
    train_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    holdout: float,
    seed: int = 0,
) -> HoldoutSplit:
    """Split a folder of good images into OUT/train/good and OUT/holdout, at random.

    `holdout` is a number of images (>= 1) or a fraction (< 1). The source folder is left as
    it is: files are hard-linked where the file system allows, else copied. Fit a new bundle
    on OUT (its train/good) and calibrate it with --good OUT/holdout.
    """
    if not (0 < holdout < 1 or (holdout >= 1 and holdout == int(holdout))):
        raise UserError(f"--holdout {holdout:g}: give a number of images or a fraction in (0, 1)")
    paths = list_images(train_dir)
    count = round(holdout * len(paths)) if holdout < 1 else int(holdout)
    if not 1 <= count < len(paths):
        raise UserError(
            f"--holdout {holdout:g}: {train_dir} has {len(paths)} images; hold out at least 1 "
            "and leave at least 1 to fit on"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder for the split")
    held = set(random.Random(seed).sample(range(len(paths)), count))
    train, holdout_dir = out / "train" / "good", out / "holdout"
    train.mkdir(parents=True, exist_ok=True)
    holdout_dir.mkdir(parents=True, exist_ok=True)
    linked = True
    for i, path in enumerate(paths):
        dest = (holdout_dir if i in held else train) / path.name
        linked = _link_or_copy(path, dest) and linked
    return HoldoutSplit(train, holdout_dir, len(paths) - count, count, linked)


def _link_or_copy(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest)
        return True
    except OSError:
        shutil.copy2(src, dest)
        return False
