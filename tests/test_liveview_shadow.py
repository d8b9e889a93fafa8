"""The live view's shadow report: GET /shadow.json serves the agent's latest report (the one
it publishes on <prefix>/<line>/shadow), behind the token like every endpoint, and the page
draws it per inspection (frames compared and skipped, the agreement matrix, would-be false
rejects and catches, score quantiles). End to end: a real agent subprocess on a real
Mosquitto, a candidate started through the live view's own action endpoint, the page read by
headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import pytest

from edge_agent.images import list_images
from edge_agent.lifecycle.shadow import Comparison, ShadowStats
from edge_agent.model.bundle import update_thresholds
from edge_agent.ops.liveview import LiveStore, LiveViewServer
from edge_agent.publish.contract import shadow_message
from tests.brokers import Broker, Subscriber, free_port
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "shadow-view-token"  # the single token: an engineer
SHADOW = "edge-agent/line1/shadow"


def _report() -> dict[str, Any]:
    """A shadow report as the agent builds it (ShadowStats does the counting): 7 frames
    production passed, 2 of them the candidate would reject; 4 it rejected, 3 caught."""
    stats = ShadowStats(window=16)
    seen = [("OK", "OK")] * 5 + [("OK", "NG")] * 2 + [("NG", "NG")] * 3 + [("NG", "OK")]
    for i, (production, candidate) in enumerate(seen):
        stats.add(Comparison(production, candidate, 20.0 + i, 25.0 + i))
    stats.skipped = 9
    entry = {
        "inspection": "left",
        "recipe": "bottle-a",
        "state": "running",
        "candidate": {
            "bundle": "/srv/candidates/left-v2",
            "copy": "/spool/_lifecycle/bundles/left-v2",
            "model_id": "cand-v2",
            "threshold": 31.5,
        },
        "since": 1_700_000_000_000,
        "regression": {"confirmed": 1, "missed": 0},
        **stats.report(),
    }
    return shadow_message(1_700_000_060.0, [entry])


def _get(server: LiveViewServer, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    host, port = server.address
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveViewServer]]:
    started: list[LiveViewServer] = []

    def start(**kwargs: Any) -> LiveViewServer:
        server = LiveViewServer(LiveStore(["cam1"]), "127.0.0.1", 0, TOKEN, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_shadow_json_is_the_agents_report_behind_the_token(
    serve: Callable[..., LiveViewServer],
) -> None:
    calls = []
    report = _report()

    def latest() -> Mapping[str, Any]:
        calls.append(1)
        return report

    server = serve(shadows=latest)
    assert _get(server, "/shadow.json") == (200, report)
    assert _get(server, "/shadow.json", token=None)[0] == 401
    assert len(calls) == 1  # without the token the agent is not even asked
    assert _get(server, "/shadow.json", token="wrong")[0] == 401
    # An agent without shadows (or a store served alone): an empty report, not a 404.
    assert _get(serve(), "/shadow.json") == (200, {"shadows": []})


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    unavailable("chromium not installed (scripts/setup.sh: apt-get install chromium)")
    raise AssertionError  # unreachable


def _dom(tmp_path: Path, url: str) -> str:
    """The page after its JS ran for 3 s of virtual time, in headless Chromium. With ``poll``
    in the URL: an MJPEG stream that has no frame yet would hold virtual time still."""
    cmd = [
        _chromium(),
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _cell(dom: str, cell: str) -> int:
    match = re.search(rf'data-cell="{cell}"[^>]*>(\d+)<', dom)
    assert match, f"no matrix cell {cell}: {dom[-3000:]}"
    return int(match.group(1))


def _figure(dom: str, key: str) -> str:
    match = re.search(rf'data-figure="{key}">([^<]*)<', dom)
    assert match, f"no figure {key}: {dom[-3000:]}"
    return match.group(1)


def test_the_page_draws_each_shadow_in_a_real_browser(
    serve: Callable[..., LiveViewServer], tmp_path: Path
) -> None:
    _chromium()
    report = _report()
    server = serve(shadows=lambda: report)
    host, port = server.address
    dom = _dom(tmp_path, f"http://{host}:{port}/?token={TOKEN}&poll")
    assert 'data-shadow="left"' in dom and 'data-state="running"' in dom, dom[-3000:]
    assert "candidate cand-v2" in dom and "recipe bottle-a" in dom
    matrix = report["shadows"][0]["matrix"]
    for p in ("OK", "NG", "ERROR"):
        for q in ("OK", "NG", "ERROR"):
            assert _cell(dom, f"{p}-{q}") == matrix[p][q]
    assert _figure(dom, "frames") == "compared 11"
    assert _figure(dom, "skipped") == "skipped 9 (budget)"
    assert _figure(dom, "false_rejects") == "would-be false rejects 2 of 7 passed (28.6%)"
    assert _figure(dom, "catches") == "would-be catches 3 of 4 rejected (75.0%)"
    assert _figure(dom, "regression") == "confirmed defects 1, 0 would pass"
    # Score quantiles: production scored 20..30, the candidate 25..35.
    assert re.search(r"<th>production</th><td>25\.000</td><td>29\.000</td>", dom), dom[-3000:]
    assert re.search(r"<th>candidate</th><td>30\.000</td>", dom)

    # Nothing shadows: no shadow panel at all.
    quiet = serve()
    host, port = quiet.address
    dom = _dom(tmp_path, f"http://{host}:{port}/?token={TOKEN}&poll")
    assert re.search(r'<section id="shadows" hidden', dom) and 'data-shadow="' not in dom


@pytest.fixture
def tiles(mtd_small: Path, tmp_path: Path) -> Path:
    """Good tiles and defects at one size."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    for type_dir in sorted((mtd_small / "test").iterdir()):
        for path in list_images(type_dir)[:3]:
            image = cv2.resize(cv2.imread(str(path)), (160, 120))
            cv2.imwrite(str(folder / f"{type_dir.name}_{path.stem}.png"), image)
    return folder


