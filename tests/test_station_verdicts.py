"""The worst-wins rule against a brute force over every combination."""

from __future__ import annotations

import itertools

from edge_agent.station.verdicts import worst


def test_worst_matches_a_brute_force_over_all_combinations() -> None:
    rank = {"OK": 0, "NG": 1, "ERROR": 2}
    for n in range(1, 4):
        for combo in itertools.product(["OK", "NG", "ERROR"], repeat=n):
            expected = max(combo, key=rank.__getitem__)
            assert worst(combo) == expected, combo


def test_nothing_inspected_or_an_unknown_verdict_never_passes() -> None:
    assert worst([]) == "ERROR"
    assert worst(["OK", "ok"]) == "ERROR"
    assert worst(["OK", None]) == "ERROR"  # type: ignore[list-item]
