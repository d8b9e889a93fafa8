"""The reject archive: each NG frame as a JPEG (original | heat-map overlay) plus a JSON sidecar
holding its verdict, under DIR/YYYY-MM-DD/ (UTC date of capture), bounded by a disk quota.

Writing happens in one background thread behind a small bounded queue, so a slow or stalled
disk never slows inspection: when the queue is full the frame is not archived (counted, and
its verdict says reject_image null). Each file is written to a temporary name, fsynced and
renamed, so a reader (or a power cut) never sees half a JPEG; the sidecar is written after the
JPEG, so a sidecar always has its image. A failing disk (full, read-only) is counted and
logged once per streak, never raised: the agent keeps inspecting.

The quota deletes the oldest entries (image + sidecar) first; the newest entry is always
kept, so the archive exceeds the quota by at most one entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.decide.overlay import heatmap_overlay, side_by_side
from edge_agent.fileio import atomic_write

log = logging.getLogger(__name__)

QUEUE_SIZE = 32
# No dots: the stem must not grow a suffix that with_suffix() would replace.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ArchiveSettings:
    dir: Path
    quota_mb: float = 1024.0
    save_ok: bool = False  # also keep OK frames (original only), e.g. to collect training data
    jpeg_quality: int = 90


@dataclass(frozen=True)
class _Job:
    stem: Path  # DIR/YYYY-MM-DD/<name> without suffix
    frame: np.ndarray  # uint8 BGR, original size
    amap: np.ndarray | None  # float32 at frame size (NG) or None (OK: original only)
    vmin: float
    vmax: float
    pixel_threshold: float
    label: str
    sidecar: dict[str, Any]


class RejectArchive:
    def __init__(self, settings: ArchiveSettings) -> None:
        self.settings = settings
        self.root = Path(settings.dir)
        self.quota_bytes = int(settings.quota_mb * 1024 * 1024)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._entries: deque[tuple[Path, int]] = deque()  # (stem, bytes), oldest first
        self._bytes = 0
        self._failing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="archive", daemon=True)
        self.saved = 0
        self.errors = 0  # failed writes
        self.skipped = 0  # not written because the writer was behind

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Index what is on disk (so the quota counts earlier runs) and start the writer."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._fail(f"cannot create {self.root}: {exc.strerror}")
        self._scan()
        self._enforce_quota(keep=None)
        self._thread.start()
        log.info(
            "reject archive in %s: %d entries, %.1f of %.0f MB",
            self.root,
            len(self._entries),
            self._bytes / 1048576,
            self.settings.quota_mb,
        )

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("reject archive: writer still busy after %.0f s, leaving", timeout_s)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "saved": self.saved,
                "errors": self.errors,
                "skipped": self.skipped,
                "entries": len(self._entries),
                "bytes": self._bytes,
            }

    # -- producer side (the inference thread) -----------------------------------------------

    def wants(self, verdict: str) -> bool:
        return verdict == "NG" or (verdict == "OK" and self.settings.save_ok)

    def submit(
        self,
        frame_bgr: np.ndarray,
        verdict: dict[str, Any],
        *,
        amap: np.ndarray | None = None,
        vmin: float = 0.0,
        vmax: float = 1.0,
        pixel_threshold: float | None = None,
    ) -> str | None:
        """Queue one frame; returns the image path it will have, or None if not archived.

        `verdict` is the verdict message (its `reject_image` is filled in here for the
        sidecar); `amap` is the anomaly map at the frame's size for an overlay, None to keep
        the original only.
        """
        stem = self._stem(verdict)
        image_path = str(stem.with_suffix(".jpg"))
        sidecar = {**verdict, "reject_image": image_path}
        score = verdict.get("score")
        label = f"{verdict.get('verdict')} {score:.3f}" if isinstance(score, float) else ""
        job = _Job(
            stem,
            frame_bgr,
            amap,
            float(vmin),
            float(vmax),
            float(pixel_threshold if pixel_threshold is not None else np.inf),
            label,
            sidecar,
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.skipped += 1
                first = self.skipped == 1
            if first:
                log.warning("reject archive: writer is behind, frames are not being archived")
            return None
        return image_path

    def _stem(self, verdict: dict[str, Any]) -> Path:
        ts_ms = int(verdict.get("timestamp") or time.time() * 1000)
        when = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
        camera = _UNSAFE.sub("_", str(verdict.get("camera", "camera")))
        name = (
            f"{when:%H%M%S}{ts_ms % 1000:03d}_{camera}_{int(verdict.get('sequence', 0)):08d}"
            f"_{verdict.get('verdict', 'NG')}"
        )
        return self.root / f"{when:%Y-%m-%d}" / name

    # -- writer thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                size = self._write(job)
            except OSError as exc:
                self._fail(f"cannot write {job.stem}.jpg: {exc.strerror or exc}")
                continue
            except Exception:  # a rendering bug must not kill the writer thread
                log.exception("reject archive: cannot render %s", job.stem.name)
                with self._lock:
                    self.errors += 1
                continue
            with self._lock:
                self.saved += 1
                self._entries.append((job.stem, size))
                self._bytes += size
            if self._failing:
                self._failing = False
                log.info("reject archive: writing again")
            self._enforce_quota(keep=job.stem)

    def _write(self, job: _Job) -> int:
        image = job.frame
        if job.amap is not None:
            overlay = heatmap_overlay(
                job.frame,
                job.amap,
                vmin=job.vmin,
                vmax=job.vmax,
                mask=job.amap >= job.pixel_threshold,
                label=job.label or None,
            )
            image = side_by_side(job.frame, overlay)
        ok, encoded = cv2.imencode(
            ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(self.settings.jpeg_quality)]
        )
        if not ok:
            raise OSError("JPEG encoding failed")
        job.stem.parent.mkdir(parents=True, exist_ok=True)
        jpeg = job.stem.with_suffix(".jpg")
        sidecar = job.stem.with_suffix(".json")
        data = json.dumps(job.sidecar, indent=1).encode()
        atomic_write(jpeg, encoded.tobytes())
        try:
            atomic_write(sidecar, data)
        except OSError:
            jpeg.unlink(missing_ok=True)
            raise
        return len(encoded) + len(data)

    def _fail(self, message: str) -> None:
        with self._lock:
            self.errors += 1
        if not self._failing:
            self._failing = True
            log.error("reject archive: %s (counting further failures silently)", message)

    # -- quota ------------------------------------------------------------------------------

    def _scan(self) -> None:
        sizes: dict[Path, int] = {}
        if self.root.is_dir():
            for day in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for f in day.iterdir():
                    if f.suffix in (".jpg", ".json") and not f.name.startswith("."):
                        try:
                            sizes[f.with_suffix("")] = sizes.get(f.with_suffix(""), 0) + (
                                f.stat().st_size
                            )
                        except OSError:
                            continue
        # Names start with the capture time and folders with the date: sorted = oldest first.
        self._entries = deque(sorted(sizes.items()))
        self._bytes = sum(sizes.values())

    def _enforce_quota(self, keep: Path | None) -> None:
        while True:
            with self._lock:
                if self._bytes <= self.quota_bytes or not self._entries:
                    return
                stem, size = self._entries[0]
                if stem == keep:
                    return
                self._entries.popleft()
                self._bytes -= size
            for suffix in (".jpg", ".json"):
                try:
                    stem.with_suffix(suffix).unlink(missing_ok=True)
                except OSError as exc:
                    log.debug("reject archive: cannot delete %s: %s", stem, exc)
            _remove_if_empty(stem.parent)


def _remove_if_empty(folder: Path) -> None:
    # Not empty (the usual case) or already gone: both fine.
    with contextlib.suppress(OSError):
        folder.rmdir()
