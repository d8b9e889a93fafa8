"""`edge-agent teach`: the covering-radius selection against brute force, and teach, history,
rollback, calibrate's refusal and failures on a real bundle (MTD)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.cli import main
from edge_agent.errors import UserError
from edge_agent.images import list_images, read_image
from edge_agent.model.bundle import load_bundle, read_manifest, write_manifest
from edge_agent.model.scorer import Scorer
from edge_agent.model.teach import estimated_covering_radius, extend_cover, nearest_distances
from edge_agent.tools.teach import rollback, teach

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the maths


def _brute_cover(f: np.ndarray, bank: np.ndarray, r: float) -> list[int]:
    """extend_cover's rule written out plainly: farthest uncovered patch first."""
    rows = [list(b) for b in bank.astype(np.float64)]
    chosen: list[int] = []
    while True:
        d = [min(float(np.linalg.norm(x - np.array(b))) for b in rows) for x in f]
        i = int(np.argmax(d))
        if d[i] <= r * (1 + 1e-6):
            return chosen
        chosen.append(i)
        rows.append(list(f[i]))


def test_extend_cover_matches_brute_force_and_covers() -> None:
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(40, 6)).astype(np.float32)
    f = np.vstack([rng.normal(size=(60, 6)), rng.normal(loc=4.0, size=(30, 6))]).astype(np.float32)
    for r in (0.5, 1.5, 3.0):
        chosen = extend_cover(f, bank, r)
        assert chosen.tolist() == _brute_cover(f.astype(np.float64), bank, r)
        grown = np.vstack([bank, f[chosen]])
        assert nearest_distances(f, grown).max() <= r * (1 + 1e-6)
        # added rows are farther than r from the bank and from each other
        assert (nearest_distances(f[chosen], bank) > r).all()
        if len(chosen) > 1:
            gaps = np.linalg.norm(f[chosen][:, None] - f[chosen][None], axis=2)
            assert gaps[~np.eye(len(chosen), dtype=bool)].min() > r
    assert extend_cover(bank, bank, 1e-3).size == 0  # the bank covers itself (up to rounding)
    assert extend_cover(f, bank, 1e9).size == 0


def test_nearest_distances_is_exact_far_from_the_origin() -> None:
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(50, 8)) + 1e4
    q = rng.normal(size=(20, 8)) + 1e4
    brute = np.linalg.norm(q[:, None] - bank[None], axis=2).min(axis=1)
    np.testing.assert_allclose(nearest_distances(q, bank), brute, rtol=1e-9)


def test_estimated_covering_radius_is_the_bank_separation() -> None:
    bank = np.array([[0, 0], [3, 0], [0, 4], [10, 10], [10, 10]], dtype=np.float32)
    # duplicates (distance 0) are left out; the closest distinct pair is 3 apart
    assert estimated_covering_radius(bank) == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError):
        estimated_covering_radius(np.ones((3, 2), dtype=np.float32))


# --------------------------------------------------------------------------- a real bundle


def _digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (history included) -> SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _scorer(bundle: Path) -> Scorer:
    return Scorer(load_bundle(bundle), device="cpu", index="flat")


def _score(scorer: Scorer, paths: list[Path]):
    s = scorer.score(np.stack([scorer.prepare(read_image(p)) for p in paths]))
    return s.image_scores, s.patch_scores


