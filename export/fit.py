"""`edge-agent fit`: good images -> bundle (model.onnx + coreset memory bank + manifest)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from edge_agent.errors import CheckFailed, UserError
from edge_agent.export.backbones import BACKBONES, DEFAULT_LAYERS, load_trunk
from edge_agent.export.coreset import approximate_greedy_coreset
from edge_agent.export.extractor import PROJECTIONS, PatchFeatureExtractor
from edge_agent.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, parity
from edge_agent.export.quantize import (
    MAX_DEVIATION,
    calibration_batch,
    calibration_subset,
    deviation,
    quantize_trunk,
)
from edge_agent.fileio import fsync_directory, fsync_tree
from edge_agent.images import BadImage, declared_size, decode_image, list_images, resize
from edge_agent.model import bundle as bundle_format
from edge_agent.model.bundle import MAX_IMAGE_SIGMA, PRECISIONS
from edge_agent.model.geometry import (
    ASPECT_TOLERANCE,
    DEFAULT_SIDE,
    MAX_AREA,
    MAX_SHRINK,
    SizeChoice,
    auto_input_size,
    one_aspect,
)
from edge_agent.model.scorer import session_settings
from edge_agent.model.teach import bank_neighbours
from edge_agent.model.tiling import DEFAULT_OVERLAP, TILES_PER_RUN, Tiling, default_overlap
from edge_agent.station.regions import blank, crop, keep_cells, load_ignore_mask
from edge_agent.tools.dataset import train_folder

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-3  # relative to the largest feature value
PARITY_IMAGES = 4
HEADER_BYTES = 1 << 16  # where an image's size is, for all but JPEGs with huge metadata
# Memory-bank augmentation (issue 13): the training images plus mirrored copies, for parts whose
# look is symmetric; off by default (oriented parts, text, connectors).
AUGMENTS = ("none", "flips")
CORESET_PROJ_DIM = 128  # the reference's approximate greedy coreset works in 128 dims
# --precision: auto (the default) quantizes where the int8 graph holds and keeps float32 where
# it does not, saying which and why; int8 asked for explicitly refuses a graph that does not
# hold instead (issue 34: a default must not refuse good images).
AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS)


@dataclass
class FitOptions:
    # Lite2 over Lite0 on MTD: image AUROC +0.012, PRO +0.03, recall at 5% false rejects +3.5
    # points, for ~20% of the engine's speed (BENCHMARKS.md, "New defaults: Lite2 and a
    # smoothed image score"); Lite0 stays the fast choice.
    backbone: str = "efficientnet_lite2"
    weights: Path | None = None
    layers: list[str] | None = None  # None: the backbone's default
    # None: auto (model/geometry.py): the training images' aspect ratio where they share one,
    # else 288x288, measured best on MTD for image AUROC, pixel AUROC and PRO (BENCHMARKS.md).
    # With `tile`: the frame size tiles are cut from (None: the training images' own size).
    image_size: tuple[int, int] | None = None
    tile: tuple[int, int] | None = None  # (height, width) of a tile (model/tiling.py)
    overlap: int | None = None  # None: tiling.default_overlap
    # 2%: at 1% MTD's pixel AUROC varied 0.743-0.752 with the coreset seed; 2% is above the
    # anomalib figure for every seed tried (BENCHMARKS.md), at 1.5x the fit time.
    coreset: float = 0.02
    projection: str = "none"
    embed_dim: int | None = None
    patch_size: int = 3
    knn_k: int = 1
    # The image score. image_sigma > 0: max of the patch grid smoothed over that many cells
    # (scoring.smooth_grid); on MTD sigma 1 raised recall at 1% false rejects by 3.6 (Lite0)
    # and 7.1 (Lite2) points and image AUROC by ~0.012 over the plain max, where Eq. 7 moved
    # nothing (BENCHMARKS.md).
    # reweight_k >= 2: Eq. 7 with that many bank neighbours instead. Both 0: the plain max
    # (the reference's).
    image_sigma: float = 1.0
    reweight_k: int = 0
    batch_size: int = 16
    threads: int | None = None
    seed: int = 0
    augment: str = "none"
    # int8: the trunk in 8-bit integers (export/quantize.py): on MTD the float graph's
    # accuracy, ONNX 1.8-1.9x as fast on an AVX-512 CPU (BENCHMARKS.md). auto: int8 where its
    # features stay within MAX_DEVIATION of the float graph's, else float32 (choose_precision).
    precision: str = AUTO
    progress: bool = True
    # fit --roi / --ignore (a station's inspection): the part of each frame learnt, and its
    # pixels never learnt (filled, their patches kept out of the bank); both go in the bundle.
    roi: tuple[int, int, int, int] | None = None
    ignore: Path | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FitOptions()
    S = DEFAULT_SIDE
    p.add_argument("data", type=Path, help="folder of good images, or an MVTec-layout dataset")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing bundle folder")
    p.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    p.add_argument("--weights", type=Path, help="backbone weights file (state dict)")
    p.add_argument(
        "--layers",
        type=lambda s: [x for x in s.split(",") if x],
        help="comma-separated layers (default: "
        + "; ".join(f"{','.join(v)} for {k}" for k, v in DEFAULT_LAYERS.items())
        + ")",
    )
    p.add_argument(
        "--image-size",
        nargs="+",
        metavar="PX",
        default="auto",
        help="model input HEIGHT [WIDTH], or auto: the training images' aspect ratio where "
        f"they share one (within {ASPECT_TOLERANCE * 100:.0f}%%) at about {S}x{S}'s patch count, "
        f"else {S}x{S}; grown where that shrinks them more than {MAX_SHRINK:g}x per side, up "
        f"to {MAX_AREA:g}x {S}x{S}'s pixels. With --tile: the frame size tiles are cut from "
        "(auto: the training images' own size)",
    )
    p.add_argument(
        "--tile",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="learn and score HEIGHT x WIDTH tiles at native resolution, for frames much "
        "larger than a model input (sides: multiples of the backbone's stride, 16 px for the "
        "default layers)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        metavar="PX",
        help="pixels neighbouring tiles share, a multiple of 8; features are blended across "
        f"it (default: {DEFAULT_OVERLAP}, at most half the tile)",
    )
    p.add_argument("--coreset", type=float, default=d.coreset, help="fraction of patches kept")
    p.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default=d.projection,
        help="none: raw 3x3-averaged channels; adaptive: the reference's pooling to "
        "--embed-dim; random/pca: linear map of the raw channels to --embed-dim",
    )
    p.add_argument("--embed-dim", type=int, help="feature width for adaptive/random/pca")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="neighbourhood (odd)")
    p.add_argument("--knn-k", type=int, default=d.knn_k, help="neighbours per patch score")
    p.add_argument(
        "--reweight-k",
        type=int,
        default=d.reweight_k,
        help="Eq. 7 image-score reweighting with this many bank neighbours (0: off; needs "
        "--image-sigma 0)",
    )
    p.add_argument(
        "--image-sigma",
        type=float,
        default=d.image_sigma,
        help="image score: max of the patch grid smoothed by a Gaussian of this many patch "
        "cells (0: the largest patch score)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where training features are extracted (ONNX Runtime's CUDA provider for cuda)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--augment",
        choices=AUGMENTS,
        default=d.augment,
        help="flips: also learn each training image mirrored left-right, top-bottom and both "
        "(4x the patches: the bank grows with them unless --coreset is lowered; only for "
        "parts that may appear mirrored)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=d.precision,
        help="the backbone's arithmetic: int8 quantizes its convolutions with ranges from the "
        "training images (faster on a CPU) and refuses a graph whose features it moves by more "
        f"than {MAX_DEVIATION} RMS; float32 keeps the exported graph as is (for a GPU); auto: "
        "int8 where it holds, else float32",
    )
    p.add_argument(
        "--roi",
        metavar="X,Y,W,H",
        help="learn only this region of every training frame (frame pixels; a station's "
        "inspection): the bundle records it, and run, evaluate, calibrate and teach cut it too",
    )
    p.add_argument(
        "--ignore",
        type=Path,
        metavar="MASK",
        help="a one-channel image, ROI- or frame-sized, white where nothing is learnt or scored "
        "(a date code, a fixture): those pixels are filled before the backbone sees them and "
        "their patches never enter the bank; the bundle keeps the mask",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_image_size(values: str | list[str]) -> tuple[int, int] | None:
    """--image-size: None for auto (the default is the string "auto"), else (height, width)."""
    if isinstance(values, str):
        values = [values]
    if values == ["auto"]:
        return None
    try:
        size = [int(v) for v in values]
    except ValueError:
        size = []
    if len(size) not in (1, 2) or min(size) < 32:
        raise UserError("--image-size takes auto or HEIGHT [WIDTH], each at least 32 pixels")
    return size[0], size[-1]


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """ "x,y,w,h" in frame pixels -> a ROI; UserError for anything else."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--roi takes x,y,width,height in frame pixels, got {text!r}") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise UserError(f"--roi: x and y must be 0 or more, width and height positive: {text!r}")
    return x, y, w, h


