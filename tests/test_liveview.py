"""The commissioning live view: its config rules, the bounded HTTP server (token, connection
and stream caps, timeouts), the store's cheap inference side, and the page end to end: a real
agent subprocess with a real Mosquitto, read by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.agent.config import load_config
from edge_agent.decide.decision import Thresholds, decide
from edge_agent.errors import UserError
from edge_agent.images import list_images, read_image
from edge_agent.ops import liveview
from edge_agent.ops.liveview import LiveStore, LiveViewServer, encode_jpeg
from edge_agent.publish.contract import verdict_message
from edge_agent.station.recipes import Inspection
from tests.brokers import Broker, free_port
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
TH = Thresholds(image=30.0, pixel=28.0)
H, W = 240, 320
FRAME_HW = (240, 320)  # what the end-to-end test's tiles are resized to


# -- config ----------------------------------------------------------------------------------


def _load(tmp_path: Path, section: str) -> object:
    path = tmp_path / "config.yaml"
    path.write_text(f"bundle: b\ncameras: [{{id: cam1, source: images}}]\n{section}")
    return load_config(path)


def test_liveview_is_off_by_default_and_needs_a_token_off_loopback(tmp_path: Path) -> None:
    assert _load(tmp_path, "").liveview is None  # type: ignore[attr-defined]
    assert _load(tmp_path, "liveview: {host: 0.0.0.0}\n").liveview is None  # type: ignore[attr-defined]
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        c = _load(tmp_path, f"liveview: {{enabled: true, host: '{host}', port: 0}}\n")
        assert c.liveview is not None and c.liveview.token is None  # type: ignore[attr-defined]
    for host in ("0.0.0.0", "192.168.1.5", "::", "viewer.example"):
        with pytest.raises(UserError) as info:
            _load(tmp_path, f"liveview: {{enabled: true, host: '{host}'}}\n")
        message = str(info.value)
        assert "\n" not in message
        assert message.endswith(
            f"liveview.token: required (or tokens_file) when host is not a loopback address "
            f"(host {host!r})"
        )
    c = _load(tmp_path, "liveview: {enabled: true, host: 0.0.0.0, tokens_file: tokens}\n")
    assert c.liveview.tokens_file == tmp_path / "tokens"  # type: ignore[attr-defined]
    c = _load(tmp_path, "liveview: {enabled: true, host: 0.0.0.0, token: s3cret-token}\n")
    assert c.liveview.token.get_secret_value() == "s3cret-token"  # type: ignore[attr-defined]
    with pytest.raises(UserError) as info:
        _load(tmp_path, "liveview: {enabled: true, token: 12345}\n")
    assert "12345" not in str(info.value)  # a secret is never echoed, not even a wrong one


# -- the store -------------------------------------------------------------------------------


def _frame(seq: int, *, ng: bool, camera: str = "cam1") -> tuple[np.ndarray, object, dict]:
    rng = np.random.default_rng(seq)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    amap = np.full((H, W), 10.0, np.float32)
    if ng:
        amap[50:90, 100:160] = 40.0  # one region, over the pixel threshold
    decision = decide(35.0 if ng else 12.0, amap if ng else None, (H, W), TH)
    now = time.time()
    msg = verdict_message(
        decision,
        camera=camera,
        sequence=seq,
        frame_id=f"f{seq}",
        captured_at=now - 0.01,
        decided_at=now,
        model_id="m1",
        part_id=f"P{seq}",
    )
    return image, decision, msg


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray, quality: int) -> bytes:
        self.calls += 1
        return encode_jpeg(image, quality)


def test_update_is_cheap_and_rendering_happens_once_per_frame_on_demand() -> None:
    encoder = CountingEncoder()
    store = LiveStore(["cam1"], encoder=encoder)
    frames = [_frame(i, ng=i % 2 == 0) for i in range(1, 6)]
    t0 = time.perf_counter()
    n = 20_000
    for i in range(n):
        image, decision, msg = frames[i % len(frames)]
        store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    per_update = (time.perf_counter() - t0) / n
    assert encoder.calls == 0  # the inference side never encodes
    assert per_update < 200e-6, per_update  # references and counters (~µs), not a render
    status = store.status()["cameras"]["cam1"]
    assert status["version"] == n and status["counts"]["NG"] == n // 5 * 2
    assert len(status["history"]) == liveview.HISTORY

    shot = store.jpeg("cam1")
    assert shot is not None and shot[0] == n and encoder.calls == 1
    for _ in range(5):  # many viewers, one frame: one encoding
        assert store.jpeg("cam1") == shot
    assert encoder.calls == 1
    image, decision, msg = _frame(99, ng=True)
    store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    assert store.jpeg("cam1")[0] == n + 1 and encoder.calls == 2  # type: ignore[index]


def test_rendered_frames_keep_the_frame_size_and_show_the_regions_on_ng() -> None:
    store = LiveStore(["cam1"])
    assert store.jpeg("cam1") is None  # nothing yet
    image, decision, msg = _frame(1, ng=True)
    store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    ng = cv2.imdecode(np.frombuffer(store.jpeg("cam1")[1], np.uint8), cv2.IMREAD_COLOR)  # type: ignore[index]
    assert ng.shape == (H, W, 3)
    # Before JPEG (whose chroma subsampling smears a 1 px line): the region's box, and the
    # heat map (red over the region, blue elsewhere).
    drawn = liveview.render(image, decision, msg, TH)  # type: ignore[arg-type]
    assert decision.regions[0].as_dict()["bbox"] == [100, 50, 60, 40]  # type: ignore[attr-defined]
    assert (drawn[50, 100:160] == liveview.BOX_BGR).all()
    assert (drawn[89, 100:160] == liveview.BOX_BGR).all()
    inside, outside = drawn[60:80, 110:150].astype(int), drawn[150:, :].astype(int)
    assert inside[..., 2].mean() > outside[..., 2].mean() + 40
    assert outside[..., 0].mean() > outside[..., 2].mean()
    image, decision, msg = _frame(2, ng=False)
    store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    ok = cv2.imdecode(np.frombuffer(store.jpeg("cam1")[1], np.uint8), cv2.IMREAD_COLOR)  # type: ignore[index]
    assert ok.shape == (H, W, 3)
    # No heat map on OK: below the label the picture is the frame, untouched.
    drawn = liveview.render(image, decision, msg, TH)  # type: ignore[arg-type]
    assert (drawn[60:] == image[60:]).all() and not (drawn[:10, :10] == image[:10, :10]).all()
    # An ERROR without an image is listed but leaves the last picture up.
    err = verdict_message(
        None,
        camera="cam1",
        sequence=3,
        frame_id="f3",
        captured_at=time.time(),
        decided_at=time.time(),
        model_id="m1",
        error="unreadable",
    )
    store.update("cam1", None, None, err, TH)
    status = store.status()["cameras"]["cam1"]
    assert status["last"]["verdict"] == "ERROR" and status["version"] == 2
    assert status["counts"] == {"OK": 1, "NG": 1, "ERROR": 1}


def test_each_inspection_is_drawn_and_listed() -> None:
    """A station camera: each ROI outlined (with its id), ignored pixels tinted, the rest of
    the picture untouched, and every inspection's own answer in the status the page shows."""
    ignore = np.zeros((60, 100), dtype=bool)
    ignore[:, :50] = True  # the left half of the cap's region: a date code
    cap = Inspection("cap", "cam1", Path("b"), roi=(20, 30, 100, 60), ignore=ignore)
    label = Inspection("label", "cam1", Path("b"), roi=(150, 100, 120, 80))
    store = LiveStore(["cam1"])
    image, decision, msg = _frame(1, ng=False)
    msg = {
        **msg,
        "recipe": "bottle-a",
        "inspections": [
            {"id": "cap", "verdict": "OK", "score": 12.0, "threshold": 30.0},
            {"id": "label", "verdict": "NG", "score": 35.0, "threshold": 30.0},
        ],
    }
    store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    store.set_inspections("cam1", [cap, label])
    assert store.version("cam1") == 2, "new regions: the picture is drawn again"
    drawn = liveview.render(image, decision, msg, TH, [cap, label])  # type: ignore[arg-type]
    for x, y, w, h in (cap.roi, label.roi):  # type: ignore[misc]
        assert (drawn[y, x : x + w] == liveview.ROI_BGR).all()
        assert (drawn[y + h - 1, x : x + w] == liveview.ROI_BGR).all()
    tinted = drawn[40:80, 25:65].astype(int) - image[40:80, 25:65].astype(int)
    assert np.abs(tinted).mean() > 10, "ignored pixels are tinted"
    assert (drawn[40:80, 75:115] == image[40:80, 75:115]).all(), "scored pixels are not"
    assert (drawn[200:, :140] == image[200:, :140]).all(), "outside every region: untouched"
    last = store.status()["cameras"]["cam1"]["last"]
    assert last["recipe"] == "bottle-a"
    assert [(i["id"], i["verdict"]) for i in last["inspections"]] == [
        ("cap", "OK"),
        ("label", "NG"),
    ]


