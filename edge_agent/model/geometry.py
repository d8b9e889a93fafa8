"""Input geometry: the model input size a training set gets, and whether a frame fits it.

A line camera delivers one frame shape all day, rarely square. Squeezing a 2.5:1 frame into a
square shrinks one axis 2.5 times more than the other, and a thin defect across that axis
disappears (issue 11 measured image AUROC 0.758 squeezed vs 0.868 aspect-preserving on such
frames). So `fit --image-size auto` (the default) keeps the training images' aspect ratio when
they share one, at about the patch count of the square default so speed stays the same:

    aspect a = median(w / h) over the training images
    (H, W) = argmin over H, W multiples of m of |ln(W/H / a)| + |ln(H*W / S^2)|

with S = 288 (the measured best square side) and m the backbone's deepest stride among the
layers used (a side that is not a multiple of it leaves feature maps misaligned). Images of
varying shape (MVTec-style crops, as in MTD) keep the square S x S: no one aspect is theirs.

ASPECT_TOLERANCE (5%) is what "one aspect" means. Rounding both sides to multiples of 16
near 288 px alone moves an aspect by up to about 5% (8 px of 160 and of 480), so frames closer
than that are as alike as the model input can make them; and a 5% squeeze moves a point at the
far side of a 288 px patch grid by under one 8 px patch cell, which no score can see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ASPECT_TOLERANCE = 0.05
DEFAULT_SIDE = 288  # BENCHMARKS.md: the best square side on MTD for every metric


@dataclass(frozen=True)
class SizeChoice:
    """What `fit --image-size auto` picked and why (stored in the manifest, printed)."""

    size: tuple[int, int]  # (height, width)
    reason: str
    aspect_range: tuple[float, float]  # (min, max) of w / h over the training images


def aspect(shape: tuple[int, int]) -> float:
    """w / h of a (height, width) shape."""
    return shape[1] / shape[0]


def one_aspect(low: float, high: float, tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether aspects from `low` to `high` are one aspect within `tolerance`."""
    return high <= low * (1.0 + tolerance)


def aspect_size(target: float, multiple: int, side: int = DEFAULT_SIDE) -> tuple[int, int]:
    """(H, W), multiples of `multiple`, closest to aspect `target` and to side^2 pixels: the
    argmin in the module docstring, over the few multiples around the exact solution."""
    area = side * side
    h0, w0 = math.sqrt(area / target), math.sqrt(area * target)
    best: tuple[float, int, int] | None = None

    def near(x: float) -> range:
        return range(max(1, math.floor(x / multiple) - 3), math.ceil(x / multiple) + 4)

    for h in (k * multiple for k in near(h0)):
        for w in (k * multiple for k in near(w0)):
            cost = abs(math.log(w / h / target)) + abs(math.log(h * w / area))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, h, w)
    assert best is not None
    return best[1], best[2]


def auto_input_size(
    shapes: Sequence[tuple[int, int]], multiple: int, side: int = DEFAULT_SIDE
) -> SizeChoice:
    """The model input for training images of these (height, width) shapes: see the module
    docstring. A square training set gets exactly side x side."""
    if not shapes:
        raise ValueError("no training image shapes")
    aspects = sorted(aspect(s) for s in shapes)
    low, high = aspects[0], aspects[-1]
    median = aspects[len(aspects) // 2]
    spread = f"{low:.2f}:1" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}:1 to {high:.2f}:1"
    if not one_aspect(low, high):
        return SizeChoice(
            (side, side),
            f"the training images' aspect ratios vary ({spread}, more than "
            f"{ASPECT_TOLERANCE:.0%} apart): square default",
            (low, high),
        )
    if one_aspect(min(median, 1.0), max(median, 1.0)):
        return SizeChoice((side, side), f"the training images are square ({spread})", (low, high))
    size = aspect_size(median, multiple, side)
    return SizeChoice(
        size,
        f"the training images share one aspect ratio ({spread}): kept, at about the patch "
        f"count of {side}x{side}",
        (low, high),
    )


def aspect_mismatch(
    frame: tuple[int, int], fitted: tuple[float, float], tolerance: float = ASPECT_TOLERANCE
) -> str | None:
    """None when a (height, width) frame has an aspect within `tolerance` of the training
    images' range `fitted` (min, max of w / h); else why not, in one line for the log and the
    health message. The frame is still scored: the model was fitted on another geometry, so
    its scores mean less, and the line engineer should know."""
    a = aspect(frame)
    low, high = fitted
    if low / (1.0 + tolerance) <= a <= high * (1.0 + tolerance):
        return None
    fitted_text = f"{low:.2f}:1" if one_aspect(low, high) else f"{low:.2f}:1 to {high:.2f}:1"
    return (
        f"frames of {frame[1]}x{frame[0]} ({a:.2f}:1) but the model was fitted on images of "
        f"{fitted_text}: scores are less reliable (refit on this camera's frames)"
    )
