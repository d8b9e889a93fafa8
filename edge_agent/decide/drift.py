"""Is the model still right for this line? Rolling statistics of the image scores a camera
sees, against the good-score distribution its thresholds were calibrated on.

Two signals, per camera, over the last `window` answered frames (ERROR frames left out):

- the median image score of the OK frames, as a share of the way from the calibration's
  good median m0 to the image threshold t:
      shift = (median(OK scores) - m0) / (t - m0)
  0: as calibrated; 1: the typical good part now scores at the threshold. A supplier change,
  a lens going soft or new lighting moves it either way (down too: the parts look unlike the
  ones the bank holds in another direction, and defects may hide there);
- the NG rate of all answered frames: a line that suddenly rejects many parts has either a
  real problem or a model that no longer fits.

An alarm needs `min_frames` frames in the window, so a start-up or a short burst does not
cry wolf; it clears when both signals are back inside their bounds. Defaults, and the MTD
replay that chose them: BENCHMARKS.md, "Drift".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_WINDOW = 500
DEFAULT_MIN_FRAMES = 200
DEFAULT_MEDIAN_SHIFT = 0.25
DEFAULT_NG_RATE = 0.1


@dataclass(frozen=True)
class DriftReference:
    """The calibration's good scores (median) and the image threshold in force."""

    good_median: float
    threshold: float

    @classmethod
    def from_calibration(
        cls, calibrated: dict[str, Any] | None, threshold: float
    ) -> DriftReference | None:
        """From the manifest's `thresholds.calibrated` record (calibrate writes `good_scores`);
        None when the bundle has none or its good median is not below the threshold."""
        good = (calibrated or {}).get("good_scores") or {}
        median = good.get("p50")
        if not isinstance(median, (int, float)) or not median < threshold:
            return None
        return cls(float(median), float(threshold))


@dataclass(frozen=True)
class DriftState:
    frames: int  # answered frames in the window (OK + NG)
    ok_median: float | None  # median OK score in the window
    shift: float | None  # (ok_median - good_median) / (threshold - good_median)
    ng_rate: float | None
    alarm: bool
    reason: str | None  # why the alarm is on, for the log line and the health message

    def as_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {
            "frames": self.frames,
            "ok_median": r(self.ok_median),
            "shift": r(self.shift),
            "ng_rate": r(self.ng_rate),
            "alarm": self.alarm,
            "reason": self.reason,
        }


def drift_state(
    scores: np.ndarray,
    ng: np.ndarray,
    reference: DriftReference,
    *,
    min_frames: int = DEFAULT_MIN_FRAMES,
    median_shift: float = DEFAULT_MEDIAN_SHIFT,
    ng_rate: float = DEFAULT_NG_RATE,
) -> DriftState:
    """The drift signals of a window of answered frames (`scores` [N], `ng` [N] bool) and the
    alarm rule: N >= min_frames and (|shift| >= median_shift or NG rate >= ng_rate)."""
    n = len(scores)
    ok = scores[~ng]
    median = float(np.median(ok)) if len(ok) else None
    shift = (
        None
        if median is None
        else (median - reference.good_median) / (reference.threshold - reference.good_median)
    )
    rate = float(ng.mean()) if n else None
    reasons = []
    if n >= min_frames:
        if shift is not None and abs(shift) >= median_shift:
            side = "up towards" if shift > 0 else "down away from"
            reasons.append(
                f"OK-score median {median:.3g} moved {side} the threshold "
                f"({shift:+.2f} of the way from the calibrated {reference.good_median:.3g} to "
                f"{reference.threshold:.3g}; bound {median_shift:g})"
            )
        if rate is not None and rate >= ng_rate:
            reasons.append(f"NG rate {rate:.1%} over the last {n} frames (bound {ng_rate:.0%})")
    return DriftState(n, median, shift, rate, bool(reasons), "; ".join(reasons) or None)


class DriftMonitor:
    """One camera's window of the last `window` answered frames (not thread-safe: the
    inference thread adds, and reads between batches)."""

    def __init__(
        self,
        reference: DriftReference,
        *,
        window: int = DEFAULT_WINDOW,
        min_frames: int = DEFAULT_MIN_FRAMES,
        median_shift: float = DEFAULT_MEDIAN_SHIFT,
        ng_rate: float = DEFAULT_NG_RATE,
    ) -> None:
        self.reference = reference
        self.rules = {"min_frames": min_frames, "median_shift": median_shift, "ng_rate": ng_rate}
        self._scores: deque[float] = deque(maxlen=window)
        self._ng: deque[bool] = deque(maxlen=window)

    def add(self, score: float, ng: bool) -> None:
        self._scores.append(float(score))
        self._ng.append(bool(ng))

    def state(self) -> DriftState:
        return drift_state(
            np.fromiter(self._scores, dtype=np.float64, count=len(self._scores)),
            np.fromiter(self._ng, dtype=bool, count=len(self._ng)),
            self.reference,
            **self.rules,
        )
