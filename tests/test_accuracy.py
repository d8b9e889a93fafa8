"""Metrics against hand-computed values and brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from edge_agent.tools.accuracy import (
    pixel_roc_auc,
    pro_score,
    recall_at_frr,
    recall_at_frr_ci,
    roc_auc,
)

# ---------------------------------------------------------------------------- references


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """O(n^2) pairwise count: 1 per correctly ordered (pos, neg) pair, 1/2 per tie."""
    pos = scores[labels.astype(bool)]
    neg = scores[~labels.astype(bool)]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (pos.size * neg.size)


def brute_force_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """The PRO curve built literally: one point per distinct threshold, then trapezoids.

    Regions come from scipy (not cv2, which the implementation uses) with a 3x3 structure.
    """
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, count + 1)]
    negatives = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(negatives >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs, fprs[1:], pros, pros[1:], strict=False):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment that crosses the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# ---------------------------------------------------------------------------- roc_auc


def test_roc_auc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(labels, scores) == 1.0
    assert roc_auc(labels, -scores) == 0.0


def test_roc_auc_all_tied_is_half() -> None:
    assert roc_auc(np.array([1, 0, 1, 0, 0]), np.full(5, 0.7)) == 0.5


def test_roc_auc_hand_case_with_ties() -> None:
    labels = np.array([False, False, True, True, False, True])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.2])
    # positives 0.4, 0.8, 0.2 vs negatives 0.1, 0.4, 0.8:
    #   0.4 beats 0.1, ties 0.4          -> 1.5
    #   0.8 beats 0.1 and 0.4, ties 0.8  -> 2.5
    #   0.2 beats 0.1                    -> 1.0
    # (1.5 + 2.5 + 1.0) / (3 * 3) = 5 / 9
    assert roc_auc(labels, scores) == pytest.approx(5 / 9, abs=1e-15)


@pytest.mark.parametrize("n_pos", [3, 40, 77])  # fewer, about as many, more positives than negs
def test_roc_auc_matches_pairwise_count(n_pos: int) -> None:
    rng = np.random.default_rng(n_pos)
    labels = np.r_[np.ones(n_pos, bool), np.zeros(41, bool)]
    rng.shuffle(labels)
    # few distinct values so that many pairs are tied, shifted so the answer is not ~0.5
    scores = rng.integers(0, 8, labels.size) + 2 * labels
    assert roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)
    floats = rng.random(labels.size).astype(np.float32)
    assert roc_auc(labels, floats) == pytest.approx(brute_force_auc(labels, floats), abs=1e-12)


def test_roc_auc_rejects_single_class_nan_and_bad_labels() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(4, bool), np.arange(4.0))
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.zeros(4, int), np.arange(4.0))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1]), np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="0 and 1"):
        roc_auc(np.array([0, 2]), np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="shape"):
        roc_auc(np.array([0, 1, 1]), np.array([0.5, 0.6]))


# ---------------------------------------------------------------------------- pixel_roc_auc


def test_pixel_roc_auc_equals_flat_roc_auc() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((4, 16, 12)) < 0.2
    maps = (rng.random((4, 16, 12)) + 0.5 * masks).astype(np.float32)
    maps[0, :4] = 0.25  # a block of ties across both classes
    expected = brute_force_auc(masks.ravel(), maps.ravel())
    assert 0.6 < expected < 0.95  # neither trivial nor chance
    assert pixel_roc_auc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_roc_auc(masks, maps) == roc_auc(masks.ravel(), maps.ravel())


def test_pixel_roc_auc_rejects_shape_mismatch_and_one_class() -> None:
    with pytest.raises(ValueError, match="shape"):
        pixel_roc_auc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="both classes"):
        pixel_roc_auc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), np.float32))


# ---------------------------------------------------------------------------- pro_score


def two_regions_case() -> tuple[np.ndarray, np.ndarray]:
    """One 12x9 image: regions A and B of 4 px each, 100 negatives scoring 0.00 ... 0.99."""
    masks = np.zeros((1, 12, 9), bool)
    masks[0, 1:3, 1:3] = True  # A
    masks[0, 8:10, 5:7] = True  # B
    maps = np.zeros((1, 12, 9), np.float32)
    maps[~masks] = np.arange(100, dtype=np.float32) / 100
    maps[0, 1:3, 1:3] = 2.0  # A above every negative: found at FPR 0
    return masks, maps


def test_pro_perfect_map_is_one() -> None:
    masks, _ = two_regions_case()
    assert pro_score(masks, masks.astype(np.float32)) == 1.0
    assert pro_score(masks, masks.astype(np.float32), fpr_limit=0.05) == 1.0


def test_pro_one_of_two_regions_first() -> None:
    masks, maps = two_regions_case()
    maps[0, 8:10, 5:7] = 0.895  # B: between negatives 0.89 and 0.90, i.e. found at FPR 0.10
    # PRO = 0.5 (only A) for FPR in [0, 0.1), then 1.0 (both):
    # area up to 0.3 = 0.5 * 0.1 + 1.0 * 0.2 = 0.25, normalised 0.25 / 0.3 = 5/6
    assert pro_score(masks, maps, fpr_limit=0.3) == pytest.approx(5 / 6, abs=1e-12)
    # B never found below the limit: area 0.5 * 0.05, normalised 0.5
    assert pro_score(masks, maps, fpr_limit=0.05) == pytest.approx(0.5, abs=1e-12)


def test_pro_region_tied_with_a_negative_gets_a_sloped_segment() -> None:
    masks, maps = two_regions_case()
    maps[0, 8:10, 5:7] = 0.90  # B tied with the negative scoring 0.90
    # Curve: PRO 0.5 up to FPR 0.09, then one segment (0.09, 0.5) -> (0.10, 1.0), then 1.0.
    # Up to 0.3: 0.5 * 0.09 + 0.01 * 0.75 + 1.0 * 0.2 = 0.2525, normalised 0.2525 / 0.3
    assert pro_score(masks, maps, fpr_limit=0.3) == pytest.approx(0.2525 / 0.3, abs=1e-12)
    # Limit inside that segment: interpolate PRO(0.095) = 0.75;
    # area 0.5 * 0.09 + 0.005 * (0.5 + 0.75) / 2 = 0.048125, normalised 0.048125 / 0.095
    assert pro_score(masks, maps, fpr_limit=0.095) == pytest.approx(0.048125 / 0.095, abs=1e-12)


def test_pro_weights_large_and_small_regions_equally() -> None:
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 2:10, 2:7] = True  # large: 40 px
    masks[0, 15:17, 15:17] = True  # small: 4 px
    large, small = masks.copy(), masks.copy()
    large[0, 15:17, 15:17] = False
    small[0, 2:10, 2:7] = False
    negatives = np.linspace(0.1, 0.9, 356, dtype=np.float32)
    find_large = np.zeros((1, 20, 20), np.float32)
    find_large[~masks] = negatives
    find_small = find_large.copy()
    find_large[large], find_large[small] = 1.0, 0.0  # large above all negatives, small below
    find_small[large], find_small[small] = 0.0, 1.0
    # Pixel AUROC counts pixels: 40 of 44 positives ranked perfectly vs 4 of 44 ...
    assert pixel_roc_auc(masks, find_large) == pytest.approx(40 / 44)
    assert pixel_roc_auc(masks, find_small) == pytest.approx(4 / 44)
    # ... PRO counts regions: either way one of two regions is found at FPR 0.
    assert pro_score(masks, find_large) == pytest.approx(0.5, abs=1e-12)
    assert pro_score(masks, find_small) == pytest.approx(0.5, abs=1e-12)


def test_pro_regions_are_8_connected_and_per_image() -> None:
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: ONE region
    masks[1, 1, 1] = True  # same place, other image: a region of its own
    maps = np.full((2, 6, 6), 0.5, np.float32)
    maps[0, 1, 1] = maps[1, 1, 1] = 1.0  # found
    maps[0, 2, 2] = 0.0  # missed, below every negative
    # 8-connectivity: regions {half found, found} -> PRO 0.75 over the whole range.
    # 4-connectivity would give 3 regions, 2 found -> 2/3; so would labelling the stack as one
    # 3-D volume, which merges the two images' (1, 1) pixels into the diagonal region.
    assert pro_score(masks, maps) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_pro_matches_literal_curve_with_ties(fpr_limit: float) -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((3, 14, 14), bool)
    for image, (r, c, h, w) in zip(masks, [(1, 1, 4, 6), (6, 5, 7, 3), (2, 8, 2, 2)], strict=True):
        image[r : r + h, c : c + w] = True
    masks[0, 10:13, 1:4] = True  # a second region in image 0
    masks[2] = False  # an image without defects still contributes negatives
    # integer scores: lots of ties within and across the classes
    maps = (rng.integers(0, 12, masks.shape) + 3 * masks).astype(np.float32)
    expected = brute_force_pro(masks, maps, fpr_limit)
    assert 0.1 < expected < 0.99
    assert pro_score(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_pro_of_random_map_is_half_the_limit() -> None:
    # A map unrelated to the masks has E[PRO(FPR)] = FPR, so the area up to L is L^2 / 2 and
    # the normalised score L / 2: 0.15 at L = 0.3, 0.05 at L = 0.1.
    rng = np.random.default_rng(3)
    masks = np.zeros((12, 64, 64), bool)
    for image in masks[:8]:
        for r, c in rng.integers(0, 52, (3, 2)):
            image[r : r + rng.integers(3, 12), c : c + rng.integers(3, 12)] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    assert pro_score(masks, maps, fpr_limit=0.3) == pytest.approx(0.15, abs=0.015)
    assert pro_score(masks, maps, fpr_limit=0.1) == pytest.approx(0.05, abs=0.01)


def test_pro_rejects_degenerate_inputs() -> None:
    maps = np.zeros((2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="no anomalous regions"):
        pro_score(np.zeros((2, 5, 5), bool), maps)
    with pytest.raises(ValueError, match="no negative pixels"):
        pro_score(np.ones((2, 5, 5), bool), maps)
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 2, 2] = True
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            pro_score(masks, maps, fpr_limit=limit)
    with pytest.raises(ValueError, match="shape"):
        pro_score(masks, maps[:, :4])
    maps[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pro_score(masks, maps)


# ---------------------------------------------------------------------------- evaluate


def _recall_brute_force(labels: np.ndarray, scores: np.ndarray, rate: float) -> float:
    """Best recall over every threshold (each distinct score, and above all) whose false-reject
    rate is at most `rate`."""
    pos, neg = scores[labels], scores[~labels]
    best = 0.0
    for t in [*np.unique(scores), np.inf]:
        if np.mean(neg >= t) <= rate + 1e-12:
            best = max(best, float(np.mean(pos >= t)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_recall_at_frr_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_neg, n_pos = int(rng.integers(1, 60)), int(rng.integers(1, 40))
    # Integer scores: many ties between and within the classes.
    scores = rng.integers(0, 25, n_neg + n_pos).astype(np.float32)
    labels = np.arange(n_neg + n_pos) >= n_neg
    for rate in (0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0):
        recall, t = recall_at_frr(labels, scores, rate)
        assert recall == pytest.approx(_recall_brute_force(labels, scores, rate))
        # The returned threshold achieves it within the rate.
        assert np.mean(scores[~labels] >= t) <= rate + 1e-12
        assert np.mean(scores[labels] >= t) == pytest.approx(recall)


def test_recall_at_frr_hand_case_and_errors() -> None:
    labels = np.array([False] * 100 + [True] * 4)
    scores = np.array([*range(100), 50, 98.5, 99, 120], dtype=np.float32)
    assert recall_at_frr(labels, scores, 0.0)[0] == 0.25  # above 99: only 120
    assert recall_at_frr(labels, scores, 0.01)[0] == 0.75  # one good (99) rejected: > 98
    assert recall_at_frr(labels, scores, 0.5)[0] == 1.0  # fifty rejected: > 49
    with pytest.raises(ValueError):
        recall_at_frr(labels, scores, 1.5)
    with pytest.raises(ValueError):
        recall_at_frr(np.ones(3, bool), np.ones(3), 0.01)


# ---------------------------------------------------------------------------- recall's interval


def _ci_brute_force(
    labels: np.ndarray, scores: np.ndarray, rate: float, resamples: int, seed: int
) -> tuple[float, float]:
    """The bootstrap as written: replay the documented draws, build each resampled test set and
    score it with recall_at_frr, then take the 2.5% / 97.5% quantiles."""
    neg, pos = scores[~labels], scores[labels]
    rng = np.random.default_rng(seed)
    neg_draw = rng.integers(0, len(neg), size=(resamples, len(neg)))
    pos_draw = rng.integers(0, len(pos), size=(resamples, len(pos)))
    resampled_labels = np.r_[np.zeros(len(neg), bool), np.ones(len(pos), bool)]
    recalls = [
        recall_at_frr(resampled_labels, np.r_[neg[n], pos[p]], rate)[0]
        for n, p in zip(neg_draw, pos_draw, strict=True)
    ]
    low, high = np.quantile(recalls, [0.025, 0.975])
    return float(low), float(high)


@pytest.mark.parametrize("seed", range(12))
def test_recall_ci_matches_the_bootstrap_done_by_hand(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_neg, n_pos = int(rng.integers(2, 120)), int(rng.integers(1, 80))
    # Integer scores in half the cases: ties within and between the classes.
    scores = rng.normal(0.0, 1.0, n_neg + n_pos) + 1.2 * (np.arange(n_neg + n_pos) >= n_neg)
    if seed % 2:
        scores = np.round(scores * 3)
    scores = scores.astype(np.float32)
    labels = np.arange(n_neg + n_pos) >= n_neg
    for rate in (0.0, 0.01, 0.05, 0.3):
        got = recall_at_frr_ci(labels, scores, rate, resamples=200, seed=seed)
        assert got == pytest.approx(_ci_brute_force(labels, scores, rate, 200, seed))


def test_recall_ci_analytic_cases() -> None:
    # Separated classes: every resample catches every defect; reversed: none.
    labels = np.r_[np.zeros(50, bool), np.ones(30, bool)]
    scores = np.r_[np.arange(50.0), 100 + np.arange(30.0)]
    assert recall_at_frr_ci(labels, scores, 0.01) == (1.0, 1.0)
    assert recall_at_frr_ci(labels, -scores, 0.01) == (0.0, 0.0)
    # Goods all equal: the bar never moves, recall is Binomial(m, 3/4) / m: its quantiles.
    m = 100
    labels = np.r_[np.zeros(40, bool), np.ones(m, bool)]
    scores = np.r_[np.zeros(40), np.where(np.arange(m) < 75, 1.0, -1.0)]
    low, high = recall_at_frr_ci(labels, scores, 0.01, resamples=20000)
    assert low == pytest.approx(66 / m, abs=1.01 / m)  # binom.ppf(0.025, 100, 0.75) = 66
    assert high == pytest.approx(83 / m, abs=1.01 / m)  # binom.ppf(0.975, 100, 0.75) = 83
    # One high good among 10, every defect between it and the rest, rate 0: a resample catches
    # all defects unless it drew that good, which it misses with probability 0.9^10 = 0.349.
    # So recall is 0 below its 0.651 quantile and 1 above it.
    labels = np.r_[np.zeros(10, bool), np.ones(20, bool)]
    scores = np.r_[np.zeros(9), 10.0, np.full(20, 5.0)]
    assert recall_at_frr_ci(labels, scores, 0.0, confidence=0.2, resamples=20000) == (0, 0)
    assert recall_at_frr_ci(labels, scores, 0.0, confidence=0.4, resamples=20000) == (0, 1)
    # A rate that lets every good through: recall 1 whatever is drawn.
    assert recall_at_frr_ci(labels, scores, 1.0) == (1.0, 1.0)


def test_recall_ci_is_seeded_and_brackets_the_point() -> None:
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(203, bool), np.ones(392, bool)]
    scores = np.r_[rng.normal(0, 1, 203), rng.normal(2.5, 1, 392)].astype(np.float32)
    first = recall_at_frr_ci(labels, scores, 0.01)
    assert first == recall_at_frr_ci(labels, scores, 0.01)  # same seed, same interval
    assert first != recall_at_frr_ci(labels, scores, 0.01, seed=1)
    point = recall_at_frr(labels, scores, 0.01)[0]
    assert first[0] < point < first[1]
    wider = recall_at_frr_ci(labels, scores, 0.01, confidence=0.99)
    assert wider[0] <= first[0] and first[1] <= wider[1]


def test_recall_ci_rejects_bad_arguments() -> None:
    labels = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    scores = np.arange(10.0)
    for kwargs in ({"confidence": 1.0}, {"confidence": 0.0}, {"resamples": 0}):
        with pytest.raises(ValueError):
            recall_at_frr_ci(labels, scores, 0.01, **kwargs)
    with pytest.raises(ValueError):
        recall_at_frr_ci(labels, scores, 1.5)
    with pytest.raises(ValueError):
        recall_at_frr_ci(np.ones(3, bool), np.ones(3), 0.01)
    with pytest.raises(ValueError):
        recall_at_frr_ci(labels, np.r_[np.nan, scores[1:]], 0.01)


def test_evaluate_reports_the_interval(capsys: pytest.CaptureFixture[str]) -> None:
    """compute_metrics puts recall_at_frr_ci beside recall_at_frr, overall and per defect type,
    and the text table prints the overall intervals."""
    from pathlib import Path

    from edge_agent.tools.accuracy import FALSE_REJECT_RATES
    from edge_agent.tools.dataset import TestSample
    from edge_agent.tools.evaluate import Scored, compute_metrics, print_table

    rng = np.random.default_rng(3)
    types = ["good"] * 60 + ["crack"] * 20 + ["fray"] * 20
    samples = [
        TestSample(Path(f"{i}.png"), t, None if t == "good" else Path(f"{i}_mask.png"))
        for i, t in enumerate(types)
    ]
    labels = np.array(types) != "good"
    scores = (rng.normal(0, 1, 100) + 2 * labels).astype(np.float32)
    masks = np.zeros((100, 8, 8), bool)
    masks[labels, 2:5, 2:5] = True
    maps = rng.random((100, 8, 8)).astype(np.float32) + masks
    scored = Scored(samples, [], scores, maps, masks, 1.0)
    result = compute_metrics(scored)
    crack = np.isin(types, ["good", "crack"])
    for rate in FALSE_REJECT_RATES:
        key = f"{rate:g}"
        assert result["recall_at_frr_ci"][key] == list(recall_at_frr_ci(labels, scores, rate))
        want = list(recall_at_frr_ci(labels[crack], scores[crack], rate))
        assert result["per_type"]["crack"]["recall_at_frr_ci"][key] == want
    result["images_per_second"], result["device"] = 10.0, "cpu"
    print_table(result)
    low, high = result["recall_at_frr_ci"]["0.01"]
    point = result["recall_at_frr"]["0.01"]
    assert f"R@1% {point:.3f} [{low:.3f}, {high:.3f}]" in capsys.readouterr().out
