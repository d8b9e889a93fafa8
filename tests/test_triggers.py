"""Trigger mode's pairing rule: each trigger takes the first frame of its camera captured at
or after the trigger's arrival, one frame per trigger, in arrival order; at most
MAX_PENDING_TRIGGERS wait, and the oldest beyond that are dropped and counted."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge_agent.agent.config import load_checked_bundle, load_config
from edge_agent.agent.service import MAX_PENDING_TRIGGERS, Agent
from edge_agent.capture.frame_queue import Frame


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
    bundle, thresholds = load_checked_bundle(cfg)
    return Agent(cfg, bundle, thresholds, exit_when_done=True)  # not started: no threads


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
