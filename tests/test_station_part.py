"""Part assembly: complete, timed out, in trigger order, bounded."""

from __future__ import annotations

from edge_agent.station import part as part_module
from edge_agent.station.part import PartAssembler

EXPECTED = ("cap", "label")


def _result(verdict: str, inspection: str = "cap") -> dict:
    return {"id": inspection, "verdict": verdict, "score": 1.0}


def test_a_part_completes_when_every_inspection_answered() -> None:
    parts = PartAssembler(timeout_s=2.0)
    parts.open("p1", "bottle-a", EXPECTED, now=0.0)
    parts.add("p1", "bottle-a", EXPECTED, "cap", _result("OK"), now=0.1)
    assert parts.poll(now=0.2) == []
    parts.add("p1", "bottle-a", EXPECTED, "label", _result("NG", "label"), now=0.3)
    (done,) = parts.poll(now=0.3)
    msg = done.verdict_message()
    assert msg["part_id"] == "p1" and msg["recipe"] == "bottle-a"
    assert msg["verdict"] == "NG" and msg["missing"] == []
    assert [i["id"] for i in msg["inspections"]] == ["cap", "label"]
    assert len(parts) == 0


def test_a_silent_inspection_makes_the_part_error_and_is_named() -> None:
    parts = PartAssembler(timeout_s=2.0)
    parts.add("p1", "bottle-a", EXPECTED, "cap", _result("OK"), now=0.0)
    assert parts.poll(now=1.99) == []
    (done,) = parts.poll(now=2.0)
    msg = done.verdict_message()
    assert msg["verdict"] == "ERROR" and msg["missing"] == ["label"]


def test_parts_leave_in_the_order_they_opened() -> None:
    parts = PartAssembler(timeout_s=2.0)
    parts.open("p1", "a", EXPECTED, now=0.0)
    parts.open("p2", "a", EXPECTED, now=0.5)
    for inspection in EXPECTED:
        parts.add("p2", "a", EXPECTED, inspection, _result("OK", inspection), now=0.6)
    assert parts.poll(now=1.0) == [], "p2 is complete but waits for p1"
    parts.add("p1", "a", EXPECTED, "cap", _result("OK"), now=1.1)
    parts.add("p1", "a", EXPECTED, "label", _result("OK", "label"), now=1.2)
    assert [p.part_id for p in parts.poll(now=1.2)] == ["p1", "p2"]


def test_the_recipe_of_a_part_is_the_one_it_opened_under() -> None:
    parts = PartAssembler(timeout_s=2.0)
    parts.open("p1", "a", ("cap",), now=0.0)
    parts.add("p1", "b", ("x", "y"), "cap", _result("OK"), now=0.1)  # changed over meanwhile
    (done,) = parts.poll(now=0.1)
    assert done.verdict_message()["recipe"] == "a"


def test_duplicates_and_strangers_are_counted_not_used() -> None:
    parts = PartAssembler(timeout_s=2.0)
    parts.add("p1", "a", EXPECTED, "cap", _result("OK"), now=0.0)
    parts.add("p1", "a", EXPECTED, "cap", _result("NG"), now=0.1)
    parts.add("p1", "a", EXPECTED, "fill", _result("NG", "fill"), now=0.1)
    parts.add("p1", "a", EXPECTED, "label", _result("OK", "label"), now=0.2)
    (done,) = parts.poll(now=0.2)
    assert done.verdict_message()["verdict"] == "OK", "the first result of each counts"
    assert (parts.duplicates, parts.unexpected) == (1, 1)


def test_open_parts_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(part_module, "MAX_OPEN_PARTS", 3)
    parts = PartAssembler(timeout_s=100.0)
    for i in range(5):
        parts.open(f"p{i}", "a", EXPECTED, now=float(i))
    done = parts.poll(now=5.0)
    assert [p.part_id for p in done] == ["p0", "p1"] and len(parts) == 3
    assert parts.overflowed == 2
    assert all(p.verdict_message()["verdict"] == "ERROR" for p in done)
    assert [p.part_id for p in parts.close_all()] == ["p2", "p3", "p4"]
