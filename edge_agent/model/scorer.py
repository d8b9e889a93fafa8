"""The inference engine: uint8 frames -> ONNX Runtime features -> FAISS kNN -> patch and image
scores. One Scorer owns one ORT session and one index; it is used from one thread."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.images import resize, to_bgr
from edge_agent.model import scoring
from edge_agent.model.bundle import Bundle
from edge_agent.model.knn import DEFAULT_INDEX, DEFAULT_NPROBE, MemoryBankIndex

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
MAX_DEFAULT_THREADS = 8


@dataclass(frozen=True)
class BatchScores:
    image_scores: np.ndarray  # [B] float32
    patch_scores: np.ndarray  # [B, h, w] float32


def default_threads() -> int:
    """ONNX Runtime's intra-op threads when none are asked for: every core, at most
    MAX_DEFAULT_THREADS (a big server need not give one agent all of its cores)."""
    return min(os.cpu_count() or 1, MAX_DEFAULT_THREADS)


def _providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu): using CPU")
    return ["CPUExecutionProvider"]


class Scorer:
    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        threads: int | None = None,
        index: str = DEFAULT_INDEX,
        hnsw_ef_search: int = 64,
        ivf_nprobe: int = DEFAULT_NPROBE,
        scoring_overrides: dict[str, Any] | None = None,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        self.bundle = bundle
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        self.session = ort.InferenceSession(
            str(bundle.model_path), opts, providers=_providers(device)
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.index = MemoryBankIndex(
            bundle.bank,
            kind=index,
            device=device,
            hnsw_ef_search=hnsw_ef_search,
            ivf_nprobe=ivf_nprobe,
        )
        cfg = {**bundle.scoring, **(scoring_overrides or {})}
        self.k = int(cfg.get("k", 1))
        self.sigma = float(cfg.get("mask_sigma", 4.0))
        self.bank_knn: np.ndarray | None = None
        if cfg.get("reweight") and int(cfg.get("reweight_k", 0)) >= 2:
            if bundle.bank_knn is None or bundle.bank_knn.shape[1] < int(cfg["reweight_k"]):
                raise ValueError("reweighting needs bank_knn.npy with at least reweight_k columns")
            self.bank_knn = bundle.bank_knn[:, : int(cfg["reweight_k"])]
        self.reweight = self.bank_knn is not None
        self.input_size = bundle.input_size
        self.grid = bundle.grid

    @property
    def device(self) -> str:
        onnx = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        return f"onnx:{onnx} faiss:{self.index.device}/{self.index.kind}"

    def prepare(self, bgr: np.ndarray) -> np.ndarray:
        """A uint8 BGR frame (what images.read_image/decode_image/to_bgr return) -> at the
        model's input size. Callers convert once, so the agent does not pay it twice."""
        return resize(bgr, self.input_size)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, h*w, D]."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def score(self, batch: np.ndarray, stage_s: dict[str, float] | None = None) -> BatchScores:
        """Score a stacked batch of prepared frames.

        With `stage_s`, the seconds spent in each stage ("onnx", "knn", "score") are added to
        it, so `bench` and the agent's metrics time exactly this code.
        """
        t0 = time.perf_counter()
        feats = self.features(batch)
        t1 = time.perf_counter()
        b, p, d = feats.shape
        dist, idx = self.index.search(feats.reshape(b * p, d), self.k)
        t2 = time.perf_counter()
        patch = (dist[:, 0] if self.k == 1 else dist.mean(axis=1)).reshape(b, p)
        if self.reweight:
            image = scoring.reweighted_scores(
                feats, patch, idx[:, 0].reshape(b, p), self.bundle.bank, self.bank_knn
            )
        else:
            image = patch.max(axis=1)
        result = BatchScores(image.astype(np.float32), patch.reshape(b, *self.grid))
        if stage_s is not None:
            t3 = time.perf_counter()
            for stage, seconds in (("onnx", t1 - t0), ("knn", t2 - t1), ("score", t3 - t2)):
                stage_s[stage] = stage_s.get(stage, 0.0) + seconds
        return result

    def score_frames(self, frames: Sequence[np.ndarray]) -> BatchScores:
        """Any decoded frames (gray, BGRA, 16-bit, ...) -> scores; raises images.BadImage."""
        return self.score(np.stack([self.prepare(to_bgr(f)) for f in frames]))

    def anomaly_map(self, patch_scores: np.ndarray) -> np.ndarray:
        """[h, w] patch scores -> smoothed map at the model's input size."""
        return scoring.anomaly_map(patch_scores, self.input_size, self.sigma)