def options_from_args(args: argparse.Namespace) -> FitOptions:
    size = parse_image_size(args.image_size)
    roi = parse_roi(args.roi) if args.roi else None
    if args.ignore is not None and args.augment != "none":
        raise UserError("--ignore and --augment: a mirrored frame would not fit its mask")
    if args.tile is not None and min(args.tile) < 32:
        raise UserError("--tile takes HEIGHT WIDTH, each at least 32 pixels")
    if args.overlap is not None and args.overlap < 0:
        raise UserError(f"--overlap must be at least 0 pixels, got {args.overlap}")
    if not 0.0 < args.coreset <= 1.0:
        raise UserError(f"--coreset must be a fraction in (0, 1], got {args.coreset}")
    if args.projection in ("adaptive", "random", "pca") and not args.embed_dim:
        raise UserError(f"--projection {args.projection} needs --embed-dim")
    if args.patch_size < 1 or args.patch_size % 2 == 0:
        raise UserError("--patch-size must be a positive odd number")
    if args.knn_k < 1 or args.reweight_k < 0 or args.reweight_k == 1:
        raise UserError("--knn-k must be >= 1 and --reweight-k 0 (off) or >= 2")
    if not 0.0 <= args.image_sigma <= MAX_IMAGE_SIGMA:
        raise UserError(
            f"--image-sigma must be 0 to {MAX_IMAGE_SIGMA:g} cells, got {args.image_sigma}"
        )
    if args.image_sigma > 0 and args.reweight_k >= 2:
        raise UserError(
            "--reweight-k (Eq. 7) and --image-sigma are alternatives: add --image-sigma 0 to "
            "reweight"
        )
    return FitOptions(
        backbone=args.backbone,
        weights=args.weights,
        layers=args.layers,
        image_size=size,
        tile=tuple(args.tile) if args.tile else None,
        overlap=args.overlap,
        coreset=args.coreset,
        projection=args.projection,
        embed_dim=args.embed_dim,
        patch_size=args.patch_size,
        knn_k=args.knn_k,
        reweight_k=args.reweight_k,
        image_sigma=args.image_sigma,
        batch_size=args.batch_size,
        threads=args.threads,
        seed=args.seed,
        augment=args.augment,
        precision=args.precision,
        progress=not args.no_progress,
        roi=roi,
        ignore=args.ignore,
    )


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if args.device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("--device cuda: ONNX Runtime has no CUDA provider (onnxruntime-gpu)")
    manifest = fit(args.data, args.out, opts, force=args.force, device=args.device)
    t = manifest["training"]
    inp = manifest["input"]
    tiling = manifest.get("tiling")
    tiles = ""
    if tiling:
        th, tw = tiling["tile"]
        tiles = f" as {tw}x{th} tiles (overlap {tiling['overlap']} px)"
    print(f"input {inp['width']}x{inp['height']}{tiles}: {inp['size_choice']}")
    feats = manifest["features"]
    print(f"precision {feats['precision']}: {feats['precision_choice']}")
    print(
        f"bundle {args.out}: {manifest['bank']['size']} of {manifest['bank']['patches']} patches "
        f"from {manifest['training']['n_images']} images "
        f"({manifest['training']['n_skipped']} skipped), D={manifest['features']['dim']}, "
        f"fit {t['seconds']:.1f} s (features {t['feature_seconds']:.1f} s, "
        f"coreset {t['coreset_seconds']:.1f} s), peak RAM {t['peak_rss_mb']:.0f} MB, "
        f"ONNX parity {t['onnx_parity_rel']:.1e}"
    )
    return 0


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} exists and is not empty (use --force to overwrite)")
        if not (out / bundle_format.MANIFEST).is_file():
            raise UserError(f"{out} is not a bundle folder; refusing to overwrite it")


