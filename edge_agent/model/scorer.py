"""The inference engine: uint8 frames -> ONNX Runtime features -> FAISS kNN -> patch and image
scores. One Scorer owns one ORT session and one index; it is used from one thread.

With a re-checked index (knn.py: hnsw-exact, the CPU default, or ivf-exact) every patch is
searched approximately, which gives an upper bound of its exact score, and only the patches
that decide are searched exactly again:

- image scores: per image the patches in descending order of bound until no bound can beat
  the best exact score (scoring.recheck_max), so the max patch, its nearest bank row and the
  Eq. 7 score are flat's;
- maps (exact_map): the map is a non-negative linear function of the patch scores, so a map of
  bounds is >= flat's map everywhere. Pixels below a threshold there are below it in flat's
  map too; the patches under the others are re-checked, after which the mask, its regions and
  their peaks are flat's. The map maximum is found the same way at its argmax.

An int8 bundle scores the same bits on every x86-64 CPU with AVX2, whichever SIMD kernels its
libraries pick there (issue 33), and on older CPUs but for rare values (session_settings): the
graph runs without ONNX Runtime's CPU-dependent layout pass (session_settings), OpenCV's float
operations on its baseline kernels (baseline_opencv_kernels), and every distance that decides
is summed by knn.py's own code.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from edge_agent.images import BadImage, resize, to_bgr
from edge_agent.model import devicemem, scoring
from edge_agent.model.bundle import Bundle
from edge_agent.model.knn import DEFAULT_INDEX, DEFAULT_NPROBE, MemoryBankIndex
from edge_agent.model.tiling import TILES_PER_RUN
from edge_agent.ops.threads import default_threads
from edge_agent.station.regions import blank, crop, keep_cells

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BatchScores:
    """A batch's scores. With ivf-exact, `patch_scores` are flat's where `exact` and upper
    bounds elsewhere, and Scorer.exact_map replaces bounds by exact values in place as maps
    need them (so `features` are kept); other kinds leave `exact` and `features` None."""

    image_scores: np.ndarray  # [B] float32
    patch_scores: np.ndarray  # [B, h, w] float32
    exact: np.ndarray | None = None  # [B, h, w] bool
    features: np.ndarray | None = None  # [B, h*w, D] float32
    rechecked: np.ndarray | None = None  # [B] int: patches searched exactly, score + maps


CUDA_PROVIDER = "CUDAExecutionProvider"
CUDA_OPTIONS: dict[str, str] = {
    # ONNX Runtime's CUDA provider lets cuDNN and cuBLAS use TF32 on Ampere and later by default:
    # a 10-bit mantissa in the convolutions' products, far above the 1e-4 relative score parity
    # with the CPU that gpu_check.sh asserts. Full float32 costs some of the GPU's speed, not
    # the verdicts' reproducibility.
    "use_tf32": "0",
}


# ONNX Runtime's NCHWc layout transformer rewrites the float convolutions and pools around the
# graph's ops into blocked kernels whose block is the CPU's vector width (8 floats with AVX2, 16
# with AVX-512), and so whose sums run in a different order on each. On MTD's default int8
# bundle that alone made the features of an AVX-512 CPU differ from an AVX2 or SSE4 one's in
# the last bits (3 million of 10 million values, 1.3e-7 relative) and moved image scores; without
# it the int8 graph's features are the same bits with AVX-512 VNNI, AVX-512 and AVX2 kernels
# (integer convolutions are exact; scripts/kernels_check.py, BENCHMARKS.md), and with SSE4.2
# kernels too since fit writes the residual adds as Sums (export.quantize.float_residual_adds:
# ONNX Runtime's fused QLinearAdd rounds by the CPU). Without the layout pass the
# int8 graph took 1.08-1.25x the ONNX time alone and the engine's rate did not move beyond its
# noise (default bundle, alternated, loaded machine). A float32 graph took ~3x its ONNX time
# without it, and is the same bits only across CPUs with FMA even then: float32 keeps it, and
# its scores agree across CPUs to ~1e-6 relative where int8's are the same bits.
REPRODUCIBLE_PRECISIONS = ("int8",)
CPU_KERNEL_DEPENDENT_OPTIMIZERS = ("NchwcTransformer",)


def baseline_opencv_kernels() -> None:
    """Run OpenCV's float image operations on its baseline x86-64 kernels in this process.

    The anomaly map (bilinear resize, Gaussian blur) and the smoothed image score are float
    OpenCV operations, which it dispatches to AVX2 code on CPUs that have it (with FMA: other
    roundings) and to SSE code on others: on MTD the same patch scores gave image scores 1e-7
    relative apart and one region in 48 images changed between an AVX2 and an SSE4.2-only CPU.
    Its baseline kernels give the same bits on every x86-64 CPU (scripts/kernels_check.py),
    for 0.08 ms more per 288 x 288 map and ~5% on uint8 resizes (measured). The setting is
    OpenCV's one switch, for the whole process: every scorer in it scores alike."""
    cv2.setUseOptimized(False)


