"""Image reading and the host-side preprocessing: to 3-channel uint8 BGR, straight resize.

Everything else (float conversion, RGB, mean/std, NCHW) happens inside the ONNX graph, so the
host only resizes and stacks uint8 frames.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class BadImage(ValueError):
    """A frame or file that cannot be used as an image (empty, corrupt, wrong shape)."""


def list_images(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Sorted image files in `folder`; a UserError if it is missing or holds none."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserError(
            f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """Any decoded frame (gray, BGR, BGRA, 16-bit) -> uint8 HxWx3 BGR; BadImage if unusable."""
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise BadImage("empty frame")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (3, 4)):
        raise BadImage(f"unsupported frame shape {frame.shape}")
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        raise BadImage(f"frame too small: {frame.shape[1]}x{frame.shape[0]}")
    if frame.dtype != np.uint8:
        if frame.dtype == np.uint16:
            frame = (frame >> 8).astype(np.uint8)
        elif np.issubdtype(frame.dtype, np.floating):
            frame = np.clip(frame * 255.0, 0, 255).astype(np.uint8)
        else:
            raise BadImage(f"unsupported pixel type {frame.dtype}")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return frame


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 BGR; BadImage if they are not a decodable image."""
    buf = np.frombuffer(data, dtype=np.uint8)
    frame = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if frame is None:
        raise BadImage("not a decodable image")
    return to_bgr(frame)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as uint8 BGR; BadImage (with the path) if missing or corrupt."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return decode_image(data)
    except BadImage as exc:
        raise BadImage(f"{path}: {exc}") from None


def resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Straight resize to (height, width), no crop: area filter when shrinking (anti-aliased)."""
    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    shrinking = frame.shape[0] * frame.shape[1] > h * w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(frame, (w, h), interpolation=interp)
