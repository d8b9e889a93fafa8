"""`edge-agent doctor` tells the truth about this machine's accelerators."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from edge_agent.cli import main
from edge_agent.model import scorer as scorer_module
from edge_agent.model.bundle import load_bundle
from edge_agent.model.knn import gpu_count
from edge_agent.model.scorer import providers_for


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


def test_cuda_sessions_are_asked_for_full_float32() -> None:
    """TF32 (ONNX Runtime's CUDA default on Ampere and later) would break the 1e-4 parity."""
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    for device in ("auto", "cuda"):
        assert providers_for(device, [cuda, cpu]) == [(cuda, {"use_tf32": "0"}), cpu]
        assert providers_for(device, [cpu]) == [cpu]
    assert providers_for("cpu", [cuda, cpu]) == [cpu]
    first = providers_for("cuda", [cuda, cpu])[0]
    assert isinstance(first, tuple)
    first[1]["use_tf32"] = "1"  # a caller's edit must not leak into the next session
    assert providers_for("cuda", [cuda, cpu])[0] == (cuda, {"use_tf32": "0"})


def test_the_scorer_passes_the_cuda_options_to_onnx_runtime(
    small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the Scorer hands the real InferenceSession when ONNX Runtime says it has CUDA (this
    CPU build then falls back to the CPU itself, with its own warning)."""
    bundle = load_bundle(small_bundle)  # its own check runs a CPU session of its own
    seen: list[object] = []
    real = scorer_module.ort.InferenceSession

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("providers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer_module.ort, "InferenceSession", spy)
    monkeypatch.setattr(
        scorer_module.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    scorer_module.Scorer(bundle, device="cuda", threads=1)
    assert seen == [[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]]


def test_doctor_prints_the_cuda_options_asked_and_taken(
    small_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _doctor(capsys, "--bundle", str(small_bundle), "--device", "cuda")
    assert report["onnx_cuda_options_asked"] == {"use_tf32": "0"}
    on_cuda = report["onnx_session_providers"][0] == "CUDAExecutionProvider"
    assert report["onnx_cuda_options_taken"] == ({"use_tf32": "0"} if on_cuda else None)
