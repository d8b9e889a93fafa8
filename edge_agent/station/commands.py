"""The envelope every JSON command a plant sends shares (recipe select, model changes): a size
bound, UTF-8 JSON, one object, no field the command does not know. One copy of those rules, so
each command's parser checks only its own fields."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def json_command(payload: bytes, limit: int, known: Iterable[str]) -> dict[str, Any] | str:
    """The payload's JSON object when it is at most `limit` bytes of UTF-8 JSON, an object, with
    only `known` fields; else the reason it is refused (one line, for the sender)."""
    if len(payload) > limit:
        return f"command of {len(payload)} bytes (at most {limit})"
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "not JSON in UTF-8"
    if not isinstance(data, dict):
        return "not a JSON object"
    unknown = sorted(set(data) - set(known))
    if unknown:
        return f"unknown field(s) {unknown}"
    return data
