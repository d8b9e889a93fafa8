"""Offline scoring loops (evaluate, calibrate): decode ahead in a helper thread and show
progress, so a CPU core is not idle while images are read."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_batches(
    items: Sequence[T], load: Callable[[T], R | None], batch_size: int
) -> Iterator[list[tuple[T, R]]]:
    """Batches of up to `batch_size` (item, load(item)) pairs, in order, loading in a helper
    thread (OpenCV's decoding releases the GIL) while the caller scores the previous batch.
    Items whose load returns None (unreadable) are left out."""
    batch: list[tuple[T, R]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for item, loaded in zip(items, pool.map(load, items), strict=True):
            if loaded is None:
                continue
            batch.append((item, loaded))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


class Progress:
    """A one-line counter on stderr, only when a person is watching (a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.live = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if self.live:
            end = "\n" if self.done >= self.total else ""
            print(f"\r{self.label}: {self.done}/{self.total}", end=end, file=sys.stderr, flush=True)
