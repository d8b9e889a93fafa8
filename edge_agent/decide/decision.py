"""From scores to a verdict: pure functions, no I/O, no model.

- verdict: NG when the image score reaches the image threshold (score >= threshold), else OK;
  ERROR when the score is not a finite number (NaN or infinite: the model is broken, and
  `nan >= threshold` being False must not let the part pass as OK);
- normalised score: the calibrated piecewise-linear scale (threshold -> 0.5); without a
  calibrated scale, score / (2 * threshold) clipped to [0, 1], which also puts the threshold
  at 0.5;
- regions: connected components of the anomaly map >= the pixel threshold, in the ORIGINAL
  frame's pixel coordinates, reported for NG verdicts only. An OK frame may still have a few
  pixels over the pixel threshold (the two thresholds are calibrated separately); reporting
  them would contradict the verdict, and skipping the map for OK frames saves its cost on the
  common path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edge_agent.model import scoring

OK = "OK"
NG = "NG"
ERROR = "ERROR"  # not inspected; publish.contract sends it with the `error` reason
NONFINITE = "non-finite score"

# A config override this far outside the bundle's calibrated score range is almost surely a
# typo or a threshold for another model: warned about at start and flagged in health.
OVERRIDE_RANGE_FACTOR = 2.0

MAX_REGIONS = 16  # keeps a verdict message small even for a frame full of speckles


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds plus the normalisation scale (None: uncalibrated scale)."""

    image: float
    pixel: float
    normalization: dict[str, float] | None = None
    # One message per config override far outside the calibrated range (see resolve_thresholds).
    out_of_range: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("image", "pixel"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} threshold must be a positive number, got {value!r}")

    @property
    def scale(self) -> dict[str, float]:
        """The normalisation actually used: calibrated when it fits the image threshold."""
        norm = self.normalization
        if norm and float(norm["low"]) < self.image < float(norm["high"]):
            return {"low": float(norm["low"]), "threshold": self.image, "high": float(norm["high"])}
        return {"low": 0.0, "threshold": self.image, "high": 2.0 * self.image}


def resolve_thresholds(
    bundle_thresholds: dict[str, Any], image: float | None, pixel: float | None
) -> Thresholds | None:
    """Config overrides win over the bundle's calibration; None when either is unknown.

    Overrides are compared with the calibrated score range (`normalization` low..high):
    an image threshold below `low` rejects every good calibration part, one above
    OVERRIDE_RANGE_FACTOR x `high` passes far more than the worst defect seen; the pixel
    threshold gets the same factor on both sides. Each such override is one message in
    `out_of_range` (the agent warns and flags it in health; it still obeys the config).
    """
    norm = bundle_thresholds.get("normalization")
    norm = dict(norm) if isinstance(norm, dict) else None
    out_of_range = tuple(
        problem
        for key, value in (("image", image), ("pixel", pixel))
        if value is not None and (problem := _override_problem(key, float(value), norm))
    )
    image = image if image is not None else bundle_thresholds.get("image")
    pixel = pixel if pixel is not None else bundle_thresholds.get("pixel")
    if image is None or pixel is None:
        return None
    return Thresholds(float(image), float(pixel), norm, out_of_range)


def _override_problem(key: str, value: float, norm: dict[str, Any] | None) -> str | None:
    if not norm:
        return None  # uncalibrated bundle: nothing to compare with
    low, high = float(norm["low"]), float(norm["high"])
    f = OVERRIDE_RANGE_FACTOR
    lowest = low if key == "image" else low / f
    if lowest <= value <= f * high:
        return None
    side = f"below {lowest:g}" if value < lowest else f"above {f:g} x {high:g}"
    return (
        f"thresholds.{key} {value:g} is far outside the bundle's calibrated score range "
        f"{low:g}..{high:g} ({side}): check the config override"
    )


@dataclass(frozen=True)
class Decision:
    verdict: str  # OK, NG, or ERROR (non-finite score; `error` says so)
    score: float
    normalised_score: float
    threshold: float
    regions: tuple[scoring.Region, ...] = ()
    anomaly_map: np.ndarray | None = field(default=None, compare=False, repr=False)
    error: str | None = None

    @property
    def is_ng(self) -> bool:
        return self.verdict == NG

    @property
    def is_error(self) -> bool:
        return self.verdict == ERROR


def verdict_for(score: float, thresholds: Thresholds) -> str:
    # Checked first: every comparison with NaN is False, which would read as OK.
    if not math.isfinite(score):
        return ERROR
    return NG if score >= thresholds.image else OK


def frame_map(amap: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
    """An anomaly map at the model's input size -> float32 map at the frame's size."""
    height, width = frame_hw
    if amap.shape[:2] == (height, width):
        return np.asarray(amap, dtype=np.float32)
    amap = np.ascontiguousarray(amap, dtype=np.float32)
    return cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)


def decide(
    score: float,
    amap_input: np.ndarray | None,
    frame_hw: tuple[int, int],
    thresholds: Thresholds,
    *,
    max_regions: int = MAX_REGIONS,
    ignore: np.ndarray | None = None,
) -> Decision:
    """The verdict for one frame.

    `amap_input` is the anomaly map at the model's input size (Scorer.anomaly_map); it is only
    used for NG frames and may be None for OK ones. Regions are found on the map resized to
    `frame_hw` (height, width), so their boxes are in the original frame's pixels. `ignore`
    (bool, `frame_hw`) zeroes the map where True: no region is found on ignored pixels.
    """
    score = float(score)
    verdict = verdict_for(score, thresholds)
    if verdict == ERROR:
        return Decision(ERROR, score, math.nan, thresholds.image, error=f"{NONFINITE} ({score})")
    normalised = float(scoring.normalise(score, thresholds.scale))
    if verdict == OK or amap_input is None:
        return Decision(verdict, score, normalised, thresholds.image)
    amap = frame_map(amap_input, frame_hw)
    if ignore is not None:
        amap = np.where(ignore, np.float32(0.0), amap)
    regions = scoring.find_regions(amap, thresholds.pixel)[:max_regions]
    return Decision(verdict, score, normalised, thresholds.image, tuple(regions), amap)
