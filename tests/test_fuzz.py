"""Fuzzing, bounded to a few seconds: the image decoder on random and mutated bytes, and the
trigger payload parser on anything a broker can deliver.

decode_image must return a uint8 HxWx3 image or raise BadImage, nothing else, and never spend
more memory than the pixel limit allows (measured with tracemalloc, which sees the arrays
OpenCV decodes into: they are numpy allocations). parse_part_id must return None or a short,
printable str.
"""

from __future__ import annotations

import json
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.images import BYTES_PER_PIXEL_MAX, BadImage, decode_image
from edge_agent.publish.contract import MAX_PART_ID, MAX_TRIGGER_BYTES, parse_part_id
from tests.test_hostile_frames import encoded, png_header_lie, tiff

# A few seconds in all; no example database left behind in the shared tree.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MAX_PIXELS = 64 * 64  # the seeds are 48x64 = 3072 pixels: mutations can cross the limit


def _seeds() -> list[bytes]:
    seeds = [
        encoded(".png", (48, 64, 3)),
        encoded(".png", (48, 64), seed=1),
        encoded(".jpg", (48, 64, 3)),
        encoded(".jpg", (48, 64, 3), params=(cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
        encoded(".bmp", (48, 64, 3)),
        encoded(".tiff", (48, 64, 4)),
        encoded(".webp", (48, 64, 3)),
        encoded(".webp", (48, 64, 3), params=(cv2.IMWRITE_WEBP_QUALITY, 70)),
        tiff(64, 48, order=">", big=True),
        png_header_lie(64, 48),
    ]
    ok, png16 = cv2.imencode(".png", np.full((48, 64, 4), 40000, np.uint16))
    assert ok
    return [*seeds, png16.tobytes()]


SEEDS = _seeds()


def _size_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, bytes, byte order) of the width and height fields of a seed, found here
    without the parser under test, so that a strategy can lie about the size."""
    if data.startswith(b"\x89PNG"):
        return [(16, 4, "big"), (20, 4, "big")]
    if data.startswith(b"\xff\xd8"):
        sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))  # OpenCV: no EXIF
        return [(sof + 5, 2, "big"), (sof + 7, 2, "big")]
    if data.startswith(b"BM"):
        return [(18, 4, "little"), (22, 4, "little")]
    if data[12:16] == b"VP8L":
        return [(21, 2, "little"), (22, 2, "little")]  # 14-bit fields across these bytes
    return []


SIZED = [(seed, _size_fields(seed)) for seed in SEEDS if _size_fields(seed)]


@st.composite
def header_lies(draw: st.DrawFn) -> bytes:
    """A real image whose width and/or height field says something else: 0, 1, a little
    more, the most the field holds, or anything; PNG's IHDR checksum made right again."""
    seed, fields = draw(st.sampled_from(SIZED))
    data = bytearray(seed)
    for at, n, order in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
        top = 256**n - 1
        value = draw(st.sampled_from([0, 1, 65, 4097, 60000, top]) | st.integers(0, top))
        data[at : at + n] = value.to_bytes(n, order)
    if data.startswith(b"\x89PNG"):
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


HEADER = 256  # sizes, lengths and tables live here (a JPEG's SOF follows its DQT tables)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real image with some of: bytes or 16/32-bit fields overwritten (mostly in the header,
    where sizes and lengths live), a cut, bytes inserted or deleted; a PNG's IHDR checksum
    then made right again, as a hostile tester's tool does (else libpng stops at the CRC)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        hot = draw(st.booleans())
        at = draw(st.integers(0, min(len(data), HEADER if hot else len(data)) - 1))
        width = draw(st.sampled_from([1, 1, 2, 4]))
        value = draw(st.sampled_from([0, 0xFF, 0xFFFF, 0xFFFFFFFF, 60000])) if width > 1 else 0
        value = value or draw(st.integers(0, 256**width - 1))
        field = (value % 256**width).to_bytes(width, draw(st.sampled_from(["big", "little"])))
        data[at : at + width] = field[: len(data) - at]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        del data[at : at + draw(st.integers(1, 32))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33 and draw(st.booleans()):
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _check_decode(data: bytes) -> None:
    tracemalloc.start()  # only around the decode: tracing slows everything it sees
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS)
    except BadImage as exc:
        assert str(exc) and "\n" not in str(exc)
        image = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if image is not None:
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] * image.shape[1] <= MAX_PIXELS
    # The widest pixel accepted, a few working copies (decode, shift, convert), the input.
    budget = 4 * MAX_PIXELS * BYTES_PER_PIXEL_MAX + 2 * len(data) + 256 * 1024
    assert peak <= budget, f"{peak} bytes for {len(data)} input bytes"


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_random_bytes(data: bytes) -> None:
    _check_decode(data)


