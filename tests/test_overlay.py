"""Heat-map overlay and side-by-side: geometry, colours, clipping, outlines, labels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_agent.decide.overlay import SEPARATOR_BGR, colorize, heatmap_overlay, side_by_side

WHITE = (255, 255, 255)


def jet(value: int) -> np.ndarray:
    """The BGR colour COLORMAP_JET gives to one uint8 value."""
    return cv2.applyColorMap(np.array([[value]], np.uint8), cv2.COLORMAP_JET)[0, 0]


def gray_frame(h: int = 60, w: int = 80, value: int = 128) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def is_white(image: np.ndarray) -> np.ndarray:
    return np.all(image == WHITE, axis=-1)


def test_output_has_the_frame_size_and_leaves_the_input_alone() -> None:
    frame = gray_frame(60, 80)
    before = frame.copy()
    out = heatmap_overlay(frame, np.zeros((15, 20), np.float32), vmin=0.0, vmax=1.0)
    assert out.shape == (60, 80, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(frame, before)


def test_alpha_blends_between_frame_and_heat_map() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    amap = rng.random((30, 40), dtype=np.float32)
    np.testing.assert_array_equal(heatmap_overlay(frame, amap, vmin=0, vmax=1, alpha=0.0), frame)
    heat = colorize(amap, vmin=0, vmax=1)
    np.testing.assert_array_equal(heatmap_overlay(frame, amap, vmin=0, vmax=1, alpha=1.0), heat)
    half = heatmap_overlay(frame, amap, vmin=0, vmax=1, alpha=0.5).astype(int)
    assert np.abs(half - (frame.astype(int) + heat) / 2).max() <= 1


def test_hot_spot_is_red_where_it_is_and_cold_area_is_blue() -> None:
    amap = np.zeros((15, 20), np.float32)
    amap[:5, :5] = 1.0  # top-left quarter-ish of the map -> rows/cols 0..19 of the 60x80 frame
    out = heatmap_overlay(gray_frame(), amap, vmin=0.0, vmax=1.0).astype(int)
    blue, red = 0, 2
    hot, cold = out[10, 10], out[45, 60]
    assert hot[red] > hot[blue] + 40
    assert cold[blue] > cold[red] + 40
    assert hot[red] > cold[red] + 40
    # the spot stays where it was: the mirrored corner is cold
    assert out[10, 70][blue] > out[10, 70][red]


def test_scores_are_clipped_to_vmin_vmax() -> None:
    amap = np.array([[-5.0, 0.0, 1.0, 2.0, 7.0, 12.0]], np.float32)
    heat = colorize(amap, vmin=1.0, vmax=7.0)
    for col in (0, 1, 2):  # at or below vmin: the coldest colour
        np.testing.assert_array_equal(heat[0, col], jet(0))
    for col in (4, 5):  # at or above vmax: the hottest colour
        np.testing.assert_array_equal(heat[0, col], jet(255))
    np.testing.assert_array_equal(heat[0, 3], jet(42))  # (2 - 1) / 6 * 255 = 42.5 -> 42
    # the scale is vmin..vmax, not the map's own range
    np.testing.assert_array_equal(
        colorize(np.array([[5.0]]), vmin=0, vmax=10), colorize(np.array([[0.5]]), vmin=0, vmax=1)
    )


def test_nan_scores_show_as_normal() -> None:
    heat = colorize(np.array([[np.nan, 0.0]]), vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(heat[0, 0], heat[0, 1])


def test_mask_outline_at_frame_size_follows_the_mask_edge() -> None:
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:50] = True
    out = heatmap_overlay(gray_frame(value=0), np.zeros((15, 20)), vmin=0, vmax=1, mask=mask)
    white = is_white(out)
    edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    np.testing.assert_array_equal(white, edge)  # exactly the 1 px border, nothing else
    assert white.sum() == 2 * 20 + 2 * 18


def test_mask_at_map_size_is_scaled_to_the_frame() -> None:
    mask = np.zeros((15, 20), bool)
    mask[5:10, 5:10] = True  # x4 -> rows/cols 20..39 of the frame
    out = heatmap_overlay(gray_frame(value=0), np.zeros((15, 20)), vmin=0, vmax=1, mask=mask)
    rows, cols = np.nonzero(is_white(out))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 39, 20, 39)
    assert not is_white(out)[30, 30]  # outline only, not filled


def test_label_is_drawn_top_left_on_a_dark_box() -> None:
    frame, amap = gray_frame(120, 160), np.zeros((15, 20))
    plain = heatmap_overlay(frame, amap, vmin=0, vmax=1)
    labelled = heatmap_overlay(frame, amap, vmin=0, vmax=1, label="NG 0.93")
    changed = np.any(labelled != plain, axis=-1)
    rows, cols = np.nonzero(changed)
    assert rows.max() < 30 and cols.max() < 100  # confined to the top-left corner
    corner = labelled[: rows.max() + 1, : cols.max() + 1]
    assert np.mean(corner.max(axis=-1) < 40) > 0.5  # mostly dark box ...
    assert np.any(is_white(corner))  # ... with white text on it
    np.testing.assert_array_equal(labelled[40:], plain[40:])


def test_gray_and_bgra_frames_are_accepted() -> None:
    gray = np.tile(np.arange(80, dtype=np.uint8), (60, 1))
    amap = np.random.default_rng(1).random((15, 20)).astype(np.float32)
    expected = heatmap_overlay(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), amap, vmin=0, vmax=1)
    np.testing.assert_array_equal(heatmap_overlay(gray, amap, vmin=0, vmax=1), expected)
    bgra = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA)
    np.testing.assert_array_equal(heatmap_overlay(bgra, amap, vmin=0, vmax=1), expected)
    # a [1, H, W] map, as a model emits it, is the same map
    np.testing.assert_array_equal(heatmap_overlay(gray, amap[None], vmin=0, vmax=1), expected)


def test_bad_arguments_are_rejected() -> None:
    frame, amap = gray_frame(), np.zeros((15, 20))
    with pytest.raises(ValueError, match="vmin < vmax"):
        heatmap_overlay(frame, amap, vmin=1.0, vmax=1.0)
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(frame, amap, vmin=0, vmax=1, alpha=1.5)
    with pytest.raises(ValueError, match="mask"):
        heatmap_overlay(frame, amap, vmin=0, vmax=1, mask=np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="2-D"):
        heatmap_overlay(frame, np.zeros((2, 15, 20)), vmin=0, vmax=1)


def test_side_by_side_scales_to_the_tallest_and_separates() -> None:
    left = np.full((40, 60, 3), 10, np.uint8)
    right = np.full((20, 10), 200, np.uint8)  # gray, half the height
    out = side_by_side(left, right)
    assert out.shape == (40, 60 + 4 + 20, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :60], left)
    assert np.all(out[:, 60:64] == SEPARATOR_BGR)
    assert np.all(out[:, 64:] == 200)


def test_side_by_side_with_explicit_height_and_a_single_image() -> None:
    a, b = gray_frame(40, 60), gray_frame(20, 10)
    assert side_by_side(a, b, height=10).shape == (10, 15 + 4 + 5, 3)
    np.testing.assert_array_equal(side_by_side(a), a)
    with pytest.raises(ValueError):
        side_by_side()
    with pytest.raises(ValueError, match="height"):
        side_by_side(a, height=0)
