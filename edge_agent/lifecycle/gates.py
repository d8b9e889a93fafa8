"""The gates a candidate passes before it may become production, and the regression check
teach makes too. Pure: evidence in, the reasons it fails out (empty: it passes).

A candidate is promoted only when
1. its bundle passed the self-test (the one the agent runs at start and on reload);
2. it is calibrated: the bundle carries its own image and pixel thresholds and calibrate has
   run since the bank last changed (teach marks `calibration_stale`);
3. the shadow window holds at least ``min_frames`` compared frames, and its would-be false
   rejects among the frames production passed are at most ``max_false_reject_rate`` of them;
4. every confirmed defect of the inspection's regression set is still NG under it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edge_agent.decide.decision import NG


@dataclass(frozen=True)
class Rescored:
    """A confirmed defect as a bundle answers it now."""

    verdict: str
    score: float | None = None
    threshold: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Evidence:
    self_test: str | None  # why the self-test failed; None: passed
    thresholds: Mapping[str, object]  # the candidate bundle's manifest thresholds
    frames: int  # frames compared in the shadow window
    passed: int  # of those, frames production passed
    false_rejects: int  # of those, frames the candidate would reject
    calibration_stale: bool = False  # the manifest says the bank changed after calibrate
    regression: Mapping[str, Rescored] = field(default_factory=dict)


def regression_misses(rescored: Mapping[str, Rescored]) -> list[str]:
    """One reason per confirmed defect that would not be rejected as NG (an ERROR is a miss
    too: the candidate cannot answer a part it must reject)."""
    reasons = []
    for name, r in sorted(rescored.items()):
        if r.verdict == NG:
            continue
        if r.error is not None:
            reasons.append(f"confirmed defect {name}: cannot be scored ({r.error})")
        elif r.score is not None and r.threshold is not None:
            reasons.append(
                f"confirmed defect {name} would pass ({r.verdict}: score {r.score:.3f} < "
                f"threshold {r.threshold:.3f})"
            )
        else:
            reasons.append(f"confirmed defect {name} would be {r.verdict}")
    return reasons


def failed_gates(e: Evidence, *, min_frames: int, max_false_reject_rate: float) -> list[str]:
    """Every gate ``e`` fails, each as one reason; [] when the candidate may be promoted."""
    reasons = []
    if e.self_test is not None:
        reasons.append(f"self-test failed: {e.self_test}")
    missing = [k for k in ("image", "pixel") if e.thresholds.get(k) is None]
    if missing:
        reasons.append(
            f"not calibrated: the bundle has no {' or '.join(missing)} threshold "
            "(edge-agent calibrate)"
        )
    elif e.calibration_stale:
        reasons.append("calibration is stale: the bank changed since (edge-agent calibrate)")
    if e.frames < min_frames:
        reasons.append(
            f"shadow window: {e.frames} frame(s) compared, at least {min_frames} needed "
            "(shadow.min_frames)"
        )
    elif e.passed == 0:
        reasons.append(
            "shadow window: production passed no frame, so the false-reject rate is unknown"
        )
    elif e.false_rejects > max_false_reject_rate * e.passed:
        reasons.append(
            f"would-be false rejects: {e.false_rejects} of {e.passed} frames production "
            f"passed ({e.false_rejects / e.passed:.2%}), above "
            f"shadow.max_false_reject_rate {max_false_reject_rate:.2%}"
        )
    reasons.extend(regression_misses(e.regression))
    return reasons
