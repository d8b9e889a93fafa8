"""A candidate bundle on production's live frames: what it would have answered, counted, and
the budget that keeps it from slowing production. Pure: the service measures the seconds and
hands in the verdicts; nothing here reads a clock, a model or a file.

The candidate decides nothing. Per inspection the comparison counts

- the agreement matrix, production's verdict x the candidate's (OK/NG/ERROR each);
- would-be false rejects: frames production passed and the candidate would reject (NG or
  ERROR: either stops a good part);
- would-be catches: frames production rejected (NG) that the candidate rejects too;
- the score quantiles of both over the last ``window`` frames.

Budget: after each batch the service credits ``max_share`` x production's inference seconds
and asks how many of the batch's frames the candidate may take (``Budget.take``) at its
measured cost per frame; the frames it may not take are counted as skipped and never wait. A
run's real cost is charged afterwards, so credit may go negative and the next frames wait for
it. Credit is capped, so a quiet spell does not save up a burst that production would then
feel. Over any run, candidate seconds <= max_share x production seconds + the cap + one
batch's error of estimate (tests/test_lifecycle_shadow.py checks this against brute force).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.decide.decision import ERROR, NG, OK

VERDICTS = (OK, NG, ERROR)
QUANTILES = (0.5, 0.9, 0.99)
BURST_PRODUCTION_S = 2.0
"""The cap on saved-up credit, in production seconds (x max_share): a shadow that could not
run for a while catches up by at most this much at once."""
COST_SMOOTHING = 0.2  # weight of the newest run in the cost-per-frame estimate


class Budget:
    """Inference seconds the candidate may spend, as a share of production's."""

    def __init__(self, max_share: float) -> None:
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
        self.max_share = max_share
        self.credit = 0.0
        self.cost_per_frame: float | None = None  # None until the first run is measured
        self.production_s = 0.0
        self.shadow_s = 0.0

    @property
    def cap(self) -> float:
        one = self.cost_per_frame or 0.0
        # Never below one frame's cost, or a slow candidate could never run at all.
        return max(self.max_share * BURST_PRODUCTION_S, one)

    def earn(self, production_s: float) -> None:
        """Production spent ``production_s`` on a batch: the candidate's share of it."""
        production_s = max(0.0, production_s)
        self.production_s += production_s
        self.credit = min(self.credit + self.max_share * production_s, self.cap)

    def take(self, frames: int) -> int:
        """How many of ``frames`` the candidate may score now (0..frames)."""
        if frames <= 0 or self.credit <= 0:
            return 0
        if self.cost_per_frame is None:
            return 1  # one frame to learn what a frame costs
        return min(frames, int(self.credit / self.cost_per_frame))

    def spend(self, seconds: float, frames: int) -> None:
        """The candidate took ``seconds`` for ``frames`` frames."""
        seconds = max(0.0, seconds)
        self.shadow_s += seconds
        self.credit -= seconds
        if frames > 0:
            each = seconds / frames
            old = self.cost_per_frame
            self.cost_per_frame = (
                each if old is None else (1 - COST_SMOOTHING) * old + COST_SMOOTHING * each
            )

    @property
    def share(self) -> float:
        """Candidate seconds over production seconds so far."""
        return self.shadow_s / self.production_s if self.production_s > 0 else 0.0


def _rejects(verdict: str) -> bool:
    # Anything but OK stops the part (an unknown verdict too: fail safe).
    return verdict != OK


@dataclass(frozen=True)
class Comparison:
    """One frame as both saw it."""

    production: str
    candidate: str
    production_score: float | None = None
    candidate_score: float | None = None

    @property
    def disagree(self) -> bool:
        return self.production != self.candidate


class ShadowStats:
    """The comparison of one inspection's candidate with production."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window!r}")
        self.window = window
        self.matrix = {p: dict.fromkeys(VERDICTS, 0) for p in VERDICTS}
        self.skipped = 0  # frames the budget did not let the candidate take
        self.archived = 0  # disagreements saved to the archive
        self._scores: dict[str, deque[float]] = {
            "production": deque(maxlen=window),
            "candidate": deque(maxlen=window),
        }

    def add(self, c: Comparison) -> None:
        p = c.production if c.production in VERDICTS else ERROR
        q = c.candidate if c.candidate in VERDICTS else ERROR
        self.matrix[p][q] += 1
        for key, score in (("production", c.production_score), ("candidate", c.candidate_score)):
            if score is not None and np.isfinite(score):
                self._scores[key].append(float(score))

    @property
    def frames(self) -> int:
        return sum(sum(row.values()) for row in self.matrix.values())

    @property
    def passed(self) -> int:
        """Frames production passed."""
        return sum(self.matrix[OK].values())

    @property
    def false_rejects(self) -> int:
        return sum(n for q, n in self.matrix[OK].items() if _rejects(q))

    @property
    def rejected(self) -> int:
        """Frames production rejected as NG."""
        return sum(self.matrix[NG].values())

    @property
    def catches(self) -> int:
        return self.matrix[NG][NG]

    @property
    def disagreements(self) -> int:
        return sum(n for p, row in self.matrix.items() for q, n in row.items() if p != q)

    def report(self) -> dict[str, Any]:
        """The figures the shadow topic, the metrics and the live view show."""
        return {
            "frames": self.frames,
            "skipped": self.skipped,
            "matrix": {p: dict(row) for p, row in self.matrix.items()},
            "passed": self.passed,
            "false_rejects": self.false_rejects,
            "false_reject_rate": rate(self.false_rejects, self.passed),
            "rejected": self.rejected,
            "catches": self.catches,
            "catch_rate": rate(self.catches, self.rejected),
            "disagreements": self.disagreements,
            "archived": self.archived,
            "quantiles": {key: quantiles(values) for key, values in self._scores.items()},
        }


def rate(part: int, whole: int) -> float | None:
    """part / whole, None when there is no whole to speak of."""
    return part / whole if whole > 0 else None


def quantiles(values: Iterable[float]) -> dict[str, float] | None:
    """{"p50": .., "p90": .., "p99": .., "max": ..} of finite ``values``; None without any."""
    data = np.fromiter(values, dtype=np.float64)
    if data.size == 0:
        return None
    found = np.quantile(data, QUANTILES)
    out = {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, found, strict=True)}
    out["max"] = float(data.max())
    return out
