"""The README's first command: the demo runs to the end on the shipped sample data."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.tools import demo


@pytest.mark.slow
def test_demo_runs_end_to_end_with_the_embedded_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No Mosquitto on a new user's machine: the demo must fall back to its own broker.
    monkeypatch.setattr(demo, "_mosquitto", lambda: None)
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--fps", "20"]) == 0
    text = capsys.readouterr().out
    assert "embedded broker" in text
    assert "20 of 20 frames answered over MQTT" in text
    rejects = list((out / "rejects").rglob("*.jpg"))
    sidecars = list((out / "rejects").rglob("*.json"))
    assert rejects and len(rejects) == len(sidecars)
    assert (out / "calibration.png").stat().st_size > 10_000
    # The sample holds 10 good and 10 defective parts; the demo must separate them better
    # than chance (measured: 7 of 10 defects rejected, 0 of 10 good parts).
    caught = int(text.split(" defective parts rejected")[0].split(": ")[-1].split(" of ")[0])
    false_alarms = int(text.split(" good parts rejected")[0].split(", ")[-1].split(" of ")[0])
    assert caught >= 5 and false_alarms <= 2


def test_demo_without_sample_data_is_a_clear_error(tmp_path: Path) -> None:
    code = main(["demo", "--sample", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code == 2
