"""The reject archive: JPEG + JSON per NG frame, dated folders, quota, no crash on a bad disk."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.decide.archive import ArchiveSettings, RejectArchive

DAY_MS = 86_400_000
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def _frame(seed: int, hw=(120, 160)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Noise does not compress: each JPEG is a few kB, so a small quota fills quickly.
    return rng.integers(0, 256, (*hw, 3), dtype=np.uint8)


def _verdict(seq: int, ts_ms: int, camera: str = "cam/1") -> dict:
    return {
        "schema": "edge-agent/verdict/v1",
        "timestamp": ts_ms,
        "camera": camera,
        "sequence": seq,
        "verdict": "NG",
        "score": 3.5,
        "reject_image": None,
    }


def _submit(archive: RejectArchive, seq: int, ts_ms: int) -> str | None:
    frame = _frame(seq)
    amap = np.zeros(frame.shape[:2], dtype=np.float32)
    amap[40:80, 60:100] = 4.0
    return archive.submit(
        frame, _verdict(seq, ts_ms), amap=amap, vmin=0.0, vmax=4.0, pixel_threshold=2.0
    )


def test_one_jpeg_and_sidecar_per_reject(tmp_path: Path) -> None:
    archive = RejectArchive(ArchiveSettings(dir=tmp_path / "a", quota_mb=100))
    archive.start()
    paths = [_submit(archive, i, T0 + i * DAY_MS // 4) for i in range(4)]
    archive.close()
    assert all(paths)
    for i, p in enumerate(paths):
        jpeg = Path(p)
        assert jpeg.is_file() and jpeg.suffix == ".jpg"
        image = cv2.imread(str(jpeg))
        # original | 4 px bar | overlay, same height
        assert image.shape == (120, 2 * 160 + 4, 3)
        side = json.loads(jpeg.with_suffix(".json").read_text())
        assert side["sequence"] == i and side["reject_image"] == p
        assert "/" not in jpeg.name  # the camera id is made file-name safe
    days = sorted(d.name for d in (tmp_path / "a").iterdir())
    assert days == ["2023-11-14", "2023-11-15"]  # UTC dates of capture
    assert not list((tmp_path / "a").rglob(".*"))  # no temporary files left
    assert archive.stats["saved"] == 4 and archive.stats["errors"] == 0


def test_quota_deletes_oldest_first_and_counts_earlier_runs(tmp_path: Path) -> None:
    root = tmp_path / "a"
    first = RejectArchive(ArchiveSettings(dir=root, quota_mb=100))
    first.start()
    for i in range(3):
        _submit(first, i, T0 + i)
    first.close()
    entry = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 3
    # Room for about four entries: a second run must count the three already there.
    quota_mb = 4.5 * entry / (1024 * 1024)
    second = RejectArchive(ArchiveSettings(dir=root, quota_mb=quota_mb))
    second.start()
    for i in range(3, 12):
        _submit(second, i, T0 + i)
    second.close()
    files = sorted(f for f in root.rglob("*.json"))
    kept = [json.loads(f.read_text())["sequence"] for f in files]
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total <= quota_mb * 1024 * 1024 + 1.5 * entry  # exceeded by at most the newest
    assert kept == list(range(12 - len(kept), 12)) and 3 <= len(kept) <= 5
    assert len(list(root.rglob("*.jpg"))) == len(kept)


def test_quota_removes_emptied_day_folders(tmp_path: Path) -> None:
    root = tmp_path / "a"
    archive = RejectArchive(ArchiveSettings(dir=root, quota_mb=1e-6))
    archive.start()
    for i in range(3):
        _submit(archive, i, T0 + i * DAY_MS)
    archive.close()
    assert [d.name for d in root.iterdir()] == ["2023-11-16"]  # only the newest survives
    assert len(list(root.rglob("*.jpg"))) == 1


def test_full_disk_is_counted_and_logged_once(tmp_path: Path, caplog) -> None:
    # A regular file where the day folder should be: every write fails like a broken disk.
    root = tmp_path / "a"
    root.mkdir()
    (root / "2023-11-14").write_text("in the way")
    archive = RejectArchive(ArchiveSettings(dir=root, quota_mb=10))
    archive.start()
    with caplog.at_level("ERROR", logger="edge_agent.decide.archive"):
        for i in range(3):
            _submit(archive, i, T0 + i)
        archive.close()
    assert archive.stats["errors"] == 3 and archive.stats["saved"] == 0
    errors = [r for r in caplog.records if r.name == "edge_agent.decide.archive"]
    assert len([r for r in errors if r.levelno >= logging.ERROR]) == 1
    # and it recovers once the disk does
    (root / "2023-11-14").unlink()
    again = RejectArchive(ArchiveSettings(dir=root, quota_mb=10))
    again.start()
    assert _submit(again, 9, T0 + 9) is not None
    again.close()
    assert again.stats["saved"] == 1


def test_ok_frames_only_with_save_ok_and_without_overlay(tmp_path: Path) -> None:
    archive = RejectArchive(ArchiveSettings(dir=tmp_path, save_ok=False))
    assert archive.wants("NG") and not archive.wants("OK") and not archive.wants("ERROR")
    keep = RejectArchive(ArchiveSettings(dir=tmp_path / "ok", save_ok=True))
    assert keep.wants("OK")
    keep.start()
    frame = _frame(1)
    path = keep.submit(frame, {**_verdict(1, T0), "verdict": "OK"})
    keep.close()
    assert path is not None and cv2.imread(path).shape == frame.shape


# -- the free-space floor ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB filesystem (tmpfs; needs root): the archive's quota is far larger than the
    disk, as when the archive shares a small eMMC with the spool."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (the floor is also tested without it)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _drain(archive: RejectArchive, accepted: int, timeout_s: float = 10.0) -> None:
    """Wait until the writer has handled the `accepted` jobs (keeps 'writer behind' out)."""
    deadline = time.monotonic() + timeout_s
    while archive.stats["saved"] + archive.stats["errors"] < accepted:
        assert time.monotonic() < deadline, archive.stats
        time.sleep(0.005)


def test_a_full_small_disk_never_publishes_a_path_that_is_not_written(small_disk: Path) -> None:
    archive = RejectArchive(ArchiveSettings(dir=small_disk / "a", quota_mb=100, min_free_mb=0.5))
    archive.start()
    published = []
    for i in range(80):  # about 5 MB of JPEGs for a 2 MB disk
        path = _submit(archive, i, T0 + i)
        if path is not None:
            published.append(path)
        _drain(archive, len(published))
    archive.close()
    stats = archive.stats
    assert stats["errors"] == 0, stats  # no write ever ran into a full disk
    assert stats["saved"] == len(published) > 10
    assert shutil.disk_usage(small_disk).free >= 0.5 * 1024 * 1024
    on_disk = sorted(str(p) for p in (small_disk / "a").rglob("*.jpg"))
    # The floor deleted the oldest entries to make room: what is left is the newest of what
    # was published, each with its sidecar naming it, and no sidecar without its image.
    assert on_disk and on_disk == sorted(published[-len(on_disk) :])
    for side in (small_disk / "a").rglob("*.json"):
        assert Path(json.loads(side.read_text())["reject_image"]).is_file()
    assert len(list((small_disk / "a").rglob("*.json"))) == len(on_disk)
    assert not list((small_disk / "a").rglob(".*"))  # no temporary files left behind


def test_below_the_floor_nothing_is_promised_and_it_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Without root: a floor above the free space of any real disk stands for a full one.
    floor_mb = (shutil.disk_usage(tmp_path).free + (1 << 40)) / (1024 * 1024)
    root = tmp_path / "a"
    archive = RejectArchive(ArchiveSettings(dir=root, min_free_mb=floor_mb))
    archive.start()
    with caplog.at_level("INFO", logger="edge_agent.decide.archive"):
        paths = [_submit(archive, i, T0 + i) for i in range(5)]
        archive.close()
    assert paths == [None] * 5  # the verdicts say reject_image null
    stats = archive.stats
    assert stats["skipped"] == stats["skipped_low_disk"] == 5 and stats["saved"] == 0
    assert not list(root.rglob("*.*"))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "below the floor" in errors[0] and "min_free_mb" in errors[0]
    # With room again (a floor of 0), archiving resumes.
    again = RejectArchive(ArchiveSettings(dir=root, min_free_mb=0))
    again.start()
    path = _submit(again, 9, T0 + 9)
    again.close()
    assert path is not None and Path(path).is_file()


def test_a_failed_write_leaves_no_sidecar_claiming_an_image(tmp_path: Path) -> None:
    root = tmp_path / "a"
    root.mkdir()
    (root / "2023-11-14").write_text("in the way")  # every write fails like a broken disk
    archive = RejectArchive(ArchiveSettings(dir=root, min_free_mb=0))
    archive.start()
    path = _submit(archive, 1, T0)
    archive.close()
    assert path is not None and archive.stats["errors"] == 1  # logged and counted
    assert not list(root.rglob("*.json")) and not Path(path).exists()
