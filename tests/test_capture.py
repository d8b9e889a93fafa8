"""CameraCapture against real sources: MTD image folders, video files written from MTD tiles,
an HTTP MJPEG stream and an RTSP stream served by ffmpeg on loopback, a USB index that does
not exist."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.capture.cameras import CameraCapture, CameraSettings, redact
from edge_agent.capture.frame_queue import Frame, FrameQueue
from edge_agent.errors import UserError
from edge_agent.images import read_image

from .conftest import require_mtd
from .streams import (
    FFMPEG,
    RTSP_SERVER,
    RTSP_UDP_ENV,
    MjpegHttpServer,
    RtspServer,
    free_port,
    mtd_tiles,
    tile_frames,
    write_video,
)

needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed")


@pytest.fixture(scope="module")
def tiles() -> list[tuple[Path, str]]:
    return mtd_tiles(10, 10, require_mtd())


@pytest.fixture(scope="module")
def mjpeg_video(tiles, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "tiles.avi"
    write_video(path, tiles, codec="mjpeg")
    return path


@pytest.fixture
def capture_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="edge_agent.capture.cameras")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def collect_until_finished(cap: CameraCapture, q: FrameQueue, timeout_s: float = 20) -> list:
    """Consume like the inference thread until the finite source is done and drained."""
    got: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while not (cap.finished and q.depth() == 0):
        assert time.monotonic() < deadline, f"source not finished, {len(got)} frames"
        got += q.get_batch(3, 0.01, timeout_s=0.2)
    return got


def collect_for(q: FrameQueue, seconds: float) -> list[Frame]:
    got: list[Frame] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += q.get_batch(8, 0.01, timeout_s=0.1)
    return got


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_well_numbered(frames: list[Frame], camera: str, first: int = 0) -> None:
    assert [f.sequence for f in frames] == list(range(first, first + len(frames)))
    assert [f.frame_id for f in frames] == [f"{camera}-{f.sequence}" for f in frames]
    stamps = [f.captured_at for f in frames]
    assert stamps == sorted(stamps)
    assert all(abs(t - time.time()) < 120 for t in stamps)


# -- settings ----------------------------------------------------------------------------------


def test_kind_and_overflow_resolution(tmp_path: Path) -> None:
    def settings(source, **kw) -> CameraSettings:
        return CameraSettings("c", source, **kw)

    assert settings(0).resolved_kind() == "usb"
    assert settings("2").resolved_kind() == "usb"
    assert settings("/dev/video0").resolved_kind() == "usb"
    assert settings("rtsp://cam/stream").resolved_kind() == "stream"
    assert settings("http://cam/video.mjpg").resolved_kind() == "stream"
    assert settings(str(tmp_path)).resolved_kind() == "folder"
    assert settings(str(tmp_path / "a.mp4")).resolved_kind() == "file"
    assert settings("x.mp4", kind="stream").resolved_kind() == "stream"
    assert not settings(0).blocks()
    assert not settings("rtsp://cam/s").blocks()
    assert settings(str(tmp_path)).blocks()
    assert settings("a.mp4").blocks()
    assert settings("rtsp://cam/s", overflow="block").blocks()
    assert not settings("a.mp4", overflow="drop_oldest").blocks()


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"kind": "webcam"}, "kind"),
        ({"overflow": "drop_newest"}, "overflow"),
        ({"mode": "burst"}, "mode"),
        ({"fps_limit": 0}, "fps_limit"),
        ({"reconnect_initial_s": 5.0, "reconnect_max_s": 1.0}, "reconnect"),
    ],
)
def test_bad_settings_are_user_errors(kw: dict, key: str) -> None:
    with pytest.raises(UserError, match=key):
        CameraSettings("cam1", 0, **kw)


def test_redact_hides_credentials_and_tokens() -> None:
    shown = redact("rtsp://admin:hunter2@10.0.0.5:554/live?token=abc123")
    assert "hunter2" not in shown and "admin" not in shown and "abc123" not in shown
    assert shown.startswith("rtsp://***@10.0.0.5:554/live")
    assert redact("/data/video.mp4") == "/data/video.mp4"


# -- folder ------------------------------------------------------------------------------------


def make_folder(tiles, dest: Path, n: int) -> list[str]:
    dest.mkdir()
    for i, (p, _) in enumerate(tiles[:n]):
        shutil.copy(p, dest / f"{i:03d}_{p.name}")
    (dest / "002_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (dest / "notes.txt").write_text("not an image")
    return sorted(f.name for f in dest.iterdir() if f.suffix == ".jpg")


def test_folder_delivers_every_file_once_in_order(tiles, tmp_path: Path, capture_log) -> None:
    names = make_folder(tiles, tmp_path / "imgs", 6)
    q = FrameQueue(2)  # smaller than the folder: back-pressure must hold the files back
    cap = CameraCapture(CameraSettings("line1", str(tmp_path / "imgs")), q)
    cap.start()
    try:
        t0 = time.time()
        got = collect_until_finished(cap, q)
    finally:
        cap.stop()
    assert [f.source_name for f in got] == names
    assert_well_numbered(got, "line1")
    assert all(f.captured_at >= t0 - 1 for f in got)
    for f in got:
        if f.source_name == "002_corrupt.jpg":
            assert f.image.shape == (0, 0, 3) and f.image.dtype == np.uint8
            assert f.error is not None and "not a decodable image" in f.error  # the reason
        else:
            assert np.array_equal(f.image, read_image(tmp_path / "imgs" / f.source_name))
            assert f.error is None
    assert cap.stats["frames_in"] == len(names) and cap.stats["dropped"] == 0
    assert cap.finished and not cap.running
    warnings = messages(capture_log, logging.WARNING)
    assert len(warnings) == 1 and "002_corrupt.jpg" in warnings[0]


def test_folder_loop_starts_again_and_keeps_numbering(tiles, tmp_path: Path) -> None:
    names = make_folder(tiles, tmp_path / "imgs", 3)
    q = FrameQueue(4)
    cap = CameraCapture(CameraSettings("c", str(tmp_path / "imgs"), loop=True), q, run_id="r7")
    cap.start()
    got: list[Frame] = []
    try:
        while len(got) < 2 * len(names) + 1:
            got += q.get_batch(4, 0.01, timeout_s=5.0)
    finally:
        cap.stop()
    assert [f.source_name for f in got[: 2 * len(names)]] == names + names
    assert [f.sequence for f in got] == list(range(len(got)))
    assert got[0].frame_id == "r7-c-0"
    assert not cap.finished


def test_folder_without_images_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    cap = CameraCapture(CameraSettings("c", str(tmp_path), kind="folder"), FrameQueue(2))
    with pytest.raises(UserError, match="no images"):
        cap.start()
    assert not cap.running


# -- video file --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["mjpeg", pytest.param("h264", marks=needs_ffmpeg)])
def test_video_file_delivers_every_frame_once_in_order(tiles, tmp_path: Path, codec: str) -> None:
    path = tmp_path / ("v.avi" if codec == "mjpeg" else "v.mp4")
    infos = write_video(path, tiles, codec=codec)
    q = FrameQueue(3)
    cap = CameraCapture(CameraSettings("c", str(path)), q)
    cap.start()
    try:
        got = collect_until_finished(cap, q)
    finally:
        cap.stop()
    assert len(got) == len(infos) == 20
    assert_well_numbered(got, "c")
    # Each decoded frame must be closest to the tile written at that index: order, no skips.
    truth = tile_frames(tiles).astype(np.float32)
    for i, f in enumerate(got):
        assert f.image.shape == (224, 224, 3)
        err = np.abs(truth - f.image.astype(np.float32)).mean(axis=(1, 2, 3))
        assert int(err.argmin()) == i, f"frame {i} looks like tile {int(err.argmin())}"
        assert err[i] < 6.0
    assert cap.stats["dropped"] == 0 and cap.finished


def test_looping_video_starts_again(tiles, mjpeg_video: Path) -> None:
    q = FrameQueue(4)
    cap = CameraCapture(CameraSettings("c", str(mjpeg_video), loop=True), q)
    cap.start()
    got: list[Frame] = []
    try:
        while len(got) < 25:
            got += q.get_batch(4, 0.01, timeout_s=5.0)
    finally:
        cap.stop()
    truth = tile_frames(tiles).astype(np.float32)
    for f in got[18:25]:
        err = np.abs(truth - f.image.astype(np.float32)).mean(axis=(1, 2, 3))
        assert int(err.argmin()) == f.sequence % 20
    assert_well_numbered(got, "c")
    assert not cap.finished


@pytest.mark.parametrize("what", ["missing", "junk", "folder-as-file"])
def test_unopenable_video_file_is_a_user_error(tmp_path: Path, what: str) -> None:
    path = tmp_path / "cam.mp4"
    if what == "junk":
        path.write_text("this is not a video")
    elif what == "folder-as-file":
        path.mkdir()
    kind = "file" if what == "folder-as-file" else "auto"
    cap = CameraCapture(CameraSettings("c", str(path), kind=kind), FrameQueue(2))
    with pytest.raises(UserError, match=r"cam\.mp4"):
        cap.start()
    assert not cap.running


# -- live: USB ---------------------------------------------------------------------------------


def missing_usb_index() -> int:
    return next(i for i in range(60, 100) if not os.path.exists(f"/dev/video{i}"))


def test_missing_usb_camera_retries_quietly_and_stops_promptly(capture_log) -> None:
    settings = CameraSettings(
        "usb", missing_usb_index(), reconnect_initial_s=0.05, reconnect_max_s=0.2
    )
    cap = CameraCapture(settings, FrameQueue(4))
    cap.start()  # a dead live camera is an outage, never an error at start
    time.sleep(1.2)
    stats = cap.stats
    assert stats["reconnect_attempts"] >= 3
    assert stats["frames_in"] == 0 and not stats["connected"] and stats["reconnects"] == 0
    assert "cannot open" in stats["last_error"]
    warnings = messages(capture_log, logging.WARNING)
    assert len(warnings) == 1 and "retrying" in warnings[0]  # one warning per outage
    t0 = time.monotonic()
    cap.stop()
    assert time.monotonic() - t0 < 1.0 and not cap.running


def test_stop_interrupts_a_long_back_off() -> None:
    settings = CameraSettings(
        "c", f"http://127.0.0.1:{free_port()}/x", reconnect_initial_s=30, reconnect_max_s=60
    )
    cap = CameraCapture(settings, FrameQueue(4))
    cap.start()
    wait_for(lambda: cap.stats["last_error"] is not None, 5, "the first failed open")
    time.sleep(0.2)
    t0 = time.monotonic()
    cap.stop()
    assert time.monotonic() - t0 < 1.0 and not cap.running


def test_credentials_never_reach_the_log(capture_log) -> None:
    url = f"http://admin:hunter2@127.0.0.1:{free_port()}/video?token=abc123"
    cap = CameraCapture(CameraSettings("c", url, reconnect_initial_s=0.05), FrameQueue(4))
    cap.start()
    wait_for(lambda: cap.stats["reconnect_attempts"] >= 1, 5, "a retry")
    cap.stop()
    text = " ".join(r.getMessage() for r in capture_log.records) + str(cap.stats)
    assert "127.0.0.1" in text
    assert "hunter2" not in text and "abc123" not in text


# -- live: HTTP MJPEG from ffmpeg --------------------------------------------------------------


def stream_settings(url: str, **kw) -> CameraSettings:
    base = {"reconnect_initial_s": 0.1, "reconnect_max_s": 0.5, "read_timeout_s": 2.0}
    return CameraSettings("cam1", url, **{**base, **kw})


@needs_ffmpeg
@pytest.mark.slow
def test_http_stream_reconnects_after_the_server_restarts(
    mjpeg_video: Path, tmp_path: Path, capture_log
) -> None:
    with MjpegHttpServer(mjpeg_video, log_dir=tmp_path) as server:
        q = FrameQueue(64)
        cap = CameraCapture(stream_settings(server.url), q)
        cap.start()
        try:
            before = collect_for(q, 1.5)
            assert len(before) >= 5, "no frames from the HTTP stream"
            assert all(f.image.shape == (224, 224, 3) for f in before)
            assert_well_numbered(before, "cam1")
            assert cap.stats["connected"] and cap.stats["reconnects"] == 0

            server.stop()  # the camera goes away
            wait_for(lambda: not cap.stats["connected"], 5, "the drop to be noticed")
            time.sleep(0.5)
            assert cap.running, "a dead stream must not end the capture"
            server.start()  # and comes back on the same port

            wait_for(lambda: cap.stats["reconnects"] == 1, 10, "the reconnect")
            after = collect_for(q, 1.0)
            assert len(after) >= 3, "no frames after the reconnect"
            assert_well_numbered(before + after, "cam1")  # numbering runs on across outages
        finally:
            cap.stop()
    assert cap.stats["dropped"] == 0
    assert messages(capture_log, logging.WARNING) == [
        f"camera cam1: stream lost (read from {server.url} failed or timed out), reconnecting"
    ]
    assert any("reconnected after" in m for m in messages(capture_log, logging.INFO))


@needs_ffmpeg
def test_live_overflow_drops_oldest_and_counts(mjpeg_video: Path, tmp_path: Path) -> None:
    with MjpegHttpServer(mjpeg_video, log_dir=tmp_path) as server:
        q = FrameQueue(2)
        cap = CameraCapture(stream_settings(server.url), q)
        cap.start()
        try:
            wait_for(lambda: cap.stats["frames_in"] >= 8, 10, "frames")  # nobody consumes
            cap.stop()
        finally:
            cap.stop()
    stats = cap.stats
    kept = q.get_batch(8, 0.0)
    assert stats["dropped"] == stats["frames_in"] - 2 and stats["dropped"] >= 6
    assert [f.sequence for f in kept] == [stats["frames_in"] - 2, stats["frames_in"] - 1]


@needs_ffmpeg
def test_live_frames_over_the_limit_are_error_frames(mjpeg_video: Path, tmp_path: Path) -> None:
    # A camera that suddenly sends far larger frames (a misconfigured sensor, a hostile
    # stream): each is answered ERROR with the reason, the capture carries on.
    with MjpegHttpServer(mjpeg_video, log_dir=tmp_path) as server:
        q = FrameQueue(64)
        cap = CameraCapture(stream_settings(server.url, max_megapixels=0.01), q)
        cap.start()
        try:
            wait_for(lambda: cap.stats["frames_in"] >= 3, 10, "frames")
            got = collect_for(q, 0.5)
        finally:
            cap.stop()
    assert len(got) >= 3 and cap.stats["reconnects"] == 0
    for f in got:
        assert f.image.size == 0
        assert f.error == "frame 224x224 pixels (0.1 MP) exceeds the limit of 0.01 MP"


@needs_ffmpeg
def test_fps_limit_skips_frames_in_between(mjpeg_video: Path, tmp_path: Path) -> None:
    with MjpegHttpServer(mjpeg_video, log_dir=tmp_path) as server:  # 10 frames/s
        q = FrameQueue(64)
        cap = CameraCapture(stream_settings(server.url, fps_limit=2.0), q)
        cap.start()
        try:
            wait_for(lambda: cap.stats["frames_in"] >= 1, 10, "the first frame")
            got = collect_for(q, 2.0)
        finally:
            cap.stop()
    assert 2 <= len(got) <= 6  # about 4 at 2 fps, 20 without the limit
    gaps = np.diff([f.captured_at for f in got])
    assert gaps.min() > 0.3


@needs_ffmpeg
def test_stop_returns_while_a_read_hangs(mjpeg_video: Path, tmp_path: Path) -> None:
    with MjpegHttpServer(mjpeg_video, log_dir=tmp_path) as server:
        q = FrameQueue(64)
        cap = CameraCapture(stream_settings(server.url, read_timeout_s=3.0), q)
        cap.start()
        wait_for(lambda: cap.stats["frames_in"] >= 2, 10, "frames")
        server.pause()  # connection open, no bytes: the read blocks
        time.sleep(0.5)
        t0 = time.monotonic()
        cap.stop(timeout_s=0.5)
        assert time.monotonic() - t0 < 1.0
        # The read timeout then ends the read and the stopped thread exits on its own.
        wait_for(lambda: not cap.running, 6, "the capture thread to end")


# -- live: RTSP --------------------------------------------------------------------------------


@needs_ffmpeg
@pytest.mark.slow
@pytest.mark.skipif(RTSP_SERVER is None, reason="rtsp-server-perl not installed")
def test_rtsp_stream_reconnects_after_the_server_restarts(
    tiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(*RTSP_UDP_ENV)  # the relay only does RTP over UDP
    video = tmp_path / "tiles.mp4"
    write_video(video, tiles, codec="h264")
    with RtspServer(video, log_dir=tmp_path) as server:
        q = FrameQueue(64)
        cap = CameraCapture(stream_settings(server.url, read_timeout_s=2.0), q)
        cap.start()
        try:
            wait_for(lambda: cap.stats["frames_in"] >= 5, 15, "frames from the RTSP stream")
            server.stop()
            wait_for(lambda: not cap.stats["connected"], 10, "the drop to be noticed")
            n_before = cap.stats["frames_in"]
            server.start()
            wait_for(lambda: cap.stats["frames_in"] >= n_before + 5, 20, "frames after restart")
        finally:
            cap.stop()
    got = q.get_batch(1000, 0.0)
    assert cap.stats["reconnects"] >= 1
    assert_well_numbered(got, "cam1")
    assert all(f.image.shape == (224, 224, 3) for f in got)
