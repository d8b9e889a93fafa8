"""Scoring: kNN distances, Eq. 7 reweighting, mask smoothing, regions, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from edge_agent.model import scoring
from edge_agent.model.knn import MemoryBankIndex


def test_flat_knn_equals_brute_force_numpy() -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((500, 24)).astype(np.float32)
    queries = rng.standard_normal((300, 24)).astype(np.float32)
    dist, idx = MemoryBankIndex(bank, kind="flat", device="cpu").search(queries, 1)
    brute = np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=2)
    np.testing.assert_array_equal(idx[:, 0], brute.argmin(axis=1))
    np.testing.assert_allclose(dist[:, 0], brute.min(axis=1), rtol=1e-4, atol=1e-4)


def test_knn_k3_sorted_and_exact() -> None:
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((200, 8)).astype(np.float32)
    queries = rng.standard_normal((50, 8)).astype(np.float32)
    dist, _ = MemoryBankIndex(bank).search(queries, 3)
    brute = np.sort(np.linalg.norm(queries[:, None] - bank[None], axis=2), axis=1)[:, :3]
    np.testing.assert_allclose(dist, brute, rtol=1e-4, atol=1e-4)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_hnsw_finds_nearly_all_exact_neighbours() -> None:
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((500, 16)).astype(np.float32)
    _, exact = MemoryBankIndex(bank, kind="flat").search(queries, 1)
    _, approx = MemoryBankIndex(bank, kind="hnsw", hnsw_ef_search=128).search(queries, 1)
    assert (exact[:, 0] == approx[:, 0]).mean() > 0.95


def test_unknown_index_kind() -> None:
    with pytest.raises(ValueError, match="index kind"):
        MemoryBankIndex(np.zeros((3, 2), np.float32), kind="lsh")


@pytest.mark.parametrize("shape", [(28, 28), (14, 40)])
def test_anomaly_map_matches_scipy_gaussian_filter(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    patch = rng.random(shape).astype(np.float32)
    size = (shape[0] * 8, shape[1] * 8)
    ours = scoring.anomaly_map(patch, size, sigma=4.0)
    import cv2

    up = cv2.resize(patch, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    reference = gaussian_filter(up.astype(np.float64), sigma=4.0)  # mode reflect, truncate 4
    assert ours.shape == size
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_anomaly_map_upsampling_matches_torch_style_bilinear() -> None:
    # align_corners=False bilinear: a 2x2 grid upsampled x4 keeps the corner values at the
    # borders and blends linearly in the middle.
    patch = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    up = scoring.anomaly_map(patch, (8, 8), sigma=0)
    np.testing.assert_allclose(up[0], [0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1], atol=1e-6)


def test_gaussian_ksize_matches_scipy_truncation() -> None:
    assert scoring.gaussian_ksize(4.0) == 33
    assert scoring.gaussian_ksize(1.0) == 9


def test_eq7_reweighting_hand_computed() -> None:
    # One image, two patches in 1-D features. Bank: 0, 1, 3, 10. Patch scores: patch 1 (at 5)
    # is the most anomalous; its nearest bank row is 3 (distance 2). N_b(3) with k=3 is
    # {3, 1, 0}: distances from the patch 2, 4, 5.
    bank = np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    bank_knn = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 2, 1]], dtype=np.int32)
    queries = np.array([[[0.5], [5.0]]], dtype=np.float32)
    patch_scores = np.array([[0.5, 2.0]], dtype=np.float32)
    nearest = np.array([[0, 2]])
    got = scoring.reweighted_scores(queries, patch_scores, nearest, bank, bank_knn)
    expected = (1 - math.exp(2) / (math.exp(2) + math.exp(4) + math.exp(5))) * 2.0
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-6)


def test_eq7_isolated_neighbourhood_scores_higher() -> None:
    # Same s*, but m* in a tight cluster (neighbours close to the patch too) vs m* isolated:
    # the paper's point is that the isolated case is up-weighted.
    bank = np.array([[0.0], [0.1], [0.2], [50.0], [60.0], [70.0]], dtype=np.float32)
    knn = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, 5], [4, 3, 5], [5, 4, 3]], np.int32)
    patch = np.array([[1.0]], dtype=np.float32)
    tight = scoring.reweighted_scores(
        np.array([[[1.2]]], np.float32), patch, np.array([[2]]), bank, knn
    )
    isolated = scoring.reweighted_scores(
        np.array([[[49.0]]], np.float32), patch, np.array([[3]]), bank, knn
    )
    assert isolated[0] > tight[0]


def test_find_regions_bbox_area_peak() -> None:
    amap = np.zeros((20, 30), dtype=np.float32)
    amap[2:5, 3:8] = 1.0
    amap[3, 4] = 2.5
    amap[10:18, 20:22] = 1.5
    regions = scoring.find_regions(amap, 0.5)
    assert [r.as_dict() for r in regions] == [
        {"bbox": [3, 2, 5, 3], "area": 15, "peak": 2.5},
        {"bbox": [20, 10, 2, 8], "area": 16, "peak": 1.5},
    ]
    assert scoring.find_regions(amap, 5.0) == []
    assert len(scoring.find_regions(amap, 0.5, min_area=16)) == 1


def test_regions_are_8_connected() -> None:
    amap = np.zeros((5, 5), dtype=np.float32)
    amap[1, 1] = amap[2, 2] = 1.0  # diagonal neighbours: one region
    assert len(scoring.find_regions(amap, 0.5)) == 1


def test_normalise_maps_threshold_to_half() -> None:
    norm = {"low": 1.0, "threshold": 3.0, "high": 7.0}
    assert scoring.normalise(3.0, norm) == pytest.approx(0.5)
    assert scoring.normalise(1.0, norm) == pytest.approx(0.0)
    assert scoring.normalise(2.0, norm) == pytest.approx(0.25)
    assert scoring.normalise(5.0, norm) == pytest.approx(0.75)
    assert scoring.normalise(100.0, norm) == pytest.approx(1.0)
    assert scoring.normalise(-5.0, norm) == pytest.approx(0.0)
    arr = scoring.normalise(np.array([1.0, 3.0, 7.0]), norm)
    np.testing.assert_allclose(arr, [0.0, 0.5, 1.0])
    assert math.isnan(scoring.normalise(3.0, None))


def test_ivf_with_every_cell_probed_is_exact() -> None:
    rng = np.random.default_rng(4)
    bank = rng.standard_normal((900, 16)).astype(np.float32)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    d_flat, i_flat = MemoryBankIndex(bank, kind="flat").search(queries, 1)
    d_ivf, i_ivf = MemoryBankIndex(bank, kind="ivf", ivf_nprobe=30).search(queries, 1)
    np.testing.assert_array_equal(i_ivf, i_flat)
    np.testing.assert_allclose(d_ivf, d_flat, rtol=1e-4)


def test_ivf_never_underestimates_and_is_deterministic() -> None:
    rng = np.random.default_rng(5)
    bank = rng.standard_normal((2500, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    exact, _ = MemoryBankIndex(bank, kind="flat").search(queries, 1)
    a, ia = MemoryBankIndex(bank, kind="ivf", ivf_nprobe=2).search(queries, 1)
    b, ib = MemoryBankIndex(bank, kind="ivf", ivf_nprobe=2).search(queries, 1)
    assert (a >= exact - 1e-4).all()  # a subset of the bank can only be farther
    assert (a > exact + 1e-4).any()  # ... and with 2 of 50 cells it sometimes is
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(a, b)