@pytest.fixture(scope="module")
def setup(mtd_small: Path, calibrated_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of calibrated_bundle, the highest-scoring good test image in its own folder,
    and a few other images; then that image taught in place."""
    root = tmp_path_factory.mktemp("teach")
    bundle = root / "bundle"
    shutil.copytree(calibrated_bundle, bundle)
    good = list_images(mtd_small / "test" / "good")
    before, _ = _score(_scorer(bundle), good)
    worst = int(np.argmax(before))
    folder = root / "rejected"
    folder.mkdir()
    shutil.copy(good[worst], folder / good[worst].name)
    others = [p for i, p in enumerate(good) if i != worst][:5]
    others += list_images(mtd_small / "test" / "crack")[:2]
    old_scores, old_patches = _score(_scorer(bundle), others)
    original = {name: (bundle / name).read_bytes() for name in ("bank.npy", "manifest.json")}
    result = teach(bundle, folder, device="cpu")
    return {
        "bundle": bundle,
        "folder": folder,
        "image": folder / good[worst].name,
        "before": float(before[worst]),
        "others_max": float(np.delete(before, worst).max()),
        "others": others,
        "old_scores": old_scores,
        "old_patches": old_patches,
        "original": original,
        "result": result,
        "root": root,
    }


def test_fit_records_the_covering_radius(small_bundle: Path, mtd_small: Path) -> None:
    radius = read_manifest(small_bundle)["bank"]["covering_radius"]
    bundle = load_bundle(small_bundle)
    scorer = Scorer(bundle, device="cpu", index="flat")
    train = list_images(mtd_small / "train" / "good")[:6]
    feats = scorer.features(np.stack([scorer.prepare(read_image(p)) for p in train]))
    d = nearest_distances(feats.reshape(-1, bundle.dim), bundle.bank)
    assert 0 < d.max() <= radius * (1 + 1e-4)  # a training patch is never farther than r


def test_taught_image_drops_below_the_other_good_images(setup) -> None:
    r = setup["result"]
    assert setup["before"] > setup["others_max"]  # it was the outlier among good images
    assert r.rows_added > 0 and r.bank_size[1] == r.bank_size[0] + r.rows_added
    (after,), _ = _score(_scorer(setup["bundle"]), [setup["image"]])
    assert after == pytest.approx(float(r.after[0]), rel=1e-5)
    assert after <= r.radius * (1 + 1e-4)  # all its patches are within r of the bank now
    assert after < setup["others_max"] < setup["before"]
    assert after < 30.0 < setup["before"]  # calibrated_bundle's image threshold: now OK


def test_other_images_never_score_higher(setup) -> None:
    """The bank only grew, so every patch's nearest distance can only fall (Eq. 7 image
    scores can move either way a little, since bank_knn neighbourhoods change: see report)."""
    new_scores, new_patches = _score(_scorer(setup["bundle"]), setup["others"])
    assert (new_patches <= setup["old_patches"] + 1e-4).all()
    # Holds on these images (measured: unchanged); not a theorem under Eq. 7, see above.
    assert (new_scores <= setup["old_scores"] + 1e-4).all()


def test_teaching_again_adds_nothing(setup, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = setup["bundle"]
    before = _digest(bundle)
    assert main(["teach", "--bundle", str(bundle), "--good", str(setup["folder"])]) == 0
    assert "nothing to add" in capsys.readouterr().out
    assert _digest(bundle) == before


def test_teaching_a_training_image_adds_few_rows(
    small_bundle: Path, mtd_small: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(small_bundle, bundle)
    folder = tmp_path / "train_img"
    folder.mkdir()
    for p in list_images(mtd_small / "train" / "good")[:2]:
        shutil.copy(p, folder / p.name)
    result = teach(bundle, folder, out=tmp_path / "out", device="cpu")
    assert result.rows_added <= 3  # covered by fit's radius up to float32 rounding


def test_manifest_history_and_run_still_loads(setup) -> None:
    bundle, r = setup["bundle"], setup["result"]
    m = read_manifest(bundle)
    assert m["model_id"] == r.model_id != r.previous_model_id
    entry = m["history"][-1]
    sha = hashlib.sha256(setup["image"].read_bytes()).hexdigest()
    assert entry["previous_model_id"] == r.previous_model_id
    assert entry["images"] == [{"name": setup["image"].name, "sha256": sha}]
    assert entry["rows_added"] == r.rows_added
    assert m["calibration_stale"] is True
    loaded = load_bundle(bundle)  # what run loads: the new fields pass validation
    assert loaded.thresholds["image"] == 30.0 and loaded.thresholds["pixel"] == 28.0
    assert len(loaded.bank) == m["bank"]["size"] == r.bank_size[1]
    assert loaded.bank_knn is not None and loaded.bank_knn.shape[0] == len(loaded.bank)
    assert (bundle / ".history" / r.previous_model_id / "bank.npy").is_file()
    assert sha in loaded.training_image_hashes()


def test_calibrate_refuses_a_taught_image(setup) -> None:
    from edge_agent.calibrate.command import calibrate

    with pytest.raises(UserError, match="training images of this bundle"):
        calibrate(setup["bundle"], setup["folder"], None, device="cpu")


def test_teach_does_not_import_torch(setup, small_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(small_bundle, bundle)
    code = (
        "import sys\nfrom edge_agent.cli import main\n"
        f"rc = main(['teach', '--bundle', {str(bundle)!r}, '--good', {str(setup['folder'])!r}])\n"
        "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ROWS', __import__('json').load(open(sys.argv[1]))['history'][-1]['rows_added'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(bundle / "manifest.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ROWS" in proc.stdout and "ROWS 0" not in proc.stdout  # it really taught


def test_failures_are_one_line_and_change_nothing(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = setup["bundle"]
    before = _digest(bundle)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(setup["others"][0], corrupt / "fine.jpg")
    (corrupt / "broken.jpg").write_bytes(setup["others"][1].read_bytes()[:200])
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    cv2.imwrite(str(tiny / "tiny.png"), np.full((10, 10, 3), 90, np.uint8))
    cases = [
        (["--bundle", str(bundle), "--good", str(corrupt)], "broken.jpg"),
        (["--bundle", str(bundle), "--good", str(tiny)], "too small"),
        (["--bundle", str(bundle), "--good", str(tmp_path / "missing")], "no such folder"),
        (["--bundle", str(tmp_path), "--good", str(setup["folder"])], "manifest.json"),
    ]
    for args, needle in cases:
        assert main(["teach", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert _digest(bundle) == before


def test_archive_folder_teaches_the_original_half(setup, tmp_path: Path) -> None:
    from edge_agent.decide.archive import ArchiveSettings, RejectArchive

    archive = RejectArchive(ArchiveSettings(dir=tmp_path / "archive", min_free_mb=0))
    archive.start()
    frame = read_image(setup["others"][0])
    amap = np.random.default_rng(0).random(frame.shape[:2]).astype(np.float32)
    verdict = {"verdict": "NG", "timestamp": 1_700_000_000_000, "camera": "c", "sequence": 1}
    assert archive.submit(frame, verdict, amap=amap, pixel_threshold=0.5)
    archive.close()
    from edge_agent.tools.teach import read_good

    (image,) = read_good(tmp_path / "archive", (224, 224))
    assert image.bgr.shape == frame.shape  # the original half, not original | overlay
    assert np.abs(image.bgr.astype(int) - frame).mean() < 6  # a JPEG copy of it
    out = tmp_path / "taught"
    result = teach(setup["bundle"], tmp_path / "archive", out=out, device="cpu")
    assert result.rows_added > 0 and load_bundle(out).model_id == result.model_id


def test_old_bundle_uses_the_estimated_radius(small_bundle: Path, setup, tmp_path: Path) -> None:
    bundle = tmp_path / "old"
    shutil.copytree(small_bundle, bundle)
    m = read_manifest(bundle)
    del m["bank"]["covering_radius"]
    write_manifest(bundle, m)
    result = teach(bundle, setup["folder"], device="cpu")
    assert result.radius_source == "estimate"
    assert result.radius == pytest.approx(estimated_covering_radius(load_bundle(bundle).bank))


def test_rollback_restores_the_previous_version(setup, capsys: pytest.CaptureFixture[str]) -> None:
    # last in this module: it undoes the module's teach
    bundle, r = setup["bundle"], setup["result"]
    assert main(["teach", "--bundle", str(bundle), "--rollback"]) == 0
    assert r.previous_model_id in capsys.readouterr().out
    for name, data in setup["original"].items():
        assert (bundle / name).read_bytes() == data
    assert load_bundle(bundle).thresholds["image"] == 30.0
    assert not (bundle / ".history" / r.previous_model_id).exists()
    assert main(["teach", "--bundle", str(bundle), "--rollback"]) == 2
    assert "no previous version" in capsys.readouterr().err
    with pytest.raises(UserError):
        rollback(bundle)