def fit(
    data: Path, out: Path, opts: FitOptions, *, force: bool = False, device: str = "cpu"
) -> dict[str, Any]:
    """Fit into a temporary sibling folder and move it into place only when complete, so a
    failed or interrupted fit never leaves a half-written bundle (or destroys the old one)."""
    out = Path(out)
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _fit_into(data, work, opts, device)
        fsync_tree(work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        fsync_directory(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def training_shapes(paths: list[Path]) -> list[tuple[int, int]]:
    """(height, width) each image's header declares, without decoding; unreadable files are
    left out here (the decoding pass skips and reports them)."""
    shapes = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
            try:
                _, width, height = declared_size(head)
            except BadImage:  # a header beyond the first bytes (a large EXIF block)
                _, width, height = declared_size(path.read_bytes())
        except (OSError, BadImage):
            continue
        shapes.append((height, width))
    return shapes


@dataclass(frozen=True)
class Geometry:
    """The input fit uses: frames resized to `size`, cut into tiles where `tiling` is set."""

    size: tuple[int, int]
    tiling: Tiling | None
    reason: str
    aspect_range: tuple[float, float]


def plan_geometry(
    opts: FitOptions, shapes: list[tuple[int, int]], cell: int, multiple: int
) -> Geometry:
    """The input size (and tiling) for training images of `shapes`: an explicit --image-size,
    else auto (model/geometry.py); with --tile, the frame size the tiles are cut from.
    `cell`: pixels per patch cell; `multiple`: the deepest layer's stride."""
    if not shapes:  # no readable header: reading the images says so, with the reason
        shapes = [(opts.image_size or (DEFAULT_SIDE, DEFAULT_SIDE))]
    aspects = sorted(w / h for h, w in shapes)
    spread = (aspects[0], aspects[-1])
    if opts.tile is None:
        if opts.image_size is not None:
            return Geometry(opts.image_size, None, "set by --image-size", spread)
        choice: SizeChoice = auto_input_size(shapes, multiple)
        return Geometry(choice.size, None, f"auto: {choice.reason}", choice.aspect_range)
    th, tw = opts.tile
    if th % multiple or tw % multiple:
        raise UserError(
            f"--tile {th} {tw}: sides must be multiples of {multiple} px (the deepest "
            "layer's stride)"
        )
    overlap = default_overlap((th, tw), cell) if opts.overlap is None else opts.overlap
    if overlap % cell:
        raise UserError(f"--overlap {overlap}: must be a multiple of {cell} px (a patch cell)")
    if opts.image_size is not None:
        frame, reason = opts.image_size, "frame size set by --image-size"
    else:
        (h, w), n = Counter(shapes).most_common(1)[0]
        frame = (max(th, round(h / multiple) * multiple), max(tw, round(w / multiple) * multiple))
        reason = f"tiles at native resolution of the training images' {w}x{h} frames"
        if n < len(shapes):
            reason += f" (the most common size: {n} of {len(shapes)}; the others are resized)"
        if not one_aspect(*spread):
            log.warning(
                "the training images' aspect ratios vary (%.2f:1 to %.2f:1): tiled at %dx%d, "
                "the others squeezed to it",
                *spread,
                frame[1],
                frame[0],
            )
    try:
        tiling = Tiling(frame, (th, tw), overlap, cell)
    except ValueError as exc:
        raise UserError(f"--tile: {exc}") from None
    return Geometry(frame, tiling, reason, spread)


def _read_training_images(
    paths: list[Path],
    size: tuple[int, int],
    roi: tuple[int, int, int, int] | None = None,
    ignore: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[str], int]:
    """Each image decoded, its ROI cut and ignored pixels filled (as the Scorer will at run
    time), resized; unreadable ones skipped and counted. UserError for an image that does not
    contain the ROI or fit the mask: the region must be the same part on every frame."""
    frames, hashes, skipped = [], [], 0
    for path in paths:
        try:
            data = path.read_bytes()
            image = decode_image(data)
        except (OSError, BadImage) as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped += 1
            continue
        try:
            region = blank(crop(image, roi), ignore)
        except ValueError as exc:
            raise UserError(f"{path}: {exc} (--roi / --ignore)") from None
        frames.append(resize(region, size))
        hashes.append(bundle_format.sha256_bytes(data))
    return frames, hashes, skipped


class FeatureStream:
    """Training features through ONNX Runtime, batch by batch, in image order.

    Eager torch is several times slower than ORT on a CPU, and streaming lets `fit` keep only
    what it needs (the coreset's projected copy, then the selected rows) instead of all N x D
    features: 587k patches x 1024 dims would be 2.4 GB.
    """

    def __init__(
        self,
        model_path: Path,
        frames: list[np.ndarray],
        batch_size: int,
        device: str,
        threads: int | None,
        tiling: Tiling | None = None,
        precision: str = "float32",
    ) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        # The Scorer's own session settings: the bank is learnt with the arithmetic that
        # scores against it (for int8, the same bits on every x86-64 CPU with AVX2).
        self.session = ort.InferenceSession(
            str(model_path), providers=providers, **session_settings(precision, threads)
        )
        self.frames = frames
        self.batch_size = batch_size
        self.tiling = tiling
        shape = self.session.get_outputs()[0].shape
        self.per_image, self.dim = int(shape[1]), int(shape[2])
        if tiling is not None:  # the graph sees tiles; the bank learns stitched frames
            self.per_image = tiling.grid[0] * tiling.grid[1]

    def __len__(self) -> int:
        return len(self.frames) * self.per_image

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: batch})[0]

    def batches(self, desc: str, progress: bool, limit: int | None = None):
        """Yield (first row index, [rows, D] float32) per batch of images."""
        frames = self.frames[:limit]
        with tqdm(total=len(frames), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(frames), self.batch_size):
                chunk = np.stack(frames[start : start + self.batch_size])
                if self.tiling is None:
                    feats = self._run(chunk)
                else:  # as the Scorer does at run time
                    feats = self.tiling.features(chunk, self._run, TILES_PER_RUN)
                yield start * self.per_image, feats.reshape(-1, self.dim)
                bar.update(len(chunk))


