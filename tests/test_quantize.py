"""fit --precision int8 (export/quantize.py): an int8 trunk, a float tail, a bank of the int8
graph's own features, and the float graph's accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_agent.export import fit as fit_module
from edge_agent.export.fit import FitOptions, fit
from edge_agent.export.quantize import TRUNK_PREFIX, calibration_subset, deviation
from edge_agent.images import list_images, read_image, resize
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.model.selftest import self_test

SIZE = (224, 224)


@pytest.fixture(scope="session")
def int8_bundle(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_bundle's options (conftest) at the default precision, int8."""
    out = tmp_path_factory.mktemp("bundles") / "int8"
    opts = FitOptions(
        backbone="efficientnet_lite0",
        image_size=SIZE,
        coreset=0.05,
        image_sigma=0.0,
        reweight_k=9,
        progress=False,
    )
    assert opts.precision == "int8"  # the default: this fixture tests what fit makes
    fit(mtd_small, out, opts)
    return out


def test_calibration_subset_spreads_over_the_folder() -> None:
    assert calibration_subset(5, 8).tolist() == [0, 1, 2, 3, 4]
    picked = calibration_subset(749, 64)
    assert len(picked) == 64 and picked[0] == 0 and picked[-1] == 748
    gaps = np.diff(picked)
    assert gaps.min() >= 11 and gaps.max() <= 12


def test_deviation_is_relative_rms() -> None:
    ref = np.array([[3.0, 4.0]])
    assert deviation(ref, ref) == 0.0
    # diff (0.3, 0.4): RMS 0.354 over the reference's 3.54
    assert deviation(ref, ref * 1.1) == pytest.approx(0.1)


def test_int8_graph_quantizes_the_trunk_and_keeps_the_tail_float(int8_bundle: Path) -> None:
    model = onnx.load(str(int8_bundle / "model.onnx"))
    produced = {out: n for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    trunk = [n for n in convs if n.name.startswith(TRUNK_PREFIX)]
    assert trunk and trunk == convs  # Lite0's default tail (pooling, no projection) has none

    def fed_by_dequantize(node: onnx.NodeProto) -> bool:
        return all(produced[x].op_type == "DequantizeLinear" for x in node.input[:2])

    assert all(fed_by_dequantize(n) for n in trunk)
    # The aggregation behind the trunk (pooling, upsampling) stays float: nothing quantizes
    # what it computes.
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    tail = [n for n in model.graph.node if n.op_type in ("AveragePool", "Resize")]
    assert tail
    for node in tail:
        assert "QuantizeLinear" not in consumers.get(node.output[0], []), node.name
    m = load_bundle(int8_bundle).manifest
    assert m["features"]["precision"] == "int8"
    assert 0 < m["features"]["int8_deviation"] < fit_module.MAX_DEVIATION


def test_bank_rows_are_the_int8_graphs_own_features(int8_bundle: Path, mtd_small: Path) -> None:
    """Every bank row is a patch of a training image as the int8 graph sees it, so the agent
    (which runs that graph) compares like with like; a bank built from the float graph's
    features would miss these by the quantization error (about 10% of a feature's size)."""
    bank = load_bundle(int8_bundle).bank
    sess = ort.InferenceSession(str(int8_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    frames = np.stack([resize(read_image(p), SIZE) for p in list_images(mtd_small / "train/good")])
    feats = np.concatenate(
        [sess.run(None, {"frames": frames[i : i + 16]})[0] for i in range(0, len(frames), 16)]
    ).reshape(-1, bank.shape[1])
    bank, feats = bank.astype(np.float64), feats.astype(np.float64)  # no GEMM cancellation
    d2 = (bank**2).sum(1)[:, None] - 2 * bank @ feats.T + (feats**2).sum(1)[None, :]
    nearest = np.sqrt(np.maximum(d2.min(axis=1), 0))
    assert nearest.max() < 1e-3 * np.abs(bank).max(), nearest.max()


@pytest.mark.slow
def test_int8_bundle_scores_as_well_as_float(
    int8_bundle: Path, small_bundle: Path, mtd_small: Path
) -> None:
    from edge_agent.tools.evaluate import evaluate

    as_float, _ = evaluate(small_bundle, mtd_small)
    as_int8, _ = evaluate(int8_bundle, mtd_small)
    # The float bundle's floors (test_fit), and within a few test images of it.
    assert as_int8["image_auroc"] > 0.62 and as_int8["pixel_auroc"] > 0.72 and as_int8["pro"] > 0.38
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert abs(as_int8[key] - as_float[key]) < 0.05, (key, as_int8[key], as_float[key])


def test_int8_bundle_passes_the_agents_self_test(int8_bundle: Path) -> None:
    self_test(Scorer(load_bundle(int8_bundle), device="cpu"))


def test_fit_refuses_a_graph_that_does_not_quantize(
    mtd_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.errors import CheckFailed

    monkeypatch.setattr(fit_module, "MAX_DEVIATION", 1e-6)
    few = tmp_path / "good"
    few.mkdir()
    for p in list_images(mtd_small / "train/good")[:6]:
        (few / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CheckFailed, match="--precision float32"):
        fit(
            few,
            tmp_path / "b",
            FitOptions(backbone="efficientnet_lite0", image_size=(64, 64), progress=False),
        )
    assert not (tmp_path / "b").exists()


def test_tiled_calibration_sees_at_most_calibration_images_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibrator holds every run's tensors until the end, so a tiled fit calibrates on
    CALIBRATION_IMAGES tiles, not on every tile of CALIBRATION_IMAGES frames."""
    import cv2

    from edge_agent.export import quantize

    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # 12 frames x 8 tiles of 64 px: 96 tiles
        cv2.imwrite(str(good / f"{i}.png"), rng.integers(0, 256, (128, 256, 3), dtype=np.uint8))
    # 40 inputs at most (the product: CALIBRATION_IMAGES, 64), fewer than the 96 tiles
    monkeypatch.setattr(
        fit_module, "calibration_subset", lambda n: quantize.calibration_subset(n, 40)
    )
    seen: list[tuple[int, ...]] = []
    real = fit_module.quantize_trunk

    def counting(src, dst, inputs, name):  # type: ignore[no-untyped-def]
        def spy():
            for batch in inputs():
                seen.append(batch.shape)
                yield batch

        real(src, dst, spy, name)

    monkeypatch.setattr(fit_module, "quantize_trunk", counting)
    opts = FitOptions(
        backbone="efficientnet_lite0", image_size=(128, 256), tile=(64, 64), overlap=0,
        coreset=0.1, progress=False,
    )  # fmt: skip
    fit(good, tmp_path / "b", opts)
    assert sum(s[0] for s in seen) == 40 and all(s[1:3] == (64, 64) for s in seen), seen
