"""Coreset selection: the fast (lazy, blocked) version against the plain algorithm and a
brute-force oracle written from the definition, and the geometry of what it selects."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import pytest
import torch

import edge_agent.export.coreset as coreset
from edge_agent.export.coreset import (
    approximate_greedy_coreset,
    covering_radius,
    reference_greedy_coreset,
)

Selector = Callable[..., np.ndarray]

# ---------------------------------------------------------------------------- data


def clustered(
    n: int, dim: int, n_clusters: int, seed: int, *, rank: int = 8, spread: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank Gaussian clusters of very unequal sizes plus noise, away from the origin
    (like post-ReLU patch features). Returns float32 rows and cluster labels."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_clusters, 0.7))
    labels = rng.choice(n_clusters, size=n, p=weights)
    latent = rng.normal(scale=3.0, size=(n_clusters, rank))[labels]
    latent += rng.normal(scale=spread, size=(n, rank))
    x = latent @ rng.normal(size=(rank, dim)) / math.sqrt(rank)
    x += rng.normal(scale=0.05, size=(n, dim)) + 4.0
    return x.astype(np.float32), labels


def gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def brute_force_greedy(x: np.ndarray, n_select: int) -> np.ndarray:
    """The definition with every row as a starting row (so no randomness is involved): d_i
    starts as the mean distance to all rows; then repeatedly take argmax d and lower d to the
    distance to the taken row. Float64 differences, full N x N matrix (small N only)."""
    x64 = x.astype(np.float64)
    dist = np.sqrt(((x64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=-1))
    d = dist.mean(axis=1)
    out = []
    for _ in range(n_select):
        i = int(np.argmax(d))
        out.append(i)
        d = np.minimum(d, dist[i])
        d[i] = -np.inf
    return np.array(out)


# ---------------------------------------------------------------------------- same selection


@pytest.mark.parametrize(
    ("kind", "n", "dim", "n_select", "proj_dim", "seed"),
    [
        ("clustered", 3000, 48, 300, 16, 0),
        ("clustered", 4000, 200, 400, 128, 1),  # projected to the default width
        ("clustered", 2500, 20, 250, None, 2),
        ("clustered", 3000, 64, 900, None, 3),  # 30%: blocks refresh many times
        ("random", 3000, 64, 300, 32, 4),
        ("random", 2000, 6, 600, None, 5),  # low dimension: the pruning skips most pairs
        ("random", 400, 5, 399, None, 6),  # all rows but one
    ],
)
def test_fast_selects_what_the_plain_algorithm_selects(
    kind: str, n: int, dim: int, n_select: int, proj_dim: int | None, seed: int
) -> None:
    x = clustered(n, dim, 12, seed)[0] if kind == "clustered" else gaussian(n, dim, seed)
    fast = approximate_greedy_coreset(x, n_select, proj_dim=proj_dim, seed=seed)
    plain = reference_greedy_coreset(x, n_select, proj_dim=proj_dim, seed=seed)
    np.testing.assert_array_equal(fast, plain)


def test_tiny_blocks_and_chunks_still_select_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunked loop runs many times: rows, seeds, pending selections, small blocks."""
    monkeypatch.setattr(coreset, "_CHUNK_ROWS", 97)
    monkeypatch.setattr(coreset, "_CHUNK_ELEMENTS", 500)
    monkeypatch.setattr(coreset, "_PENDING_CHUNK", 3)
    monkeypatch.setattr(coreset, "_MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(coreset, "_BLOCKS_FOR_SMALL_INPUTS", 100)
    x = clustered(1500, 40, 8, seed=7)[0]
    fast = approximate_greedy_coreset(x, 200, proj_dim=24, seed=7)
    np.testing.assert_array_equal(fast, reference_greedy_coreset(x, 200, proj_dim=24, seed=7))


@pytest.mark.parametrize(("seed", "offset"), [(0, 0.0), (1, 0.0), (2, 1e6)])
def test_both_follow_the_definition(seed: int, offset: float) -> None:
    """Against an oracle that shares no code with the module (every row a starting row).

    At offset 1e6 the norms are ~1e12 times the squared distances: without centring the
    |x|^2 + |c|^2 - 2 x.c of both versions would lose the distances in rounding.
    """
    x = gaussian(300, 7, seed) * np.array([1, 2, 3, 1, 1, 5, 1], dtype=np.float32)
    x = (x + np.float32(offset)).astype(np.float32)
    expected = brute_force_greedy(x, 60)
    kwargs = {"proj_dim": None, "n_starts": 300, "seed": seed}
    np.testing.assert_array_equal(reference_greedy_coreset(x, 60, **kwargs), expected)
    np.testing.assert_array_equal(approximate_greedy_coreset(x, 60, **kwargs), expected)


def test_exact_ties_go_to_the_lowest_index_like_argmax() -> None:
    """Integer lattice, every point twice: all distances are exact in float32 and float64, so
    ties are real and must be broken as np.argmax breaks them, across blocks too."""
    axis = np.arange(-3, 4)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    x = np.concatenate([grid, grid]).astype(np.float32)  # mean exactly 0: centring is exact
    x = x[np.random.default_rng(0).permutation(len(x))]
    kwargs = {"proj_dim": None, "seed": 3}
    fast = approximate_greedy_coreset(x, 400, **kwargs)
    plain = reference_greedy_coreset(x, 400, **kwargs)
    np.testing.assert_array_equal(fast, plain)
    # The 343 distinct points come first; then duplicates (d = 0 ties), lowest index first.
    assert len(np.unique(x[fast[:343]], axis=0)) == 343
    np.testing.assert_array_equal(fast[343:], np.sort(fast[343:]))


def test_pruning_laziness_and_the_float32_screen_save_work() -> None:
    """White-box: the point of the fast version is computing fewer row-centre distances, and
    recomputing few of them in float64 (features far from the origin, like post-ReLU ones)."""
    x = clustered(6000, 32, 20, seed=8, spread=0.2)[0] + np.float32(100.0)
    blocked = coreset._blocked_inputs(x, None, 10, 8)
    positions, state = coreset._lazy_greedy(blocked, 300, progress=False)
    assert state.pairs < 0.3 * len(x) * 300
    assert state.exact_pairs < 0.2 * state.pairs  # ~the rows that do get lower: 9% here
    selected = blocked.layout.order[positions]
    np.testing.assert_array_equal(selected, reference_greedy_coreset(x, 300, proj_dim=None, seed=8))


def test_projection_is_skipped_when_features_are_not_wider() -> None:
    x = gaussian(800, 24, seed=9)
    a = approximate_greedy_coreset(x, 50, proj_dim=24)
    np.testing.assert_array_equal(a, approximate_greedy_coreset(x, 50, proj_dim=None))
    assert not np.array_equal(a, approximate_greedy_coreset(x, 50, proj_dim=8))


def test_float64_and_strided_input_select_like_float32() -> None:
    x64 = clustered(2000, 30, 6, seed=10)[0].astype(np.float64)
    expected = approximate_greedy_coreset(x64.astype(np.float32), 100, proj_dim=16)
    np.testing.assert_array_equal(approximate_greedy_coreset(x64, 100, proj_dim=16), expected)
    strided = np.asfortranarray(x64)[:, :]
    np.testing.assert_array_equal(approximate_greedy_coreset(strided, 100, proj_dim=16), expected)


# ---------------------------------------------------------------------------- output contract


def test_indices_are_distinct_int64_in_range_and_a_prefix_of_larger_selections() -> None:
    x = clustered(2500, 40, 10, seed=11)[0]
    big = approximate_greedy_coreset(x, 250, seed=11)
    assert big.dtype == np.int64 and big.shape == (250,)
    assert len(np.unique(big)) == 250
    assert big.min() >= 0 and big.max() < len(x)
    # Greedy: selecting fewer rows gives the start of the same sequence.
    np.testing.assert_array_equal(approximate_greedy_coreset(x, 60, seed=11), big[:60])


@pytest.mark.parametrize("fn", [approximate_greedy_coreset, reference_greedy_coreset])
@pytest.mark.parametrize("extra", [0, 5])
def test_n_select_at_least_n_returns_every_index(fn: Selector, extra: int) -> None:
    x = gaussian(37, 4, seed=12)
    out = fn(x, 37 + extra)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, np.arange(37))