@dataclass(frozen=True)
class PrecisionChoice:
    """The arithmetic a bundle's graph runs and why (printed, stored in the manifest)."""

    precision: str  # "int8" or "float32"
    reason: str
    int8_deviation: float | None  # what the int8 graph measured, kept or not; None: not tried


def choose_precision(asked: str, dev: float) -> PrecisionChoice:
    """int8 or float32 for a fit that asked for `asked` (auto or int8), once the int8 graph's
    features measured a relative RMS deviation `dev` from the float graph's (quantize.deviation).
    int8 holds where dev <= MAX_DEVIATION; where it does not, auto keeps float32 and an explicit
    int8 refuses (CheckFailed). A NaN deviation never holds."""
    within = dev <= MAX_DEVIATION
    measured = f"{dev:.3g} RMS from the float graph's (at most {MAX_DEVIATION})"
    source = "auto" if asked == AUTO else "set by --precision"
    if within:
        return PrecisionChoice("int8", f"{source}: int8 features within {measured}", dev)
    if asked != AUTO:
        raise CheckFailed(
            f"the int8 graph's features deviate from the float graph's by {dev:.3g} RMS "
            f"(at most {MAX_DEVIATION}): this backbone does not quantize well on these images; "
            "fit with --precision float32 (or auto)"
        )
    return PrecisionChoice(
        "float32",
        f"auto: int8 features deviate {measured}: this backbone does not quantize well on "
        "these images, so the float32 graph is kept (the reference arithmetic, slower on a CPU)",
        dev,
    )


