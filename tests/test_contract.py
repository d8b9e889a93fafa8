"""MQTT contract v1 payloads: the fields a PLC/SCADA subscriber relies on, strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_agent.decide.decision import NG, Thresholds, decide
from edge_agent.publish.contract import (
    ERROR,
    HEALTH_SCHEMA,
    encode_json,
    health_message,
    mark_delayed,
    parse_part_id,
    topic,
    verdict_message,
)
from tests.test_decision import map_with_blob


def test_verdict_message_fields_and_json() -> None:
    d = decide(6.0, map_with_blob(), (224, 224), Thresholds(image=2.0, pixel=2.0))
    msg = verdict_message(
        d,
        camera="cam1",
        sequence=7,
        frame_id="cam1-7",
        captured_at=1700000000.1234,
        decided_at=1700000000.2234,
        model_id="abc",
        part_id="P-1",
        reject_image="/a/b.jpg",
    )
    assert msg["schema"] == "edge-agent/verdict/v1"
    assert msg["timestamp"] == 1700000000123
    assert msg["verdict"] == NG and msg["part_id"] == "P-1" and msg["delayed"] is False
    assert msg["latency_ms"] == pytest.approx(100.0, abs=0.01)
    assert msg["regions"][0]["bbox"][0] == 100
    assert set(msg["regions"][0]) == {"bbox", "area", "peak"}
    json.dumps(msg, allow_nan=False)  # strict JSON


def test_error_message_and_nan_become_null() -> None:
    msg = verdict_message(
        None,
        camera="c",
        sequence=1,
        frame_id="c-1",
        captured_at=1.0,
        decided_at=1.5,
        model_id="m",
        error="empty frame",
    )
    assert msg["verdict"] == ERROR and msg["error"] == "empty frame"
    assert msg["score"] is None and msg["regions"] == []
    d = decide(float("nan"), None, (4, 4), Thresholds(image=1.0, pixel=1.0))
    msg = verdict_message(
        d, camera="c", sequence=1, frame_id="c-1", captured_at=1.0, decided_at=1.0, model_id="m"
    )
    # A NaN score is an ERROR like any frame that could not be inspected, never OK.
    assert msg["verdict"] == ERROR and msg["error"] == "non-finite score (nan)"
    assert msg["score"] is None and msg["threshold"] is None and msg["regions"] == []
    json.dumps(msg, allow_nan=False)
    assert not math.isnan(msg["latency_ms"])


def test_source_only_when_known() -> None:
    common = dict(camera="c", sequence=1, frame_id="c-1", captured_at=1.0, decided_at=1.0)
    assert "source" not in verdict_message(None, model_id="m", **common)
    assert verdict_message(None, model_id="m", source="a.png", **common)["source"] == "a.png"


def test_health_message_fields() -> None:
    msg = health_message(
        camera="c",
        timestamp=1700000000.5,
        fps=12.345,
        frames_in=10,
        dropped=1,
        inspected=8,
        ng=2,
        errors=1,
        discarded=0,
        queue_depth=3,
        spool=4,
        connected=True,
        finished=False,
        last_error=None,
        model_id="m",
        device="onnx:cpu faiss:cpu/flat",
        uptime_s=12.345,
    )
    assert msg["schema"] == HEALTH_SCHEMA and msg["timestamp"] == 1700000000500
    assert msg["fps"] == 12.35 and msg["uptime_s"] == 12.3
    # Added within v1: present (and false/zero) even when the caller does not know them.
    assert msg["nonfinite_scores"] == 0 and msg["threshold_override_out_of_range"] is False
    assert msg["aspect_mismatch"] is None
    json.loads(encode_json(msg))


def test_health_message_reports_nonfinite_scores_and_insane_thresholds() -> None:
    msg = health_message(
        camera="c", timestamp=1.0, fps=0.0, frames_in=3, dropped=0, inspected=0, ng=0,
        errors=3, discarded=0, queue_depth=0, spool=0, connected=True, finished=False,
        last_error=None, model_id="m", device=None, uptime_s=1.0,
        nonfinite_scores=3, threshold_override_out_of_range=True,
    )  # fmt: skip
    assert msg["nonfinite_scores"] == 3 and msg["threshold_override_out_of_range"] is True


def test_topic_and_delayed_marking() -> None:
    assert topic("plant/hall2", "line1", "cam1", "verdict") == "plant/hall2/line1/cam1/verdict"
    marked = json.loads(mark_delayed(encode_json({"verdict": "OK", "delayed": False})))
    assert marked == {"verdict": "OK", "delayed": True}
    assert mark_delayed(b"not json") == b"not json"
    assert mark_delayed(b"[1]") == b"[1]"
    assert encode_json({"s": np.float32(1.5), "n": np.int64(2)}) == b'{"s":1.5,"n":2}'


def test_parse_part_id() -> None:
    assert parse_part_id(b" P-1\n") == "P-1"
    assert parse_part_id(b'{"part_id": 42}') == "42"
    assert parse_part_id(b'{"part": 1}') is None
    assert parse_part_id(b"") is None
    assert parse_part_id(b"\xff") is None
