"""`edge-agent run` end to end: a real subprocess (real signals), a real Mosquitto broker, the
real small bundle and real MTD tiles; plus the sd_notify and metrics building blocks."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.errors import UserError
from edge_agent.images import list_images, read_image
from edge_agent.model.bundle import load_bundle, update_thresholds
from edge_agent.model.scorer import Scorer
from edge_agent.ops.metrics import (
    STAGE_PER,
    AgentMetrics,
    CameraSnapshot,
    MetricsServer,
    Snapshot,
)
from edge_agent.ops.sdnotify import Notifier
from tests.brokers import Broker, Gate, Subscriber, free_port

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edge-agent/line1"


# -- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frames:
    """A folder of MTD test tiles (good first, then defects), with labels and direct scores."""

    folder: Path
    names: list[str]  # in the order a folder source reads them (sorted)
    anomalous: dict[str, bool]
    scores: dict[str, float]  # Scorer on the same files, outside the agent
    image: float  # an image threshold between two scores, with NG and OK on both sides
    pixel: float


@pytest.fixture(scope="module")
def frames(mtd_small: Path, small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Frames:
    folder = tmp_path_factory.mktemp("frames")
    anomalous = {}
    for type_dir in sorted((mtd_small / "test").iterdir()):
        for path in sorted(type_dir.iterdir()):
            name = f"{type_dir.name}_{path.name}"
            shutil.copy(path, folder / name)
            anomalous[name] = type_dir.name != "good"
    names = [p.name for p in list_images(folder)]
    scorer = Scorer(load_bundle(small_bundle), device="cpu", threads=2)
    values = scorer.score_frames([read_image(folder / n) for n in names]).image_scores
    scores = dict(zip(names, map(float, values), strict=True))
    ordered = sorted(scores.values())
    mid = len(ordered) // 2
    # Halfway between two neighbours: no score sits within float noise of the threshold.
    image = (ordered[mid - 1] + ordered[mid]) / 2
    return Frames(folder, names, anomalous, scores, image, pixel=0.95 * image)


@pytest.fixture
def mqtt(tmp_path: Path) -> Iterator[tuple[Broker, Subscriber]]:
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        yield broker, sub


def _config(
    tmp_path: Path,
    bundle: Path,
    broker: Broker | Gate,
    cameras: str,
    *,
    thresholds: tuple[float, float] | None,
    extra: str = "",
) -> Path:
    th = f"thresholds: {{image: {thresholds[0]}, pixel: {thresholds[1]}}}\n" if thresholds else ""
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"bundle: {bundle}\n"
        "device: cpu\n"
        "threads: 2\n"
        f"{th}"
        "batching: {max_batch: 4, max_wait_ms: 10, queue_size: 4}\n"
        f"cameras:\n{cameras}"
        "mqtt:\n"
        f"  port: {broker.port}\n"
        f"  spool_dir: {tmp_path / 'spool'}\n"
        "  health_interval_s: 0.5\n"
        f"metrics: {{port: {free_port()}}}\n"
        f"{extra}"
    )
    return path


def _start(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass(frozen=True)
class Scrape:
    """One GET /metrics: the raw text and its samples, parsed by prometheus_client."""

    text: str
    content_type: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for n, labels in self.samples if n == name]

    def type_of(self, name: str) -> str | None:
        """The type on the `# TYPE name ...` line, the name as exposed (with `_total`)."""
        for line in self.text.splitlines():
            if line.startswith(f"# TYPE {name} "):
                return line.split()[-1]
        return None


def _scrape(host: str, port: int) -> Scrape:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return Scrape(text, content_type, samples)


def _finish(proc: subprocess.Popen, timeout_s: float = 60.0) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"agent did not exit in {timeout_s} s:\n{err[-3000:]}")
    return proc.returncode, out + err


def _reloads(config: Path, result: str) -> float:
    """`edge_agent_reloads_total{result=...}` of the agent run with `config`: a reload's outcome
    is known only once it is counted, however long the helper thread took to build it."""
    port = int(re.search(r"port: (\d+)\}", config.read_text()).group(1))
    metrics = _scrape("127.0.0.1", port)
    key = ("edge_agent_reloads_total", frozenset({("result", result)}))
    return metrics.samples.get(key, 0.0)


def _verdicts(sub: Subscriber, camera: str) -> list[dict]:
    return [json.loads(m.payload) for m in sub.on(f"{PREFIX}/{camera}/verdict")]


def _wait(predicate, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            _, log = _finish(proc)
            pytest.fail(f"agent exited early ({proc.returncode}):\n{log[-3000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
                _, log = _finish(proc)
                pytest.fail(f"timed out; agent log:\n{log[-3000:]}")
            pytest.fail("timed out")
        time.sleep(0.05)


def _final_counts(log: str) -> dict[str, int]:
    line = next(ln for ln in log.splitlines() if "stopped after" in ln)
    frame_part = line.split(" s: ", 1)[1].split(";")[0]  # before the MQTT counts
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", frame_part)}


def _retained(port: int, topic: str) -> list[bytes]:
    """What a fresh subscriber gets as retained on `topic`."""
    with Subscriber(port, topic) as sub:
        sub.wait_for(lambda msgs: bool(msgs), timeout_s=2.0)
        return [m.payload for m in sub.messages if m.retain]


# -- end to end ----------------------------------------------------------------------------


def _bad_frames(folder: Path, like: Path) -> dict[str, str]:
    """Bad files in a folder, and what each must get: 'ERROR' or a real verdict ('OK/NG')."""
    folder.mkdir()
    image = cv2.imread(str(like), cv2.IMREAD_GRAYSCALE)
    (folder / "a_empty.png").write_bytes(b"")
    (folder / "b_corrupt.jpg").write_bytes(like.read_bytes()[:200] + b"\x00" * 100)
    (folder / "c_text.jpg").write_text("not an image at all")
    cv2.imwrite(str(folder / "d_gray.png"), image)
    cv2.imwrite(str(folder / "e_odd_size.png"), cv2.resize(image, (97, 311)))
    cv2.imwrite(str(folder / "f_16bit.png"), image.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "g_tiny.png"), image[:1, :1])
    return {
        "a_empty.png": "ERROR",
        "b_corrupt.jpg": "ERROR",
        "c_text.jpg": "ERROR",
        "d_gray.png": "OK/NG",
        "e_odd_size.png": "OK/NG",
        "f_16bit.png": "OK/NG",
        "g_tiny.png": "ERROR",
    }


@pytest.mark.slow
def test_folder_every_file_one_verdict_with_back_pressure(
    tmp_path: Path, small_bundle: Path, frames: Frames, mqtt
) -> None:
    broker, sub = mqtt
    bad = _bad_frames(tmp_path / "bad", frames.folder / frames.names[0])
    cameras = (
        f"  - {{id: line, source: {frames.folder}}}\n"  # folder: overflow auto -> block
        f"  - {{id: odd, source: {tmp_path / 'bad'}}}\n"
    )
    archive = tmp_path / "archive"
    config = _config(
        tmp_path,
        small_bundle,
        broker,
        cameras,
        thresholds=(frames.image, frames.pixel),
        extra=f"archive: {{dir: {archive}, quota_mb: 100}}\n",
    )
    started = time.monotonic()
    code, log = _finish(_start(config, "--exit-when-done"))
    assert code == 0, log[-3000:]
    assert time.monotonic() - started < 60

    sub.wait_for(lambda m: len([x for x in m if x.topic.endswith("/status")]) >= 4)
    verdicts = _verdicts(sub, "line")
    # Exactly one verdict per file, in order, nothing skipped under back-pressure (queue 4).
    assert [v["sequence"] for v in verdicts] == list(range(len(frames.names)))
    assert [v["source"] for v in verdicts] == frames.names
    for v in verdicts:
        expected = "NG" if frames.scores[v["source"]] >= frames.image else "OK"
        assert v["verdict"] == expected, v
        assert v["score"] == pytest.approx(frames.scores[v["source"]], rel=1e-3)
        assert v["threshold"] == pytest.approx(frames.image)
        assert v["schema"] == "edge-agent/verdict/v1" and v["delayed"] is False
        assert v["latency_ms"] >= 0 and v["part_id"] is None
        assert (v["normalised_score"] >= 0.5) == (v["verdict"] == "NG")
        if v["verdict"] == "NG":
            # Regions in the ORIGINAL tile's pixels, not the 224x224 model input.
            h, w = read_image(frames.folder / v["source"]).shape[:2]
            for r in v["regions"]:
                x, y, bw, bh = r["bbox"]
                assert x >= 0 and x + bw <= w and y >= 0 and y + bh <= h
        else:
            assert v["regions"] == [] and v["reject_image"] is None
    # The agent's confusion at this threshold is exactly the one the scores give.
    agent_tp = sum(v["verdict"] == "NG" and frames.anomalous[v["source"]] for v in verdicts)
    direct_tp = sum(s >= frames.image and frames.anomalous[n] for n, s in frames.scores.items())
    assert agent_tp == direct_tp and agent_tp > 0
    assert any(len(v["regions"]) > 0 for v in verdicts if v["verdict"] == "NG")

    # Bad frames: ERROR verdicts with a reason, or a real verdict for odd-but-valid images.
    odd = {v["source"]: v for v in _verdicts(sub, "odd")}
    assert set(odd) == set(bad)
    for name, want in bad.items():
        if want == "ERROR":
            assert odd[name]["verdict"] == "ERROR" and odd[name]["error"], odd[name]
            assert odd[name]["score"] is None
        else:
            assert odd[name]["verdict"] in ("OK", "NG") and "error" not in odd[name]

    # Reject archive: one JPEG + JSON sidecar per NG verdict, named in the verdict.
    ng = [v for v in [*verdicts, *odd.values()] if v["verdict"] == "NG"]
    assert sorted(str(p) for p in archive.rglob("*.jpg")) == sorted(v["reject_image"] for v in ng)
    for v in ng:
        side = json.loads(Path(v["reject_image"]).with_suffix(".json").read_text())
        assert side["sequence"] == v["sequence"] and side["camera"] == v["camera"]

    # Status retained offline, health retained with the final counts.
    for cam in ("line", "odd"):
        assert _retained(broker.port, f"{PREFIX}/{cam}/status") == [b"offline"]
    health = json.loads(_retained(broker.port, f"{PREFIX}/line/health")[0])
    assert health["inspected"] == len(frames.names) and health["frames_in"] == len(frames.names)
    assert health["ng"] == len([v for v in verdicts if v["verdict"] == "NG"])
    assert health["model_id"] == load_bundle(small_bundle).model_id and "cpu" in health["device"]
    counts = _final_counts(log)
    assert counts["frames_in"] == len(frames.names) + len(bad)
    assert counts["errors"] == sum(w == "ERROR" for w in bad.values())
    assert "Traceback" not in log


class _Lines:
    """A running agent's stderr, read line by line as it comes (the test can wait for one)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.has(text):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code, log = self.finish(5)
                pytest.fail(f"no {text!r} (exit {code}):\n{log[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout_s: float) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"agent did not exit in {timeout_s} s:\n{''.join(self.lines)[-3000:]}")
        self._thread.join(5)
        return self.proc.returncode, "".join(self.lines)


@pytest.mark.slow
def test_offline_run_with_the_broker_away_exits_3_and_says_what_is_kept(
    tmp_path: Path, small_bundle: Path, frames: Frames, mqtt
) -> None:
    """--exit-when-done must not report success while its verdicts sit in the spool."""
    broker, _ = mqtt
    with Gate(broker.port, is_open=False) as gate:
        cameras = f"  - {{id: line, source: {frames.folder}}}\n"
        config = _config(tmp_path, small_bundle, gate, cameras, thresholds=(1.0, 1.0))
        code, log = _finish(_start(config, "--exit-when-done", "--drain-timeout", "1"))
    assert code == 3, log[-3000:]
    n = len(frames.names)
    assert f"{n} verdict(s) not delivered within --drain-timeout 1 s" in log, log[-3000:]
    assert str(tmp_path / "spool" / "line") in log
    assert list((tmp_path / "spool" / "line").glob("*.seg")), "kept on disk for the next run"
    assert "Traceback" not in log


@pytest.mark.slow
def test_offline_run_delivers_when_the_broker_returns_during_the_drain(
    tmp_path: Path, small_bundle: Path, frames: Frames, mqtt
) -> None:
    """The broker is down when the run ends and back a moment later: the stop reconnects and
    delivers every verdict in order, then exits 0 (it used to exit 0 at once, verdicts spooled)."""
    broker, sub = mqtt
    with Gate(broker.port, is_open=False) as gate:
        cameras = f"  - {{id: line, source: {frames.folder}}}\n"
        config = _config(tmp_path, small_bundle, gate, cameras, thresholds=(1.0, 1.0))
        agent = _Lines(_start(config, "--exit-when-done", "--drain-timeout", "60"))
        agent.wait_for("the broker away; connecting again for up to", 60)
        time.sleep(0.5)  # the drain is under way with the broker away
        assert agent.proc.poll() is None, "the agent waits for the broker"
        gate.open()
        code, log = agent.finish(30)
    assert code == 0, log[-3000:]
    sub.wait_for(lambda m: len(_verdicts(sub, "line")) >= len(frames.names), 10)
    seqs = [v["sequence"] for v in _verdicts(sub, "line")]
    assert sorted(set(seqs)) == list(range(len(frames.names))), "every verdict arrived"
    first = list(dict.fromkeys(seqs))
    assert first == list(range(len(frames.names))), "in order"
    assert "not delivered" not in log and "Traceback" not in log


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket (abstract namespace)."""

    def __init__(self) -> None:
        self.name = f"@edge-agent-test-{os.getpid()}-{id(self):x}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def fields(self) -> list[str]:
        return [f for m in list(self.messages) for f in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.slow
def test_sigterm_drains_notifies_systemd_serves_metrics_and_honours_triggers(
    tmp_path: Path, small_bundle: Path, frames: Frames, mqtt
) -> None:
    broker, sub = mqtt
    cameras = (
        f"  - {{id: line, source: {frames.folder}, loop: true}}\n"
        f"  - {{id: station, source: {frames.folder}, loop: true, mode: trigger}}\n"
    )
    config = _config(
        tmp_path, small_bundle, broker, cameras, thresholds=(frames.image, frames.pixel)
    )
    metrics_port = int(re.search(r"port: (\d+)\}", config.read_text()).group(1))
    notify = NotifySocket()
    try:
        proc = _start(config, env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "400000"})
        _wait(lambda: "READY=1" in notify.fields(), 30, proc)
        _wait(lambda: len(_verdicts(sub, "line")) >= 12, 30, proc)

        # Trigger mode: one verdict per trigger, for a frame taken after it, part id echoed.
        trigger = f"{PREFIX}/station/trigger"
        for part in ("P-1", "P-2"):
            sub.client.publish(trigger, part, qos=1).wait_for_publish(5)
            _wait(lambda p=part: p in [v["part_id"] for v in _verdicts(sub, "station")], 20, proc)
        sub.client.publish(trigger, json.dumps({"part_id": "P-3"}), qos=1).wait_for_publish(5)
        _wait(lambda: len(_verdicts(sub, "station")) >= 3, 20, proc)
        # A part id with control characters (an ANSI escape) is refused and counted.
        sub.client.publish(trigger, "P-\x1b[31m4", qos=1).wait_for_publish(5)
        time.sleep(0.5)

        metrics = _scrape("127.0.0.1", metrics_port)
        _wait(lambda: any(f.startswith("WATCHDOG=1") for f in notify.fields()), 10, proc)
        # A STATUS message of its own (READY=1 carries one too).
        _wait(lambda: any(m.startswith("STATUS=inspected") for m in notify.messages), 10, proc)

        proc.send_signal(signal.SIGTERM)
        code, log = _finish(proc)
    finally:
        notify.close()
    assert code == 0, log[-3000:]
    fields = notify.fields()
    assert "STOPPING=1" in fields
    assert fields.index("READY=1") < fields.index("STOPPING=1")
    assert fields.count("WATCHDOG=1") >= 2  # every 0.2 s while the loop runs

    # Metrics, scraped mid-run: per-camera counters and per-stage latency histograms.
    assert metrics("edge_agent_frames_inspected_total", camera="line") >= 12
    assert metrics("edge_agent_frames_in_total", camera="line") >= 12
    assert metrics("edge_agent_frames_dropped_total", camera="line") == 0
    assert metrics("edge_agent_trigger_discarded_total", camera="station") > 0
    assert metrics("edge_agent_triggers_rejected_total", camera="station") == 1
    assert metrics("edge_agent_triggers_dropped_total", camera="station") == 0
    assert "P-\x1b[31m4" not in [v["part_id"] for v in _verdicts(sub, "station")]
    for stage, per in STAGE_PER.items():
        assert metrics("edge_agent_stage_seconds_count", per=per, stage=stage) > 0
    assert metrics("edge_agent_stage_seconds_bucket", per="batch", stage="infer", le="+Inf") > 0
    assert metrics.has("edge_agent_queue_depth") and metrics.has("edge_agent_spool_messages")
    assert metrics.has("edge_agent_ng_total", camera="line")
    # The agent's own collector: mirrored capture counts are counters, levels are gauges.
    for name in ("frames_in", "frames_dropped", "camera_reconnects", "spool_dropped"):
        assert metrics.type_of(f"edge_agent_{name}_total") == "counter", name
    for name in ("queue_depth", "spool_messages", "camera_connected", "uptime_seconds"):
        assert metrics.type_of(f"edge_agent_{name}") == "gauge", name
    assert metrics.has("edge_agent_camera_reconnects_total", camera="station")
    assert metrics.has("edge_agent_spool_dropped_total")
    assert metrics("edge_agent_uptime_seconds") > 0
    (info,) = metrics.labels_of("edge_agent_model_info")
    assert info["device"].startswith("onnx:cpu") and info["model_id"]

    # Every queued frame was answered before exit; sequences have no gap.
    sub.wait_for(lambda m: any(x.payload == b"offline" for x in m), 5)
    line = _verdicts(sub, "line")
    station = _verdicts(sub, "station")
    assert [v["sequence"] for v in line] == list(range(len(line)))
    assert [v["part_id"] for v in station] == ["P-1", "P-2", "P-3"]
    counts = _final_counts(log)
    assert counts["inspected"] == len(line) + len(station)
    # frames_in counts only frames that entered the queue, so every one is accounted for,
    # including those a camera read while blocked on the full queue when it was stopped.
    assert counts["frames_in"] == counts["inspected"] + counts["discarded"]
    for cam in ("line", "station"):
        assert _retained(broker.port, f"{PREFIX}/{cam}/status") == [b"offline"]
    assert "Traceback" not in log


@pytest.mark.slow
def test_http_stream_camera_survives_the_stream_restarting(
    tmp_path: Path, small_bundle: Path, frames: Frames, mqtt: tuple[Broker, Subscriber]
) -> None:
    """A live camera served by ffmpeg as HTTP MJPEG: verdicts arrive; the stream is killed and
    comes back on the same port; the agent reconnects and verdicts resume, no restart."""
    from tests.streams import MjpegHttpServer, mtd_tiles, write_video

    broker, sub = mqtt
    video = tmp_path / "line.avi"
    write_video(video, mtd_tiles(4, 4), fps=10)
    with MjpegHttpServer(video) as server:
        cameras = (
            f"  - {{id: live, source: '{server.url}', reconnect_initial_s: 0.2, "
            "reconnect_max_s: 1.0}\n"
        )
        config = _config(tmp_path, small_bundle, broker, cameras,
                         thresholds=(frames.image, frames.pixel))  # fmt: skip
        proc = _start(config)
        _wait(lambda: len(_verdicts(sub, "live")) >= 5, 30, proc)
        server.stop()  # the camera goes away...
        time.sleep(1.5)
        before = len(_verdicts(sub, "live"))
        # ...and comes back on the same address; the agent, retrying, may connect at once.
        server.start(wait=False)
        _wait(lambda: len(_verdicts(sub, "live")) >= before + 5, 30, proc)
        proc.send_signal(signal.SIGTERM)
        code, log = _finish(proc)
    assert code == 0, log[-3000:]
    verdicts = _verdicts(sub, "live")
    sequences = [v["sequence"] for v in verdicts]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert {v["verdict"] for v in verdicts} <= {"OK", "NG"}
    assert "reconnected" in log and "Traceback" not in log


@pytest.mark.slow
def test_sighup_swaps_the_bundle_and_rejects_a_broken_one(
    tmp_path: Path, small_bundle: Path, frames: Frames, mqtt
) -> None:
    broker, sub = mqtt
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    first, second = frames.image, frames.image * 1.5
    update_thresholds(bundle, {"image": first, "pixel": frames.pixel})
    config = _config(
        tmp_path,
        bundle,
        broker,
        f"  - {{id: line, source: {frames.folder}, loop: true}}\n",
        thresholds=None,  # from the bundle, so a re-calibrated bundle shows in the verdicts
    )
    proc = _start(config)
    # Verdicts carry thresholds rounded to 6 decimals.
    first, second = round(first, 6), round(second, 6)
    thresholds = lambda: [round(v["threshold"], 6) for v in _verdicts(sub, "line")]  # noqa: E731
    _wait(lambda: len(thresholds()) >= 8, 30, proc)

    update_thresholds(bundle, {"image": second, "pixel": frames.pixel})
    proc.send_signal(signal.SIGHUP)
    _wait(lambda: second in thresholds()[-3:], 30, proc)
    assert _reloads(config, "ok") == 1

    # A damaged bundle: the checksum no longer matches, the running model stays.
    with open(bundle / "bank.npy", "ab") as f:
        f.write(b"junk")
    seen = len(thresholds())
    proc.send_signal(signal.SIGHUP)
    _wait(lambda: _reloads(config, "rejected") == 1, 60, proc)
    _wait(lambda: len(thresholds()) >= seen + 12, 30, proc)
    proc.send_signal(signal.SIGTERM)
    code, log = _finish(proc)
    assert code == 0, log[-3000:]

    values = thresholds()
    switch = values.index(second)
    assert set(values[:switch]) == {first} and set(values[switch:]) == {second}
    line = _verdicts(sub, "line")
    assert [v["sequence"] for v in line] == list(range(len(line)))  # no frame lost
    assert len([ln for ln in log.splitlines() if "reloaded in" in ln]) == 1
    rejected = [ln for ln in log.splitlines() if "reload rejected" in ln]
    assert len(rejected) == 1 and "bank.npy does not match its checksum" in rejected[0]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bundle: {bundle}\ncameras: [{{id: a, source: 0}}]\nmqtt: {{hots: x}}\n", "mqtt.hots"),
        ("bundle: {bundle}\ncameras: [{{id: a, source: 0}}]\nthreads: many\n", "threads"),
        ("bundle: {bundle}\ncameras: [{{id: a}}]\n", "cameras[0].source"),
        ("bundle: {bundle}\ncameras: [{{id: a, source: 0}}\n", "line 3, column 1"),
        ("bundle: {missing}\ncameras: [{{id: a, source: 0}}]\n", "bundle"),
        ("bundle: {bundle}\ncameras: [{{id: a, source: 0}}]\n", "thresholds.image"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, small_bundle: Path, text: str, key: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text.format(bundle=small_bundle, missing=tmp_path / "nothing"))
    code, log = _finish(_start(config, "--check"), timeout_s=30)
    assert code == 2
    lines = log.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edge-agent: error: {config}: {key}"), log


def test_check_accepts_a_good_config(tmp_path: Path, small_bundle: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text(
        f"bundle: {small_bundle}\nthresholds: {{image: 30, pixel: 29}}\n"
        "cameras: [{id: a, source: 0}]\n"
    )
    code, log = _finish(_start(config, "--check"), timeout_s=30)
    assert code == 0 and "OK: 1 camera(s)" in log and "image 30 pixel 29" in log


def test_missing_camera_folder_is_a_user_error(tmp_path: Path, small_bundle: Path) -> None:
    config = tmp_path / "cfg.yaml"
    broker_port = free_port()  # nothing listens: the agent must not get as far as MQTT
    config.write_text(
        f"bundle: {small_bundle}\nthresholds: {{image: 30, pixel: 29}}\n"
        f"cameras: [{{id: a, source: {tmp_path / 'none'}, kind: folder}}]\n"
        f"mqtt: {{port: {broker_port}, spool_dir: {tmp_path / 'spool'}}}\nmetrics: {{port: null}}\n"
    )
    code, log = _finish(_start(config), timeout_s=60)
    assert code == 2 and "edge-agent: error: camera a:" in log and "no such folder" in log
    assert "Traceback" not in log


# -- building blocks -----------------------------------------------------------------------


def test_notifier_speaks_the_sd_notify_protocol() -> None:
    sock = NotifySocket()
    try:
        n = Notifier({"NOTIFY_SOCKET": sock.name, "WATCHDOG_USEC": "2000000"})
        assert n.enabled and n.watchdog_interval_s == 1.0
        n.ready("starting")
        n.status("inspected 3\nsecond line")
        assert n.watchdog_due(now=time.monotonic())  # never pinged yet
        assert not n.watchdog_due(now=time.monotonic() + 0.5)
        assert n.watchdog_due(now=time.monotonic() + 1.1)
        n.stopping()
        _wait(lambda: len(sock.messages) >= 5, 5)
        assert sock.messages[:2] == ["READY=1\nSTATUS=starting", "STATUS=inspected 3"]
        assert sock.messages[2:5] == ["WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]
        n.close()
    finally:
        sock.close()


def test_notifier_path_socket_and_no_op_cases(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": str(path)}).ready()
        assert server.recv(100) == b"READY=1"
    finally:
        server.close()
    silent = Notifier({})
    assert not silent.enabled and not silent.ready() and not silent.watchdog_due()
    # A watchdog meant for another process (inherited environment) is not ours to feed.
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None
    # A vanished socket is reported as False, not raised.
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready()


def _snapshot(frames_in: int = 5, *, archive: bool = True) -> Snapshot:
    return Snapshot(
        cameras={
            "cam1": CameraSnapshot(frames_in=frames_in, dropped=1, reconnects=2, connected=True),
            "cam2": CameraSnapshot(frames_in=0, dropped=0, reconnects=0, connected=False),
        },
        queue_depth=3,
        spool_messages=4,
        spool_dropped=7,
        uptime_s=12.5,
        archive_saved=6 if archive else None,
        archive_errors=2 if archive else None,
        model=("abc123", "onnx:cpu faiss:cpu/flat"),
    )


def test_metrics_endpoint_text_format_types_and_http() -> None:
    m = AgentMetrics()
    m.frames_inspected.labels("cam1").inc()
    m.frames_inspected.labels("cam1").inc()
    m.frames_inspected.labels('we"ird').inc()
    for value in (0.0004, 0.003, 0.003, 20.0):
        m.observe_stage("infer", value)
    m.observe_stage("wait", 0.002)
    with pytest.raises(ValueError, match="unknown stage"):
        m.observe_stage("warp", 0.1)
    m.reloads.labels("ok").inc()
    snapshots = [_snapshot(5), _snapshot(9)]
    calls: list[int] = []

    def source() -> Snapshot:
        calls.append(1)
        return snapshots[len(calls) - 1]

    m.watch(source)
    with pytest.raises(ValueError):
        m.watch(source)  # the same names twice would expose duplicate series
    server = MetricsServer(m.registry, "127.0.0.1", 0)
    server.start()
    try:
        host, port = server.address
        assert port != 0
        first = _scrape(host, port)
        second = _scrape(host, port)
        # The port is taken: a clear one-line error, not a traceback.
        with pytest.raises(UserError, match=rf"^metrics.port: cannot listen on {host}:{port} \("):
            MetricsServer(m.registry, host, port).start()
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        _scrape(host, port)  # stop() closed the socket
    assert calls == [1, 1]  # read once per scrape, never at registration
    assert first.content_type.startswith("text/plain; version=0.0.4")

    v = first
    assert v("edge_agent_frames_inspected_total", camera="cam1") == 2
    assert v("edge_agent_frames_inspected_total", camera='we"ird') == 1
    infer = {"per": "batch", "stage": "infer"}
    assert v("edge_agent_stage_seconds_bucket", **infer, le="0.0005") == 1
    assert v("edge_agent_stage_seconds_bucket", **infer, le="0.005") == 3
    assert v("edge_agent_stage_seconds_bucket", **infer, le="10.0") == 3
    assert v("edge_agent_stage_seconds_bucket", **infer, le="+Inf") == 4
    assert v("edge_agent_stage_seconds_count", **infer) == 4
    assert v("edge_agent_stage_seconds_sum", **infer) == pytest.approx(20.0064)
    assert v("edge_agent_stage_seconds_count", per="frame", stage="wait") == 1
    # Every stage is there from the start, and only with its own `per`.
    counted = {(s["per"], s["stage"]) for s in v.labels_of("edge_agent_stage_seconds_count")}
    assert counted == {(per, stage) for stage, per in STAGE_PER.items()}
    assert v("edge_agent_stage_seconds_count", per="batch", stage="knn") == 0
    assert {s["le"] for s in v.labels_of("edge_agent_batch_size_bucket")} == {
        "1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "+Inf",
    }  # fmt: skip
    assert v("edge_agent_reloads_total", result="ok") == 1

    # Mirrored from the snapshot, at scrape time.
    assert v("edge_agent_frames_in_total", camera="cam1") == 5
    assert second("edge_agent_frames_in_total", camera="cam1") == 9
    assert v("edge_agent_frames_dropped_total", camera="cam1") == 1
    assert v("edge_agent_camera_reconnects_total", camera="cam1") == 2
    assert v("edge_agent_camera_connected", camera="cam1") == 1
    assert v("edge_agent_camera_connected", camera="cam2") == 0
    assert v("edge_agent_queue_depth") == 3
    assert v("edge_agent_spool_messages") == 4
    assert v("edge_agent_spool_dropped_total") == 7
    assert not v.has("edge_agent_spool_dropped")  # it only grows: a counter, named so
    assert v("edge_agent_archive_saved_total") == 6
    assert v("edge_agent_archive_errors_total") == 2
    assert v("edge_agent_uptime_seconds") == 12.5
    assert v.labels_of("edge_agent_model_info") == [
        {"model_id": "abc123", "device": "onnx:cpu faiss:cpu/flat"}
    ]
    assert v("edge_agent_model_info", model_id="abc123", device="onnx:cpu faiss:cpu/flat") == 1

    types = {
        "edge_agent_frames_in_total": "counter",
        "edge_agent_frames_dropped_total": "counter",
        "edge_agent_frames_inspected_total": "counter",
        "edge_agent_ng_total": "counter",
        "edge_agent_bad_frames_total": "counter",
        "edge_agent_trigger_discarded_total": "counter",
        "edge_agent_triggers_dropped_total": "counter",
        "edge_agent_triggers_rejected_total": "counter",
        "edge_agent_camera_reconnects_total": "counter",
        "edge_agent_camera_connected": "gauge",
        "edge_agent_stage_seconds": "histogram",
        "edge_agent_latency_seconds": "histogram",
        "edge_agent_batch_size": "histogram",
        "edge_agent_queue_depth": "gauge",
        "edge_agent_spool_messages": "gauge",
        "edge_agent_spool_dropped_total": "counter",
        "edge_agent_archive_saved_total": "counter",
        "edge_agent_archive_errors_total": "counter",
        "edge_agent_reloads_total": "counter",
        "edge_agent_model_info": "gauge",
        "edge_agent_uptime_seconds": "gauge",
    }
    for name, kind in types.items():
        assert v.type_of(name) == kind, name


def test_metrics_endpoint_survives_a_failing_collector() -> None:
    m = AgentMetrics()
    m.ng.labels("cam1").inc()

    def broken() -> Snapshot:
        raise RuntimeError("stats went away")

    m.watch(broken)
    v = _served(m)
    assert v("edge_agent_ng_total", camera="cam1") == 1
    assert not v.has("edge_agent_queue_depth")


def _served(m: AgentMetrics) -> Scrape:
    """One scrape of `m` through a real metrics endpoint, started and stopped around it."""
    server = MetricsServer(m.registry, "127.0.0.1", 0)
    server.start()
    try:
        return _scrape(*server.address)
    finally:
        server.stop()


def test_metrics_without_archive_expose_no_archive_samples() -> None:
    m = AgentMetrics()
    m.watch(lambda: _snapshot(archive=False))
    v = _served(m)
    assert not v.has("edge_agent_archive_saved_total")
    assert not v.has("edge_agent_archive_errors_total")
    assert v("edge_agent_queue_depth") == 3
    assert not v.labels_of("edge_agent_opcua_open"), "no OPC UA server: no samples"
    assert not v.labels_of("edge_agent_recipe_info"), "not running yet: no recipe"
    m = AgentMetrics()
    m.watch(lambda: dataclasses.replace(_snapshot(), recipe=("bottle-b", 2)))
    v = _served(m)
    assert v.labels_of("edge_agent_recipe_info") == [{"recipe": "bottle-b", "number": "2"}]
    assert v("edge_agent_recipe_info", recipe="bottle-b", number="2") == 1


def test_metrics_carry_the_opcua_servers_connection_counts() -> None:
    from edge_agent.publish.opcua import CONNECTION_STATS

    counts = {key: i + 1 for i, key in enumerate(CONNECTION_STATS)}
    m = AgentMetrics()
    m.watch(lambda: dataclasses.replace(_snapshot(), opcua=counts))
    v = _served(m)
    assert v.type_of("edge_agent_opcua_open") == "gauge"
    assert v.type_of("edge_agent_opcua_refused_total") == "counter"
    assert v("edge_agent_opcua_open", kind="sockets") == counts["sockets_open"]
    assert v("edge_agent_opcua_open", kind="sessions") == counts["sessions_open"]
    refused = {
        "no_hello": "sockets_without_hello",
        "evicted": "sockets_evicted",
        "sockets": "sockets_refused",
        "sessions": "sessions_refused",
        "certificates": "certificates_refused",
    }
    for reason, key in refused.items():
        assert v("edge_agent_opcua_refused_total", reason=reason) == counts[key]


def test_metrics_are_thread_safe() -> None:
    m = AgentMetrics()
    server = MetricsServer(m.registry, "127.0.0.1", 0)
    server.start()

    def work() -> None:
        for _ in range(2000):
            m.frames_inspected.labels("x").inc()
            m.observe_stage("decide", 0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(20):
            _scrape(*server.address)  # scrapes while counting
        for t in threads:
            t.join()
        v = _scrape(*server.address)
    finally:
        server.stop()
    assert v("edge_agent_frames_inspected_total", camera="x") == 8000
    assert v("edge_agent_stage_seconds_count", per="frame", stage="decide") == 8000