def test_different_seeds_start_differently() -> None:
    x = gaussian(1000, 16, seed=13)
    assert not np.array_equal(
        approximate_greedy_coreset(x, 20, seed=0), approximate_greedy_coreset(x, 20, seed=1)
    )


def test_progress_bar_and_torch_settings_are_restored(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        x = gaussian(1000, 8, seed=14)
        out = approximate_greedy_coreset(x, 30, progress=True)
        assert torch.get_num_threads() == threads
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert "Coreset" in capsys.readouterr().err
    np.testing.assert_array_equal(out, reference_greedy_coreset(x, 30))


# ---------------------------------------------------------------------------- geometry


def test_covering_radius_shrinks_as_the_fraction_grows() -> None:
    x = clustered(4000, 24, 15, seed=15)[0]
    fractions = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    radii = []
    for f in fractions:
        bank = x[approximate_greedy_coreset(x, math.ceil(f * len(x)), seed=15)]
        radii.append(covering_radius(x, bank))
    for smaller, larger in itertools.pairwise(radii):
        assert larger <= smaller * (1 + 1e-6)
    assert radii[-1] < 0.5 * radii[0]


def test_coreset_covers_far_better_than_a_random_subset() -> None:
    x = clustered(4000, 24, 15, seed=16)[0]
    k = 80
    core = covering_radius(x, x[approximate_greedy_coreset(x, k, seed=16)])
    rng = np.random.default_rng(16)
    randoms = [covering_radius(x, x[rng.choice(len(x), k, replace=False)]) for _ in range(5)]
    assert core < 0.5 * min(randoms)


def test_every_cluster_of_a_separated_mixture_is_represented() -> None:
    """Clusters of 2000 down to 3 points, far apart: a random 20 misses the small ones."""
    rng = np.random.default_rng(17)
    sizes = [2000, 1000, 500, 200, 100, 50, 20, 10, 5, 3]
    centres = rng.normal(scale=50.0, size=(len(sizes), 16))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = (centres[labels] + rng.normal(size=(len(labels), 16))).astype(np.float32)
    order = rng.permutation(len(x))
    x, labels = x[order], labels[order]
    for proj_dim in (None, 8):
        selected = approximate_greedy_coreset(x, 20, proj_dim=proj_dim, seed=17)
        assert set(labels[selected].tolist()) == set(range(len(sizes)))


def test_covering_radius_against_hand_computed_values() -> None:
    features = np.array([[0, 0], [3, 4], [6, 8], [6, 0]], dtype=np.float32)
    assert covering_radius(features, features[[0]]) == pytest.approx(10.0, rel=1e-6)
    assert covering_radius(features, features[[0, 2]]) == pytest.approx(6.0, rel=1e-6)
    assert covering_radius(features, features[[1]], chunk=1) == pytest.approx(5.0, rel=1e-6)
    assert covering_radius(features, features) == pytest.approx(0.0, abs=1e-5)


def test_covering_radius_matches_brute_force_far_from_the_origin() -> None:
    """Integer points (exact distances), then the same shifted by 1e4. From
    distance_compute_blas_threshold queries on, FAISS computes |q|^2 + |b|^2 - 2 q.b in float32:
    without centring, ~1.6e9 +- 128 for squared distances of ~100."""
    points = np.random.default_rng(18).integers(0, 10, size=(500, 16)).astype(np.float32)
    bank = points[:50]
    diff = points[:, None, :].astype(np.float64) - bank[None, :, :]
    expected = math.sqrt((diff**2).sum(axis=-1).min(axis=1).max())
    shifted = points + np.float32(1e4)
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20  # its default in most versions
    try:
        assert covering_radius(points, bank) == pytest.approx(expected, rel=1e-6)
        assert covering_radius(shifted, shifted[:50]) == pytest.approx(expected, rel=1e-6)
        assert covering_radius(shifted, shifted[:50], chunk=64) == pytest.approx(expected, rel=1e-6)
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold


# ---------------------------------------------------------------------------- bad arguments

GOOD = np.zeros((10, 3), dtype=np.float32)


@pytest.mark.parametrize("fn", [approximate_greedy_coreset, reference_greedy_coreset])
@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        (np.zeros(10, np.float32), {}, "2-D"),
        (np.zeros((2, 5, 3), np.float32), {}, "2-D"),
        (np.zeros((10, 3), np.int64), {}, "float"),
        (np.zeros((0, 3), np.float32), {}, "empty"),
        (np.zeros((10, 0), np.float32), {}, "empty"),
        (np.full((10, 3), np.nan, np.float32), {}, "NaN"),
        (GOOD, {"n_select": 0}, "n_select"),
        (GOOD, {"n_select": -2}, "n_select"),
        (GOOD, {"n_select": 2.5}, "n_select"),
        (GOOD, {"n_select": True}, "n_select"),
        (GOOD, {"proj_dim": 0}, "proj_dim"),
        (GOOD, {"proj_dim": 4.0}, "proj_dim"),
        (GOOD, {"n_starts": 0}, "n_starts"),
    ],
)
def test_bad_arguments_raise_value_error(
    fn: Selector, features: np.ndarray, kwargs: dict[str, Any], message: str
) -> None:
    kwargs = {"n_select": 3, **kwargs}
    n_select = kwargs.pop("n_select")
    with pytest.raises(ValueError, match=message):
        fn(features, n_select, **kwargs)


@pytest.mark.parametrize(
    ("features", "bank", "kwargs", "message"),
    [
        (GOOD, np.zeros((4, 2), np.float32), {}, "columns"),
        (GOOD, np.zeros((0, 3), np.float32), {}, "empty"),
        (GOOD, np.zeros(3, np.float32), {}, "2-D"),
        (GOOD, GOOD, {"chunk": 0}, "chunk"),
    ],
)
def test_covering_radius_rejects_bad_arguments(
    features: np.ndarray, bank: np.ndarray, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        covering_radius(features, bank, **kwargs)
