"""Non-square inputs: a wide bundle localises a defect at the right spot of the original frame."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.decide.decision import Thresholds, decide
from edge_agent.images import read_image
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer

from .conftest import require_mtd

TILE = 128  # training tiles are laid side by side in threes: a 128 x 384 (h x w) "line scan"


def _strip(files: list[Path], tile: int) -> np.ndarray:
    return np.hstack([cv2.resize(read_image(f), (tile, tile)) for f in files])


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_agent.export.fit import FitOptions, fit

    goods = sorted((require_mtd() / "train" / "good").iterdir())[:60]
    data = tmp_path_factory.mktemp("wide") / "good"
    data.mkdir()
    for i in range(0, 60, 3):
        cv2.imwrite(str(data / f"strip{i:03d}.png"), _strip(goods[i : i + 3], TILE))
    out = data.parent / "bundle"
    fit(data, out, FitOptions(image_size=(TILE, 3 * TILE), coreset=0.1, progress=False))
    return out


@pytest.mark.slow
def test_wide_bundle_keeps_the_aspect_ratio(wide_bundle: Path) -> None:
    b = load_bundle(wide_bundle)
    assert b.input_size == (128, 384)
    assert b.grid == (16, 48)


@pytest.mark.slow
@pytest.mark.parametrize("centre", [(80, 620), (180, 130)])  # (y, x) in frame pixels
def test_defect_is_localised_in_frame_coordinates(
    wide_bundle: Path, centre: tuple[int, int]
) -> None:
    # The camera frame is twice the model's input size in each direction; a dark scratch is
    # drawn at a known spot. The anomaly map, mapped back to the frame, must peak there.
    goods = sorted((require_mtd() / "test" / "good").iterdir())[:3]
    frame = _strip(goods, 2 * TILE)  # 256 x 768
    y, x = centre
    cv2.ellipse(frame, (x, y), (22, 9), 35, 0, 360, (15, 15, 15), thickness=-1)

    scorer = Scorer(load_bundle(wide_bundle), device="cpu")
    scores = scorer.score_frames([frame])
    amap = scorer.anomaly_map(scores.patch_scores[0])
    assert amap.shape == (128, 384)
    peak = float(amap.max())
    thresholds = Thresholds(image=0.5 * float(scores.image_scores[0]), pixel=0.8 * peak)
    decision = decide(float(scores.image_scores[0]), amap, frame.shape[:2], thresholds)

    assert decision.verdict == "NG"
    assert decision.anomaly_map is not None and decision.anomaly_map.shape == (256, 768)
    py, px = np.unravel_index(np.argmax(decision.anomaly_map), decision.anomaly_map.shape)
    assert abs(py - y) <= 30 and abs(px - x) <= 30, f"peak at {(py, px)}, defect at {centre}"
    bx, by, bw, bh = decision.regions[0].as_dict()["bbox"]
    assert bx <= x <= bx + bw and by <= y <= by + bh
