"""Trigger mode's pairing rule: each trigger takes the first frame of its camera captured at
or after the trigger's arrival, one frame per trigger, in arrival order; at most
MAX_PENDING_TRIGGERS wait, and the oldest beyond that are dropped and counted. Whatever a
peer publishes as a trigger is refused and counted, never raised out of paho's callback."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.publish as single

from edge_agent.agent.config import load_config
from edge_agent.agent.service import MAX_PENDING_TRIGGERS, Agent, load_station
from edge_agent.capture.frame_queue import Frame
from edge_agent.publish.publisher import Publisher
from tests.brokers import (
    Broker,
    broker_fixture,  # noqa: F401  (the `broker` fixture)
)
from tests.test_publisher import PREFIX, make_settings, wait_until


def _agent(tmp_path: Path, small_bundle: Path) -> Agent:
    shutil.copytree(small_bundle, tmp_path / "bundle")
    (tmp_path / "frames").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        "bundle: bundle\nthresholds: {image: 30.0, pixel: 30.0}\n"
        "cameras:\n  - {id: station, source: frames, kind: folder, mode: trigger}\n"
        "mqtt: {spool_dir: spool}\nmetrics: {port: null}\n"
    )
    cfg = load_config(config)
    return Agent(cfg, load_station(cfg), exit_when_done=True)  # not started: no threads


def _frame(seq: int, captured_at: float) -> Frame:
    return Frame("station", seq, f"f{seq}", captured_at, np.zeros((4, 4, 3), np.uint8))


def test_each_trigger_takes_the_next_frame_after_it(tmp_path: Path, small_bundle: Path) -> None:
    agent = _agent(tmp_path, small_bundle)
    agent._triggers["station"].extend([(10.0, "A"), (10.0, "B"), (12.0, "C")])
    taken = [agent._take_trigger(_frame(i, t)) for i, t in enumerate((9.9, 10.0, 10.0, 11.0, 12.5))]
    # 9.9 came before any trigger: discarded. Two triggers in the same instant get two
    # frames, in order; C (at 12.0) does not take the 11.0 frame but the 12.5 one.
    assert taken == [(False, None), (True, "A"), (True, "B"), (False, None), (True, "C")]


def test_overflow_drops_the_oldest_and_counts_them(tmp_path: Path, small_bundle: Path) -> None:
    agent = _agent(tmp_path, small_bundle)
    extra = 6
    for i in range(MAX_PENDING_TRIGGERS + extra):
        agent._on_trigger("station", f"P-{i}")
    assert agent.counts["station"].triggers_dropped == extra
    sample = agent.metrics.registry.get_sample_value
    assert sample("edge_agent_triggers_dropped_total", {"camera": "station"}) == extra
    pending = [part for _, part in agent._triggers["station"]]
    assert pending[0] == f"P-{extra}" and len(pending) == MAX_PENDING_TRIGGERS


# -- hostile trigger payloads on a real broker ---------------------------------------------

HOSTILE_TRIGGERS = [
    b'{"part_id": ' + b"[" * 3000,  # RecursionError inside json, within the size bound
    b'{"part_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # over the size bound
    b"P" * (1 << 20),  # 1 MiB
    b"\xff\xfe P-1",  # not UTF-8
    b"P-1\x00",
    "P-\u202e1".encode(),
    b'{"part_id": true}',
    b'{"part_id": ' + b"9" * 4000 + b"}",  # an integer far longer than a part id
    b'{"part_id": "\\ud800"}',  # a lone surrogate
    b"{not json",
    b"",
]


def test_hostile_triggers_are_refused_without_dropping_the_connection(
    broker: Broker, tmp_path: Path
) -> None:
    """contract.parse_part_id runs inside paho's on_message (link.py): an exception there
    would drop the connection. Each payload is refused and counted; the link stays up."""
    opts: dict[str, Any] = {"hostname": "127.0.0.1", "port": broker.port, "qos": 1}
    calls: list[tuple[str, str]] = []
    pub = Publisher(make_settings(broker.port, tmp_path), ["camA"])
    pub.start()
    try:
        pub.set_trigger_handler(lambda camera, part_id: calls.append((camera, part_id)))
        # The subscription is made on the network thread: probe until it is in place.
        assert wait_until(
            lambda: bool(calls) or single.single(f"{PREFIX}/camA/trigger", "probe", **opts) or 0
        )
        assert wait_until(lambda: ("camA", "probe") in calls)
        rejected = pub.stats["triggers_rejected"]
        single.multiple(
            [{"topic": f"{PREFIX}/camA/trigger", "payload": p, "qos": 1} for p in HOSTILE_TRIGGERS]
            + [{"topic": f"{PREFIX}/camA/trigger", "payload": b"P-OK", "qos": 1}],
            hostname="127.0.0.1",
            port=broker.port,
        )
        assert wait_until(lambda: calls[-1] == ("camA", "P-OK"))
        stats = pub.stats
    finally:
        pub.stop(timeout_s=2.0)
    assert stats["triggers_rejected"] - rejected == len(HOSTILE_TRIGGERS)
    assert stats["reconnects"] == 0 and stats["connected"]
    assert {part for _, part in calls} == {"probe", "P-OK"}
