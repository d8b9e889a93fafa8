"""`edge-agent doctor`: which accelerators this install can use, and where each stage of a
bundle's scoring actually runs, with the reason whenever a requested GPU is not used."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import faiss
import onnxruntime as ort

from edge_agent import __version__
from edge_agent.cli import add_scorer_options
from edge_agent.model.bundle import load_bundle
from edge_agent.model.knn import gpu_count
from edge_agent.model.scorer import CUDA_OPTIONS, Scorer
from edge_agent.model.scorer import CUDA_PROVIDER as CUDA
from edge_agent.ops import threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, help="also build this bundle's scorer and report it")
    add_scorer_options(p, batch_size=False)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def environment() -> dict[str, Any]:
    providers = ort.get_available_providers()
    return {
        "edge_agent": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": providers,
        "faiss": faiss.__version__,
        "faiss_build": faiss.get_compile_options().strip(),
        "faiss_gpus": gpu_count(),
        "thread_pools": " ".join(f"{k}={os.environ.get(k, '-')}" for k in threads.KEYS),
    }


def fallbacks(env: dict[str, Any], device: str) -> list[str]:
    """Why a requested (cuda) or possible (auto) GPU is not used, stage by stage."""
    if device == "cpu":
        return []
    out = []
    if CUDA not in env["onnxruntime_providers"]:
        out.append(
            "onnx: this onnxruntime has no CUDA provider (pip install 'edge-agent[gpu]', "
            "i.e. onnxruntime-gpu, with the CUDA and cuDNN libraries it needs)"
        )
    if env["faiss_gpus"] == 0:
        out.append("faiss: no GPU (faiss-cpu installed, or no CUDA device visible to faiss-gpu)")
    return out


def run(args: argparse.Namespace) -> int:
    env = environment()
    report: dict[str, Any] = {**env, "device": args.device, "why_cpu": fallbacks(env, args.device)}
    if args.bundle is not None:
        scorer = Scorer(
            load_bundle(args.bundle),
            device=args.device,
            threads=args.threads,
            index=args.index,
            ivf_nprobe=args.nprobe,
        )
        report["scorer"] = scorer.device
        report["onnx_session_providers"] = scorer.session.get_providers()
        # Asked for, and what the session really took (ONNX Runtime's own reading; None where
        # no CUDA session runs): TF32 off is what keeps GPU scores within 1e-4 of the CPU's.
        taken = scorer.session.get_provider_options().get(CUDA)
        report["onnx_cuda_options_asked"] = dict(CUDA_OPTIONS)
        report["onnx_cuda_options_taken"] = (
            {k: taken.get(k) for k in CUDA_OPTIONS} if taken is not None else None
        )
        cuda_unused = scorer.session.get_providers()[0] != CUDA
        if args.device != "cpu" and CUDA in env["onnxruntime_providers"] and cuda_unused:
            report["why_cpu"].append(
                "onnx: the CUDA provider is installed but did not initialise (see the log)"
            )
    for key, value in report.items():
        if key == "why_cpu":
            for reason in value or ["-"]:
                print(f"{key:24} {reason}")
        else:
            print(f"{key:24} {', '.join(map(str, value)) if isinstance(value, list) else value}")
    if args.json:
        print(json.dumps(report))
    return 0
