"""Export the extractor to ONNX (dynamic batch) and prove ONNX Runtime agrees with torch."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from edge_agent.export.extractor import PatchFeatureExtractor

log = logging.getLogger(__name__)

INPUT_NAME = "frames"
OUTPUT_NAME = "features"
OPSET = 17


def export_onnx(extractor: PatchFeatureExtractor, path: Path, height: int, width: int) -> None:
    extractor.eval()
    dummy = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not ours to fix
        torch.onnx.export(
            extractor,
            (dummy,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    _pin_output_shape(buf.getvalue(), path, extractor, height, width)


def _pin_output_shape(
    model_bytes: bytes, path: Path, extractor: PatchFeatureExtractor, height: int, width: int
) -> None:
    """Declare [batch, h*w, D] with static h*w and D, so a loader can check the bank width
    against the graph without running it (the exporter leaves them symbolic)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    grid = extractor.grid_for(height, width)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].ClearField("dim_param")
    dims[1].dim_value = grid[0] * grid[1]
    dims[2].ClearField("dim_param")
    dims[2].dim_value = extractor.dim
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def parity(
    extractor: PatchFeatureExtractor, model_path: Path, frames: np.ndarray
) -> tuple[float, float]:
    """(max abs difference, that relative to the largest feature) of ONNX Runtime vs torch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run([OUTPUT_NAME], {INPUT_NAME: frames})[0]
    with torch.no_grad():
        torch_out = extractor(torch.from_numpy(frames)).numpy()
    diff = float(np.abs(onnx_out - torch_out).max())
    return diff, diff / max(float(np.abs(torch_out).max()), 1e-12)
