"""Image reading and the host-side preprocessing: to 3-channel uint8 BGR, straight resize.

Everything else (float conversion, RGB, mean/std, NCHW) happens inside the ONNX graph, so the
host only resizes and stacks uint8 frames.

Hostile files: a frame guard reads the size an image's header declares and refuses one above
a pixel limit BEFORE anything is decoded, so a 1 MB PNG that inflates to 20000x20000 costs
microseconds, not gigabytes. OpenCV has a limit of its own (OPENCV_IO_MAX_IMAGE_PIXELS,
default 2^30 pixels), but it is read once when the OpenCV library loads (setting it after
``import cv2`` has no effect: measured with opencv-python 5.0), it cannot differ per camera and
its error is an assertion text; it stays as the last line of defence. Only the formats whose
header the guard reads are decoded at all (PNG, JPEG, BMP, TIFF, WebP): bytes in any other
format OpenCV might know are refused, not decoded unguarded. Every failure is a BadImage with
the reason, never a cv2.error.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

DEFAULT_MAX_PIXELS = 50_000_000
"""The frame guard's default: 50 megapixels, three times a 4096x4096 line-scan frame (16.7 MP)
and above most machine-vision area-scan sensors (typically 5 to 45 MP), while the largest
frame it lets through decodes to at most 400 MB (16-bit RGBA, 8 bytes a pixel). Cameras
beyond it set ``max_megapixels`` in their config."""

BYTES_PER_PIXEL_MAX = 8
"""16-bit RGBA, the widest pixel the agent accepts: a file larger than the limit's pixels at
this many bytes each (plus headers) cannot be an image within the limit, so it is not read."""

FORMATS = "PNG, JPEG, BMP, TIFF, WebP"


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


# -- the frame guard: the size a header declares ---------------------------------------------


def declared_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as the header of encoded `data` declares them, read the way the
    decoder OpenCV uses reads them (the first image of a TIFF, a WebP's canvas, a JPEG's
    frame header and not an EXIF thumbnail's). BadImage for an unknown format or a header
    that is truncated or invalid."""
    if not data:
        raise BadImage("empty file")
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    head = bytes(data[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ("PNG", *_png_size(data))
    if head.startswith(b"\xff\xd8"):
        return ("JPEG", *_jpeg_size(data))
    if head.startswith(b"BM"):
        return ("BMP", *_bmp_size(data))
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return ("TIFF", *_tiff_size(data))
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return ("WebP", *_webp_size(data))
    raise BadImage(f"not a decodable image (not {FORMATS})")


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    if offset < 0 or offset + struct.calcsize(fmt) > len(data):
        raise BadImage(f"not a decodable image (truncated {what} header)")
    return struct.unpack_from(fmt, data, offset)


def _png_size(data: bytes) -> tuple[int, int]:
    # IHDR must be the first chunk (PNG spec 5.6); libpng refuses a file where it is not.
    length, kind, width, height = _unpack(">I4sII", data, 8, "PNG")
    if kind != b"IHDR" or length != 13:
        raise BadImage("not a decodable image (PNG without IHDR)")
    return width, height


# SOF0-3, 5-7, 9-11, 13-15: every frame header; C4 (DHT), C8 (JPG), CC (DAC) are not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Real files have a few dozen segments before the frame header (an ICC profile at most 255
# chunks); the bound keeps a file of a million empty segments from costing seconds here.
MAX_JPEG_SEGMENTS = 4096


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Marker by marker like libjpeg's read_markers: bytes that are not a marker are skipped
    # (libjpeg only warns), each segment is stepped over by its length, so an SOF inside an
    # EXIF thumbnail (APP1) is never taken for the frame's.
    i, n = 2, len(data)
    for _ in range(MAX_JPEG_SEGMENTS):
        i = data.find(b"\xff", i)
        while 0 <= i < n and data[i] == 0xFF:
            i += 1
        if i < 0 or i >= n:
            raise BadImage("not a decodable image (JPEG without a frame header)")
        marker = data[i]
        i += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # stuffed byte, TEM, RSTn, SOI: no length follows
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            raise BadImage("not a decodable image (JPEG without a frame header)")
        (length,) = _unpack(">H", data, i, "JPEG")
        if length < 2:
            raise BadImage("not a decodable image (invalid JPEG segment)")
        if marker in _JPEG_SOF:
            _precision, height, width = _unpack(">BHH", data, i + 2, "JPEG")
            return width, height
        i += length
    raise BadImage("not a decodable image (JPEG with too many segments before its frame header)")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header,) = _unpack("<I", data, 14, "BMP")
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = _unpack("<HH", data, 18, "BMP")
        return width, height
    if header < 40:
        raise BadImage("not a decodable image (invalid BMP header)")
    width, height = _unpack("<ii", data, 18, "BMP")
    if width < 0:
        raise BadImage("not a decodable image (negative BMP width)")
    return width, abs(height)  # a negative height is a top-down bitmap


def _tiff_size(data: bytes) -> tuple[int, int]:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:  # BigTIFF: 64-bit offsets and counts, 20-byte entries
        offset_size, zero, ifd = _unpack(order + "HHQ", data, 4, "TIFF")
        if offset_size != 8 or zero != 0:
            raise BadImage("not a decodable image (invalid BigTIFF header)")
        (count,) = _unpack(order + "Q", data, ifd, "TIFF")
        first, entry, count_fmt = ifd + 8, 20, "Q"
    else:
        (ifd,) = _unpack(order + "I", data, 4, "TIFF")
        (count,) = _unpack(order + "H", data, ifd, "TIFF")
        first, entry, count_fmt = ifd + 2, 12, "I"
    if first + count * entry > len(data):
        raise BadImage("not a decodable image (truncated TIFF header)")
    size: dict[int, int] = {}
    for k in range(count):
        at = first + k * entry
        tag, kind, n = _unpack(order + "HH" + count_fmt, data, at, "TIFF")
        value_at = at + 4 + struct.calcsize(count_fmt)
        if tag in (256, 257) and n >= 1:
            # SHORT, LONG or (BigTIFF only: it fills the 8-byte value field) LONG8,
            # left-justified in the value field.
            fmt = {3: "H", 4: "I", 16: "Q" if big else None}.get(kind)
            if fmt is None:
                raise BadImage("not a decodable image (invalid TIFF image size)")
            size[tag] = _unpack(order + fmt, data, value_at, "TIFF")[0]
    if 256 not in size or 257 not in size:
        raise BadImage("not a decodable image (TIFF without an image size)")
    return size[256], size[257]


def _webp_size(data: bytes) -> tuple[int, int]:
    (chunk,) = _unpack("4s", data, 12, "WebP")
    if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        start, width, height = _unpack("<3sHH", data, 23, "WebP")
        if start != b"\x9d\x01\x2a":
            raise BadImage("not a decodable image (invalid WebP VP8 header)")
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature, then 14-bit sizes minus one
        signature, bits = _unpack("<BI", data, 20, "WebP")
        if signature != 0x2F:
            raise BadImage("not a decodable image (invalid WebP VP8L header)")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24-bit sizes minus one
        w0, w1, w2, h0, h1, h2 = _unpack("<6B", data, 24, "WebP")
        return (w0 | w1 << 8 | w2 << 16) + 1, (h0 | h1 << 8 | h2 << 16) + 1
    raise BadImage("not a decodable image (invalid WebP header)")


def check_pixels(width: int, height: int, max_pixels: int, what: str = "declared") -> None:
    """BadImage when a `width` x `height` frame is above the limit or empty."""
    if width <= 0 or height <= 0:
        raise BadImage(f"{what} size {width}x{height} is empty")
    if width * height > max_pixels:
        raise BadImage(
            f"{what} {width}x{height} pixels ({width * height / 1e6:.1f} MP) exceeds the "
            f"limit of {max_pixels / 1e6:g} MP"
        )


def max_file_bytes(max_pixels: int) -> int:
    """The largest file `read_image` reads for `max_pixels`: see BYTES_PER_PIXEL_MAX."""
    return max_pixels * BYTES_PER_PIXEL_MAX + (1 << 20)


# -- decoding ---------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 BGR; BadImage if they are not a decodable image or declare more
    than `max_pixels` pixels (checked before decoding)."""
    kind, width, height = declared_size(data)
    check_pixels(width, height, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        frame = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise BadImage(f"not a decodable image ({kind}: {cv_reason(exc)})") from None
    except MemoryError:
        raise BadImage(f"not decodable: out of memory for {width}x{height} pixels") from None
    if frame is None:
        raise BadImage(f"not a decodable image (corrupt or truncated {kind})")
    # The header was read by us and the pixels by OpenCV: should they ever disagree, the
    # decoded frame is held to the limit too.
    check_pixels(frame.shape[1], frame.shape[0], max_pixels, "decoded")
    return to_bgr(frame)


def cv_reason(exc: cv2.error) -> str:
    """A cv2.error's message without OpenCV's version and source path."""
    # "OpenCV(5.0.0) /path/file.cpp:79: error: (-215:Assertion failed) x in function 'f'"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(" error: ", 1)[-1][:200]


def read_image_bytes(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The bytes of an image file; BadImage (without the path) if unreadable or larger than
    `max_bytes` (then not read: a huge file must not fill the memory before any check)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise BadImage(f"file larger than {max_bytes / 1e6:g} MB: not an image within the limit")
    return data


def read_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as uint8 BGR; BadImage (with the path) if missing or corrupt."""
    try:
        data = read_image_bytes(path, max_bytes=max_file_bytes(max_pixels))
        return decode_image(data, max_pixels=max_pixels)
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
