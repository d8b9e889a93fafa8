"""fit --precision int8 (export/quantize.py): an int8 trunk, a float tail, a bank of the int8
graph's own features, and the float graph's accuracy."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_agent.errors import CheckFailed
from edge_agent.export import fit as fit_module
from edge_agent.export.fit import FitOptions, choose_precision, fit
from edge_agent.export.quantize import (
    CALIBRATION_BATCH,
    TRUNK_PREFIX,
    calibration_batch,
    calibration_subset,
    deviation,
)
from edge_agent.images import list_images, read_image, resize
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.model.selftest import self_test

SIZE = (224, 224)


@pytest.fixture(scope="session")
def int8_bundle(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_bundle's options (conftest) at the default precision, auto: int8 on MTD."""
    out = tmp_path_factory.mktemp("bundles") / "int8"
    opts = FitOptions(
        backbone="efficientnet_lite0",
        image_size=SIZE,
        coreset=0.05,
        image_sigma=0.0,
        reweight_k=9,
        progress=False,
    )
    assert opts.precision == "auto"  # the default: this fixture tests what fit makes
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
    # The residual adds are Sums (float_residual_adds): ONNX Runtime fuses an Add between
    # dequantized inputs into its CPU-dependent QLinearAdd, and no Sum.
    sums = [n for n in model.graph.node if n.op_type == "Sum"]
    assert sums and all(fed_by_dequantize(n) for n in sums)
    assert not [n for n in model.graph.node if n.op_type == "Add" and fed_by_dequantize(n)]
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
    assert m["features"]["precision_choice"].startswith("auto: int8 features within")


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


def test_choose_precision_keeps_int8_where_it_holds_and_never_refuses_by_default() -> None:
    limit = fit_module.MAX_DEVIATION
    for asked in ("auto", "int8"):
        held = choose_precision(asked, limit)
        assert held.precision == "int8" and held.int8_deviation == limit
    for dev in (limit * 1.001, math.nan, math.inf):
        fallback = choose_precision("auto", dev)
        assert fallback.precision == "float32" and "float32 graph is kept" in fallback.reason
        with pytest.raises(CheckFailed, match="--precision float32"):
            choose_precision("int8", dev)


def test_calibration_batches_hold_at_most_the_default_inputs_pixels() -> None:
    assert calibration_batch(288, 288) == calibration_batch(64, 64) == CALIBRATION_BATCH == 8
    assert calibration_batch(448, 448) == 3  # 8 x 288^2 / 448^2 = 3.3
    assert calibration_batch(2048, 2048) == 1


def _faint_set(folder: Path, n: int = 12, side: int = 128) -> Path:
    """Good images of a flat grey surface with one grey level of per-pixel noise: a
    high-frequency texture at the lowest contrast. Lite0's int8 features deviate from the
    float graph's by 0.36-0.37 RMS on it (at most 0.3 hold); textures of more contrast measured
    0.08-0.25 (uniform, binary and speckle noise, checkerboards)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        grey = np.clip(rng.normal(128, 1.0, (side, side)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:02d}.png"), grey)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def faint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _faint_set(tmp_path_factory.mktemp("faint") / "good")


FAINT_FIT = ("--backbone", "efficientnet_lite0", "--coreset", "0.1", "--no-progress")


def test_default_fit_falls_back_to_float32_where_int8_does_not_hold(
    faint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    proc = _cli("fit", str(faint), "--out", str(out), *FAINT_FIT)
    assert proc.returncode == 0, proc.stderr
    m = load_bundle(out).manifest["features"]
    assert m["precision"] == "float32"
    assert m["int8_deviation"] > fit_module.MAX_DEVIATION  # measured, not forced
    assert m["precision_choice"].startswith("auto: int8 features deviate")
    # The summary says what it fell back to and why.
    assert f"precision float32: {m['precision_choice']}" in proc.stdout.splitlines()
    model = onnx.load(str(out / "model.onnx"))  # the float graph, not the int8 one
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert not list(out.glob("model.*.onnx"))  # no int8 or float copy left beside it
    # Quiet: the product's lines, not the quantizer's bookkeeping (it widened weight scales
    # here: the -v run below shows them).
    assert "Increased scale" not in proc.stderr and " INFO root:" not in proc.stderr


def test_explicit_int8_still_refuses_with_the_reason(faint: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    proc = _cli("-v", "fit", str(faint), "--out", str(out), *FAINT_FIT, "--precision", "int8")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edge-agent: error:")]
    assert len(lines) == 1, proc.stderr
    assert "deviate from the float graph's by" in lines[0] and "--precision float32" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".b.partial-*"))
    assert "Increased scale" in proc.stderr  # -v: the quantizer's own lines too


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
