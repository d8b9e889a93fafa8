"""The agent's per-inspection path (agent/inspect.py): a region that does not fit is that
inspection's ERROR with the reason, inspections sharing a bundle are scored in one batch, and
answers come back in frame pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import inspect
from edge_agent.agent.models import Model, Run
from edge_agent.decide.decision import Thresholds
from edge_agent.images import list_images, read_image
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.station.recipes import Inspection


@pytest.fixture(scope="module")
def model(small_bundle: Path) -> Model:
    bundle = load_bundle(small_bundle)
    return Model(bundle, Scorer(bundle, device="cpu", threads=2))


def _run(model: Model, name: str, roi: tuple[int, int, int, int] | None) -> Run:
    # A low threshold: every answer NG, so maps and regions are made.
    return Run(Inspection(name, "cam", Path("b"), roi=roi), model, Thresholds(1.0, 1.0))


def test_regions_that_fit_are_scored_in_one_batch_and_answer_in_frame_pixels(
    model: Model, mtd_small: Path
) -> None:
    image = np.ascontiguousarray(read_image(list_images(mtd_small / "test" / "good")[0]))
    h, w = image.shape[:2]
    left = _run(model, "left", (0, 0, w // 2, h))
    right = _run(model, "right", (w // 2, 0, w - w // 2, h))
    off = _run(model, "off", (w - 10, 0, 20, h))  # past the frame's right edge
    tasks = [inspect.prepare(image, r) for r in (left, right, off)]
    assert tasks[2].error is not None and "outside" in tasks[2].error
    assert tasks[2].prepared is None
    calls: list[int] = []
    real = model.scorer.score

    def counting(batch, stage_s=None, keep=None):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        return real(batch, stage_s, keep)

    model.scorer.score = counting  # type: ignore[method-assign]
    try:
        assert inspect.score(tasks, {}) is None
    finally:
        del model.scorer.score
    assert calls == [2], "the two regions of one bundle: one batch"
    assert [t.verdict for t in tasks] == ["NG", "NG", "ERROR"]
    assert inspect.worst_task(tasks) is tasks[2], "ERROR > NG"
    shifted = inspect.in_frame(tasks[1], (h, w))
    assert shifted is not None and shifted.anomaly_map is not None
    assert shifted.anomaly_map.shape == (h, w)
    assert (shifted.anomaly_map[:, : w // 2] == 0).all(), "the left half is not this region's"
    for own, region in zip(tasks[1].decision.regions, shifted.regions, strict=True):  # type: ignore[union-attr]
        assert (region.x, region.y) == (own.x + w // 2, own.y)