# -- the server ------------------------------------------------------------------------------


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LiveViewServer]:
    token = getattr(request, "param", None)
    store = LiveStore(["cam1"])
    image, decision, msg = _frame(1, ng=True)
    store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    s = LiveViewServer(store, "127.0.0.1", 0, token)
    s.start()
    yield s
    s.stop()


def _get(server: LiveViewServer, path: str, headers: dict[str, str] | None = None) -> tuple:
    host, port = server.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_port_0_logs_the_port_and_the_endpoints_answer(
    server: LiveViewServer, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = server.address
    assert port != 0
    code, headers, body = _get(server, "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<script>" in body and b"http" not in body.split(b"<script>")[1]  # no external assets
    code, _, body = _get(server, "/status.json")
    assert code == 200 and json.loads(body)["cameras"]["cam1"]["last"]["verdict"] == "NG"
    code, headers, body = _get(server, "/frame/cam1.jpg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert _get(server, "/frame/nope.jpg")[0] == 404
    assert _get(server, "/stream/../x.mjpg")[0] == 404
    assert _get(server, "/etc/passwd")[0] == 404

    with caplog.at_level("INFO", logger="edge_agent.ops.liveview"):
        other = LiveViewServer(LiveStore(["cam1"]), "127.0.0.1", 0)
        other.start()
        other.stop()
    assert re.search(r"live view on http://127\.0\.0\.1:[1-9]\d*/", caplog.text)
    with pytest.raises(UserError, match=r"liveview\.port: cannot listen on 127\.0\.0\.1:"):
        LiveViewServer(LiveStore(["cam1"]), host, port).start()  # taken


@pytest.mark.parametrize("server", ["tok12345"], indirect=True)
def test_a_token_is_required_on_every_endpoint(server: LiveViewServer) -> None:
    for path in ("/", "/status.json", "/frame/cam1.jpg", "/stream/cam1.mjpg", "/nope"):
        code, headers, _ = _get(server, path)
        assert code == 401 and headers["WWW-Authenticate"] == "Bearer", path
        assert _get(server, path + "?token=wrong")[0] == 401
        assert _get(server, path, {"Authorization": "Bearer wrong"})[0] == 401
    assert _get(server, "/status.json?token=tok12345")[0] == 200
    assert _get(server, "/status.json", {"Authorization": "Bearer tok12345"})[0] == 200
    assert _get(server, "/frame/cam1.jpg?token=tok12345")[0] == 200


def _connect(server: LiveViewServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=5)


def _closed_unanswered(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_are_capped_and_idle_ones_time_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(liveview, "CONNECTION_TIMEOUT_S", 1.0)
    s = LiveViewServer(LiveStore(["cam1"]), "127.0.0.1", 0)
    s.start()
    try:
        idle = [_connect(s) for _ in range(liveview.MAX_CONNECTIONS)]  # never send a request
        time.sleep(0.3)
        extra = _connect(s)
        assert _closed_unanswered(extra)  # refused at once, not queued behind the idle ones
        assert s.refused >= 1
        # The idle ones are dropped after the timeout, freeing the slots.
        t0 = time.monotonic()
        for sock in idle:
            assert _closed_unanswered(sock)
        assert time.monotonic() - t0 < 5
        assert _get(s, "/status.json")[0] == 200
        for sock in (*idle, extra):
            sock.close()
    finally:
        s.stop()


def _read_part(f: object) -> tuple[int, bytes]:
    """One multipart part of the MJPEG stream: (X-Frame-Version, JPEG bytes)."""
    headers: dict[str, str] = {}
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        assert line, "stream ended"
        line = line.strip()
        if line == b"--frame":
            continue
        if not line and headers:
            break
        if line:
            k, v = line.decode().split(":", 1)
            headers[k.lower()] = v.strip()
    jpeg = f.read(int(headers["content-length"]))  # type: ignore[attr-defined]
    return int(headers["x-frame-version"]), jpeg


def test_streams_are_capped_send_only_new_frames_and_end_on_stop(
    server: LiveViewServer,
) -> None:
    host, port = server.address
    store = server.store
    streams = []
    for _ in range(liveview.MAX_STREAMS):
        resp = urllib.request.urlopen(f"http://{host}:{port}/stream/cam1.mjpg", timeout=5)
        assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        streams.append(resp)
    code, headers, _ = _get(server, "/stream/cam1.mjpg")
    assert code == 503 and headers["Retry-After"]
    assert _get(server, "/status.json")[0] == 200  # the page's other requests still work
    first = _read_part(streams[0])
    assert first[0] == 1
    image, decision, msg = _frame(2, ng=False)
    store.update("cam1", image, decision, msg, TH)  # type: ignore[arg-type]
    second = _read_part(streams[0])
    assert second[0] == 2  # the next part is the next frame, not a repeat
    decoded = cv2.imdecode(np.frombuffer(second[1], np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (H, W, 3)
    for resp in streams[1:]:
        resp.close()
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3  # an open stream does not hold up the agent's stop
    streams[0].close()


# -- end to end: a real agent, a real broker, headless Chromium ------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    unavailable("chromium not installed (scripts/setup.sh: apt-get install chromium)")
    raise AssertionError  # unreachable


def _browser(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on `url`: the page's JS runs for 3 s of virtual time."""
    cmd = [
        _chromium(),
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=3000",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture
def tiles(mtd_small: Path, tmp_path: Path) -> Path:
    """Good and defect MTD tiles at one size, so the served frame's size is known."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    for type_dir in sorted((mtd_small / "test").iterdir()):
        for path in sorted(type_dir.iterdir())[:2]:
            image = cv2.resize(read_image(path), FRAME_HW[::-1], interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(folder / f"{type_dir.name}_{path.stem}.png"), image)
    assert len(list_images(folder)) >= 6
    return folder


def _wait_status(url: str, predicate, proc: subprocess.Popen, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"agent exited ({proc.returncode}):\n{(out + err)[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                status = json.loads(resp.read())
            if predicate(status):
                return status
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"timed out waiting for the live view:\n{(out + err)[-3000:]}")
        time.sleep(0.1)


def _save_artefact(png: Path) -> Path:
    """tests/artifacts/ (gitignored), and $EDGE_AGENT_ARTIFACTS when CI collects them."""
    saved = ROOT / "tests" / "artifacts" / png.name
    saved.parent.mkdir(exist_ok=True)
    shutil.copy(png, saved)
    if os.environ.get("EDGE_AGENT_ARTIFACTS"):
        dest = Path(os.environ["EDGE_AGENT_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, dest / png.name)
    return saved


def test_the_page_shows_live_frames_and_verdicts_in_a_real_browser(
    calibrated_bundle: Path, tiles: Path, tmp_path: Path
) -> None:
    _chromium()  # before starting anything
    lv_port = free_port()
    token = "commissioning-token"
    with Broker(tmp_path / "broker") as broker:
        config = tmp_path / "agent.yaml"
        # A station camera (two regions), so the page lists each inspection's answer.
        config.write_text(
            "recipes:\n"
            "  bottle-a:\n"
            "    number: 1\n"
            "    inspections:\n"
            "      - {id: left, camera: cam1, roi: [0, 0, 160, 240], bundle: BUNDLE}\n"
            "      - {id: right, camera: cam1, roi: [160, 0, 160, 240], bundle: BUNDLE}\n"
            "device: cpu\n"
            "threads: 2\n"
            "batching: {max_batch: 2, max_wait_ms: 10, queue_size: 4}\n"
            "cameras:\n"
            f"  - {{id: cam1, source: {tiles}, kind: folder, loop: true}}\n"
            "mqtt:\n"
            f"  port: {broker.port}\n"
            f"  spool_dir: {tmp_path / 'spool'}\n"
            "  health_interval_s: 0.5\n"
            "metrics: {port: null}\n"
            f"liveview: {{enabled: true, port: {lv_port}, token: {token}}}\n".replace(
                "BUNDLE", str(calibrated_bundle)
            )
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://127.0.0.1:{lv_port}"
        try:
            status = _wait_status(
                f"{base}/status.json?token={token}",
                lambda s: s["cameras"]["cam1"]["version"] >= 2,
                proc,
            )
            assert status["model_id"]

            # The page, after its JS ran: camera, verdict, score against threshold.
            doms = []
            for _ in range(2):
                doms.append(_browser(tmp_path, f"{base}/?token={token}", "--dump-dom").stdout)
                time.sleep(0.6)
            seqs = []
            for dom in doms:
                assert 'id="cam-cam1"' in dom and "<h2>cam1</h2>" in dom
                assert re.search(r'data-verdict="(OK|NG)"', dom), dom[-2000:]
                assert re.search(r"\d+\.\d{3} / \d+\.\d{3}", dom)  # score / threshold
                assert re.search(r'<img [^>]*src="/stream/cam1\.mjpg\?token=', dom)
                assert 'data-inspection="left"' in dom and 'data-inspection="right"' in dom
                match = re.search(r'class="last" data-sequence="(\d+)"', dom)
                assert match, dom[-2000:]
                seqs.append(int(match.group(1)))
            assert seqs[1] != seqs[0]  # it updates

            # Without the token the browser gets nothing but the 401.
            denied = _browser(tmp_path, f"{base}/", "--dump-dom").stdout
            assert "token required" in denied and "cam-cam1" not in denied

            # The MJPEG stream: real JPEGs of the frame's size, new frames as they come.
            req = urllib.request.Request(
                f"{base}/stream/cam1.mjpg", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                parts = [_read_part(resp) for _ in range(2)]
            assert parts[1][0] > parts[0][0]
            for _, jpeg in parts:
                decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                assert decoded is not None and decoded.shape == (*FRAME_HW, 3)
            with urllib.request.urlopen(f"{base}/frame/cam1.jpg?token={token}", timeout=5) as r:
                decoded = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
            assert decoded.shape == (*FRAME_HW, 3)

            # A screenshot for people: the test artefact.
            png = tmp_path / "liveview.png"
            _browser(
                tmp_path, f"{base}/?token={token}", f"--screenshot={png}", "--window-size=1280,900"
            )
            shot = cv2.imread(str(png))
            assert shot is not None and shot.shape[:2] == (900, 1280)
            # The frame area (top left, inside the camera box) is a picture, not blank.
            assert shot[100:400, 30:560].std() > 10
            _save_artefact(png)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out + err)[-3000:]
        log = out + err
        assert re.search(rf"live view on http://127\.0\.0\.1:{lv_port}/ \(token required\)", log)
        assert token not in log  # the token is never logged
