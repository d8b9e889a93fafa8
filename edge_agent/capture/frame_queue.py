"""Captured frames and the bounded queue between the capture threads and the inference thread.

Overflow policy, per put:

- ``block=True`` (back-pressure, file and folder sources): wait for room, nothing is skipped.
- ``block=False`` (drop oldest, live sources): make room by dropping the oldest queued frame that
  was itself put with ``block=False``, so a live camera never evicts a file frame that must not be
  skipped. If every queued frame is a back-pressure one, the new frame is dropped instead. Either
  way the drop is counted against the camera whose frame was lost (``dropped``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One captured frame with where and when it was taken.

    ``sequence`` counts the frames a camera captured (0, 1, 2, ... with no gaps, across
    reconnects); frames later dropped by the queue keep their numbers, so a gap seen downstream
    is a counted drop. ``image`` is what OpenCV decoded (gray, BGR, or empty for an unreadable
    file): the inference side validates it and answers an unusable one as a bad frame.
    ``error`` is why the capture could not deliver an image for this frame (the image is then
    empty): it travels with the frame so that its ERROR verdict gives the real reason.
    """

    camera: str
    sequence: int
    frame_id: str
    captured_at: float
    image: np.ndarray = field(repr=False)
    source_name: str | None = None
    error: str | None = None


@dataclass
class _Entry:
    frame: Frame
    droppable: bool


class FrameQueue:
    """Bounded multi-producer (one capture thread per camera) single-consumer (inference) queue."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: deque[_Entry] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._dropped: dict[str, int] = {}

    def put(self, frame: Frame, *, block: bool, cancel: threading.Event | None = None) -> bool:
        """Queue `frame`; False if the queue is closed (or `cancel` was set while waiting).

        block=True waits for room (back-pressure); block=False never waits and drops a frame
        instead (see the module docstring). A producer that may be stopped while blocked passes
        its stop Event as `cancel` and calls `wake()` after setting it.
        """
        with self._lock:
            if block:
                while len(self._items) >= self.maxsize:
                    if self._closed or (cancel is not None and cancel.is_set()):
                        return False
                    self._not_full.wait()
            if self._closed:
                return False
            if len(self._items) >= self.maxsize and not self._make_room():
                self._count_drop(frame.camera)
                return True
            self._items.append(_Entry(frame, droppable=not block))
            self._not_empty.notify()
            return True

    def _make_room(self) -> bool:
        """Drop the oldest droppable entry; False if there is none. Lock held."""
        for i, entry in enumerate(self._items):
            if entry.droppable:
                del self._items[i]
                self._count_drop(entry.frame.camera)
                return True
        return False

    def _count_drop(self, camera: str) -> None:
        self._dropped[camera] = self._dropped.get(camera, 0) + 1

    def get_batch(
        self, max_batch: int, max_wait_s: float, *, timeout_s: float | None = None
    ) -> list[Frame]:
        """Up to `max_batch` frames, oldest first.

        Waits up to `timeout_s` (None: until closed) for the first frame, then at most
        `max_wait_s` more for stragglers, returning early once `max_batch` are queued, the queue
        is full (producers can add nothing more) or it is closed. [] on timeout, or when the
        queue is closed and empty.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        with self._lock:
            if not self._wait_for(lambda: bool(self._items), timeout_s):
                return []
            limit = min(max_batch, self.maxsize)
            self._wait_for(lambda: len(self._items) >= limit, max_wait_s)
            n = min(max_batch, len(self._items))
            batch = [self._items.popleft().frame for _ in range(n)]
            self._not_full.notify_all()
            return batch

    def _wait_for(self, ready, timeout_s: float | None) -> bool:
        """Wait on not_empty until ready() or closed or timeout; returns ready(). Lock held."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ready() and not self._closed:
            if deadline is None:
                self._not_empty.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._not_empty.wait(remaining)
        return ready()

    def wake(self) -> None:
        """Wake blocked producers so they re-check their `cancel` Event."""
        with self._lock:
            self._not_full.notify_all()

    def close(self) -> None:
        """No more puts; waiting producers return False, the consumer drains what is left."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def depth(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def dropped(self) -> dict[str, int]:
        """Frames dropped per camera so far (a copy)."""
        with self._lock:
            return dict(self._dropped)