def quantize_graph(
    model_path: Path,
    frames: list[np.ndarray],
    tiling: Tiling | None,
    probe: np.ndarray,
    asked: str = "int8",
) -> PrecisionChoice:
    """Quantize the float graph at `model_path` (export/quantize.py), with activation ranges
    from an even spread of the training images, measure the int8 features' deviation from the
    float graph's on `probe`, and keep whichever graph choose_precision picks at `model_path`.
    """
    import onnxruntime as ort

    int8_path = model_path.with_name("model.int8.onnx")
    batch = calibration_batch(*probe.shape[1:3])
    chosen = [frames[i] for i in calibration_subset(len(frames))]

    def batches():
        # The graph's own inputs: for a tiled bundle, CALIBRATION_IMAGES tiles spread over
        # the chosen frames' (all of them: a frame's tile count times the calibrator's memory).
        inputs = np.stack(chosen) if tiling is None else tiling.cut(np.stack(chosen))
        inputs = inputs[calibration_subset(len(inputs))]
        for start in range(0, len(inputs), batch):
            yield inputs[start : start + batch]

    log.info("int8: calibrating activation ranges on %d training images", len(chosen))
    try:
        quantize_trunk(model_path, int8_path, batches, INPUT_NAME)
        outputs = []
        for path in (model_path, int8_path):
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outputs.append(sess.run([OUTPUT_NAME], {INPUT_NAME: probe})[0])
        dev = deviation(*outputs)
        log.info("int8 vs float32 features on %d real images: %.3f RMS deviation", len(probe), dev)
        choice = choose_precision(asked, round(dev, 4))
        if choice.precision == "int8":
            int8_path.replace(model_path)
    finally:
        int8_path.unlink(missing_ok=True)
    return choice


