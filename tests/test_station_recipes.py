"""Recipe selection commands: every hostile payload refused with a reason, never raised."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.station.recipes import (
    MAX_COMMAND_BYTES,
    Inspection,
    Recipe,
    RecipeBook,
    Select,
    parse_select,
)


def _book() -> RecipeBook:
    cap = Inspection("cap", "cam1", Path("b/cap"))
    label = Inspection("label", "cam1", Path("b/label"), roi=(0, 0, 10, 10))
    side = Inspection("side", "cam2", Path("b/cap"))
    return RecipeBook(
        {
            "bottle-a": Recipe("bottle-a", 1, (cap, label)),
            "bottle-b": Recipe("bottle-b", 2, (side,)),
        },
        active="bottle-a",
    )


def test_select_by_name_or_number() -> None:
    assert parse_select(b'{"recipe": "bottle-b"}') == Select(name="bottle-b")
    assert parse_select(b'{"number": 2, "request_id": "r-7"}') == Select(number=2, request_id="r-7")
    book = _book()
    recipe = book.find(Select(number=2))
    assert isinstance(recipe, Recipe) and recipe.name == "bottle-b"
    assert book.find(Select(name="bottle-c")) == "no recipe named 'bottle-c'"
    assert book.find(Select(number=9)) == "no recipe with number 9"
    assert book.bundles() == (Path("b/cap"), Path("b/label"))
    assert book.recipes["bottle-a"].on_camera("cam1")[1].id == "label"
    assert book.recipes["bottle-a"].inspection_ids == ("cap", "label")


def test_hostile_commands_are_refused_with_a_reason() -> None:
    cases = {
        b"": "not JSON",
        b"\xff\xfe": "not JSON",
        b"[" * 100_000: f"at most {MAX_COMMAND_BYTES}",
        b"[" * 4000: "not JSON",  # nested past the parser's recursion limit, within the size
        b'"bottle-a"': "not a JSON object",
        b"[1]": "not a JSON object",
        b"{}": "exactly one of",
        b'{"recipe": "a", "number": 1}': "exactly one of",
        b'{"recipe": ""}': "non-empty string",
        b'{"recipe": 5}': "non-empty string",
        b'{"number": true}': "integer 1..32767",
        b'{"number": 1.0}': "integer 1..32767",
        b'{"number": 0}': "integer 1..32767",
        b'{"number": 32768}': "integer 1..32767",
        b'{"number": "2"}': "integer 1..32767",
        b'{"number": 2, "request_id": 5}': "request_id must be a string",
        b'{"number": 2, "request_id": "' + b"x" * 200 + b'"}': "request_id must be a string",
        b'{"number": 2, "recipes": "x"}': "unknown field(s) ['recipes']",
        b'{"number": 1e400}': "integer",
        b'{"number": NaN}': "integer",
    }
    for payload, words in cases.items():
        reason = parse_select(payload)
        assert isinstance(reason, str) and words in reason, (payload[:40], reason)


@given(st.binary(max_size=600))
def test_no_bytes_raise(payload: bytes) -> None:
    assert isinstance(parse_select(payload), (Select, str))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_no_json_raises(value: object) -> None:
    assert isinstance(parse_select(json.dumps(value).encode()), (Select, str))
