"""The re-checked indexes (ivf-exact, hnsw-exact): approximate search, then exact re-checks of
the patches that decide.

Pure parts against brute force (the max rule, the map's support, the bound property), then
real MTD images: image scores, thresholded masks and regions, and map maxima equal the flat
index's, while plain ivf at the same nprobe gets them wrong (so the re-check is what does it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.decide.decision import Thresholds, decide, frame_map
from edge_agent.images import list_images, read_image
from edge_agent.model import scoring
from edge_agent.model.bundle import load_bundle
from edge_agent.model.knn import (
    INDEX_KINDS,
    RECHECK_PRODUCT_BELOW,
    MemoryBankIndex,
    resolve_kind,
)
from edge_agent.model.scorer import BatchScores, Scorer
from edge_agent.tools.prefetch import score_items

# Relative agreement with flat. Flat itself is not batch-invariant at this level: the same
# patch searched in a different batch moves by up to ~7e-6 (BLAS blocking), so this is as
# close as two flat runs get.
REL = 1e-5
NPROBE = 1  # one cell per query: plain ivf is wrong for a large share of patches


# --------------------------------------------------------------------------- recheck_max


@pytest.mark.parametrize("seed", range(40))
def test_recheck_max_equals_the_full_max(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 6)), int(rng.integers(1, 60))
    # Small integers: many ties, between exact values and between bounds.
    exact = rng.integers(0, 8, (rows, cols)).astype(np.float32)
    slack = rng.integers(0, 4, (rows, cols)) * (rng.random((rows, cols)) < 0.6)
    bounds = exact + slack.astype(np.float32)
    bounds[rng.random((rows, cols)) < 0.05] = np.inf  # no result from the index
    known = rng.random((rows, cols)) < 0.1
    bounds[known] = exact[known]
    asked: list[tuple[int, int]] = []

    def recheck(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        asked.extend(zip(r.tolist(), c.tolist(), strict=True))
        return exact[r, c]

    values, known_after, argmax = scoring.recheck_max(
        bounds, recheck, known=known, per_round=int(rng.integers(1, 5))
    )
    np.testing.assert_array_equal(argmax, exact.argmax(axis=1))
    np.testing.assert_array_equal(values[np.arange(rows), argmax], exact.max(axis=1))
    assert len(asked) == len(set(asked)) and not any(known[r, c] for r, c in asked)
    np.testing.assert_array_equal(values[known_after], exact[known_after])
    np.testing.assert_array_equal(values[~known_after], bounds[~known_after])
    # What was left unchecked could not have won: its bound is below the max.
    left = np.where(known_after, -np.inf, bounds).max(axis=1)
    assert (left < exact.max(axis=1)).all()


def test_recheck_max_stops_early_on_tight_bounds() -> None:
    rng = np.random.default_rng(0)
    exact = rng.random((4, 500)).astype(np.float32)
    calls: list[int] = []

    def recheck(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        calls.append(r.size)
        return exact[r, c]

    _, known, _ = scoring.recheck_max(exact + 1e-3, recheck, per_round=2)
    assert known.sum(axis=1).max() <= 4 and len(calls) <= 2


# --------------------------------------------------------------------------- smoothed max


def _smooth_by_hand(grid: np.ndarray, sigma: float) -> np.ndarray:
    """smooth_grid's formula written out: truncated normalised Gaussian, reflected border."""
    r = scoring.score_radius(sigma)
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = grid.shape

    def reflect(i: int, n: int) -> int:  # BORDER_REFLECT: fedcba|abcdef|fedcba
        while not 0 <= i < n:
            i = -i - 1 if i < 0 else 2 * n - i - 1
        return i

    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(
                taps[dy + r] * taps[dx + r] * grid[reflect(y + dy, h), reflect(x + dx, w)]
                for dy in range(-r, r + 1)
                for dx in range(-r, r + 1)
            )
    return out


@pytest.mark.parametrize(("sigma", "shape"), [(1.0, (7, 9)), (0.5, (4, 5)), (1.5, (3, 12))])
def test_smooth_grid_is_the_formula(sigma: float, shape: tuple[int, int]) -> None:
    grid = np.random.default_rng(1).random(shape).astype(np.float32) * 30
    np.testing.assert_allclose(
        scoring.smooth_grid(grid, sigma), _smooth_by_hand(grid, sigma), rtol=1e-5
    )
    np.testing.assert_array_equal(scoring.smooth_grid(grid, 0.0), grid)


