"""Verdicts from scores: threshold rule, normalisation, regions in frame coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.decide.decision import (
    NG,
    OK,
    Thresholds,
    decide,
    frame_map,
    resolve_thresholds,
    verdict_for,
)
from edge_agent.publish.contract import ERROR


def map_with_blob(size=(224, 224), box=(100, 40, 30, 20), value=5.0) -> np.ndarray:
    amap = np.full(size, 0.5, dtype=np.float32)
    x, y, w, h = box
    amap[y : y + h, x : x + w] = value
    return amap


def test_threshold_is_inclusive_and_normalises_to_half() -> None:
    t = Thresholds(image=2.0, pixel=1.5)
    at = decide(2.0, None, (10, 10), t)
    below = decide(np.nextafter(2.0, 0.0), None, (10, 10), t)
    assert at.verdict == NG and below.verdict == OK
    assert at.normalised_score == pytest.approx(0.5)
    assert decide(0.0, None, (10, 10), t).normalised_score == 0.0
    assert decide(9.0, None, (10, 10), t).normalised_score == 1.0


def test_calibrated_scale_is_used_and_override_keeps_half_at_threshold() -> None:
    norm = {"low": 1.0, "threshold": 2.0, "high": 4.0}
    t = resolve_thresholds({"image": 2.0, "pixel": 1.8, "normalization": norm}, None, None)
    assert t is not None
    assert decide(3.0, None, (4, 4), t).normalised_score == pytest.approx(0.75)
    # A config override moves the threshold: it, not the bundle's, maps to 0.5.
    over = resolve_thresholds({"image": 2.0, "pixel": 1.8, "normalization": norm}, 3.0, None)
    assert over is not None and over.image == 3.0 and over.pixel == 1.8
    assert decide(3.0, None, (4, 4), over).normalised_score == pytest.approx(0.5)


def test_missing_thresholds_resolve_to_none() -> None:
    assert resolve_thresholds({}, None, None) is None
    assert resolve_thresholds({}, 2.0, None) is None
    assert resolve_thresholds({"image": 2.0}, None, 1.0) == Thresholds(2.0, 1.0, None)
    with pytest.raises(ValueError):
        Thresholds(image=0.0, pixel=1.0)


def test_regions_are_in_original_frame_pixels() -> None:
    amap = map_with_blob()  # blob at x=100..129, y=40..59 in a 224x224 map
    frame_hw = (448, 896)  # twice as tall, four times as wide
    d = decide(6.0, amap, frame_hw, Thresholds(image=2.0, pixel=2.0))
    assert d.verdict == NG
    assert d.anomaly_map is not None and d.anomaly_map.shape == frame_hw
    assert len(d.regions) == 1
    r = d.regions[0]
    # Scaled box (400, 80, 120, 40), give or take the bilinear edge.
    assert abs(r.x - 400) <= 4 and abs(r.y - 80) <= 2
    assert abs(r.width - 120) <= 8 and abs(r.height - 40) <= 4
    assert r.peak == pytest.approx(5.0)


def test_ok_frames_report_no_regions_even_over_the_pixel_threshold() -> None:
    amap = map_with_blob(value=3.0)
    d = decide(1.0, amap, (224, 224), Thresholds(image=2.0, pixel=2.0))
    assert d.verdict == OK and d.regions == () and d.anomaly_map is None


def test_region_count_is_capped() -> None:
    amap = np.zeros((64, 64), dtype=np.float32)
    amap[::4, ::4] = 9.0  # 256 isolated speckles
    d = decide(9.0, amap, (64, 64), Thresholds(image=1.0, pixel=1.0), max_regions=5)
    assert len(d.regions) == 5


def test_frame_map_keeps_same_size_and_resizes_others() -> None:
    amap = map_with_blob()
    assert frame_map(amap, (224, 224)) is not None
    assert frame_map(amap, (224, 224)).shape == (224, 224)
    assert frame_map(amap, (100, 300)).shape == (100, 300)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf"), np.float32("nan")])
def test_a_non_finite_score_is_never_ok(score: float) -> None:
    # nan >= threshold is False: without the check a broken model passes every part.
    t = Thresholds(image=2.0, pixel=1.5, normalization={"low": 1.0, "threshold": 2.0, "high": 4.0})
    assert verdict_for(score, t) == ERROR
    d = decide(score, map_with_blob(), (224, 224), t)
    assert d.verdict == ERROR and d.is_error and not d.is_ng
    assert d.error is not None and d.error.startswith("non-finite score")
    assert d.regions == () and np.isnan(d.normalised_score)