def session_settings(precision: str, threads: int | None) -> dict[str, Any]:
    """Keyword arguments of ort.InferenceSession (sess_options, disabled_optimizers) for a
    bundle graph of `precision` on `threads` threads (None: ONNX Runtime's default). One rule for
    the Scorer and fit's feature stream, so the bank is learnt with the arithmetic that scores."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # ORT's workers spin after each run by default; on a small box those spins take the
    # cores FAISS and the re-checks need next (BENCHMARKS.md, thread contention).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    disabled = CPU_KERNEL_DEPENDENT_OPTIMIZERS if precision in REPRODUCIBLE_PRECISIONS else ()
    return {"sess_options": opts, "disabled_optimizers": list(disabled)}


def providers_for(
    device: str, available: list[str] | None = None
) -> list[str | tuple[str, dict[str, str]]]:
    """The ``providers`` argument of the ONNX Runtime session for ``device`` (auto, cuda, cpu),
    given the providers this install has (``available``; default: ask ONNX Runtime)."""
    available = ort.get_available_providers() if available is None else available
    if device in ("auto", "cuda") and CUDA_PROVIDER in available:
        _preload_cuda_libraries()
        return [(CUDA_PROVIDER, dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu): using CPU")
    return ["CPUExecutionProvider"]


@functools.cache
def _preload_cuda_libraries() -> None:
    """The CUDA 13 wheels put their libraries in site-packages/nvidia/, off the loader's path:
    onnxruntime-gpu loads them itself (preload_dlls, ONNX Runtime >= 1.21) before the first
    CUDA session. Where it cannot, the session says why (and falls back to the CPU)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a library missing here is the session's to report
        log.warning("ONNX Runtime could not preload the CUDA libraries: %s", exc)


def _add_stages(stage_s: dict[str, float] | None, t0: float, t1: float, t2: float) -> None:
    """Add the seconds of score()'s stages (ONNX t0-t1, kNN t1-t2, scoring t2-now)."""
    if stage_s is not None:
        t3 = time.perf_counter()
        for stage, seconds in (("onnx", t1 - t0), ("knn", t2 - t1), ("score", t3 - t2)):
            stage_s[stage] = stage_s.get(stage, 0.0) + seconds


