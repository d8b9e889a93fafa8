"""The backbone graph in 8-bit integers: the same features at about half the CPU time.

EfficientNet-Lite was designed for post-training quantization (ReLU6, no squeeze-excite). On
MTD the default Lite2 bundle with an int8 trunk scores as the float one does (image AUROC
0.958 vs 0.957, recall at 1% false rejects 75.5% vs 74.0%, 76.8-77.0% both at another coreset
seed), and ONNX Runtime runs it 1.8-1.9x as fast on this project's AVX-512 CPU (BENCHMARKS.md,
"An 8-bit backbone").

What is quantized: the trunk's convolutions and residual adds only, as QDQ pairs (int8
weights per output channel, uint8 activations with ranges from the training images). The
normalisation in front and the patch aggregation behind stay float, so the features keep
their float scale and the bank is the same kind of data as before. The residual adds'
outputs are quantized, but the adds themselves run in float (float_residual_adds), so every
x86-64 CPU computes the same integers.

The bank is built from the int8 graph's own features (`fit` streams them through the graph it
writes), so scores compare like with like; fit measures the int8 features' deviation from
the float graph's on real images (`deviation`) and records it in the manifest.

`reduce_range` (7-bit weights) is on: x86 CPUs without VNNI multiply uint8 by int8 with
an instruction that saturates 16-bit pair sums (ONNX Runtime's quantization docs), so with
full-range weights an older edge box could compute slightly different features from the
machine that fitted the bank. 7-bit weights keep every pair sum in range
(2 x 255 x 64 < 2^15), so every CPU computes the same integers.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8
# Fit's peak memory is the calibrator's run over one batch with every intermediate tensor
# as an output (measured at 448x448 on 120 frames: batches of 8 5.7 GB, 3 2.9 GB, 2 2.4 GB,
# and 26 or 64 images alike), so larger inputs calibrate in smaller batches of at most the
# default's pixels (calibration_batch): the ranges, min/max over every image, are the same.
CALIBRATION_BATCH_PIXELS = CALIBRATION_BATCH * 288 * 288
# The int8 features' RMS deviation from the float graph's, relative to the features' RMS,
# above which fit refuses: Lite2 on MTD measures 0.16 (BENCHMARKS.md); a graph that
# quantization breaks (an op whose range calibration cannot capture) measures far above it.
MAX_DEVIATION = 0.3
TRUNK_PREFIX = "/stages."  # the extractor's trunk module: export names its nodes after it


def calibration_subset(n: int, limit: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Indices of `limit` images spread evenly over `n` (all when n <= limit): the order of a
    training folder often follows time, and ranges should see all of it."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def calibration_batch(height: int, width: int) -> int:
    """Inputs of height x width per calibration run: CALIBRATION_BATCH, fewer where they
    would hold more than CALIBRATION_BATCH_PIXELS, at least one."""
    return max(1, min(CALIBRATION_BATCH, CALIBRATION_BATCH_PIXELS // (height * width)))


def trunk_nodes(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path))
    return [n.name for n in model.graph.node if n.name.startswith(TRUNK_PREFIX)]


def quantize_trunk(
    src: Path, dst: Path, inputs: Callable[[], Iterator[np.ndarray]], input_name: str
) -> None:
    """Write `src` with its trunk quantized to `dst`. `inputs()` yields the calibration
    batches exactly as the graph takes them (uint8 NHWC, the graph's input size). The caller
    bounds the inputs and the batch (calibration_batch): each run computes every
    intermediate tensor as a graph output (its CalibMaxIntermediateOutputs option drops runs
    instead of folding them in, onnxruntime 1.32)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    nodes = trunk_nodes(src)
    if not nodes:
        raise ValueError(f"{src}: no trunk nodes (named {TRUNK_PREFIX}*) to quantize")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = inputs()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    root = logging.getLogger()  # the quantizer logs on the root logger and prints to stdout
    root.addFilter(_quiet_quantizer)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # Min/max over percentile (99.999%): on MTD it kept the 0.1% false-reject
                # point that percentile ranges lost (BENCHMARKS.md), and needs no histograms.
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_quantize=nodes,
                extra_options={"CalibTensorRangeSymmetric": False},
                calibration_providers=["CPUExecutionProvider"],
            )
    finally:
        root.removeFilter(_quiet_quantizer)
    import onnx

    model = onnx.load(str(dst))
    _drop_unused_constants(model)
    float_residual_adds(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def float_residual_adds(model: onnx.ModelProto) -> int:
    """Turn each quantized residual Add (both inputs dequantized) into a two-input Sum, in
    place; returns how many. The result is the same arithmetic, but ONNX Runtime fuses
    DequantizeLinear -> Add -> QuantizeLinear into QLinearAdd, whose kernels differ by CPU:
    fixed-point multipliers with AVX2, float without, so an SSE4.2-only box rounds some values
    the other way (on MTD's default bundle 217 of 595 image scores and 32 regions moved,
    BENCHMARKS.md). It fuses no Sum: the add then runs as DequantizeLinear, a float add and
    QuantizeLinear, each one correctly rounded IEEE operation, the same bits on every CPU and
    exactly the ONNX definition of a quantized add."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    count = 0
    for node in model.graph.node:
        if node.op_type == "Add" and all(
            producers.get(name) == "DequantizeLinear" for name in node.input
        ):
            node.op_type = "Sum"
            count += 1
    return count


def _drop_unused_constants(model: onnx.ModelProto) -> None:
    """The quantizer folds each ReLU6 (Clip) into its activation's range and leaves the Clip's
    bounds behind; ONNX Runtime would warn about each of them (60 for Lite2) every time the
    agent loads the bundle."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        if not any(out in used for out in node.output):
            graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _quiet_quantizer(record: logging.LogRecord) -> bool:
    """The quantizer's root-logger records that fit's output shows.

    Its advice to pre-process never: its symbolic shape inference and graph optimisation are
    for graphs with dynamic shapes and unfused ops; ours is exported with static sides and
    BatchNorm already folded. Its INFO lines (one per weight scale it widens so a bias stays
    representable) only with -v: they are its bookkeeping, and the
    deviation fit measures afterwards is what says whether the graph still holds."""
    if "pre-processing before quantization" in record.getMessage():
        return False
    return record.levelno >= logging.WARNING or logging.getLogger().isEnabledFor(logging.DEBUG)


def deviation(reference: np.ndarray, quantized: np.ndarray) -> float:
    """RMS of (quantized - reference) over RMS of reference: 0 for equal features."""
    ref = reference.astype(np.float64)
    diff = quantized.astype(np.float64) - ref
    return float(np.sqrt((diff**2).mean() / max((ref**2).mean(), 1e-30)))
