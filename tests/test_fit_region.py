"""fit --roi / --ignore: a bundle learns one region of the frame and never the pixels its mask
ignores; the bundle records both, and every tool that scores through it cuts and fills the
same way (issue 25: "a defect painted only inside the ignored area leaves the score equal to
the clean image's; painted outside it is found")."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.agent.config import load_config
from edge_agent.agent.service import load_station
from edge_agent.cli import main
from edge_agent.errors import UserError
from edge_agent.export.fit import FitOptions, fit
from edge_agent.images import list_images, read_image
from edge_agent.model.bundle import IGNORE_FILE, load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.station.regions import keep_cells

FRAME = (240, 320)  # height, width of every frame
ROI = (40, 30, 240, 180)  # x, y, w, h
IGNORED = (slice(40, 120), slice(20, 110))  # rows, columns of the ROI: a "date code"


def _frames(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for path in list_images(src):
        cv2.imwrite(str(dest / f"{path.stem}.png"), cv2.resize(read_image(path), FRAME[::-1]))
    return dest


@pytest.fixture(scope="module")
def region_bundle(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("region")
    _frames(mtd_small / "train" / "good", root / "data" / "train" / "good")
    mask = np.zeros((ROI[3], ROI[2]), dtype=np.uint8)
    mask[IGNORED] = 255
    cv2.imwrite(str(root / "mask.png"), mask)
    out = root / "bundle"
    opts = FitOptions(
        backbone="efficientnet_lite0",
        image_size=(224, 224),
        coreset=0.05,
        precision="float32",
        progress=False,
        roi=ROI,
        ignore=root / "mask.png",
    )
    fit(root / "data", out, opts)
    return out


def _paint(image: np.ndarray, centre_in_roi: tuple[int, int]) -> np.ndarray:
    """A dark pit of 12 px radius at a point of the ROI."""
    out = image.copy()
    x, y = ROI[0] + centre_in_roi[0], ROI[1] + centre_in_roi[1]
    cv2.circle(out, (x, y), 12, (10, 10, 10), -1)
    return out


def test_the_bundle_records_its_region_and_never_learns_ignored_patches(
    region_bundle: Path,
) -> None:
    bundle = load_bundle(region_bundle)
    assert bundle.roi == ROI
    assert bundle.ignore is not None and bundle.ignore.shape == (ROI[3], ROI[2])
    assert bundle.ignore[IGNORED].all() and bundle.ignore.sum() == 80 * 90
    assert IGNORE_FILE in bundle.manifest["files"], "checksummed with the other files"
    kept = int(keep_cells(bundle.ignore, bundle.grid).sum())
    n_images = bundle.manifest["training"]["n_images"]
    assert bundle.manifest["bank"]["patches"] == n_images * kept < n_images * np.prod(bundle.grid)


def test_a_defect_in_the_ignored_area_changes_nothing_and_one_outside_is_found(
    region_bundle: Path, mtd_small: Path, tmp_path: Path
) -> None:
    scorer = Scorer(load_bundle(region_bundle), device="cpu", threads=2)
    goods = [
        cv2.resize(read_image(p), FRAME[::-1]) for p in list_images(mtd_small / "test" / "good")
    ]
    clean = scorer.score_frames(goods).image_scores
    inside = scorer.score_frames([_paint(g, (65, 80)) for g in goods]).image_scores
    outside = scorer.score_frames([_paint(g, (180, 120)) for g in goods]).image_scores
    np.testing.assert_allclose(inside, clean, rtol=1e-6)
    assert (outside > clean * 1.2).all(), (outside / clean).min()
    assert np.median(outside) > clean.max(), "found above every clean part's score"
    # Outside the region a defect is not this inspection's business at all.
    beyond = scorer.score_frames([_paint(g, (-30, -20)) for g in goods]).image_scores
    np.testing.assert_allclose(beyond, clean, rtol=1e-6)
    # A frame that does not contain the region cannot be scored: said, not guessed.
    with pytest.raises(Exception, match="outside"):
        scorer.score_frames([goods[0][:100, :100]])


def test_the_agent_takes_the_bundles_region_and_refuses_another(
    region_bundle: Path, tmp_path: Path
) -> None:
    def station(extra: str) -> Path:
        path = tmp_path / "station.yaml"
        path.write_text(
            "thresholds: {image: 50.0, pixel: 50.0}\n"
            f"cameras: [{{id: cam, source: {tmp_path}}}]\n"
            "recipes:\n  a:\n    number: 1\n    inspections:\n"
            f"      - {{id: cap, camera: cam, bundle: {region_bundle}{extra}}}\n"
            f"mqtt: {{spool_dir: {tmp_path / 'spool'}}}\n"
        )
        return path

    from edge_agent.agent.models import bind

    config = load_config(station(""))
    models = load_station(config)
    (run,) = bind(config, config.station.recipes["a"], models)["cam"]
    assert run.spec.roi == ROI and run.spec.ignore is not None
    config = load_config(station(f", roi: {list(ROI)}"))
    assert bind(config, config.station.recipes["a"], load_station(config))["cam"][0].spec.roi == ROI
    config = load_config(station(", roi: [0, 0, 100, 100]"))
    with pytest.raises(
        UserError, match=r"inspections\[0\]\.roi: \[0, 0, 100, 100\] is not the ROI"
    ):
        bind(config, config.station.recipes["a"], load_station(config))


def test_fit_region_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in (
        (["--roi", "1,2,3"], "--roi takes x,y,width,height"),
        (["--roi", "0,0,0,5"], "width and height positive"),
        (["--ignore", "m.png", "--augment", "flips"], "--ignore and --augment"),
    ):
        code = main(["fit", str(tmp_path), "--out", str(tmp_path / "b"), *args])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err
