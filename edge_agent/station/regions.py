"""Where an inspection looks: its ROI in the frame, and the pixels it ignores.

A ROI is ``(x, y, w, h)`` in frame pixels; None is the whole frame. An ignore mask is a boolean
image (True = ignored) of the ROI's size; a frame-sized mask is cropped to the ROI once, at
start. The model sees the ROI resized to its input, split into an ``h x w`` grid of patches; a
patch is ignored when its receptive centre lies on an ignored pixel (keep_cells).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import UserError

Roi = tuple[int, int, int, int]
IGNORE_FILL = (104, 116, 124)
"""BGR of ignored pixels before a bundle fitted with an ignore mask sees them (at fit and at
run time alike): ImageNet's mean colour, the value the graph's normalisation maps to zero, so
what varies there (a date code, a defect) cannot reach the neighbouring patches either."""


def roi_problem(roi: Roi, frame_hw: tuple[int, int]) -> str | None:
    """Why ``roi`` cannot be cut from a frame of ``frame_hw`` (height, width); None if it can."""
    x, y, w, h = roi
    height, width = frame_hw
    if w <= 0 or h <= 0:
        return f"roi {list(roi)} has no area"
    if x < 0 or y < 0 or x + w > width or y + h > height:
        return f"roi {list(roi)} lies outside the {width}x{height} frame"
    return None


def crop(frame: np.ndarray, roi: Roi | None) -> np.ndarray:
    """The ROI's pixels (a view, no copy); the frame itself for None. ValueError with the
    reason when the ROI does not fit the frame (the inspection's verdict is then ERROR)."""
    if roi is None:
        return frame
    problem = roi_problem(roi, frame.shape[:2])
    if problem is not None:
        raise ValueError(problem)
    x, y, w, h = roi
    return frame[y : y + h, x : x + w]


def load_ignore_mask(path: Path, roi: Roi | None, key: str) -> np.ndarray:
    """An ignore mask file -> bool [h, w] at the ROI's size (True = ignored: white, any value
    above 127). The file must be one channel (8 or 16 bit) and either ROI- or frame-sized; a
    frame-sized mask of a ROI inspection is cropped to it. UserError naming ``key`` otherwise;
    the frame's size is not known before the first frame, so a mask for a whole-frame
    inspection is checked against each frame by ``ignore_for_frame``."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise UserError(f"{key}: {path} is not a readable image")
    if data.ndim != 2:
        raise UserError(f"{key}: {path} has {data.shape[2]} channels; a mask has one")
    limit = 127 if data.dtype == np.uint8 else 32767
    ignored = data > limit
    if roi is None:
        return ignored
    x, y, w, h = roi
    if ignored.shape == (h, w):
        return ignored
    if ignored.shape[0] >= y + h and ignored.shape[1] >= x + w:
        return ignored[y : y + h, x : x + w].copy()
    raise UserError(
        f"{key}: {path} is {ignored.shape[1]}x{ignored.shape[0]}; it must be the ROI's size "
        f"({w}x{h}) or a frame that contains the ROI"
    )


def ignore_for_frame(mask: np.ndarray | None, region_hw: tuple[int, int]) -> np.ndarray | None:
    """The mask for a region of ``region_hw``; ValueError (the verdict's reason) when a mask of
    another size was configured."""
    if mask is None or mask.shape == region_hw:
        return mask
    raise ValueError(
        f"the ignore mask is {mask.shape[1]}x{mask.shape[0]}, the inspected region "
        f"{region_hw[1]}x{region_hw[0]}"
    )


def keep_cells(ignored: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """bool [h, w]: the patches of an ``h x w`` grid laid over ``ignored`` (bool [H, W]) whose
    receptive centre is not ignored. Cell (r, c)'s centre is the pixel
    (floor((r + 1/2) H / h), floor((c + 1/2) W / w))."""
    big_h, big_w = ignored.shape
    h, w = grid
    rows = np.minimum(((np.arange(h) + 0.5) * big_h / h).astype(np.int64), big_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * big_w / w).astype(np.int64), big_w - 1)
    return ~ignored[np.ix_(rows, cols)]


def blank(region: np.ndarray, ignored: np.ndarray | None) -> np.ndarray:
    """``region`` (BGR) with its ignored pixels set to IGNORE_FILL: a copy where anything is
    ignored, the region itself where nothing is. ValueError when the mask is another size."""
    if ignored is None or not ignored.any():
        return region
    ignore_for_frame(ignored, region.shape[:2])
    out = region.copy()
    out[ignored] = IGNORE_FILL
    return out
