"""`edge-agent bench --agent`: the real agent process, a real Mosquitto and a subscriber, next
to the engine on the same images. No mocks: the figures come from verdicts that really
travelled agent -> broker -> subscriber."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.config import Batching
from edge_agent.cli import main
from edge_agent.decide.decision import Thresholds
from edge_agent.tools import agent_bench, broker
from tests.conftest import ROOT, unavailable


def _require_mosquitto() -> None:
    if broker.mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (scripts/setup.sh installs it)")


def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["bench", "--agent", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def _bench_eight(
    capsys: pytest.CaptureFixture[str], bundle: Path, mtd: Path, *extra: str
) -> tuple[int, dict[str, Any], str]:
    """_bench on 8 MTD test frames in batches of 4, none left out as warm-up."""
    _require_mosquitto()
    return _bench(
        capsys, "--bundle", str(bundle), "--data", str(mtd / "test"),
        "--limit", "8", "--max-batch", "4", "--warmup", "0", *extra,
    )  # fmt: skip


def _ordered(p: dict[str, float]) -> bool:
    return 0 < p["p50"] <= p["p99"]


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bench's temporary folders go here, so a test can see that they are removed."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_every_frame_gets_a_verdict_and_the_ratio_is_agent_over_engine(
    small_bundle: Path, mtd_small: Path, own_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_mosquitto()
    code, r, out = _bench(
        capsys, "--bundle", str(small_bundle), "--data", str(mtd_small / "test"),
        "--limit", "12", "--max-batch", "4", "--warmup", "1",
    )  # fmt: skip
    assert code == 0, out
    assert r["mode"] == "throughput"
    assert r["frames"] == r["verdicts"] == r["captured"] == 12 and r["all_answered"]
    assert r["dropped"] == r["duplicates"] == r["errors"] == 0
    assert "every frame answered: 12 of 12" in out
    assert _ordered(r["latency_ms"]) and _ordered(r["decided_ms"])
    # Received is decided plus the trip through the broker (timestamps are whole ms).
    assert r["decided_ms"]["p50"] <= r["latency_ms"]["p50"] + 1
    assert r["max_batch"] == 4 and r["warmup_verdicts"] == 4
    assert r["max_wait_ms"] == Batching.model_fields["max_wait_ms"].default
    assert 1 <= r["counted"] <= 12 - 4 and r["verdicts_per_second"] > 0
    engine = r["engine"]
    assert engine["batch"] == 4 and engine["images"] == 12 and engine["images_per_second"] > 0
    assert r["ratio"] == pytest.approx(r["verdicts_per_second"] / engine["images_per_second"])
    # The uncalibrated bundle got thresholds at the median engine score: the agent, scoring
    # the same files, rejects half of them.
    assert abs(r["ng"] - 6) <= 1
    assert not list(own_tmp.iterdir()), "the temporary folder is removed"


def test_protocols_run_sparkplug_and_opcua_in_the_benched_agent(
    small_bundle: Path, mtd_small: Path, own_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, r, out = _bench_eight(capsys, small_bundle, mtd_small, "--protocols")
    assert code == 0, out
    assert r["protocols"] and "Sparkplug B and OPC UA on" in out
    assert r["frames"] == r["verdicts"] == 8 and r["all_answered"]


def test_against_flat_checks_every_published_score_against_exact_search(
    small_bundle: Path, mtd_small: Path, own_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, r, out = _bench_eight(capsys, small_bundle, mtd_small, "--against-flat")
    assert code == 0, out
    assert "faiss:cpu/hnsw-exact" in r["device"], "the agent ran the re-checked default"
    against = r["against_flat"]
    assert against["engine"]["images"] == 8 and "faiss:cpu/flat" in against["engine"]["device"]
    assert against["compared"] == against["within"] == against["verdicts_equal"] == 8
    assert against["equal"] and against["unscored"] == 0 and against["max_relative"] < 1e-3
    assert "equal to flat search: 8 of 8 scores" in out
    assert not list(own_tmp.iterdir())


def _arrival(source: str, score: float | None, verdict: str, sequence: int) -> agent_bench.Arrival:
    return agent_bench.Arrival(
        0.0,
        {"camera": "cam1", "sequence": sequence, "source": source, "score": score,
         "verdict": verdict},
    )  # fmt: skip


def test_compare_with_flat_counts_scores_off_by_more_than_rtol_and_other_verdicts() -> None:
    flat = [10.0, 20.0, 30.0, 40.0]
    arrivals = [
        _arrival("000000.png", 10.0, "OK", 0),
        _arrival("000001.png", 20.0 * (1 + 2e-3), "NG", 1),  # off by 2e-3: outside 1e-3
        _arrival("000001.png", 20.0 * (1 + 2e-3), "NG", 1),  # a duplicate: counted once
        _arrival("000002.png", 30.0 * (1 - 5e-4), "OK", 2),  # within, but flat says NG
        _arrival("000003.png", None, "ERROR", 3),
    ]
    got = agent_bench.compare_with_flat(arrivals, flat, Thresholds(image=15.0, pixel=15.0))
    assert got["compared"] == 3 and got["unscored"] == 1
    assert got["within"] == 2 and got["verdicts_equal"] == 2
    assert got["max_relative"] == pytest.approx(2e-3)


def test_live_camera_mode_paces_frames_and_answers_every_captured_one(
    small_bundle: Path, mtd_small: Path, own_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_mosquitto()
    code, r, out = _bench(
        capsys, "--bundle", str(small_bundle), "--data", str(mtd_small / "test" / "good"),
        "--limit", "6", "--fps", "8", "--seconds", "3", "--warmup", "1",
    )  # fmt: skip
    assert code == 0, out
    assert r["mode"] == "live" and r["fps"] == 8 and r["seconds"] == 3
    assert r["max_batch"] == Batching.model_fields["max_batch"].default
    # 3 s of an 8 fps camera after the first verdict, plus the frames before it.
    assert r["captured"] >= 20 and r["sent"] >= r["captured"]
    assert r["verdicts"] == r["captured"] - r["dropped"] and r["all_answered"]
    # Paced: never faster than the camera; the small bundle keeps up with 8 fps even on a
    # busy 2-core box (a loaded one may drop a few frames, hence the margin below).
    assert 0.5 * 8 < r["verdicts_per_second"] < 1.3 * 8
    assert _ordered(r["latency_ms"]) and _ordered(r["decided_ms"])
    assert r["engine"]["batch"] == 1
    assert r["latency_ratio"] == pytest.approx(
        r["latency_ms"]["p50"] / r["engine"]["latency_ms"]["p50"]
    )
    assert not list(own_tmp.iterdir())


def test_an_agent_that_fails_is_one_line_with_its_log_tail_and_nothing_left(
    small_bundle: Path,
    mtd_small: Path,
    own_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _require_mosquitto()
    # Stands in for an agent that dies at start (a broken GPU, say): exit code and last words.
    failing = "import sys; print('model on cpu'); print('it broke here'); sys.exit(3)"
    monkeypatch.setattr(agent_bench, "AGENT_COMMAND", (sys.executable, "-c", failing))
    code = main(["bench", "--agent", "--bundle", str(small_bundle),
                 "--data", str(mtd_small / "test"), "--limit", "4"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-agent: error: the agent exited with code 3")
    assert "it broke here" in last
    assert "  model on cpu" in err  # the tail, above the error line
    assert not list(own_tmp.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fps", "5"], "--fps needs --agent"),
        (["--max-batch", "4"], "--max-batch needs --agent"),
        (["--protocols"], "--protocols needs --agent"),
        (["--against-flat"], "--against-flat needs --agent"),
        (["--agent", "--fps", "5", "--against-flat"], "--against-flat needs a folder run"),
        (["--agent", "--batch", "4"], "--max-batch"),
        (["--agent", "--max-batch", "0"], "--max-batch: "),
        (["--agent", "--max-wait-ms", "-1"], "--max-wait-ms: "),
        (["--agent", "--seconds", "3"], "--seconds needs --fps"),
        (["--agent", "--fps", "0"], "--fps must be above 0"),
    ],
)
def test_option_mistakes_are_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "--bundle", str(tmp_path), "--data", str(tmp_path), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_bundle_or_data_is_one_line(
    small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "no-images"
    data.mkdir()
    for bundle, folder in ((tmp_path / "missing", data), (small_bundle, data)):
        assert main(["bench", "--agent", "--bundle", str(bundle), "--data", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("edge-agent: error: "), err


def test_no_broker_is_one_line_before_the_engine_runs(
    small_bundle: Path,
    mtd_small: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(broker, "mosquitto_binary", lambda: None)
    monkeypatch.setattr(broker, "amqtt_version", lambda: None)
    code = main(["bench", "--agent", "--bundle", str(small_bundle),
                 "--data", str(mtd_small / "test")])  # fmt: skip
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert "bench --agent needs an MQTT broker" in captured.err
    assert "apt install mosquitto" in captured.err
    assert "engine:" not in captured.out


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(f"{cmdline.parent.name}: {args}")
    return found


def test_ctrl_c_stops_the_agent_and_the_broker_and_removes_the_folder(
    small_bundle: Path, mtd_small: Path, tmp_path: Path
) -> None:
    _require_mosquitto()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "edge_agent", "bench", "--agent", "--bundle", str(small_bundle),
           "--data", str(mtd_small / "test" / "good"), "--limit", "4",
           "--fps", "5", "--seconds", "120"]  # fmt: skip
    with out.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}, stdout=f,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        # The agent and the broker run from config files in the bench's temporary folder.
        while len(_processes_mentioning(str(tmp))) < 2:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        time.sleep(2.0)  # the agent is inspecting frames by now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in out.read_text()
    assert not _processes_mentioning(str(tmp))
    # Only the bench's own folder: libraries the agent loads may leave files in TMPDIR too.
    assert not list(tmp.glob("edge-agent-bench-*"))
