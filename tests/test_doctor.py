"""`edge-agent doctor` tells the truth about this machine's accelerators."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from edge_agent.cli import main
from edge_agent.model.knn import gpu_count


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["doctor", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_reports_where_each_stage_runs_and_why_not_on_a_gpu(
    small_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _doctor(capsys, "--bundle", str(small_bundle), "--device", "cuda")
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    assert report["onnxruntime_providers"] == ort.get_available_providers()
    assert report["faiss_gpus"] == gpu_count()
    onnx_reason = any(r.startswith("onnx:") for r in report["why_cpu"])
    faiss_reason = any(r.startswith("faiss:") for r in report["why_cpu"])
    assert faiss_reason == (gpu_count() == 0)
    on_cuda = report["onnx_session_providers"][0] == "CUDAExecutionProvider"
    assert onnx_reason == (not on_cuda)
    assert report["scorer"].startswith("onnx:cuda" if on_cuda else "onnx:cpu")
    if not has_cuda_ep:
        assert "onnxruntime-gpu" in " ".join(report["why_cpu"])


def test_cpu_by_choice_has_no_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    report = _doctor(capsys, "--device", "cpu")
    assert report["why_cpu"] == [] and "scorer" not in report