def _poll(url: str, predicate: Callable[[Any], bool], proc: subprocess.Popen) -> Any:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            out, _ = proc.communicate()
            pytest.fail(f"the agent exited ({proc.returncode}):\n{out[-3000:]}")
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                body = json.loads(resp.read())
            if predicate(body):
                return body
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"timed out:\n{out[-3000:]}")
        time.sleep(0.1)


def test_a_running_agent_shows_its_candidate_in_the_live_view(
    calibrated_bundle: Path, tiles: Path, tmp_path: Path
) -> None:
    _chromium()  # before starting anything
    # The candidate rejects every frame: each frame production passes is a would-be false
    # reject, each it rejects a would-be catch.
    candidate = tmp_path / "candidate"
    shutil.copytree(calibrated_bundle, candidate)
    update_thresholds(candidate, {"image": 1.0, "pixel": 1.0})
    lv_port = free_port()
    base = f"http://127.0.0.1:{lv_port}"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, SHADOW) as sub:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"bundle: {calibrated_bundle}\n"
            "batching: {max_batch: 4, max_wait_ms: 0, queue_size: 4}\n"
            f"cameras:\n  - {{id: cam, source: {tiles}, loop: true}}\n"
            f"mqtt: {{port: {broker.port}, spool_dir: {tmp_path / 'spool'}}}\n"
            "metrics: {port: null}\n"
            f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
            "shadow: {enabled: true, max_share: 1.0, report_interval_s: 0.3}\n"
            f"liveview: {{enabled: true, port: {lv_port}, token: {TOKEN}}}\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert _poll(f"{base}/shadow.json", lambda r: True, proc)["shadows"] == []
            # Started from the page's own endpoint, as an engineer would.
            body = json.dumps({"inspection": "cam", "bundle": str(candidate), "reason": "v2"})
            req = urllib.request.Request(
                f"{base}/action/shadow_start",
                data=body.encode(),
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert json.loads(resp.read()) == {"accepted": True}
            report = _poll(
                f"{base}/shadow.json",
                lambda r: bool(r["shadows"]) and r["shadows"][0]["frames"] >= 12,
                proc,
            )
            dom = _dom(tmp_path, f"{base}/?token={TOKEN}&poll")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        published = [json.loads(m.payload) for m in sub.on(SHADOW)]
    assert proc.returncode == 0, out[-3000:]
    # The very report the agent published on MQTT, not another count of its own.
    assert report in published
    s = report["shadows"][0]
    assert s["inspection"] == "cam" and s["state"] == "running"
    assert s["candidate"]["bundle"] == str(candidate)
    m = s["matrix"]
    assert s["passed"] > 0 and s["rejected"] > 0  # the tiles hold both
    assert s["false_rejects"] == m["OK"]["NG"] == s["passed"]
    assert s["catches"] == m["NG"]["NG"] == s["rejected"]
    # The page draws it.
    assert 'data-shadow="cam"' in dom, dom[-3000:]
    assert _cell(dom, "OK-NG") >= s["false_rejects"] > 0
    assert _cell(dom, "NG-OK") == 0
    assert re.fullmatch(
        r"would-be false rejects (\d+) of \1 passed \(100\.0%\)", _figure(dom, "false_rejects")
    )
    assert "Traceback" not in out
