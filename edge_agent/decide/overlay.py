"""What the operator sees: the anomaly map as a JET heat map over the frame, plus a side-by-side.

The colour scale is fixed by the caller (vmin..vmax, typically from calibration) rather than
stretched per frame, so the same colour means the same score on every frame: a good part stays
blue instead of having its noise blown up to red.
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_agent.images import resize, to_bgr

__all__ = ["colorize", "heatmap_overlay", "side_by_side"]

CONTOUR_BGR = (255, 255, 255)
LABEL_TEXT_BGR = (255, 255, 255)
LABEL_BOX_BGR = (0, 0, 0)
SEPARATOR_BGR = (128, 128, 128)
SEPARATOR_PX = 4
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def heatmap_overlay(
    image_bgr: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
    label: str | None = None,
) -> np.ndarray:
    """The frame with the anomaly map blended over it, as uint8 BGR of the frame's size.

    `anomaly_map` (any size, bilinearly resized to the frame) is clipped to vmin..vmax and
    colour-mapped with JET (blue = vmin, red = vmax), then blended with weight `alpha`. `mask`
    (bool, the map's or the frame's size) is outlined in white; `label` is written top-left on a
    dark box. `image_bgr` may be gray, BGR or BGRA; it is not modified.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = to_bgr(image_bgr)
    height, width = base.shape[:2]
    amap = _as_map(anomaly_map)
    resized = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = colorize(resized, vmin=vmin, vmax=vmax)
    out = cv2.addWeighted(heat, alpha, base, 1.0 - alpha, 0.0)
    if mask is not None:
        _draw_outline(out, _mask_at(mask, amap.shape, (height, width)))
    if label:
        _draw_label(out, label)
    return out


def colorize(anomaly_map: np.ndarray, *, vmin: float, vmax: float) -> np.ndarray:
    """A 2-D map -> uint8 BGR JET image of the same size, scores clipped to vmin..vmax."""
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmax > vmin):
        raise ValueError(f"need finite vmin < vmax, got vmin={vmin}, vmax={vmax}")
    amap = _as_map(anomaly_map)
    # NaN would turn into an arbitrary colour; showing it as "normal" hides nothing real.
    amap = np.nan_to_num(amap, nan=vmin, posinf=vmax, neginf=vmin)
    scaled = np.clip((amap - vmin) * (255.0 / (vmax - vmin)), 0.0, 255.0)
    return cv2.applyColorMap(np.rint(scaled).astype(np.uint8), cv2.COLORMAP_JET)


def side_by_side(*images_bgr: np.ndarray, height: int | None = None) -> np.ndarray:
    """Images scaled to one height (default: the tallest) and joined left to right.

    A 4 px gray bar separates neighbours; gray or BGRA inputs are converted to BGR.
    """
    if not images_bgr:
        raise ValueError("side_by_side needs at least one image")
    frames = [to_bgr(image) for image in images_bgr]
    target = max(f.shape[0] for f in frames) if height is None else height
    if target < 1:
        raise ValueError(f"height must be positive, got {target}")
    bar = np.empty((target, SEPARATOR_PX, 3), dtype=np.uint8)
    bar[:] = SEPARATOR_BGR
    parts: list[np.ndarray] = []
    for frame in frames:
        if parts:
            parts.append(bar)
        h, w = frame.shape[:2]
        parts.append(resize(frame, (target, max(1, round(w * target / h)))))
    return np.hstack(parts)


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    """A 2-D float32 map; leading singleton axes ([1,H,W], [1,1,H,W]) are dropped."""
    amap = np.asarray(anomaly_map)
    while amap.ndim > 2 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"anomaly map must be 2-D, got shape {np.shape(anomaly_map)}")
    if not (np.issubdtype(amap.dtype, np.floating) or np.issubdtype(amap.dtype, np.integer)):
        raise ValueError(f"anomaly map must be numeric, got dtype {amap.dtype}")
    return np.ascontiguousarray(amap, dtype=np.float32)


def _mask_at(mask: np.ndarray, map_shape: tuple[int, ...], size: tuple[int, int]) -> np.ndarray:
    """The mask as uint8 0/1 at the frame's size; it may be given at the map's size."""
    m = np.asarray(mask)
    if m.shape != size and m.shape != map_shape:
        raise ValueError(f"mask {m.shape} matches neither the image {size} nor the map {map_shape}")
    m = (m != 0).astype(np.float32)
    if m.shape != size:
        # Linear + threshold rather than nearest: a low-resolution mask gets a smooth outline.
        m = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return (m >= 0.5).astype(np.uint8)


def _draw_outline(out: np.ndarray, mask: np.ndarray) -> None:
    """Outline every region of `mask` (and its holes) on `out`, thicker on large frames."""
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    thickness = 1 if min(out.shape[:2]) < 512 else 2
    cv2.drawContours(out, contours, -1, CONTOUR_BGR, thickness, lineType=cv2.LINE_8)


def _draw_label(out: np.ndarray, text: str) -> None:
    """White text on a black box in the top-left corner, scaled with the frame."""
    height, width = out.shape[:2]
    scale = max(0.35, min(height, width) / 600.0)
    thickness = max(1, round(scale * 1.5))
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, round(4 * scale))
    box_w = min(width, text_w + 2 * pad)
    box_h = min(height, text_h + baseline + 2 * pad)
    out[:box_h, :box_w] = LABEL_BOX_BGR
    cv2.putText(
        out, text, (pad, pad + text_h), _FONT, scale, LABEL_TEXT_BGR, thickness, cv2.LINE_AA
    )