class Scorer:
    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        threads: int | None = None,
        index: str = DEFAULT_INDEX,
        hnsw_ef_search: int | None = None,
        ivf_nprobe: int = DEFAULT_NPROBE,
        scoring_overrides: dict[str, Any] | None = None,
        bind_io: bool | None = None,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        baseline_opencv_kernels()
        self.bundle = bundle
        self.session = ort.InferenceSession(
            str(bundle.model_path),
            providers=providers_for(device),
            **session_settings(bundle.precision, threads or default_threads()),
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
        # Bundles fitted before image_sigma existed score by the plain (or Eq. 7) maximum.
        self.image_sigma = float(cfg.get("image_sigma", 0.0))
        self.bank_knn: np.ndarray | None = None
        if cfg.get("reweight") and int(cfg.get("reweight_k", 0)) >= 2:
            if bundle.bank_knn is None or bundle.bank_knn.shape[1] < int(cfg["reweight_k"]):
                raise ValueError("reweighting needs bank_knn.npy with at least reweight_k columns")
            self.bank_knn = bundle.bank_knn[:, : int(cfg["reweight_k"])]
        self.reweight = self.bank_knn is not None
        if self.reweight and self.image_sigma > 0:
            raise ValueError("image_sigma and Eq. 7 reweighting are alternatives: set one")
        # I/O binding (None: auto, where ONNX Runtime and FAISS both run on the GPU): the ONNX
        # output stays where ORT wrote it and FAISS reads it by pointer, so features never
        # visit the host; Eq. 7 copies back one row per image. On the CPU it is the same code
        # on host memory (tests run it there); ivf-exact keeps features for its re-checks.
        # A tiled bundle's features are stitched on the host (model/tiling.py).
        self.tiling = bundle.tiling
        gpu_both = self._onnx_device == "cuda" and self.index.device == "cuda"
        self.bind_io = gpu_both and self.tiling is None if bind_io is None else bind_io
        if self.bind_io and self.index.rechecks:
            raise ValueError("I/O binding needs an index that is searched once (not ivf-exact)")
        if self.bind_io and self.tiling is not None:
            raise ValueError("I/O binding needs an untiled bundle (tiles are stitched on the host)")
        self._io = self.session.io_binding() if self.bind_io else None
        self.input_size = bundle.input_size
        self.grid = bundle.grid
        # fit --ignore: the patches the bank never learnt are never scored either.
        self.kept = keep_cells(bundle.ignore, self.grid) if bundle.ignore is not None else None
        # The latest batch score() returned: the agent answers a batch's frames (and draws
        # their maps) before it scores the next one.
        self.last: BatchScores | None = None
        # ivf-exact's work since the Scorer was made: images scored, patches re-checked for
        # image scores and for maps, and the seconds the map re-checks took.
        self.recheck_stats = {"images": 0, "score_patches": 0, "map_patches": 0, "map_s": 0.0}
        if self.index.rechecks:  # at load, not on the first NG frame
            scoring.map_support(self.grid, self.input_size, self.sigma)

    @property
    def _onnx_device(self) -> str:
        return "cuda" if self.session.get_providers()[0] == CUDA_PROVIDER else "cpu"

    @property
    def device(self) -> str:
        bound = " io-binding" if self.bind_io else ""
        return f"onnx:{self._onnx_device} faiss:{self.index.device}/{self.index.kind}{bound}"

    def prepare(self, bgr: np.ndarray) -> np.ndarray:
        """A uint8 BGR frame (what images.read_image/decode_image/to_bgr return) -> at the
        model's input size: the bundle's ROI cut (fit --roi), its ignored pixels filled, resized.
        Callers convert once, so the agent does not pay it twice. BadImage for a frame that
        does not contain the ROI."""
        return self.prepare_region(self.region(bgr))

    def region(self, image: np.ndarray) -> np.ndarray:
        """The bundle's ROI of a frame (or of its ground-truth mask); the frame itself without
        one. BadImage when the frame does not contain it."""
        try:
            return crop(image, self.bundle.roi)
        except ValueError as exc:
            raise BadImage(f"the bundle's {exc}") from None

    def prepare_region(self, region: np.ndarray) -> np.ndarray:
        """An already cut region -> at the model's input size, its ignored pixels (fit
        --ignore) filled as fit filled them. BadImage when its size is not the mask's."""
        try:
            region = blank(region, self.bundle.ignore)
        except ValueError as exc:
            raise BadImage(str(exc)) from None
        return resize(region, self.input_size)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, h*w, D]; a tiled bundle's B frames are cut into
        tiles that run together (TILES_PER_RUN at a time) and are stitched back."""
        if self.tiling is None:
            return self._run(batch)
        return self.tiling.features(batch, self._run, TILES_PER_RUN)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def score(
        self,
        batch: np.ndarray,
        stage_s: dict[str, float] | None = None,
        keep: np.ndarray | None = None,
    ) -> BatchScores:
        """Score a stacked batch of prepared frames.

        With `stage_s`, the seconds spent in each stage ("onnx", "knn", "score") are added to
        it, so `bench` and the agent's metrics time exactly this code. `keep` (bool [B, h, w])
        leaves patches out: an ignored patch's score is 0 (the floor of a distance), so it is
        never an image's maximum, never re-checked, and adds nothing to a map.
        """
        if self.kept is not None:
            keep = self.kept if keep is None else keep & self.kept
            keep = np.broadcast_to(keep, (len(batch), *self.grid))
        if self._io is not None:
            return self._score_bound(batch, stage_s, keep)
        t0 = time.perf_counter()
        feats = self.features(batch)
        t1 = time.perf_counter()
        b, p, d = feats.shape
        ignored = None if keep is None else ~keep.reshape(b, p)
        smoothed: np.ndarray | None = None
        if self.index.rechecks:
            patch, nearest, exact, rechecked, smoothed = self._bounded_search(feats, ignored)
        else:
            dist, idx = self.index.search(feats.reshape(b * p, d), self.k)
            patch = (dist[:, 0] if self.k == 1 else dist.mean(axis=1)).reshape(b, p)
            nearest, exact, rechecked = idx[:, 0].reshape(b, p), None, None
            if ignored is not None:
                patch[ignored] = 0.0
        t2 = time.perf_counter()
        if self.image_sigma > 0:
            if smoothed is None:
                smoothed = scoring.smoothed_max(patch.reshape(b, *self.grid), self.image_sigma)
            image = smoothed
        else:
            # Eq. 7 only reads the argmax patch, its feature and its nearest row: with
            # ivf-exact those are flat's (recheck_max's rule takes the same first argmax).
            masked = patch if exact is None else np.where(exact, patch, -np.inf)
            if self.reweight:
                image = scoring.reweighted_scores(
                    feats, masked, nearest, self.bundle.bank, self.bank_knn
                )
            else:
                image = masked.max(axis=1)
        result = BatchScores(
            image.astype(np.float32),
            patch.reshape(b, *self.grid),
            None if exact is None else exact.reshape(b, *self.grid),
            None if exact is None else feats,
            rechecked,
        )
        self.last = result
        _add_stages(stage_s, t0, t1, t2)
        return result

    def _score_bound(
        self, batch: np.ndarray, stage_s: dict[str, float] | None, keep: np.ndarray | None
    ) -> BatchScores:
        """score() with I/O binding: ONNX output -> FAISS by pointer, where ORT put it."""
        io = self._io
        assert io is not None
        t0 = time.perf_counter()
        io.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        io.bind_output(self.output_name, self._onnx_device)
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()  # FAISS reads on its own stream
        value = io.get_outputs()[0]  # holds the memory until this function returns
        b, p, d = value.shape()
        t1 = time.perf_counter()
        dist, idx = self.index.search_pointer(value.data_ptr(), b * p, self.k)
        patch = (dist[:, 0] if self.k == 1 else dist.mean(axis=1)).reshape(b, p)
        if keep is not None:
            patch[~keep.reshape(b, p)] = 0.0
        nearest = idx[:, 0].reshape(b, p)
        t2 = time.perf_counter()
        if self.image_sigma > 0:
            image = scoring.smoothed_max(patch.reshape(b, *self.grid), self.image_sigma)
        elif self.reweight:
            assert self.bank_knn is not None
            rows = np.arange(b)
            worst = patch.argmax(axis=1)
            m_test = devicemem.read_rows(value.data_ptr(), value.device_name(), rows * p + worst, d)
            image = scoring.reweighted_scores(
                m_test[:, None, :],
                patch[rows, worst][:, None],
                nearest[rows, worst][:, None],
                self.bundle.bank,
                self.bank_knn,
            )
        else:
            image = patch.max(axis=1)
        io.clear_binding_outputs()
        result = BatchScores(image.astype(np.float32), patch.reshape(b, *self.grid))
        self.last = result
        _add_stages(stage_s, t0, t1, t2)
        return result

    def score_frames(self, frames: Sequence[np.ndarray]) -> BatchScores:
        """Any decoded frames (gray, BGRA, 16-bit, ...) -> scores; raises images.BadImage."""
        return self.score(np.stack([self.prepare(to_bgr(f)) for f in frames]))

    def anomaly_map(self, patch_scores: np.ndarray) -> np.ndarray:
        """[h, w] patch scores -> smoothed map at the model's input size (of these values as
        they are: with ivf-exact, exact_map re-checks what a decision needs)."""
        return scoring.anomaly_map(patch_scores, self.input_size, self.sigma)

    def exact_map(
        self,
        scores: BatchScores | np.ndarray,
        i: int,
        *,
        threshold: float | None = None,
        peak: bool = False,
    ) -> np.ndarray:
        """Image i's map, equal to the flat index's where it decides (float32 rounding aside):

        - `threshold` t: wherever either map is >= t, and one pixel around (a bilinear resize
          to the frame, as decide() does, reads only those), so the mask map >= t, its regions
          and their peaks are flat's; elsewhere the map is an upper bound below t;
        - `peak`: at its maximum, so map.max() is flat's (calibrate's pixel threshold);
        - neither: everywhere (every remaining patch is re-checked, the cost of flat).

        `scores` is a BatchScores, or the patch_scores array of the latest one (`last`: what
        the agent hands its frames). Only ivf-exact has anything to re-check; other kinds
        return anomaly_map as it is.
        """
        if isinstance(scores, np.ndarray):
            if self.last is None or scores is not self.last.patch_scores:
                if self.index.rechecks:
                    raise ValueError("exact_map needs the BatchScores (or the latest batch's)")
                return self.anomaly_map(scores[i])
            scores = self.last
        grid = scores.patch_scores[i]
        if scores.exact is None or scores.features is None or scores.exact[i].all():
            return self.anomaly_map(grid)
        t0 = time.perf_counter()
        exact = scores.exact[i]
        amap = self.anomaly_map(grid)
        support = scoring.map_support(self.grid, self.input_size, self.sigma)
        if threshold is None and not peak:
            self._recheck_cells(scores, i, ~exact)
            amap = self.anomaly_map(grid)
        if threshold is not None:
            # A hair below t: a pixel of flat's map at t must not round below it here.
            above = amap >= threshold - 1e-5 * abs(threshold)
            if above.any():
                cells = scoring.cells_for(above, support, margin=1) & ~exact
                if cells.any():
                    self._recheck_cells(scores, i, cells)
                    amap = self.anomaly_map(grid)
        if peak:
            rows, cols = support
            while True:
                y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
                # The argmax of a map of bounds, with every patch under it exact: its value is
                # flat's there, and flat's map elsewhere is below these bounds, hence below it.
                cells = np.outer(rows[y], cols[x]) & ~exact
                if not cells.any():
                    break
                self._recheck_cells(scores, i, cells)
                amap = self.anomaly_map(grid)
        self.recheck_stats["map_s"] += time.perf_counter() - t0
        return amap

    def _bounded_search(
        self, feats: np.ndarray, ignored: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """ivf-exact: approximate search of every patch, exact search of those that decide the
        image scores. (patch scores [B, P], nearest bank rows [B, P], exact [B, P],
        re-checked per image [B], smoothed image scores [B] when image_sigma > 0, else None);
        nearest rows are flat's where exact."""
        b, p, d = feats.shape
        queries = feats.reshape(b * p, d)
        bounds, idx = self.index.search_bounds(queries, self.k)
        patch = (bounds[:, 0] if self.k == 1 else bounds.mean(axis=1)).reshape(b, p)
        nearest = idx[:, 0].reshape(b, p).copy()
        found = np.zeros((b, p), dtype=bool)
        if ignored is not None:  # known: 0, whatever the search found
            patch[ignored] = 0.0
            found |= ignored

        def recheck(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            dist, rows_nn = self.index.search_exact(feats[rows, cols], self.k)
            nearest[rows, cols] = rows_nn[:, 0]
            return dist[:, 0] if self.k == 1 else dist.mean(axis=1)

        # A patch ivf found too few rows for has no finite bound: search it now, so that maps
        # (which mix neighbouring patches) never meet an infinity.
        missing = ~np.isfinite(patch)
        if missing.any():
            rows, cols = np.nonzero(missing)
            patch[rows, cols] = recheck(rows, cols)
            found[rows, cols] = True
        smoothed = None
        if self.image_sigma > 0:
            grid_bounds, grid_known, smoothed = scoring.recheck_smoothed_max(
                patch.reshape(b, *self.grid),
                recheck,
                self.image_sigma,
                known=found.reshape(b, *self.grid),
            )
            patch, exact = grid_bounds.reshape(b, p), grid_known.reshape(b, p)
        else:
            patch, exact, _ = scoring.recheck_max(patch, recheck, known=found)
        rechecked = exact.sum(axis=1)
        self.recheck_stats["images"] += b
        self.recheck_stats["score_patches"] += int(rechecked.sum())
        return patch.astype(np.float32), nearest, exact, rechecked, smoothed

    def _recheck_cells(self, scores: BatchScores, i: int, cells: np.ndarray) -> None:
        """Search the patches `cells` [h, w] of image i exactly; bounds become exact in place."""
        assert scores.features is not None and scores.exact is not None
        flat = np.flatnonzero(cells)
        dist, _ = self.index.search_exact(scores.features[i, flat], self.k)
        values = dist[:, 0] if self.k == 1 else dist.mean(axis=1)
        scores.patch_scores[i].reshape(-1)[flat] = values
        scores.exact[i].reshape(-1)[flat] = True
        if scores.rechecked is not None:
            scores.rechecked[i] += flat.size
        self.recheck_stats["map_patches"] += int(flat.size)
