"""One answer per part: the results of a recipe's inspections for one part id, assembled.

A part opens at its first trigger (or its first result, whichever comes first) with the
inspections its recipe expects at that moment; a later recipe change does not move it. It is
complete when every expected inspection has answered, and ERROR, with the silent ones named in
``missing``, when ``timeout_s`` passes first. Parts come out in the order they opened: a part
that completes early waits for those before it (at most until their timeout), because a PLC
matches results to parts by their order on the conveyor as much as by id.

Pure: the caller passes ``now`` (monotonic seconds) and polls; no clock, no thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.decide.decision import ERROR
from edge_agent.station.verdicts import worst

MAX_OPEN_PARTS = 1024
"""Parts waiting at once; past it the oldest is closed as it stands (ERROR, its silent
inspections named), so a stream of triggers without frames cannot grow memory."""


@dataclass
class Part:
    part_id: str
    recipe: str
    expected: tuple[str, ...]
    opened_at: float
    results: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(i in self.results for i in self.expected)

    def verdict_message(self) -> dict[str, Any]:
        """``part_id, recipe, verdict (worst), inspections[...], missing[]``: each inspection as
        it answered, in the recipe's order; missing ones make the part ERROR."""
        missing = [i for i in self.expected if i not in self.results]
        inspections = [dict(self.results[i]) for i in self.expected if i in self.results]
        verdicts = [str(r.get("verdict")) for r in inspections]
        return {
            "part_id": self.part_id,
            "recipe": self.recipe,
            "verdict": ERROR if missing else worst(verdicts),
            "inspections": inspections,
            "missing": missing,
        }


class PartAssembler:
    """Open parts by id, in the order they opened."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._open: OrderedDict[str, Part] = OrderedDict()
        self.unexpected = 0  # results for an inspection the part's recipe does not have
        self.duplicates = 0  # a second result of one inspection for one part (the first counts)
        self.overflowed = 0  # parts closed early because MAX_OPEN_PARTS were waiting

    def __len__(self) -> int:
        return len(self._open)

    def open(self, part_id: str, recipe: str, expected: Sequence[str], now: float) -> Part:
        """The part ``part_id``, opened now if it is not open yet (later calls change nothing)."""
        part = self._open.get(part_id)
        if part is None:
            part = Part(part_id, recipe, tuple(expected), now)
            self._open[part_id] = part
        return part

    def add(
        self,
        part_id: str,
        recipe: str,
        expected: Sequence[str],
        inspection_id: str,
        result: Mapping[str, Any],
        now: float,
    ) -> None:
        """One inspection's result for ``part_id`` (``recipe``/``expected`` open the part if
        no trigger did)."""
        part = self.open(part_id, recipe, expected, now)
        if inspection_id not in part.expected:
            self.unexpected += 1
        elif inspection_id in part.results:
            self.duplicates += 1
        else:
            part.results[inspection_id] = result

    def poll(self, now: float) -> list[Part]:
        """The parts that are done (complete, or past their timeout), oldest first, stopping at
        the first that is still waiting; they are removed."""
        done: list[Part] = []
        while self._open:
            part = next(iter(self._open.values()))
            overflow = len(self._open) > MAX_OPEN_PARTS
            if not (part.complete or now - part.opened_at >= self.timeout_s or overflow):
                break
            self.overflowed += overflow
            done.append(self._open.popitem(last=False)[1])
        return done

    def close_all(self) -> list[Part]:
        """Every open part, as it stands (at a stop): oldest first."""
        parts = list(self._open.values())
        self._open.clear()
        return parts
