"""The README's first command: the demo runs to the end on the shipped sample data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.tools import broker, demo
from tests.conftest import unavailable


def _run_demo_and_check(out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the whole demo; check what it must show whatever the broker. Returns its stdout."""
    assert main(["demo", "--out", str(out), "--fps", "20"]) == 0
    text = capsys.readouterr().out
    assert "20 of 20 frames answered over MQTT" in text
    rejects = list((out / "rejects").rglob("*.jpg"))
    sidecars = list((out / "rejects").rglob("*.json"))
    assert rejects and len(rejects) == len(sidecars)
    assert (out / "calibration.png").stat().st_size > 10_000
    # The sample holds 10 good and 10 defective parts; the demo must separate them better
    # than chance (measured: 8 of 10 defects rejected, 0 of 10 good parts; 7 of 10 with Lite0).
    caught = int(text.split(" defective parts rejected")[0].split(": ")[-1].split(" of ")[0])
    false_alarms = int(text.split(" good parts rejected")[0].split(", ")[-1].split(" of ")[0])
    assert caught >= 5 and false_alarms <= 2
    return text


@pytest.mark.slow
def test_demo_runs_end_to_end_with_mosquitto(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if broker.mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (scripts/setup.sh installs it)")
    text = _run_demo_and_check(tmp_path / "demo-out", capsys)
    assert "MQTT: Mosquitto (" in text


@pytest.mark.slow
def test_demo_falls_back_to_amqtt_without_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A pip-only machine: no Mosquitto, the `demo` extra installed.
    if importlib.util.find_spec("amqtt") is None:
        unavailable("amqtt is not installed (the demo extra; scripts/setup.sh installs it)")
    monkeypatch.setattr(broker, "mosquitto_binary", lambda: None)
    text = _run_demo_and_check(tmp_path / "demo-out", capsys)
    assert "MQTT: amqtt " in text and "(Mosquitto not installed)" in text


def test_demo_without_any_broker_is_one_clear_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(broker, "mosquitto_binary", lambda: None)
    monkeypatch.setattr(broker, "amqtt_version", lambda: None)
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("edge-agent: error: ")
    assert "apt install mosquitto" in captured.err
    assert "pip install 'edge-agent[demo]'" in captured.err
    assert not out.exists()  # failed before the minute of fitting, not after it


def test_demo_without_sample_data_is_a_clear_error(tmp_path: Path) -> None:
    code = main(["demo", "--sample", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code == 2


def test_demo_outside_a_checkout_names_where_it_looked_for_the_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As from a wheel: the package's parents hold no demo/sample, nor does the working folder.
    monkeypatch.setattr(demo, "SAMPLE", tmp_path / "site-packages" / "demo" / "sample")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(tmp_path / "site-packages" / "demo" / "sample") in err
    assert str(tmp_path / "demo" / "sample") in err
    assert "--sample" in err