@pytest.mark.parametrize("seed", range(40))
def test_recheck_smoothed_max_equals_the_full_smoothed_max(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(1, 5)), int(rng.integers(1, 12)), int(rng.integers(1, 12))
    sigma = float(rng.choice([0.5, 1.0, 1.5, 2.0]))
    exact = rng.integers(0, 8, (n, h, w)).astype(np.float32)  # ties, as in recheck_max's test
    bounds = exact + (rng.integers(0, 5, (n, h, w)) * (rng.random((n, h, w)) < 0.7))
    bounds = bounds.astype(np.float32)
    known = rng.random((n, h, w)) < 0.1
    bounds[known] = exact[known]
    asked: list[tuple[int, int]] = []

    def recheck(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        asked.extend(zip(r.tolist(), c.tolist(), strict=True))
        return exact.reshape(n, -1)[r, c]

    values, known_after, scores = scoring.recheck_smoothed_max(bounds, recheck, sigma, known=known)
    np.testing.assert_allclose(scores, scoring.smoothed_max(exact, sigma), rtol=1e-6)
    assert len(asked) == len(set(asked)) and not any(known.reshape(n, -1)[r, c] for r, c in asked)
    np.testing.assert_array_equal(values[known_after], exact[known_after])
    np.testing.assert_array_equal(values[~known_after], bounds[~known_after])


def test_recheck_smoothed_max_reads_one_window_on_tight_bounds() -> None:
    exact = np.random.default_rng(0).random((3, 36, 36)).astype(np.float32) * 30
    calls: list[int] = []

    def recheck(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        calls.append(r.size)
        return exact.reshape(3, -1)[r, c]

    _, known, _ = scoring.recheck_smoothed_max(exact + 1e-3, recheck, 1.0)
    window = (2 * scoring.score_radius(1.0) + 1) ** 2
    assert known.sum(axis=(1, 2)).max() <= 2 * window and len(calls) <= 2


# --------------------------------------------------------------------------- map support


@pytest.mark.parametrize(
    ("grid", "size"), [((28, 28), (224, 224)), ((7, 9), (50, 61)), ((16, 48), (128, 384))]
)
def test_map_support_is_the_nonzero_pattern_of_each_cell(
    grid: tuple[int, int], size: tuple[int, int]
) -> None:
    rows, cols = scoring.map_support(grid, size, 4.0)
    rng = np.random.default_rng(1)
    for j, i in [(0, 0), (grid[0] - 1, grid[1] - 1), *rng.integers(0, grid, (6, 2)).tolist()]:
        impulse = np.zeros(grid, np.float32)
        impulse[j, i] = 1.0
        nonzero = scoring.anomaly_map(impulse, size, 4.0) != 0
        np.testing.assert_array_equal(nonzero, np.outer(rows[:, j], cols[:, i]))


def test_cells_for_is_every_cell_a_marked_pixel_reads() -> None:
    grid, size = (7, 9), (50, 61)
    support = scoring.map_support(grid, size, 4.0)
    rng = np.random.default_rng(2)
    pixels = rng.random(size) < 0.002
    brute = np.zeros(grid, bool)
    for j in range(grid[0]):
        for i in range(grid[1]):
            impulse = np.zeros(grid, np.float32)
            impulse[j, i] = 1.0
            brute[j, i] = (scoring.anomaly_map(impulse, size, 4.0)[pixels] != 0).any()
    np.testing.assert_array_equal(scoring.cells_for(pixels, support), brute)
    grown = scoring.cells_for(pixels, support, margin=1)
    assert (grown >= brute).all()
    assert not scoring.cells_for(np.zeros(size, bool), support).any()


def test_map_of_bounds_is_above_the_exact_map_bit_for_bit() -> None:
    # The whole map argument: non-negative weights, so rounding is monotone too.
    rng = np.random.default_rng(3)
    exact = (rng.random((28, 28)) * 30).astype(np.float32)
    bounds = exact + (rng.random((28, 28)) < 0.2) * rng.random((28, 28)).astype(np.float32)
    assert (scoring.anomaly_map(bounds, (224, 224)) >= scoring.anomaly_map(exact, (224, 224))).all()


# --------------------------------------------------------------------------- the index


@pytest.mark.parametrize("kind", ["ivf-exact", "hnsw-exact"])
def test_bounds_are_above_flat_distances_and_re_checks_are_flat(kind: str) -> None:
    rng = np.random.default_rng(4)
    bank = rng.standard_normal((3000, 32)).astype(np.float32) + 5.0
    queries = rng.standard_normal((2000, 32)).astype(np.float32) + 5.0
    # One ivf cell, or a greedy walk of the graph: often wrong.
    index = MemoryBankIndex(bank, kind=kind, device="cpu", ivf_nprobe=1, hnsw_ef_search=1)
    bounds, _ = index.search_bounds(queries, 3)
    flat, _ = MemoryBankIndex(bank, kind="flat", device="cpu").search(queries, 3)
    assert (bounds.mean(axis=1) >= flat.mean(axis=1)).all()
    assert (bounds[:, 0] > flat[:, 0] * 1.001).mean() > 0.2
    # Small re-checks rank rows by a matrix product and sum the best candidates' distances
    # directly, as flat does: the same rows, the same distances up to summation order. Large
    # ones are flat's own search.
    flat_rows = MemoryBankIndex(bank, kind="flat", device="cpu").search(queries, 3)[1]
    small = RECHECK_PRODUCT_BELOW - 1
    assert len(queries) >= RECHECK_PRODUCT_BELOW > small
    for n in (small, len(queries)):
        exact, rows = index.search_exact(queries[:n], 3)
        np.testing.assert_array_equal(rows, flat_rows[:n])
        np.testing.assert_allclose(exact, flat[:n], rtol=1e-6)
        nearest, row = index.search_exact(queries[:n], 1)
        np.testing.assert_array_equal(row[:, 0], flat_rows[:n, 0])
        np.testing.assert_allclose(nearest[:, 0], flat[:n, 0], rtol=1e-6)


def test_small_re_checks_find_the_nearest_row_where_the_product_rounds_it_away() -> None:
    # Rows of norm ~1e3 in near-equal pairs: ||y||^2 - 2 q.y is ~1e6, so the product's
    # float32 rounding (~0.1) swamps the pairs' true gap of squared distance (~0.01). The
    # k = 1 re-check must then measure both rows directly, not trust the product's argmin.
    rng = np.random.default_rng(8)
    centre = rng.standard_normal(16).astype(np.float32) * 250.0
    base = centre + rng.standard_normal((200, 16)).astype(np.float32)
    bank = np.concatenate([base, base + rng.standard_normal((200, 16)).astype(np.float32) * 3e-3])
    queries = base[rng.integers(0, 200, 500)] + rng.standard_normal((500, 16)).astype(np.float32)
    index = MemoryBankIndex(bank, kind="ivf-exact", device="cpu", ivf_nprobe=1)
    assert len(queries) < RECHECK_PRODUCT_BELOW
    exact, rows = index.search_exact(queries, 1)
    true = ((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(rows[:, 0], true.argmin(axis=1))
    np.testing.assert_allclose(exact[:, 0] ** 2, true.min(axis=1), rtol=1e-5)


def test_missing_ivf_results_are_infinite_bounds() -> None:
    rng = np.random.default_rng(5)
    bank = rng.standard_normal((16, 4)).astype(np.float32)  # 4 cells of ~4 rows
    index = MemoryBankIndex(bank, kind="ivf-exact", device="cpu", ivf_nprobe=1)
    bounds, rows = index.search_bounds(rng.standard_normal((50, 4)).astype(np.float32), 8)
    assert (rows < 0).any()
    assert np.isinf(bounds[rows < 0]).all() and np.isfinite(bounds[rows >= 0]).all()


def test_auto_is_hnsw_exact_without_a_gpu() -> None:
    assert "auto" in INDEX_KINDS and "hnsw-exact" in INDEX_KINDS
    assert resolve_kind("auto", "cpu") == "hnsw-exact"
    assert resolve_kind("flat", "cpu") == "flat"
    with pytest.raises(ValueError, match="index kind"):
        resolve_kind("lsh", "cpu")


# --------------------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def mtd_batches(mtd_small: Path, small_bundle: Path) -> list[np.ndarray]:
    scorer = Scorer(load_bundle(small_bundle), device="cpu", threads=2, index="flat")
    paths = [p for d in sorted((mtd_small / "test").iterdir()) for p in list_images(d)]
    images = np.stack([scorer.prepare(read_image(p)) for p in paths])
    return [images[i : i + 8] for i in range(0, len(images), 8)]


def _scorers(
    bundle: Path, kind: str = "ivf-exact", **overrides: object
) -> tuple[Scorer, Scorer, Scorer]:
    """flat, the re-checked `kind` and its approximate search alone, the latter two made
    to be often wrong (one ivf cell, or a graph search two candidates wide)."""
    b = load_bundle(bundle)
    common: dict = {"device": "cpu", "threads": 2, "ivf_nprobe": NPROBE, "hnsw_ef_search": 2}
    common |= overrides
    return (
        Scorer(b, index="flat", **common),
        Scorer(b, index=kind, **common),
        Scorer(b, index=kind.removesuffix("-exact"), **common),
    )


RECHECKED = ["ivf-exact", "hnsw-exact"]


# The default image score smooths the patch grid (image_sigma 1, without Eq. 7); the small
# bundle reweights (Eq. 7), so both are checked on it.
SMOOTHED = {"image_sigma": 1.0, "reweight": False}


@pytest.mark.parametrize("kind", RECHECKED)
@pytest.mark.parametrize("overrides", [{"k": 1}, {"k": 3}, SMOOTHED, {**SMOOTHED, "k": 3}], ids=str)
def test_image_scores_equal_flat_on_mtd(
    small_bundle: Path, mtd_batches: list[np.ndarray], overrides: dict, kind: str
) -> None:
    flat, exact, ivf = _scorers(small_bundle, kind, scoring_overrides=overrides)
    k = overrides.get("k", 1)
    assert exact.device.endswith(f"faiss:cpu/{kind}")
    worst, ivf_worst, rechecked = 0.0, 0.0, 0
    for batch in mtd_batches:
        f, e, a = flat.score(batch), exact.score(batch), ivf.score(batch)
        worst = max(worst, float(np.max(np.abs(e.image_scores / f.image_scores - 1))))
        ivf_worst = max(ivf_worst, float(np.max(np.abs(a.image_scores / f.image_scores - 1))))
        assert e.exact is not None and e.rechecked is not None
        rechecked += int(e.rechecked.sum())
        # Bounds are bounds; re-checked patches are flat's.
        assert (e.patch_scores >= f.patch_scores * (1 - REL)).all()
        np.testing.assert_allclose(e.patch_scores[e.exact], f.patch_scores[e.exact], rtol=REL)
    n = sum(len(b) for b in mtd_batches)
    print(f"k={k}: {kind} vs flat max rel {worst:.1e}; approximate alone {ivf_worst:.1e}; "
          f"{rechecked / n:.1f} patches re-checked per image")  # fmt: skip
    assert worst <= REL
    assert ivf_worst > 1e-3  # without the re-check this nprobe gets images wrong
    assert rechecked / n < 0.1 * exact.grid[0] * exact.grid[1]


def _clear_threshold(amap: np.ndarray, frame_hw: tuple[int, int], start: float) -> float:
    """A threshold just above `start` with no pixel of `amap` (or of it resized to the
    frame) within REL of it: maps equal up to float noise then give equal masks."""
    values = np.r_[amap.ravel(), frame_map(amap, frame_hw).ravel()]
    pixel = start
    while (np.abs(values / pixel - 1) < REL).any():
        pixel *= 1 + 2 * REL
    return pixel


@pytest.mark.parametrize("kind", RECHECKED)
def test_masks_regions_and_maxima_equal_flat_on_mtd(
    small_bundle: Path, mtd_batches: list[np.ndarray], kind: str
) -> None:
    flat, exact, _ = _scorers(small_bundle, kind)
    flat_scores = [flat.score(b) for b in mtd_batches]
    frame_hw = (300, 451)  # not the input size: decide() resizes the map to the frame
    maxima = [flat.anomaly_map(g).max() for s in flat_scores for g in s.patch_scores]
    start = float(np.median(maxima)) * 0.98  # regions on about half of the images
    bound_mask_differs = bound_max_differs = with_regions = 0
    for batch, f in zip(mtd_batches, flat_scores, strict=True):
        e = exact.score(batch)
        for i in range(len(batch)):
            assert e.exact is not None
            fmap = flat.anomaly_map(f.patch_scores[i])
            # Per image, clear of its pixels: flat's own noise (REL) must not flip one.
            pixel = _clear_threshold(fmap, frame_hw, start)
            bmap = exact.anomaly_map(e.patch_scores[i])  # bounds, before any map re-check
            bound_mask_differs += int(((bmap >= pixel) != (fmap >= pixel)).any())
            bound_max_differs += int(abs(bmap.max() / fmap.max() - 1) > 1e-3)
            emap = exact.exact_map(e, i, threshold=pixel)
            np.testing.assert_array_equal(emap >= pixel, fmap >= pixel)
            assert ((emap >= fmap * (1 - REL)) | (emap >= pixel)).all()
            t = Thresholds(image=1e-6, pixel=pixel)  # every frame NG: regions always reported
            fd = decide(1.0, fmap, frame_hw, t)
            ed = decide(1.0, emap, frame_hw, t)
            assert [r.as_dict()["bbox"] for r in ed.regions] == [
                r.as_dict()["bbox"] for r in fd.regions
            ]
            assert [r.area for r in ed.regions] == [r.area for r in fd.regions]
            np.testing.assert_allclose(
                [r.peak for r in ed.regions], [r.peak for r in fd.regions], rtol=REL
            )
            with_regions += bool(fd.regions)
            peak = exact.exact_map(e, i, peak=True).max()
            assert peak == pytest.approx(fmap.max(), rel=REL)
    assert with_regions >= 5
    assert bound_mask_differs >= 1 and bound_max_differs >= 1  # the map re-check matters


def test_exact_map_whole_and_latest_batch(
    small_bundle: Path, mtd_batches: list[np.ndarray]
) -> None:
    flat, exact, ivf = _scorers(small_bundle)
    batch = mtd_batches[-1]
    f, e = flat.score(batch), exact.score(batch)
    for i in range(len(batch)):
        np.testing.assert_allclose(
            exact.exact_map(e, i), flat.anomaly_map(f.patch_scores[i]), rtol=REL
        )
    assert e.exact is not None and e.exact.all()
    # The agent hands over the latest batch's patch_scores array (service._answer).
    e2 = exact.score(batch)
    assert exact.exact_map(e2.patch_scores, 0, peak=True).max() == pytest.approx(
        flat.anomaly_map(f.patch_scores[0]).max(), rel=REL
    )
    with pytest.raises(ValueError, match="BatchScores"):
        exact.exact_map(e.patch_scores.copy(), 0)
    # Kinds without re-checks just draw the map.
    a = ivf.score(batch)
    assert isinstance(a, BatchScores) and a.exact is None
    np.testing.assert_array_equal(ivf.exact_map(a, 0), ivf.anomaly_map(a.patch_scores[0]))


def test_score_items_map_maxima_equal_flat(small_bundle: Path, mtd_small: Path) -> None:
    flat, exact, _ = _scorers(small_bundle)
    paths = list_images(mtd_small / "test" / "crack")

    def load(p: Path) -> tuple[np.ndarray, None]:
        return flat.prepare(read_image(p)), None

    want = [(s, m.max()) for _, _, _, s, m in score_items(flat, paths, load, 4, "f")]
    got = [(s, m.max()) for _, _, _, s, m in score_items(exact, paths, load, 4, "e")]
    np.testing.assert_allclose(got, want, rtol=REL)


@pytest.mark.parametrize("kind", ["flat", *RECHECKED])
def test_ignored_patches_never_set_the_score(
    small_bundle: Path, mtd_batches: list[np.ndarray], kind: str
) -> None:
    """keep [B, h, w]: an ignored patch scores 0 and the image score is the (Eq. 7 reweighted)
    score of the best kept patch, as flat search of the kept patches alone gives it; the
    re-checked kinds still agree with flat."""
    flat, scorer, _ = _scorers(small_bundle, kind)
    batch = mtd_batches[-1]  # defects
    full = flat.score(batch)
    h, w = flat.grid
    rng = np.random.default_rng(7)
    keep = rng.random((len(batch), h, w)) < 0.7
    # The worst patch of each image ignored: the score must move to another patch.
    for i, grid in enumerate(full.patch_scores):
        keep[i][np.unravel_index(int(np.argmax(grid)), grid.shape)] = False
    kept = scorer.score(batch, keep=keep)
    assert (kept.patch_scores[~keep] == 0).all()
    np.testing.assert_allclose(
        kept.patch_scores[keep] if kind == "flat" else kept.patch_scores[keep & kept.exact],
        full.patch_scores[keep] if kind == "flat" else full.patch_scores[keep & kept.exact],
        rtol=REL,
    )
    reference = flat.score(batch, keep=keep)
    np.testing.assert_allclose(kept.image_scores, reference.image_scores, rtol=REL)
    assert (kept.image_scores < full.image_scores).all(), "the ignored maxima no longer count"
    everything = scorer.score(batch, keep=np.ones_like(keep))
    np.testing.assert_allclose(everything.image_scores, full.image_scores, rtol=REL)