def augmented(frames: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """The frames the bank learns from: as they are ("none"), or each followed by its left-right,
    top-bottom and both-ways mirror ("flips"; both ways is the 180-degree rotation)."""
    if kind == "none":
        return frames
    if kind != "flips":
        raise ValueError(f"augment must be one of {AUGMENTS}, got {kind!r}")
    out = []
    for f in frames:
        out += [f, np.ascontiguousarray(f[:, ::-1]), np.ascontiguousarray(f[::-1])]
        out.append(np.ascontiguousarray(f[::-1, ::-1]))
    return out


def coreset_space(stream: FeatureStream, proj_dim: int, seed: int, progress: bool) -> np.ndarray:
    """[N, min(D, proj_dim)] float32: the random projection the greedy coreset runs in (as the
    reference's approximate greedy coreset), without holding the full features."""
    rng = np.random.default_rng(seed)
    matrix = None
    if stream.dim > proj_dim:
        matrix = (rng.standard_normal((stream.dim, proj_dim)) / math.sqrt(proj_dim)).astype(
            np.float32
        )
    out = np.empty((len(stream), min(stream.dim, proj_dim)), dtype=np.float32)
    for first, feats in stream.batches("features", progress):
        # In float64, rounded once: a float32 product's last bits depend on the CPU's BLAS
        # kernel, and the greedy coreset follows them (a near-tie for the farthest row goes
        # the other way, and every later choice with it). The float64 sums of the same
        # products differ between kernels by ~1e-16 relative, which rounding to float32 hides
        # unless a value falls that close to a float32 midpoint (issue 33: the AVX2 and the
        # AVX-512 kernels fit the same bank, byte for byte).
        out[first : first + len(feats)] = (
            feats if matrix is None else (feats.astype(np.float64) @ matrix.astype(np.float64))
        )
    return out


def gather_rows(stream: FeatureStream, rows: np.ndarray, progress: bool) -> np.ndarray:
    """The full-width features of the given global rows, in the given order."""
    bank = np.empty((len(rows), stream.dim), dtype=np.float32)
    order = np.argsort(rows)
    sorted_rows = rows[order]
    for first, feats in stream.batches("bank", progress):
        lo, hi = np.searchsorted(sorted_rows, [first, first + len(feats)])
        bank[order[lo:hi]] = feats[sorted_rows[lo:hi] - first]
    return bank


def output_projection(stream: FeatureStream, kind: str, dim: int, seed: int) -> np.ndarray:
    """[D_raw, dim] matrix: Gaussian (distance-preserving scale) or the top principal axes of
    the training patches (from up to 256 images).

    PCA needs no centring in the graph: a shift changes no distance.
    """
    rng = np.random.default_rng(seed)
    d_raw = stream.dim
    if dim > d_raw:
        raise UserError(f"--embed-dim {dim} is wider than the raw features ({d_raw})")
    if kind == "random":
        return (rng.standard_normal((d_raw, dim)) / math.sqrt(dim)).astype(np.float32)
    cov = np.zeros((d_raw, d_raw))
    total = np.zeros(d_raw)
    n = 0
    for _, feats in stream.batches("pca", False, limit=256):
        f = feats.astype(np.float64)
        cov += f.T @ f
        total += f.sum(axis=0)
        n += len(f)
    mean = total / n
    cov = cov / n - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)
    return np.ascontiguousarray(vecs[:, ::-1][:, :dim], dtype=np.float32)


def stream_covering_radius(
    stream: FeatureStream, bank: np.ndarray, progress: bool, keep: np.ndarray | None = None
) -> float:
    """The coreset's covering radius in the bank's own space (full width, not the projection
    the coreset ran in): r = max over every training patch of the distance to its nearest
    bank row. `teach` keeps taught patches to this radius.

    Exact at about a fifth of a flat search's cost, as ivf-exact scores images (model/knn.py):
    an ivf distance bounds a patch's nearest distance from above, so per batch only patches
    whose bound exceeds the largest exact distance found so far are searched exactly, in
    descending order of bound.
    """
    from edge_agent.model.knn import MemoryBankIndex

    index = MemoryBankIndex(bank, kind="ivf-exact", device="cpu")
    worst = 0.0
    for _, feats in stream.batches("radius", progress):
        if keep is not None:  # the patches the bank was chosen from (fit --ignore)
            feats = feats.reshape(-1, len(keep), feats.shape[1])[:, keep].reshape(
                -1, feats.shape[1]
            )
        bounds = index.search_bounds(feats, 1)[0][:, 0]
        order = np.argsort(-bounds)
        for start in range(0, len(order), 64):
            chunk = order[start : start + 64]
            chunk = chunk[bounds[chunk] > worst]
            if len(chunk) == 0:
                break
            dist, _ = index.search_exact(feats[chunk], 1)
            worst = max(worst, float(dist.max()))
    return worst


