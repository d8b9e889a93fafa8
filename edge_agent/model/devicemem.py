"""Reading a few rows of an ONNX Runtime output where it lives (host or CUDA memory), so that
the GPU path hands whole feature maps to FAISS by pointer and copies back only what Eq. 7
needs: one feature row per image.

No torch or CuPy at run time: CUDA memory is read with the CUDA runtime's own cudaMemcpy,
through ctypes, from the libcudart that onnxruntime-gpu has already loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CUDA_MEMCPY_DEVICE_TO_HOST = 2  # cudaMemcpyKind
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


@functools.lru_cache(maxsize=1)
def cudart() -> Any | None:
    """The CUDA runtime library, or None where there is none (a CPU-only install)."""
    names = [*CUDART_NAMES, ctypes.util.find_library("cudart")]
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpy.restype = ctypes.c_int
        return lib
    return None


def read_rows(ptr: int, device: str, rows: np.ndarray, dim: int) -> np.ndarray:
    """float32 rows `rows` of a row-major [N, dim] float32 buffer at `ptr` -> [len(rows), dim].

    `device` is where the buffer lives, as OrtValue.device_name() says ("cpu" or "cuda").
    """
    out = np.empty((len(rows), dim), dtype=np.float32)
    row_bytes = dim * 4
    if device == "cpu":
        for j, r in enumerate(rows):
            ctypes.memmove(out.ctypes.data + j * row_bytes, ptr + int(r) * row_bytes, row_bytes)
        return out
    lib = cudart()
    if lib is None:
        raise RuntimeError("features are on the GPU but no CUDA runtime (libcudart) was found")
    for j, r in enumerate(rows):
        code = lib.cudaMemcpy(
            out.ctypes.data + j * row_bytes,
            ptr + int(r) * row_bytes,
            row_bytes,
            CUDA_MEMCPY_DEVICE_TO_HOST,
        )
        if code != 0:
            raise RuntimeError(f"cudaMemcpy from the ONNX output failed (CUDA error {code})")
    return out
