"""The one rule for combining verdicts: the worst wins (ERROR > NG > OK)."""

from __future__ import annotations

from collections.abc import Iterable

from edge_agent.decide.decision import ERROR, NG, OK

BY_SEVERITY = (OK, NG, ERROR)


def worst(verdicts: Iterable[str]) -> str:
    """The most severe of ``verdicts`` under OK < NG < ERROR. Nothing to combine is ERROR (a
    part or a frame that nothing inspected must never pass), and so is a verdict string this
    rule does not know."""
    error = BY_SEVERITY.index(ERROR)
    rank = max(
        (BY_SEVERITY.index(v) if v in BY_SEVERITY else error for v in verdicts), default=error
    )
    return BY_SEVERITY[rank]
