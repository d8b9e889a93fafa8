"""The GPU path's I/O binding (ONNX output handed to FAISS by pointer, one feature row per
image read back for Eq. 7), run on host memory: the same ORT and FAISS calls as on a GPU, so
its plumbing is tested here, and its scores must equal the host path's exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.images import list_images, read_image
from edge_agent.model import devicemem
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer


@pytest.fixture(scope="module")
def frames(small_bundle: Path, mtd_small: Path) -> np.ndarray:
    scorer = Scorer(load_bundle(small_bundle), device="cpu", index="flat")
    paths = list_images(mtd_small / "test", recursive=True)[:6]
    return np.stack([scorer.prepare(read_image(p)) for p in paths])


def test_bound_scores_equal_host_scores(small_bundle: Path, frames: np.ndarray) -> None:
    bundle = load_bundle(small_bundle)
    host = Scorer(bundle, device="cpu", index="flat")
    bound = Scorer(bundle, device="cpu", index="flat", bind_io=True)
    assert bound.reweight  # Eq. 7 reads its rows through devicemem.read_rows
    assert not host.bind_io and "io-binding" in bound.device
    a, b = host.score(frames), bound.score(frames)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.patch_scores, b.patch_scores)
    assert not np.array_equal(b.image_scores, b.patch_scores.reshape(len(frames), -1).max(1))


def test_io_binding_is_off_on_a_cpu_by_default_and_refused_for_rechecks(
    small_bundle: Path,
) -> None:
    bundle = load_bundle(small_bundle)
    assert not Scorer(bundle, device="cpu").bind_io  # auto: only with ORT and FAISS on a GPU
    with pytest.raises(ValueError, match="I/O binding"):
        Scorer(bundle, device="cpu", index="ivf-exact", bind_io=True)


def test_read_rows_reads_the_rows_asked_for() -> None:
    buf = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    rows = np.array([4, 0, 2])
    np.testing.assert_array_equal(devicemem.read_rows(buf.ctypes.data, "cpu", rows, 3), buf[rows])


def test_search_pointer_equals_search(small_bundle: Path) -> None:
    from edge_agent.model.knn import MemoryBankIndex

    bank = load_bundle(small_bundle).bank
    index = MemoryBankIndex(bank, kind="flat", device="cpu")
    queries = np.ascontiguousarray(bank[::50] + 0.25, dtype=np.float32)
    d1, i1 = index.search(queries, 3)
    d2, i2 = index.search_pointer(queries.ctypes.data, len(queries), 3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)
