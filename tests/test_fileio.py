"""Crash-safe writes: what a power cut needs to be on disk before atomic_write returns."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge_agent import fileio


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The real os.fsync, recording which path each call made durable."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", spy)
    return seen


def test_atomic_write_fsyncs_file_then_directory(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    fileio.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    # The data first (under its temporary name), then the folder that holds the rename.
    assert len(fsynced) == 2
    assert Path(fsynced[0]).parent == tmp_path and fsynced[0] != str(target)
    assert fsynced[1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_write_sets_mode_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "head"
    fileio.atomic_write(target, b"1 0\n", mode=0o640)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(TypeError):
        fileio.atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"1 0\n"  # the old content survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["head"]  # no temporary left behind


def test_fsync_tree_covers_every_file_and_folder(tmp_path: Path, fsynced: list[str]) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.npy").write_bytes(b"a")
    (tmp_path / "sub" / "b.onnx").write_bytes(b"b")
    fileio.fsync_tree(tmp_path)
    assert set(fsynced) == {
        str(tmp_path / "a.npy"),
        str(tmp_path / "sub" / "b.onnx"),
        str(tmp_path),
        str(tmp_path / "sub"),
    }