def _fit_into(data: Path, out: Path, opts: FitOptions, device: str) -> dict[str, Any]:
    started = time.perf_counter()
    folder = train_folder(data)
    paths = list_images(folder)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    trunk = load_trunk(opts.backbone, opts.weights)
    layers = opts.layers or list(DEFAULT_LAYERS[opts.backbone])
    try:
        extractor = PatchFeatureExtractor(
            trunk,
            layers,
            patch_size=opts.patch_size,
            projection=opts.projection,
            embed_dim=opts.embed_dim,
        ).eval()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cell, multiple = extractor.strides()
    ignore = load_ignore_mask(opts.ignore, opts.roi, "--ignore") if opts.ignore else None
    shapes = training_shapes(paths)
    if opts.roi is not None:  # the geometry is the region's, whatever the frames' size
        shapes = [(opts.roi[3], opts.roi[2])] * len(shapes)
    geometry = plan_geometry(opts, shapes, cell, multiple)
    tiling = geometry.tiling
    height, width = geometry.size
    log.info("input %dx%d: %s", width, height, geometry.reason)
    model_h, model_w = tiling.tile if tiling is not None else (height, width)
    grid = tiling.grid if tiling is not None else extractor.grid_for(height, width)
    if grid[0] * grid[1] * len(paths) > 3_000_000:
        log.warning(
            "%d images x %d patches is a lot of memory; consider a smaller --image-size",
            len(paths),
            grid[0] * grid[1],
        )

    frames, hashes, skipped = _read_training_images(paths, (height, width), opts.roi, ignore)
    if not frames:
        raise UserError(f"{folder}: none of the {len(paths)} images could be read")
    if skipped:
        log.warning("%d of %d images were unreadable and skipped", skipped, len(paths))
    n_images = len(frames)
    frames = augmented(frames, opts.augment)

    model_path = out / bundle_format.MODEL_FILE
    t0 = time.perf_counter()
    export_onnx(extractor, model_path, model_h, model_w)
    if opts.projection in ("random", "pca"):
        assert opts.embed_dim is not None
        stream = FeatureStream(model_path, frames, opts.batch_size, device, opts.threads, tiling)
        extractor.set_output_projection(
            output_projection(stream, opts.projection, opts.embed_dim, opts.seed)
        )
        export_onnx(extractor, model_path, model_h, model_w)

    # Check the graph the agent will run before spending time on the coreset.
    probe = np.stack(frames[:PARITY_IMAGES])
    if tiling is not None:
        probe = tiling.cut(probe[:1])[:PARITY_IMAGES]
    diff, rel = parity(extractor, model_path, probe)
    log.info(
        "ONNX vs torch on %d real images: max |diff| %.2e (%.2e relative)",
        min(len(frames), PARITY_IMAGES),
        diff,
        rel,
    )
    if rel > PARITY_TOLERANCE:
        raise CheckFailed(
            f"ONNX Runtime and torch disagree on real images: max difference {diff:.3g} "
            f"({rel:.3g} relative, tolerance {PARITY_TOLERANCE}); the bundle is not usable"
        )
    precision = PrecisionChoice("float32", "set by --precision", None)
    if opts.precision != "float32":
        precision = quantize_graph(model_path, frames, tiling, probe, opts.precision)
    stream = FeatureStream(
        model_path, frames, opts.batch_size, device, opts.threads, tiling, precision.precision
    )
    projected = coreset_space(stream, CORESET_PROJ_DIM, opts.seed, opts.progress)
    feature_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Ignored patches (fit --ignore) never enter the bank: the coreset picks among the rest.
    keep = keep_cells(ignore, grid).ravel() if ignore is not None else None
    candidates = np.flatnonzero(np.tile(keep, len(frames))) if keep is not None else None
    if candidates is not None:
        if len(candidates) == 0:
            raise UserError("--ignore: the mask leaves no patch of the region to learn")
        projected = projected[candidates]
    n_patches = len(projected)
    n_select = max(1, math.ceil(opts.coreset * n_patches))
    selected = approximate_greedy_coreset(
        projected, n_select, proj_dim=None, seed=opts.seed, progress=opts.progress
    )
    if candidates is not None:
        selected = candidates[selected]
    del projected
    coreset_s = time.perf_counter() - t0
    bank = gather_rows(stream, selected, opts.progress)
    radius = stream_covering_radius(stream, bank, opts.progress, keep)

    files = [bundle_format.MODEL_FILE, bundle_format.BANK_FILE, bundle_format.TRAINING_IMAGES_FILE]
    np.save(out / bundle_format.BANK_FILE, bank, allow_pickle=False)
    if opts.reweight_k:
        np.save(out / bundle_format.BANK_KNN_FILE, bank_neighbours(bank, opts.reweight_k))
        files.append(bundle_format.BANK_KNN_FILE)
    (out / bundle_format.TRAINING_IMAGES_FILE).write_text(json.dumps({"sha256": hashes}) + "\n")
    region: dict[str, Any] = {}
    if opts.roi is not None:
        region["roi"] = list(opts.roi)
    if ignore is not None:
        cv2.imwrite(str(out / bundle_format.IGNORE_FILE), ignore.astype(np.uint8) * 255)
        files.append(bundle_format.IGNORE_FILE)
        region["ignore"] = bundle_format.IGNORE_FILE

    manifest: dict[str, Any] = {
        "backbone": {"name": opts.backbone, "layers": extractor.layers, "weights": trunk.weights},
        "input": {
            "height": height,
            "width": width,
            "channels": 3,
            "dtype": "uint8",
            "layout": "NHWC",
            "color": "BGR",
            "resize": "straight (no crop): area filter when shrinking, bilinear when enlarging",
            "size_choice": geometry.reason,
            "training_aspect": [round(v, 4) for v in geometry.aspect_range],
            "normalisation": "inside the graph: /255, RGB, ImageNet mean/std",
        },
        "features": {
            "grid": list(grid),
            "dim": extractor.dim,
            "patch_size": opts.patch_size,
            "projection": opts.projection,
            "embed_dim": opts.embed_dim,
            "onnx_input": "frames",
            "onnx_output": "features",
            "precision": precision.precision,
            "precision_choice": precision.reason,
            **(
                {"int8_deviation": precision.int8_deviation}
                if precision.int8_deviation is not None
                else {}
            ),
        },
        "bank": {
            "size": len(bank),
            "patches": n_patches,
            "coreset_fraction": opts.coreset,
            "covering_radius": radius,
        },
        **({"tiling": tiling.as_manifest()} if tiling is not None else {}),
        **({"region": region} if region else {}),
        "scoring": {
            "k": opts.knn_k,
            "reweight": bool(opts.reweight_k),
            "reweight_k": opts.reweight_k,
            "mask_sigma": 4.0,
            "image_sigma": opts.image_sigma,
        },
        "thresholds": {},
        "training": {
            "n_images": n_images,
            "augment": opts.augment,
            "n_skipped": skipped,
            "source": str(folder),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1),
            "feature_seconds": round(feature_s, 1),
            "coreset_seconds": round(coreset_s, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "onnx_parity_rel": rel,
        },
        "platform": platform_record(),
        "files": {name: "" for name in files},
    }
    return bundle_format.write_manifest(out, manifest)


def platform_record() -> dict[str, Any]:
    """The manifest's `platform`: the CPU and the library versions (with the kernel level
    FAISS dispatched to, and OpenBLAS's forced core type) that computed the bank's features and
    chose its rows, so that two banks fitted on different machines can be told apart."""
    import faiss
    import onnxruntime as ort

    from edge_agent.ops import threads as thread_settings

    libraries = {
        "onnxruntime": ort.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    simd = getattr(faiss, "SIMDConfig", None)
    if simd is not None:
        libraries["faiss_simd"] = str(simd.get_level_name())
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    if coretype:
        libraries["openblas_coretype"] = coretype
    return {
        "cpu_model": thread_settings.cpu_model() or platform.processor() or "unknown",
        "cpu_simd": thread_settings.simd_flags(thread_settings.cpu_flags()),
        "libraries": libraries,
    }
