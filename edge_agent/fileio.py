"""Crash-safe file writes, one implementation for the bundle, the reject archive and the spool.

A rename is atomic but not durable until the directory that holds it is fsynced: without that,
a power cut right after `edge-agent calibrate` can bring back the old manifest (or none).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write to a temporary file beside `path`, fsync it, rename it over `path` and fsync the
    directory: readers see the old file or the whole new one, never a torn write, and the new
    one survives a power cut once this returns. `mode` sets the permissions (mkstemp: 0o600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(folder: Path) -> None:
    """Make renames, creations and deletions in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder` and the folders themselves (before renaming it into
    place, so the renamed folder's contents are on disk too)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(root))
