"""Calibration: order-statistic threshold maths, F1/keep-all choices, the pixel threshold, the
held-out split, and `edge-agent calibrate` end to end on a real bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import stats

from edge_agent.calibrate import thresholds as th
from edge_agent.calibrate.command import calibrate
from edge_agent.calibrate.plot import GOOD_BGR, Marker, histogram_image
from edge_agent.cli import main
from edge_agent.errors import UserError
from edge_agent.images import list_images, read_image
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.model.scoring import normalise

CONF = 0.95


# --------------------------------------------------------------------------- the Beta law


def test_false_reject_is_the_order_statistic_beta_law() -> None:
    at_max = th.false_reject(20, 0, CONF)
    assert at_max.expected == pytest.approx(1 / 21)
    assert at_max.upper == pytest.approx(1 - 0.05 ** (1 / 20))  # 13.9 %
    three = th.false_reject(200, 3, CONF)
    assert three.expected == pytest.approx(4 / 201)
    assert three.upper == pytest.approx(stats.beta.ppf(CONF, 4, 197))
    assert three.observed == pytest.approx(3 / 200)
    everything = th.false_reject(5, 5, CONF)
    assert (everything.expected, everything.upper) == (1.0, 1.0)
    with pytest.raises(ValueError):
        th.false_reject(0, 0, CONF)


@pytest.mark.parametrize(
    ("dist", "sf"),
    [
        (lambda rng, n: rng.exponential(1.0, n), lambda t: np.exp(-t)),
        (lambda rng, n: rng.normal(5.0, 2.0, n), lambda t: stats.norm.sf(t, 5.0, 2.0)),
    ],
    ids=["exponential", "normal"],
)
def test_large_sample_meets_the_target_and_the_bound_holds(dist, sf) -> None:
    rng = np.random.default_rng(1)
    good = dist(rng, 10_000)
    choice = th.choose_target(good, np.empty(0), 0.01, CONF)
    frr = choice.point.frr
    assert choice.reachable
    assert frr.rejected == 99  # (99 + 1) / 10001 <= 1 % < (100 + 1) / 10001
    assert frr.expected <= 0.01
    assert 0.01 < frr.upper < 0.0125  # n = 10,000 gives a tight bound
    true_frr = float(sf(choice.point.threshold))
    assert true_frr <= frr.upper
    assert true_frr == pytest.approx(0.01, abs=0.0025)
    fresh = dist(rng, 200_000)
    assert np.mean(fresh >= choice.point.threshold) <= frr.upper


def test_twenty_samples_cannot_promise_one_percent() -> None:
    good = np.random.default_rng(2).normal(5.0, 2.0, 20)
    choice = th.choose_target(good, np.empty(0), 0.01, CONF)
    assert not choice.reachable
    assert choice.point.threshold == th.just_above(good.max())  # the best the data can do
    assert choice.point.frr.rejected == 0
    assert choice.point.frr.expected == pytest.approx(1 / 21)
    assert choice.point.frr.upper > 0.13  # visibly wide
    assert th.best_upper_bound(20, CONF) == pytest.approx(choice.point.frr.upper)


def test_bound_has_its_stated_coverage() -> None:
    """Over many calibrations the true FRR stays under the bound in ~95 % of them, and the
    expected-rate choice meets the target on average (uniform scores: FRR = 1 - t)."""
    rng = np.random.default_rng(3)
    n, target, trials = 200, 0.05, 3000
    true, upper, promised = [], [], []
    for _ in range(trials):
        good = rng.random(n)
        point = th.choose_target(good, np.empty(0), target, CONF).point
        true.append(1.0 - point.threshold)
        upper.append(point.frr.upper)
        promised.append(
            1.0 - th.choose_target(good, np.empty(0), target, CONF, promise=True).point.threshold
        )
    true_arr = np.array(true)
    assert np.mean(true_arr <= np.array(upper)) == pytest.approx(CONF, abs=0.015)
    assert true_arr.mean() == pytest.approx(10 / 201, abs=0.002)  # j = 9: (9 + 1) / 201
    assert np.mean(np.array(promised) <= target) >= CONF - 0.01


def test_samples_needed_and_target_rank_agree() -> None:
    assert th.samples_needed(0.01) == 99
    assert th.target_rank(98, 0.01, CONF) is None
    assert th.target_rank(99, 0.01, CONF) == 0
    assert th.samples_needed(0.01, CONF) == 299
    assert th.target_rank(298, 0.01, CONF, promise=True) is None
    assert th.target_rank(299, 0.01, CONF, promise=True) == 0
    assert th.target_rank(1000, 0.01, CONF) == 9
    j = th.target_rank(1000, 0.05, CONF, promise=True)
    assert j is not None
    assert th.false_reject(1000, j, CONF).upper <= 0.05 < th.false_reject(1000, j + 1, CONF).upper
    with pytest.raises(ValueError):
        th.target_rank(100, 1.5, CONF)


def test_threshold_just_above_a_float32_score_rejects_exactly_the_higher_ones() -> None:
    scores = np.array([1.0, 2.0, 2.0, 3.0], np.float32)
    t = th.just_above(2.0)
    assert t > 2.0
    assert list(scores >= t) == [False, False, False, True]
    # ties: the threshold above a tied value counts every tie as accepted
    choice = th.choose_target(scores, np.empty(0), 0.4, CONF)  # j = 1 -> above X(3) = 2.0
    assert choice.point.threshold == t
    assert choice.point.frr.rejected == 1


# --------------------------------------------------------------------------- F1 and keep-all


GOOD5 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])


def test_f1_best_and_keep_all_on_a_hand_made_case() -> None:
    defects = np.array([2.5, 6.0, 7.0])
    f1 = th.choose_f1(GOOD5, defects, CONF)
    assert f1.threshold == th.just_above(5.0)
    assert (f1.caught, f1.frr.rejected, f1.f1) == (2, 0, pytest.approx(0.8))
    keep = th.choose_keep_all(GOOD5, defects, CONF)
    assert keep.threshold == th.just_above(2.0)
    assert (keep.caught, keep.recall, keep.frr.rejected) == (3, 1.0, 3)
    assert keep.f1 == pytest.approx(6 / 9)
    assert keep.frr.upper == pytest.approx(stats.beta.ppf(CONF, 4, 2))


def test_f1_ties_prefer_the_higher_threshold() -> None:
    good = np.array([1.0, 2.0, 3.0, 4.0])
    defects = np.array([2.5, 5.0])  # above 4: F1 2/3; above 2: F1 4/6 as well
    assert th.choose_f1(good, defects, CONF).threshold == th.just_above(4.0)


def test_f1_best_matches_brute_force_over_every_threshold() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        good = rng.normal(0, 1, 30).astype(np.float32)
        defects = rng.normal(1.5, 1, 12).astype(np.float32)
        values = np.concatenate([good, defects])
        grid = np.concatenate([values, np.nextafter(values, np.float32(np.inf))])
        best = max(
            th.f1_score(int((defects >= t).sum()), int((good >= t).sum()), int((defects < t).sum()))
            for t in grid
        )
        assert th.choose_f1(good, defects, CONF).f1 == pytest.approx(best)


def test_keep_all_with_a_defect_below_every_good_part_rejects_everything() -> None:
    keep = th.choose_keep_all(GOOD5, np.array([0.5, 6.0]), CONF)
    assert keep.threshold == 0.5
    assert (keep.caught, keep.frr.rejected, keep.frr.expected, keep.frr.upper) == (2, 5, 1, 1)


def test_f1_can_choose_to_reject_everything() -> None:
    # many weak defects among the good scores: flagging all beats any cut
    f1 = th.choose_f1(np.array([1.0, 2.0]), np.array([0.5, 1.5, 1.7, 1.8, 3.0]), CONF)
    assert f1.threshold == 0.5
    assert f1.recall == 1.0


# --------------------------------------------------------------------------- pixel, scale


def test_pixel_threshold_leaves_good_maps_empty() -> None:
    px = th.choose_pixel(np.array([3.0, 1.0, 2.0]), CONF)
    assert px.threshold == th.just_above(3.0)
    assert px.good_with_mask == 0.0
    assert px.frr.expected == pytest.approx(1 / 4)


def test_normalization_puts_threshold_at_half() -> None:
    good = np.array([2.0, 3.0, 4.0])
    norm = th.normalization(good, 5.0, np.array([4.5, 9.0]))
    assert norm == {"low": 2.0, "threshold": 5.0, "high": 9.0}
    assert normalise(5.0, norm) == pytest.approx(0.5)
    assert normalise(2.0, norm) == 0.0
    assert normalise(9.0, norm) == 1.0
    mirrored = th.normalization(good, 5.0, np.empty(0))
    assert mirrored["high"] == 8.0
    # every defect below the threshold: mirror too, so that high > threshold
    assert th.normalization(good, 5.0, np.array([4.0]))["high"] == 8.0
    assert th.normalization(good, 1.0, np.empty(0))["low"] == 0.0  # threshold below good


# --------------------------------------------------------------------------- held-out split


def _image_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), np.full((8, 8), i * 10, np.uint8))
    return folder


def test_split_holdout_partitions_and_leaves_the_source(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "good", 10)
    split = th.split_holdout(src, tmp_path / "split", 3, seed=1)
    held = {p.name for p in split.holdout_dir.iterdir()}
    kept = {p.name for p in split.train_dir.iterdir()}
    assert (split.n_holdout, split.n_train, len(held), len(kept)) == (3, 7, 3, 7)
    assert held.isdisjoint(kept) and held | kept == {p.name for p in src.iterdir()}
    assert len(list(src.iterdir())) == 10
    assert split.train_dir == tmp_path / "split" / "train" / "good"  # `edge-agent fit SPLIT`
    again = th.split_holdout(src, tmp_path / "split2", 0.3, seed=1)
    assert {p.name for p in again.holdout_dir.iterdir()} == held  # fraction, same seed
    with pytest.raises(UserError, match="not empty"):
        th.split_holdout(src, tmp_path / "split", 3)
    with pytest.raises(UserError, match="leave at least 1"):
        th.split_holdout(src, tmp_path / "split3", 10)
    with pytest.raises(UserError, match="fraction"):
        th.split_holdout(src, tmp_path / "split4", 2.5)


# --------------------------------------------------------------------------- plot


def test_histogram_image_draws_bars_lines_and_text() -> None:
    good = np.random.default_rng(4).normal(10, 1, 200)
    img = histogram_image(good, np.array([14.0, 15.0]), [Marker("t", 12.5, (200, 90, 0), True)])
    assert img.shape == (560, 1000, 3) and img.dtype == np.uint8
    assert np.all(img[..., :] == GOOD_BGR, axis=-1).sum() > 2000  # good bars
    assert np.all(img == (200, 90, 0), axis=-1).sum() > 500  # the threshold line
    assert (img.sum(axis=-1) < 100).sum() > 1000  # axes and text in black


# --------------------------------------------------------------------------- real bundle


@pytest.fixture
def bundle_copy(small_bundle: Path, tmp_path: Path) -> Path:
    """Calibration rewrites the manifest: never touch the shared session bundle."""
    return Path(shutil.copytree(small_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def defects_dir(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("defects")
    for d in (mtd_small / "test").iterdir():
        if d.name != "good":
            shutil.copytree(d, out / d.name)
    return out


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-agent: error: ")
    assert "\n" not in err and "Traceback" not in err
    return err


def test_refuses_training_images(
    bundle_copy: Path, mtd_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for f in sorted((mtd_small / "train" / "good").iterdir())[:5]:
        shutil.copy(f, good / f"renamed_{f.name}")  # the bytes count, not the name
    for f in sorted((mtd_small / "test" / "good").iterdir())[:3]:
        shutil.copy(f, good / f.name)
    before = (bundle_copy / "manifest.json").read_bytes()
    err = _one_line_error(capsys, ["calibrate", "--bundle", str(bundle_copy), "--good", str(good)])
    assert "5 of 8 images are training images" in err
    assert "--holdout-from" in err and "--good SPLIT/holdout" in err
    assert (bundle_copy / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--good", "{tmp}/missing"], "no such folder"),
        (["--good", "{tmp}/empty"], "no images found"),
        (["--good", "{good}", "--choose", "f1"], "needs defect samples"),
        (["--good", "{good}", "--defects", "{mtd}/test"], "'good' sub-folder"),
        (["--good", "{good}", "--false-reject", "1.5"], "--false-reject"),
        (["--good", "{good}", "--plot", "{tmp}/plot.jpg"], "PNG"),
        (["--good", "{good}", "--holdout", "5"], "--holdout-from"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    small_bundle: Path,
    mtd_small: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    fill = {"tmp": str(tmp_path), "good": str(mtd_small / "test" / "good"), "mtd": str(mtd_small)}
    argv = ["calibrate", "--bundle", str(small_bundle)] + [a.format(**fill) for a in extra]
    assert message in _one_line_error(capsys, argv)


def test_missing_bundle_is_one_line(
    mtd_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["calibrate", "--bundle", str(tmp_path), "--good", str(mtd_small / "test" / "good")]
    assert "manifest.json is missing" in _one_line_error(capsys, argv)


def test_holdout_split_mode(
    mtd_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = mtd_small / "train" / "good"
    argv = ["calibrate", "--holdout-from", str(src), "--holdout", "12", "--split-to"]
    assert main([*argv, str(tmp_path / "split"), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert (result["n_holdout"], result["n_train"]) == (12, 48)
    assert any("edge-agent fit" in line for line in out)
    assert len(list_images(tmp_path / "split" / "holdout")) == 12


@pytest.mark.slow
def test_calibrate_end_to_end(
    bundle_copy: Path,
    mtd_small: Path,
    defects_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good_dir = mtd_small / "test" / "good"
    before = load_bundle(bundle_copy)
    plot = tmp_path / "scores.png"
    argv = ["calibrate", "--bundle", str(bundle_copy), "--good", str(good_dir)]
    argv += ["--defects", str(defects_dir), "--plot", str(plot), "--json", "--device", "cpu"]

    manifest_before = (bundle_copy / "manifest.json").read_bytes()
    assert main([*argv, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not dry["written"]
    assert (bundle_copy / "manifest.json").read_bytes() == manifest_before

    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "cannot support a 1.0% false-reject target" in out  # 20 good images
    assert result["written"] and result["n_good"] == 20 and result["n_defects"] == 30
    assert set(result["operating_points"]) == {"target", "f1", "keep-all"}
    assert set(result["recall_by_type"]) == {p.name for p in defects_dir.iterdir()}

    after = load_bundle(bundle_copy)  # checksums still verify
    assert after.model_id == before.model_id
    t = after.thresholds
    assert t["image"] == result["image_threshold"] == dry["image_threshold"]
    assert t["pixel"] == result["pixel_threshold"]
    rec = t["calibrated"]
    assert (rec["n_good"], rec["n_defects"], rec["choice"]) == (20, 30, "target")
    assert rec["target_false_reject"] == 0.01 and rec["confidence"] == CONF
    assert rec["expected_false_reject"] == pytest.approx(1 / 21)
    assert rec["false_reject_upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 20))
    assert rec["good_source"] == str(good_dir.resolve()) and rec["date"].endswith("+00:00")
    assert normalise(t["image"], t["normalization"]) == pytest.approx(0.5)

    # Re-score independently (exact flat search, not calibrate's own index): no good image is
    # NG or shows a mask; recall is what was reported.
    scorer = Scorer(after, device="cpu", index="flat")
    good = scorer.score_frames([read_image(p) for p in list_images(good_dir)])
    # The good-score record the agent's drift check compares the line with.
    for q in (10, 50, 90):
        want = np.percentile(good.image_scores, q)
        assert rec["good_scores"][f"p{q}"] == pytest.approx(want, rel=1e-4)
    # FAISS's distances are not bit-reproducible across batchings and search paths (BLAS for
    # large query blocks, direct sums for small ones: measured up to 7e-6 relative), and the
    # threshold sits one float32 step above the highest good score: compare within 1e-5.
    assert good.image_scores.max() < t["image"] * (1 + 1e-5)
    assert max(scorer.anomaly_map(p).max() for p in good.patch_scores) < t["pixel"] * (1 + 1e-5)
    bad = scorer.score_frames([read_image(p) for p in list_images(defects_dir, recursive=True)])
    recall = float(np.mean(bad.image_scores >= t["image"]))
    assert recall == pytest.approx(result["operating_points"]["target"]["recall"])

    image = cv2.imread(str(plot))
    assert image is not None and image.shape == (560, 1000, 3)


@pytest.mark.slow
def test_keep_all_catches_every_defect(
    small_bundle: Path, mtd_small: Path, defects_dir: Path
) -> None:
    cal = calibrate(
        small_bundle, mtd_small / "test" / "good", defects_dir, choose="keep-all", device="cpu"
    )
    assert cal.chosen is cal.keep_all
    assert np.all(cal.defects.scores >= cal.chosen.threshold)
    assert cal.chosen.recall == 1.0
    assert cal.f1 is not None and cal.f1.f1 >= max(p.f1 for p in cal.points)
    assert cal.target.point.threshold > cal.good.scores.max()
