"""A score histogram as PNG, drawn with OpenCV only (matplotlib is not a dependency):
good and defect image scores with the candidate thresholds marked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import UserError

WIDTH, HEIGHT = 1000, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 50, 70
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (110, 110, 110), (225, 225, 225), (255, 255, 255)
GOOD_BGR = (80, 160, 40)  # green
DEFECT_BGR = (50, 50, 210)  # red
LINE_BGR = {"target": (200, 90, 0), "f1": (0, 140, 255), "keep-all": (160, 40, 140)}


@dataclass(frozen=True)
class Marker:
    """A vertical threshold line with its legend text."""

    label: str
    value: float
    color: tuple[int, int, int]
    bold: bool = False


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = hi - lo if hi > lo else 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{v:.{decimals}f}"


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.5, color=BLACK):
    cv2.putText(img, s, org, FONT, scale, color, 1, cv2.LINE_AA)


def _text_width(s: str, scale: float = 0.5) -> int:
    return cv2.getTextSize(s, FONT, scale, 1)[0][0]


def histogram_image(
    good: np.ndarray,
    defects: np.ndarray,
    markers: list[Marker],
    *,
    title: str = "image scores",
    bins: int | None = None,
) -> np.ndarray:
    """uint8 BGR [HEIGHT, WIDTH, 3]: overlaid histograms, threshold lines, ticks, legend."""
    good, defects = np.asarray(good, float), np.asarray(defects, float)
    values = np.concatenate([good, defects, [m.value for m in markers]])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.04 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    n_bins = bins or int(np.clip(np.sqrt(len(good) + len(defects)) * 2, 10, 60))
    edges = np.linspace(lo, hi, n_bins + 1)
    g_counts = np.histogram(good, edges)[0]
    d_counts = np.histogram(defects, edges)[0] if defects.size else np.zeros(n_bins, int)
    top = max(int(g_counts.max()), int(d_counts.max()), 1)

    img = np.full((HEIGHT, WIDTH, 3), WHITE, np.uint8)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP + 20  # y0: baseline

    def px(v: float) -> int:
        return round(float(x0 + (v - lo) / (hi - lo) * (x1 - x0)))

    def py(c: float) -> int:
        return round(float(y0 - c / (top * 1.08) * (y0 - y1)))

    yticks = [t for t in nice_ticks(0, top, 5) if t == int(t)]
    for t in yticks:  # grid first, bars over it
        cv2.line(img, (x0, py(t)), (x1, py(t)), LIGHT, 1)
    # With defects, each bin holds two half-width bars (good left, defects right): overlaid
    # bars would hide one another exactly where the two distributions meet.
    halves = 2 if defects.size else 1
    for half, (counts, color) in enumerate(((g_counts, GOOD_BGR), (d_counts, DEFECT_BGR))):
        for i, c in enumerate(counts[: len(counts) if half < halves else 0]):
            if c:
                left, right = px(edges[i]), px(edges[i + 1])
                w = (right - left) / halves
                a, b = int(left + half * w) + 1, int(left + (half + 1) * w) - 1
                cv2.rectangle(img, (a, py(c)), (max(a, b), y0), color, -1)

    # axes, ticks, labels
    cv2.line(img, (x0, y0), (x1, y0), BLACK, 1)
    cv2.line(img, (x0, y0), (x0, y1), BLACK, 1)
    xticks = nice_ticks(lo, hi, 8)
    step = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    for t in xticks:
        x = px(t)
        cv2.line(img, (x, y0), (x, y0 + 5), BLACK, 1)
        s = _fmt(t, step)
        _text(img, s, (x - _text_width(s) // 2, y0 + 22))
    for t in yticks:
        y = py(t)
        cv2.line(img, (x0 - 5, y), (x0, y), BLACK, 1)
        s = str(int(t))
        _text(img, s, (x0 - 10 - _text_width(s), y + 5))
    xlabel = "image score (NG when score >= threshold)"
    _text(img, xlabel, ((x0 + x1 - _text_width(xlabel)) // 2, HEIGHT - 18))
    _vertical_text(img, "images", (22, (y0 + y1) // 2))
    _text(img, title, (x0, 30), 0.65)

    # threshold lines, then the legend on top
    drawn: list[int] = []
    for m in markers:
        x = px(m.value)
        while any(abs(x - other) < 4 for other in drawn):  # keep coinciding lines visible
            x += 4
        drawn.append(x)
        _dashed_vline(img, x, y0, y1 - 8, m.color, 3 if m.bold else 2, solid=m.bold)
    entries: list[tuple[str, tuple[int, int, int], bool]] = [
        (f"good (n={len(good)})", GOOD_BGR, True)
    ]
    if defects.size:
        entries.append((f"defects (n={len(defects)})", DEFECT_BGR, True))
    entries += [(m.label, m.color, False) for m in markers]
    _legend(img, entries, x1)
    return img


def _dashed_vline(
    img: np.ndarray, x: int, y_from: int, y_to: int, color, thickness: int, *, solid: bool
) -> None:
    if solid:
        cv2.line(img, (x, y_from), (x, y_to), color, thickness)
        return
    for y in range(y_to, y_from, 12):
        cv2.line(img, (x, y), (x, min(y + 7, y_from)), color, thickness)


def _vertical_text(img: np.ndarray, s: str, center: tuple[int, int]) -> None:
    w, h = cv2.getTextSize(s, FONT, 0.5, 1)[0]
    patch = np.full((h + 8, w + 4, 3), WHITE, np.uint8)
    _text(patch, s, (2, h + 2))
    patch = cv2.rotate(patch, cv2.ROTATE_90_COUNTERCLOCKWISE)
    ph, pw = patch.shape[:2]
    y, x = center[1] - ph // 2, center[0] - pw // 2
    img[y : y + ph, x : x + pw] = patch


def _legend(img: np.ndarray, entries: list[tuple[str, tuple[int, int, int], bool]], right: int):
    line_h, box = 20, 14
    width = max(_text_width(s) for s, _, _ in entries) + box + 26
    x, y = right - width - 6, TOP + 24
    cv2.rectangle(img, (x, y), (x + width, y + line_h * len(entries) + 10), WHITE, -1)
    cv2.rectangle(img, (x, y), (x + width, y + line_h * len(entries) + 10), GREY, 1)
    for i, (s, color, filled) in enumerate(entries):
        cy = y + 16 + i * line_h
        if filled:
            cv2.rectangle(img, (x + 8, cy - box + 3), (x + 8 + box, cy + 3), color, -1)
        else:
            cv2.line(img, (x + 8, cy - 4), (x + 8 + box, cy - 4), color, 3)
        _text(img, s, (x + box + 16, cy + 1))


def check_path(path: Path) -> None:
    """Fail before any scoring when the plot could not be written."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the plot is written as PNG; give a .png file name")
    if not path.parent.is_dir():
        raise UserError(f"--plot {path}: folder {path.parent} does not exist")


def write_png(img: np.ndarray, path: Path) -> None:
    check_path(path)
    if not cv2.imwrite(str(path), img):
        raise UserError(f"--plot {path}: could not write the file")


def score_histogram(
    good: np.ndarray, defects: np.ndarray, markers: list[Marker], title: str, path: Path
) -> None:
    """Write the score histogram with its threshold markers to `path` (PNG)."""
    write_png(histogram_image(good, defects, markers, title=title), path)
