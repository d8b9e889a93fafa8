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

Then the scale (issue 34). Frames much larger than the input lose small defects to the
resize: a 1024 px photograph at 288 px shrinks a 37 px pit to 10 px, about one 8 px patch
cell, and the surface's texture sets the image score. So where the training frames would be
shrunk more than MAX_SHRINK times per side, the input grows, same aspect, to shrink them only
that much, within a budget of MAX_AREA times the default's pixels:

    shrink s = sqrt(median(h * w) / (H * W))
    if s > MAX_SHRINK:  (H, W) = aspect_size(a, m, side=sqrt(min(median(h * w) / MAX_SHRINK^2,
                                                                 MAX_AREA * S^2)))

The budget is what one model run may spend. The graph's time grows with its pixels, the
search's with its queries and the bank (2% of the training patches) with them, so the engine
is slower by more than the pixel ratio: at 448x448 (2.4x 288x288's pixels) it ran at 0.37-0.51x
the speed, fit took 2x as long, and fit's peak memory stayed (quantize.calibration_batch).
Tiling is not chosen automatically: at the default 96 px overlap a 288 px tile
spends (288 / 192)^2 = 2.25 model pixels per frame pixel, so within this budget one larger
input always sees the frame at a finer scale; tiles are for frames whose native resolution
matters more than the budget (`fit --tile`). BENCHMARKS.md ("Defaults on data nobody tuned
them for") has the measurements.

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
# The frames' shrink per side above which auto grows the input (MTD's ~320 px crops shrink
# 1.1x at 288), and the most it grows it to, in multiples of DEFAULT_SIDE^2 pixels: module
# docstring and BENCHMARKS.md.
MAX_SHRINK = 2.0
MAX_AREA = 2.5


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


def _median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def shrink(shapes: Sequence[tuple[int, int]], size: tuple[int, int]) -> float:
    """sqrt(median(h * w) / (H * W)): how many times per side an input of `size` shrinks the
    median training frame."""
    return math.sqrt(_median([h * w for h, w in shapes]) / (size[0] * size[1]))


def scaled_side(
    shapes: Sequence[tuple[int, int]],
    size: tuple[int, int],
    side: int = DEFAULT_SIDE,
    max_shrink: float = MAX_SHRINK,
    max_area: float = MAX_AREA,
) -> float | None:
    """The side of the square whose area the input should have so that the median frame
    shrinks at most `max_shrink` times, within `max_area` x side^2 (module docstring); None
    where `size` already shrinks it no more than that."""
    if shrink(shapes, size) <= max_shrink:
        return None
    wanted = math.sqrt(_median([h * w for h, w in shapes])) / max_shrink
    return min(wanted, math.sqrt(max_area) * side)


def auto_input_size(
    shapes: Sequence[tuple[int, int]], multiple: int, side: int = DEFAULT_SIDE
) -> SizeChoice:
    """The model input for training images of these (height, width) shapes: their aspect
    (aspect_input_size), grown where it would shrink them more than MAX_SHRINK times
    (scaled_side). See the module docstring."""
    choice = aspect_input_size(shapes, multiple, side)
    grown = scaled_side(shapes, choice.size, side)
    if grown is None:
        return choice
    h, w = choice.size
    if h == w:
        size = (max(1, round(grown / multiple)) * multiple,) * 2
    else:
        size = aspect_size(_median([aspect(s) for s in shapes]), multiple, round(grown))
    budget = math.sqrt(MAX_AREA) * side
    limit = f" (the budget's most: {MAX_AREA:g}x {side}x{side}'s pixels)" if grown >= budget else ""
    return SizeChoice(
        size,
        f"{choice.reason}; grown to {size[1]}x{size[0]}{limit}: {w}x{h} would shrink them "
        f"{shrink(shapes, choice.size):.1f}x per side (more than {MAX_SHRINK:g}x), "
        f"{size[1]}x{size[0]} {shrink(shapes, size):.1f}x",
        choice.aspect_range,
    )


def aspect_input_size(
    shapes: Sequence[tuple[int, int]], multiple: int, side: int = DEFAULT_SIDE
) -> SizeChoice:
    """The input's shape for training images of these (height, width) shapes, at about
    side^2 pixels: their aspect where they share one, else square (module docstring). A
    square training set gets exactly side x side."""
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
