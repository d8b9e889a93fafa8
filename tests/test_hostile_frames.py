"""Hostile frames, as a hostile tester sent them: header lies, a decompression bomb, truncated
and junk files. The decoder must refuse them with a reason (BadImage, never a cv2.error) before
spending memory on them, a capture thread must never die of one, and the agent must answer
each with an ERROR verdict that says why; a capture thread that dies of anything else must
stop the agent with exit 1 (systemd restarts it), never leave it running camera-less.

The builders below are shared with tests/test_fuzz.py and scripts/soak.py.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.capture.cameras import CameraCapture, CameraSettings
from edge_agent.capture.frame_queue import Frame, FrameQueue
from edge_agent.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    declared_size,
    decode_image,
    max_file_bytes,
    read_image,
)

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edge-agent/line1"


# -- builders of hostile (and honest) files ---------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_header_lie(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (RGB, 8 bit) declaring width x height, and almost no
    pixel data: under 100 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


@functools.cache
def png_bomb(width: int, height: int) -> bytes:
    """A real, fully valid black RGB PNG: zeros compress about 1000:1, so 20000x20000 (1.2 GB
    decoded) is a 1.1 MB file.

    Built in milliseconds rather than by deflating 1.2 GB: a block of rows is deflated once
    and ended with a full flush (which resets the compressor), so the same bytes can be
    repeated; the zlib trailer's Adler-32 of n zero bytes is (n mod 65521) << 16 | 1.
    """
    row = 1 + 3 * width  # filter byte + pixels, all zero
    rows = max(1, min(height, (8 << 20) // row))
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(b"\x00" * (row * rows)) + co.flush(zlib.Z_FULL_FLUSH)
    tail = co.compress(b"\x00" * (row * (height % rows))) + co.flush(zlib.Z_FINISH)
    n = row * height
    idat = b"\x78\xda" + block * (height // rows) + tail + struct.pack(">I", (n % 65521) << 16 | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def encoded(ext: str, shape: tuple[int, ...] = (48, 64, 3), seed: int = 0, params=()) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def jpeg_header_lie(width: int, height: int) -> bytes:
    """A real baseline JPEG (OpenCV's: no EXIF, so the first FFC0 is the frame header) whose
    SOF0 says width x height."""
    data = bytearray(encoded(".jpg"))
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def bmp_header_lie(width: int, height: int) -> bytes:
    data = bytearray(encoded(".bmp"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def webp_header_lie(width: int, height: int) -> bytes:
    """A lossless WebP (VP8L) whose size fields say width x height (14 bits each: at most
    16384)."""
    data = bytearray(encoded(".webp"))
    assert data[12:16] == b"VP8L"
    (bits,) = struct.unpack_from("<I", data, 21)
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | (height - 1) << 14
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


def tiff(width: int, height: int, *, order: str = "<", big: bool = False, pixels: bool = True):
    """A minimal uncompressed 8-bit gray TIFF, classic or BigTIFF, either byte order, written
    by hand so that the header parser is checked against libtiff on what OpenCV's encoder
    never writes. pixels=False: the header only (a header lie)."""
    mark = b"II" if order == "<" else b"MM"
    data_len = width * height if pixels else 16
    tags = [  # (tag, type, value): SHORT=3, LONG=4
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),  # strip offset, patched below
        (277, 3, 1),
        (278, 4, height),
        (279, 4, data_len),
    ]
    if big:
        ifd_len = 8 + 20 * len(tags) + 8
        strip = 16 + ifd_len
        body = struct.pack(order + "Q", len(tags))
        for tag, kind, value in tags:
            value = strip if tag == 273 else value
            field = struct.pack(order + ("H" if kind == 3 else "I"), value).ljust(8, b"\x00")
            body += struct.pack(order + "HHQ", tag, kind, 1) + field
        body += struct.pack(order + "Q", 0)
        head = mark + struct.pack(order + "HHHQ", 43, 8, 0, 16)
    else:
        head = mark + struct.pack(order + "HI", 42, 8)
        ifd_len = 2 + 12 * len(tags) + 4
        strip = 8 + ifd_len
        body = struct.pack(order + "H", len(tags))
        for tag, kind, value in tags:
            value = strip if tag == 273 else value
            field = struct.pack(order + ("H" if kind == 3 else "I"), value).ljust(4, b"\x00")
            body += struct.pack(order + "HHI", tag, kind, 1) + field
        body += struct.pack(order + "I", 0)
    ramp = (np.arange(data_len) % 251).astype(np.uint8).tobytes()
    return head + body + ramp


def jpeg_with_exif_thumbnail() -> tuple[bytes, tuple[int, int]]:
    """A 64x48 JPEG carrying a 16x8 JPEG thumbnail in an APP1 segment: a scanner that looks
    for the first SOF marker would read the thumbnail's size."""
    main = encoded(".jpg", (48, 64, 3))
    thumb = encoded(".jpg", (8, 16, 3), seed=1)
    payload = b"Exif\x00\x00" + thumb
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return main[:2] + app1 + main[2:], (64, 48)


def hostile_files(folder: Path) -> dict[str, str]:
    """Write the hostile tester's files into `folder`; returns name -> a phrase its ERROR
    reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "h_lie.png": (png_header_lie(60000, 60000), "declared 60000x60000 pixels"),
        "h_bomb.png": (png_bomb(20000, 20000), "declared 20000x20000 pixels"),
        "h_lie.jpg": (jpeg_header_lie(60000, 60000), "declared 60000x60000 pixels"),
        "h_lie.bmp": (bmp_header_lie(30000, 30000), "declared 30000x30000 pixels"),
        "h_lie.webp": (webp_header_lie(16384, 16384), "declared 16384x16384 pixels"),
        "h_lie.tif": (tiff(60000, 60000, pixels=False), "declared 60000x60000 pixels"),
        "h_text.jpg": (b"not an image at all", "not a decodable image"),
        "h_empty.png": (b"", "empty file"),
        "h_truncated.png": (encoded(".png")[:20], "truncated PNG header"),
        "h_corrupt.jpg": (encoded(".jpg")[:400] + b"\x00" * 64, "not a decodable image"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


# -- the decoder ------------------------------------------------------------------------------


def test_a_tiny_png_claiming_60000x60000_is_a_bad_image_not_a_cv2_error() -> None:
    data = png_header_lie(60000, 60000)
    assert len(data) < 100
    with pytest.raises(BadImage, match=r"declared 60000x60000 pixels .* exceeds the limit of 50"):
        decode_image(data)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (jpeg_header_lie(60000, 60000), "60000x60000"),
        (jpeg_header_lie(20000, 20000), "20000x20000"),  # under OpenCV's own 2^30 limit
        (bmp_header_lie(30000, 30000), "30000x30000"),
        (webp_header_lie(16384, 16384), "16384x16384"),
        (tiff(60000, 60000, pixels=False), "60000x60000"),
        (tiff(60000, 60000, order=">", pixels=False), "60000x60000"),
        (tiff(20000, 20000, big=True, pixels=False), "20000x20000"),
    ],
    ids=["jpeg", "jpeg-20k", "bmp", "webp", "tiff", "tiff-be", "bigtiff"],
)
def test_header_lies_in_every_format_are_refused_before_decoding(data: bytes, size: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(BadImage, match=f"declared {size} pixels"):
        decode_image(data)
    assert time.perf_counter() - t0 < 0.5


def test_a_decompression_bomb_costs_neither_memory_nor_time(tmp_path: Path) -> None:
    # The hostile tester's file: 1.1 MB, 20000x20000 (1.2 GB as BGR). Measured in a fresh
    # interpreter, whose peak RSS is then this decode's and nothing else's.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20000, 20000))
    assert bomb.stat().st_size < 1.5e6
    code = (
        "import sys, time\n"
        "from edge_agent.images import BadImage, read_image\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    read_image(sys.argv[1])\n"
        "    print('DECODED')\n"
        "except BadImage as exc:\n"
        "    print('BadImage:', exc)\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(time.perf_counter() - t0, hwm)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bomb)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("BadImage:") and "declared 20000x20000 pixels" in lines[0], out
    seconds, rss_kb = lines[1].split()
    assert float(seconds) < 0.5
    assert int(rss_kb) < 300 * 1024, f"peak RSS {int(rss_kb) // 1024} MB"


def test_the_limit_is_a_parameter_and_counts_pixels_exactly() -> None:
    data = encoded(".png", (100, 100, 3))
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(BadImage, match=r"declared 100x100 pixels \(0.0 MP\) exceeds the limit"):
        decode_image(data, max_pixels=9_999)
    assert DEFAULT_MAX_PIXELS == 50_000_000


def test_a_file_too_large_for_any_image_within_the_limit_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    with big.open("wb") as f:  # sparse: 10 MB on paper, nothing on disk
        f.write(encoded(".png", (10, 10, 3)))
        f.truncate(10_000_000)
    assert max_file_bytes(1000) < 10_000_000
    with pytest.raises(BadImage, match=r"huge.png: file larger than"):
        read_image(big, max_pixels=1000)


def test_a_format_the_guard_cannot_read_is_refused_not_decoded_unguarded() -> None:
    ok, ppm = cv2.imencode(".ppm", np.zeros((4, 4, 3), np.uint8))  # OpenCV would decode it
    assert ok and cv2.imdecode(ppm, cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(BadImage, match="not a decodable image"):
        decode_image(ppm.tobytes())


SHAPES = [(311, 97, 3), (311, 97), (311, 97, 4), (2, 3, 3)]
FORMATS = [
    (".png", ()),
    (".jpg", ()),
    (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    (".bmp", ()),
    (".tiff", ()),
    (".webp", ()),  # lossless: VP8L
    (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),  # lossy: VP8, or VP8X with alpha
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("ext", "params"), FORMATS, ids=lambda v: str(v))
def test_declared_size_agrees_with_opencv(ext: str, params: tuple, shape: tuple) -> None:
    data = encoded(ext, shape, params=params)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    _, width, height = declared_size(data)
    assert (height, width) == decoded.shape[:2]
    assert decode_image(data).shape == (shape[0], shape[1], 3)


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiff(97, 31),
        lambda: tiff(97, 31, order=">"),
        lambda: tiff(97, 31, big=True),
        lambda: tiff(97, 31, order=">", big=True),
    ],
    ids=["tiff-le", "tiff-be", "bigtiff-le", "bigtiff-be"],
)
def test_hand_written_tiffs_are_read_as_libtiff_reads_them(build) -> None:
    data = build()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.shape[:2] == (31, 97)
    assert declared_size(data) == ("TIFF", 97, 31)


def test_a_jpeg_thumbnail_is_not_taken_for_the_frame() -> None:
    data, (width, height) = jpeg_with_exif_thumbnail()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape[:2] == (height, width)
    assert declared_size(data) == ("JPEG", width, height)


def test_a_top_down_bmp_counts_its_height() -> None:
    data = bytearray(encoded(".bmp", (31, 97, 3)))
    (height,) = struct.unpack_from("<i", data, 22)
    struct.pack_into("<i", data, 22, -height)
    decoded = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape[:2] == (31, 97)
    assert declared_size(bytes(data)) == ("BMP", 97, 31)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
def test_every_truncation_of_a_header_is_a_bad_image(ext: str) -> None:
    data = encoded(ext)
    for n in range(0, 64):
        try:
            decode_image(data[:n])
        except BadImage:
            continue
        pytest.fail(f"{ext} cut to {n} bytes decoded")


def test_real_images_are_read_as_before() -> None:
    folder = ROOT / "demo" / "sample"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not files:
        pytest.skip(f"no sample images in {folder}")
    for path in files[:20]:
        expected = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert np.array_equal(read_image(path), expected), path


# -- the capture ------------------------------------------------------------------------------


def good_image(folder: Path, name: str, seed: int, shape=(120, 160, 3)) -> None:
    cv2.imwrite(str(folder / name), np.random.default_rng(seed).integers(0, 256, shape, np.uint8))


def collect(cap: CameraCapture, q: FrameQueue, timeout_s: float = 20) -> list[Frame]:
    got: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while cap.running or q.depth() > 0:
        assert time.monotonic() < deadline, f"no end of the source, {len(got)} frames"
        got += q.get_batch(4, 0.01, timeout_s=0.2)
    return got


def test_a_folder_camera_answers_every_hostile_file_and_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    reasons = hostile_files(folder)
    good_image(folder, "a_first.png", 1)
    good_image(folder, "z_last.jpg", 2)
    names = sorted(p.name for p in folder.iterdir())
    q = FrameQueue(2)
    cap = CameraCapture(CameraSettings("cam", str(folder)), q)
    caplog.set_level(logging.WARNING, logger="edge_agent.capture.cameras")
    cap.start()
    try:
        got = collect(cap, q)
    finally:
        cap.stop()
    assert [f.source_name for f in got] == names  # one frame per file, in order, none lost
    assert [f.sequence for f in got] == list(range(len(names)))
    for f in got:
        if f.source_name in reasons:
            assert f.error is not None and reasons[f.source_name] in f.error, (f, f.error)
            assert f.image.size == 0
        else:
            assert f.error is None and f.image.shape[2] == 3
    assert cap.finished and not cap.failed and not cap.running
    assert cap.stats["frames_in"] == len(names)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_max_megapixels_is_the_camera_limit(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    good_image(folder, "a.png", 1, shape=(100, 100, 3))
    q = FrameQueue(2)
    cap = CameraCapture(CameraSettings("cam", str(folder), max_megapixels=0.005), q)
    cap.start()
    try:
        (frame,) = collect(cap, q)
    finally:
        cap.stop()
    assert frame.error == "declared 100x100 pixels (0.0 MP) exceeds the limit of 0.005 MP"


def write_video(path: Path, n: int = 10, size: tuple[int, int] = (64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
    writer.release()


def test_video_frames_over_the_limit_are_error_frames(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    write_video(video, n=5, size=(64, 48))
    q = FrameQueue(8)
    cap = CameraCapture(CameraSettings("cam", str(video), max_megapixels=0.001), q)
    cap.start()
    try:
        got = collect(cap, q)
    finally:
        cap.stop()
    assert len(got) == 5 and cap.finished
    for f in got:
        assert f.image.size == 0
        assert f.error == "frame 64x48 pixels (0.0 MP) exceeds the limit of 0.001 MP"


def test_a_capture_thread_that_dies_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A looping video deleted while it plays: reopening it at the end fails, the thread
    # ends. That is a dead camera, which must not look like a finished source.
    video = tmp_path / "v.avi"
    write_video(video)
    q = FrameQueue(4)
    cap = CameraCapture(CameraSettings("cam", str(video), loop=True), q)
    caplog.set_level(logging.INFO, logger="edge_agent.capture.cameras")
    cap.start()
    try:
        got = q.get_batch(4, 0.01, timeout_s=5)
        video.unlink()
        deadline = time.monotonic() + 10
        while cap.running:
            assert time.monotonic() < deadline, "the capture did not end"
            got += q.get_batch(4, 0.01, timeout_s=0.1)
    finally:
        cap.stop()
    assert got
    assert cap.failed and not cap.finished
    stats = cap.stats
    assert not stats["connected"] and stats["failed"]
    assert "no such video file" in stats["last_error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line, no traceback


def test_a_stopped_capture_is_neither_finished_nor_failed(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    write_video(video)
    q = FrameQueue(2)
    cap = CameraCapture(CameraSettings("cam", str(video), loop=True), q)
    cap.start()
    q.get_batch(2, 0.01, timeout_s=5)
    cap.stop()
    assert not cap.running and not cap.failed and not cap.finished


# -- the agent, end to end: real subprocess, real Mosquitto, the real small bundle ------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator:
    from tests.brokers import Broker, Subscriber

    with Broker(tmp_path / "broker") as b, Subscriber(b.port, "#") as sub:
        yield b, sub


def agent_config(tmp_path: Path, bundle: Path, port: int, cameras: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"bundle: {bundle}\n"
        "device: cpu\n"
        "threads: 2\n"
        "thresholds: {image: 5.0, pixel: 5.0}\n"
        "batching: {max_batch: 4, max_wait_ms: 10, queue_size: 4}\n"
        f"cameras:\n{cameras}"
        "mqtt:\n"
        f"  port: {port}\n"
        f"  spool_dir: {tmp_path / 'spool'}\n"
        "  health_interval_s: 0.5\n"
        "metrics: {port: null}\n"
    )
    return path


def run_agent(config: Path, *args: str, timeout_s: float = 90) -> tuple[int | None, str]:
    """(exit code, log); None as the code when it had to be killed after `timeout_s`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


def final_counts(log: str) -> dict[str, int]:
    line = next(ln for ln in log.splitlines() if "stopped after" in ln)
    frame_part = line.split(" s: ", 1)[1].split(";")[0]
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", frame_part)}


@pytest.mark.slow
def test_the_agent_answers_every_hostile_file_with_its_reason(
    tmp_path: Path, small_bundle: Path, mtd_small: Path, broker
) -> None:
    b, sub = broker
    folder = tmp_path / "imgs"
    reasons = hostile_files(folder)
    good = sorted((mtd_small / "test" / "good").iterdir())[:3]
    for path in good:
        shutil.copy(path, folder / f"g_{path.name}")
    names = sorted(p.name for p in folder.iterdir())
    config = agent_config(tmp_path, small_bundle, b.port, f"  - {{id: cam, source: {folder}}}\n")
    code, log = run_agent(config, "--exit-when-done")
    assert code == 0, log[-3000:]
    sub.wait_for(lambda m: any(x.topic.endswith("/status") and x.payload == b"offline" for x in m))
    verdicts = [json.loads(m.payload) for m in sub.on(f"{PREFIX}/cam/verdict")]
    assert [v["source"] for v in verdicts] == names  # one verdict per file, in order
    for v in verdicts:
        if v["source"] in reasons:
            assert v["verdict"] == "ERROR" and v["score"] is None, v
            assert v["error"].startswith(f"{v['source']}: "), v
            assert reasons[v["source"]] in v["error"], v
            assert "empty frame" not in v["error"], v
        else:
            assert v["verdict"] in ("OK", "NG"), v
    counts = final_counts(log)
    assert counts["frames_in"] == len(names) == len(verdicts)
    assert counts["errors"] == len(reasons)
    assert "Traceback" not in log


@pytest.mark.slow
def test_the_agent_exits_1_when_a_capture_thread_dies(
    tmp_path: Path, small_bundle: Path, broker
) -> None:
    # Under systemd (no --exit-when-done): a dead camera must end the agent with status 1
    # (Restart=on-failure), after answering what was captured; never run on without it.
    b, sub = broker
    video = tmp_path / "v.avi"
    write_video(video)
    cameras = f"  - {{id: cam, source: {video}, loop: true}}\n"
    config = agent_config(tmp_path, small_bundle, b.port, cameras)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        if not sub.wait_for(lambda m: any(x.topic.endswith("/verdict") for x in m), 120):
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"no verdict before the camera was removed:\n{out[-3000:]}")
        video.unlink()
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the agent kept running without its camera:\n{out[-2000:]}")
    assert proc.returncode == 1, out[-3000:]
    errors = [ln for ln in out.splitlines() if " ERROR " in ln]
    assert any("camera cam: capture stopped before the end of its source" in ln for ln in errors)
    assert "Traceback" not in out
    assert sub.wait_for(lambda m: any(x.payload == b"offline" for x in m), 30)
    # Health is retained QoS 0: a live subscriber may miss one (at most once); what the broker
    # keeps, what SCADA reads on connecting, must be the dead camera.
    from tests.brokers import Subscriber

    with Subscriber(b.port, f"{PREFIX}/cam/health") as late:
        assert late.wait_for(lambda m: len(m) >= 1)
        kept = late.messages[0]
    health = json.loads(kept.payload)
    assert kept.retain and not health["connected"], health
    assert "no such video" in (health["last_error"] or ""), health
    verdicts = sub.on(f"{PREFIX}/cam/verdict")
    assert final_counts(out)["frames_in"] == len(verdicts)  # every captured frame answered
