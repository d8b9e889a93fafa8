"""The drift check (decide/drift.py): its signals against a brute-force reading of the
formula, the alarm's rules, and the real agent reporting it in health, metrics and the log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.decide.drift import DriftMonitor, DriftReference, drift_state

REF = DriftReference(good_median=20.0, threshold=30.0)


def test_signals_follow_the_formula_on_random_windows() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        scores = rng.normal(22, 4, n)
        ng = scores >= REF.threshold
        state = drift_state(scores, ng, REF, min_frames=1, median_shift=0.3, ng_rate=0.1)
        ok = sorted(s for s, bad in zip(scores, ng, strict=True) if not bad)
        if ok:
            mid = len(ok) // 2
            median = ok[mid] if len(ok) % 2 else (ok[mid - 1] + ok[mid]) / 2
            assert state.ok_median == pytest.approx(median)
            assert state.shift == pytest.approx((median - 20.0) / 10.0)
        else:
            assert state.ok_median is None and state.shift is None
        assert state.ng_rate == pytest.approx(sum(ng) / n)
        want = (ok and abs(state.shift) >= 0.3) or sum(ng) / n >= 0.1
        assert state.alarm == bool(want) and (state.reason is not None) == state.alarm


def test_alarm_needs_min_frames_and_fires_both_ways_and_clears() -> None:
    monitor = DriftMonitor(REF, window=50, min_frames=20, median_shift=0.5, ng_rate=0.2)
    for _ in range(19):
        monitor.add(26.0, False)  # shift 0.6, but too few frames yet
    assert not monitor.state().alarm
    monitor.add(26.0, False)
    state = monitor.state()
    assert state.alarm and "up towards" in str(state.reason) and state.shift == pytest.approx(0.6)
    for _ in range(50):  # the window forgets: a stable line again
        monitor.add(20.5, False)
    assert not monitor.state().alarm and monitor.state().frames == 50
    for _ in range(50):
        monitor.add(14.0, False)  # far below the calibrated good scores: unlike the bank too
    state = monitor.state()
    assert state.alarm and "down away from" in str(state.reason)
    for i in range(50):
        monitor.add(20.0 if i % 4 else 35.0, i % 4 == 0)  # 13 of 50 NG, OK median as calibrated
    state = monitor.state()
    assert state.alarm and "NG rate 26.0%" in str(state.reason) and state.shift == 0.0


def test_reference_needs_calibrated_good_scores_below_the_threshold() -> None:
    assert DriftReference.from_calibration(None, 30.0) is None
    assert DriftReference.from_calibration({"n_good": 5}, 30.0) is None  # an older calibration
    assert DriftReference.from_calibration({"good_scores": {"p50": 31.0}}, 30.0) is None
    assert DriftReference.from_calibration({"good_scores": {"p50": 20}}, 30.0) == REF


@pytest.mark.slow
def test_the_agent_reports_drift_in_health_metrics_and_log(
    tmp_path: Path, calibrated_bundle: Path, mtd_small: Path
) -> None:
    """A bundle whose calibration says good parts score ~1 (far below what these frames
    score): the agent's drift alarm fires, in the retained health message and the log."""
    from edge_agent.model.bundle import load_bundle, update_thresholds
    from tests.brokers import Broker, Subscriber
    from tests.test_service import _finish, _start

    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated_bundle, bundle)
    thresholds = dict(load_bundle(bundle).thresholds)
    thresholds["calibrated"] = {"good_scores": {"p10": 0.5, "p50": 1.0, "p90": 1.5}}
    update_thresholds(bundle, thresholds)
    frames = tmp_path / "frames"
    shutil.copytree(mtd_small / "test" / "good", frames)
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "ea/l1/cam1/health") as sub:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"bundle: {bundle}\ndevice: cpu\nthreads: 2\n"
            f"cameras:\n  - {{id: cam1, source: {frames}}}\n"
            f"mqtt: {{port: {broker.port}, spool_dir: {tmp_path / 'spool'},"
            " prefix: ea, line: l1, health_interval_s: 0.2}\n"
            "metrics: {port: null}\n"
            "drift: {window: 50, min_frames: 5}\n"
        )
        code, log = _finish(_start(config, "--exit-when-done"))
        assert code == 0, log[-3000:]
        sub.wait_for(lambda msgs: bool(msgs), timeout_s=5.0)
        healths = [json.loads(m.payload) for m in sub.messages]
    # Every health message carries the check; the one over the most frames must be alarmed.
    assert all(h["drift"] is not None for h in healths), healths
    drift = max((h["drift"] for h in healths), key=lambda d: d["frames"])
    assert drift["alarm"] and 5 <= drift["frames"] <= len(list(frames.iterdir())), healths
    assert drift["shift"] > 0.5 and "moved up towards the threshold" in drift["reason"]
    assert "camera cam1: drift: OK-score median" in log