@pytest.mark.parametrize("magic", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"BM", b"II*\x00", b"RIFF"])
def test_decode_a_bare_magic_number(magic: bytes) -> None:
    _check_decode(magic)


@FUZZ
@given(mutated())
def test_decode_mutated_images(data: bytes) -> None:
    _check_decode(data)


@FUZZ
@given(header_lies())
def test_decode_images_that_lie_about_their_size(data: bytes) -> None:
    _check_decode(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 4096))
def test_decode_truncated_images(data: bytes, n: int) -> None:
    _check_decode(data[:n])


# -- the trigger payload ----------------------------------------------------------------------


def _check_part_id(payload: bytes) -> None:
    part = parse_part_id(payload)
    if part is None:
        return
    assert isinstance(part, str) and 1 <= len(part) <= MAX_PART_ID
    assert part.isprintable() and part == part.strip()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@FUZZ
@given(st.binary(max_size=MAX_TRIGGER_BYTES + 64))
def test_part_id_from_random_bytes(payload: bytes) -> None:
    _check_part_id(payload)


@FUZZ
@given(st.text(max_size=400))
def test_part_id_from_random_text(text: str) -> None:
    _check_part_id(text.encode("utf-8", "surrogatepass"))


@settings(FUZZ, max_examples=100)
@given(json_values, st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_part_id_from_json(value, others: dict) -> None:
    _check_part_id(json.dumps({**others, "part_id": value}).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b"P-1\x00",  # NUL
        b"P-1\nP-2",  # a forged second log line
        b"P-\x1b[31m1",  # ANSI escape
        "P-\u202e1".encode(),  # bidi override: shows reversed
        "P-\u200b1".encode(),  # zero width space
        b'{"part_id": "P-1\\u0000"}',
        b'{"part_id": "P\\n1"}',
        b'{"part_id": true}',
        b'{"part_id": 1.5}',
        b'{"part_id": NaN}',
        b'{"part_id": ' + b"[" * 3000 + b"]" * 3000 + b"}",  # RecursionError in json
        b"[" * 4000,
        b"P" * (MAX_PART_ID + 1),
        b'{"part_id": "x", "pad": "' + b"y" * MAX_TRIGGER_BYTES + b'"}',
    ],
    ids=lambda p: repr(p[:24]),
)
def test_unusable_part_ids_are_rejected(payload: bytes) -> None:
    assert parse_part_id(payload) is None


@pytest.mark.parametrize(
    ("payload", "part"),
    [
        (b" P-000815\r\n", "P-000815"),  # a trailing line break from a PLC is trimmed
        (b'{"part_id": "Teil \xc3\x84-7"}', "Teil \u00c4-7"),  # printable non-ASCII
        (b'{"part_id": 42}', "42"),
        (b"P" * MAX_PART_ID, "P" * MAX_PART_ID),
    ],
)
def test_usable_part_ids_are_kept(payload: bytes, part: str) -> None:
    assert parse_part_id(payload) == part
