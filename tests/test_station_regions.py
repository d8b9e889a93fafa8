"""ROIs and ignore masks: cutting, loading, and which patches an ignore mask drops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.errors import UserError
from edge_agent.station.regions import (
    crop,
    ignore_for_frame,
    keep_cells,
    load_ignore_mask,
    roi_problem,
)


def test_crop_is_the_roi_and_refuses_what_does_not_fit() -> None:
    frame = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    out = crop(frame, (10, 5, 20, 30))
    assert out.shape == (30, 20, 3)
    assert np.shares_memory(out, frame), "a view: no copy per frame"
    assert np.array_equal(out, frame[5:35, 10:30])
    assert crop(frame, None) is frame
    assert crop(frame, (0, 0, 60, 40)).shape == frame.shape
    for roi, words in [
        ((50, 0, 20, 10), "outside the 60x40 frame"),
        ((0, 35, 10, 10), "outside"),
        ((-1, 0, 5, 5), "outside"),
        ((0, 0, 0, 5), "no area"),
        ((0, 0, 5, -2), "no area"),
    ]:
        with pytest.raises(ValueError, match=words):
            crop(frame, roi)
        assert roi_problem(roi, (40, 60)) is not None


def _brute_keep(ignored: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    big_h, big_w = ignored.shape
    h, w = grid
    keep = np.ones(grid, dtype=bool)
    for r in range(h):
        for c in range(w):
            y = int((r + 0.5) * big_h / h)
            x = int((c + 0.5) * big_w / w)
            keep[r, c] = not ignored[min(y, big_h - 1), min(x, big_w - 1)]
    return keep


def test_keep_cells_against_a_brute_force() -> None:
    rng = np.random.default_rng(0)
    for big, grid in [((224, 224), (28, 28)), ((97, 311), (36, 36)), ((300, 200), (18, 12))]:
        ignored = rng.random(big) < 0.3
        assert np.array_equal(keep_cells(ignored, grid), _brute_keep(ignored, grid))
    ignored = np.zeros((224, 224), dtype=bool)
    ignored[:, :112] = True  # the left half ignored: exactly the left half of the cells
    keep = keep_cells(ignored, (28, 28))
    assert not keep[:, :14].any() and keep[:, 14:].all()


def test_ignore_mask_files(tmp_path: Path) -> None:
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:20, 30:50] = 255
    frame_sized = tmp_path / "frame.png"
    cv2.imwrite(str(frame_sized), mask)
    # Frame-sized for a ROI: cropped to it.
    out = load_ignore_mask(frame_sized, (30, 10, 20, 10), "m")
    assert out.shape == (10, 20) and out.all()
    out = load_ignore_mask(frame_sized, (0, 0, 30, 40), "m")
    assert out.shape == (40, 30) and not out.any()
    # ROI-sized.
    roi_sized = tmp_path / "roi.png"
    cv2.imwrite(str(roi_sized), mask[10:30, 20:40])
    out = load_ignore_mask(roi_sized, (5, 5, 20, 20), "m")
    assert np.array_equal(out, mask[10:30, 20:40] > 127)
    # Whole-frame inspection: as it is; checked against each region later.
    whole = load_ignore_mask(frame_sized, None, "m")
    assert whole.shape == (40, 60)
    assert ignore_for_frame(whole, (40, 60)) is whole
    with pytest.raises(ValueError, match="60x40, the inspected region 61x40"):
        ignore_for_frame(whole, (40, 61))
    assert ignore_for_frame(None, (1, 1)) is None
    # 16 bit: white is white.
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), mask.astype(np.uint16) * 257)
    assert np.array_equal(load_ignore_mask(deep, None, "m"), mask > 127)


def test_bad_ignore_masks_are_one_line_user_errors(tmp_path: Path) -> None:
    color = tmp_path / "color.png"
    cv2.imwrite(str(color), np.zeros((10, 10, 3), dtype=np.uint8))
    text = tmp_path / "text.png"
    text.write_text("not an image")
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((5, 5), dtype=np.uint8))
    for path, roi, words in [
        (color, None, "has 3 channels; a mask has one"),
        (text, None, "is not a readable image"),
        (tmp_path / "missing.png", None, "is not a readable image"),
        (small, (0, 0, 8, 8), "must be the ROI's size \\(8x8\\) or a frame that contains"),
    ]:
        with pytest.raises(UserError, match=words) as info:
            load_ignore_mask(path, roi, "recipes.a.inspections[0].ignore")
        assert str(info.value).startswith("recipes.a.inspections[0].ignore: ")
        assert "\n" not in str(info.value)
