"""The offline scoring loop shared by evaluate and calibrate: decode ahead in a helper thread
(so a CPU core is not idle while images are read), score in batches, show progress."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

if TYPE_CHECKING:
    from edge_agent.model.scorer import Scorer

T = TypeVar("T")
R = TypeVar("R")
X = TypeVar("X")

# How exact each yielded map must be (Scorer.exact_map; matters with the ivf-exact index only):
# "peak": its maximum is flat's; "all": all of it is flat's (the cost of flat search); "bound":
# as searched (upper bounds where not re-checked).
MapExactness = Literal["peak", "all", "bound"]


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


def score_items(
    scorer: Scorer,
    items: Sequence[T],
    load: Callable[[T], tuple[np.ndarray, X] | None],
    batch_size: int,
    label: str,
    *,
    maps: MapExactness = "peak",
) -> Iterator[tuple[T, np.ndarray, X, float, np.ndarray]]:
    """(item, prepared image, extra, image score, anomaly map) for every item that loads.

    `load(item)` returns the image prepared for the scorer (Scorer.prepare) and anything else
    the caller wants read ahead with it (a ground-truth mask), or None to skip the item.
    `maps` says where maps must be flat's (MapExactness); image scores are with ivf-exact.
    """
    progress = Progress(label, len(items))
    for pairs in prefetch_batches(items, load, batch_size):
        result = scorer.score(np.stack([image for _, (image, _) in pairs]))
        for i, (item, (image, extra)) in enumerate(pairs):
            if maps == "bound":
                amap = scorer.anomaly_map(result.patch_scores[i])
            else:
                amap = scorer.exact_map(result, i, peak=maps == "peak")
            yield item, image, extra, float(result.image_scores[i]), amap
        progress.update(len(pairs))


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
