"""The bundle: one folder with everything the agent needs, and nothing that runs code on load.

    model.onnx          uint8 NHWC BGR frames [B, H, W, 3] -> patch features [B, h*w, D]
    bank.npy            coreset memory bank [M, D] float32 (loaded with allow_pickle=False)
    bank_knn.npy        optional [M, k] int32: each bank row's nearest bank rows (Eq. 7)
    training_images.json  SHA-256 of every training image (calibration refuses those)
    manifest.json       shapes, preprocessing, scoring, thresholds, SHA-256 of every file

Loading verifies every checksum, validates the manifest against one schema (ManifestModel:
types and ranges of every field the agent uses; unknown fields are kept, so a newer tool may
add some) and checks the arrays against it and against the ONNX graph: a finite [M, D] bank,
bank_knn rows that are bank rows, a grid and a width that are what the graph outputs at the
input size. Anything else is a UserError naming the bundle and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import cv2
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write
from edge_agent.model.tiling import Tiling

FORMAT = "edge-agent-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
BANK_FILE = "bank.npy"
IGNORE_FILE = "ignore.png"
BANK_KNN_FILE = "bank_knn.npy"
TRAINING_IMAGES_FILE = "training_images.json"

MAX_MANIFEST_BYTES = 1 << 20  # fit writes ~2 KB; bounds what a damaged file can cost to parse
MIN_INPUT_SIDE = 16  # below this the backbone's feature maps have no patches left
MAX_INPUT_SIDE = 4096  # a 4096x4096 frame is already ~260k patches to search per image
MAX_DIM = 65536
MAX_K = 1024  # neighbours per patch (scoring.k) or per bank row (reweight_k)
MAX_MASK_SIGMA = 64.0  # the blur kernel is 8 sigma wide: beyond this it costs seconds per map
MAX_IMAGE_SIGMA = 8.0  # cells; the image score's kernel reaches 2 sigma, 33x33 cells at most
# Scores are distances between feature vectors: tens for every backbone fit exports. A
# threshold beyond this can never be reached by a real frame, so it would pass every part.
MAX_THRESHOLD = 1e6
# Features (bank rows and what the graph outputs) are tens at most. Far beyond, float32
# squared distances overflow: FAISS then answers "no neighbour" with a finite sentinel
# distance, and its k-means (ivf) aborts the whole process on such a bank at load.
MAX_FEATURE_ABS = 1e6


# -- the manifest schema --------------------------------------------------------------------


class _Section(BaseModel):
    # Strict: JSON already has real numbers and booleans, so "224" or true where an integer
    # belongs is damage, not a spelling. Unknown keys are allowed (and kept in the manifest
    # dict): a newer fit or calibrate may record more without breaking this agent.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)


Side = Annotated[int, Field(ge=MIN_INPUT_SIDE, le=MAX_INPUT_SIDE)]
GridSide = Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)]
Threshold = Annotated[float, Field(gt=0, le=MAX_THRESHOLD)]
Score = Annotated[float, Field(ge=0, le=MAX_THRESHOLD)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# A plain file name: no folders, no leading dot, nothing a path could choke on (NUL).
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")]


class InputSection(_Section):
    height: Side
    width: Side
    # What the agent feeds the graph; a bundle expecting anything else would get garbage.
    channels: Literal[3] = 3
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    color: Literal["BGR"] = "BGR"


class TilingSection(_Section):
    """fit --tile: the graph takes `tile` (height, width) tiles cut from frames of the input
    size, sharing `overlap` pixels; `cell` pixels per patch cell (model/tiling.py)."""

    tile: Annotated[list[Side], Field(min_length=2, max_length=2)]
    overlap: Annotated[int, Field(ge=0, le=MAX_INPUT_SIDE)]
    cell: Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE)]


Precision = Literal["float32", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class FeaturesSection(_Section):
    grid: Annotated[list[GridSide], Field(min_length=2, max_length=2)]
    dim: Annotated[int, Field(ge=1, le=MAX_DIM)]
    # fit --precision (export/quantize.py); absent in bundles fitted before it: float32. The
    # graph runs either way; this says which arithmetic the bank was learnt with.
    precision: Precision = "float32"


class BankSection(_Section):
    size: Annotated[int, Field(ge=1)] | None = None
    # fit's coreset covering radius (teach keeps taught patches within it); absent before
    covering_radius: Annotated[float, Field(ge=0, le=MAX_THRESHOLD)] | None = None


class TaughtImage(_Section):
    name: str
    sha256: Sha256


class HistoryEntry(_Section):
    """One `edge-agent teach` (edge_agent/tools/teach.py): what it added to which version."""

    date: str
    action: Literal["teach"]
    previous_model_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    images: list[TaughtImage]
    rows_added: Annotated[int, Field(ge=0)]


class ScoringSection(_Section):
    k: Annotated[int, Field(ge=1, le=MAX_K)]
    reweight: bool
    reweight_k: Annotated[int, Field(ge=0, le=MAX_K)]
    mask_sigma: Annotated[float, Field(ge=0, le=MAX_MASK_SIGMA)]
    # Absent in bundles fitted before it existed: the plain (or Eq. 7) maximum.
    image_sigma: Annotated[float, Field(ge=0, le=MAX_IMAGE_SIGMA)] = 0.0

    @model_validator(mode="after")
    def _one_image_score(self) -> ScoringSection:
        if self.image_sigma > 0 and self.reweight and self.reweight_k >= 2:
            raise ValueError("image_sigma and Eq. 7 reweighting are alternatives: set one")
        return self


class Normalization(_Section):
    low: Score
    threshold: Threshold
    high: Threshold

    @model_validator(mode="after")
    def _ordered(self) -> Normalization:
        if not (self.low <= self.threshold <= self.high and self.low < self.high):
            raise ValueError(
                f"must have low <= threshold <= high and low < high, got low {self.low:g}, "
                f"threshold {self.threshold:g}, high {self.high:g}"
            )
        return self


class ThresholdsSection(_Section):
    image: Threshold | None = None
    pixel: Threshold | None = None
    normalization: Normalization | None = None
    calibrated: dict[str, Any] | None = None  # calibrate's record, for people: not used here


class RegionSection(_Section):
    """fit --roi / --ignore: the part of the frame the bundle learnt, and the pixels of it
    that it never saw (IGNORE_FILE, white = ignored, ROI-sized), so run cannot disagree."""

    roi: (
        Annotated[list[Annotated[int, Field(ge=0, le=65535)]], Field(min_length=4, max_length=4)]
        | None
    ) = None
    ignore: FileName | None = None

    @field_validator("roi")
    @classmethod
    def _area(cls, roi: list[int] | None) -> list[int] | None:
        if roi is not None and (roi[2] < 1 or roi[3] < 1):
            raise ValueError(f"width and height must be positive, got {roi}")
        return roi


class PlatformSection(_Section):
    """What computed the bank (fit): the CPU and the libraries whose kernels produced its
    features and chose its rows, so that a bank that differs from another machine's can be
    explained. For people and `doctor`: nothing reads it to score. Absent before it existed."""

    cpu_model: str | None = None
    cpu_simd: list[str] | None = None  # the SIMD flags the kernels choose by, as /proc/cpuinfo
    libraries: dict[str, str] | None = None  # name -> version (and kernel level where known)


class ManifestModel(_Section):
    """manifest.json as fit (export/fit.py) and calibrate (thresholds_section) write it."""

    format: Literal["edge-agent-bundle"]
    format_version: Literal[1]
    model_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    files: dict[FileName, Sha256]
    input: InputSection
    features: FeaturesSection
    bank: BankSection | None = None
    tiling: TilingSection | None = None
    region: RegionSection | None = None
    scoring: ScoringSection
    thresholds: ThresholdsSection | None = None
    # teach: its versions, oldest first; True when the bank changed after calibration (the
    # thresholds still apply and run keeps them, but `edge-agent calibrate` should be re-run)
    history: list[HistoryEntry] | None = None
    calibration_stale: bool = False
    platform: PlatformSection | None = None


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problem(exc: ValidationError) -> str:
    """The first error as `field.path: what is wrong, got VALUE`, on one line."""
    err = exc.errors(include_url=False)[0]
    where = _where(err["loc"]) or "the manifest"
    if err["type"] == "missing":
        return f"{where}: missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    if err["type"] == "value_error":  # our own validators say what they found
        return f"{where}: {msg}"
    got = repr(err.get("input"))
    return f"{where}: {msg}, got {got if len(got) <= 60 else got[:57] + '...'}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. `manifest` is the parsed manifest.json."""

    path: Path
    manifest: dict[str, Any]
    bank: np.ndarray  # [M, D] float32, C-contiguous
    bank_knn: np.ndarray | None  # [M, k] int32
    # fit --ignore: bool, the ROI's (or the training frames') size, True = never learnt
    ignore: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def roi(self) -> tuple[int, int, int, int] | None:
        """fit --roi: (x, y, w, h) in frame pixels; None: the whole frame."""
        roi = (self.manifest.get("region") or {}).get("roi")
        return (int(roi[0]), int(roi[1]), int(roi[2]), int(roi[3])) if roi else None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        inp = self.manifest["input"]
        return int(inp["height"]), int(inp["width"])

    @cached_property
    def tiling(self) -> Tiling | None:
        """How frames are cut into the graph's tiles; None: the graph takes whole frames."""
        return tiling_of(self.manifest)

    @property
    def fitted_aspect(self) -> tuple[float, float] | None:
        """(min, max) w / h of the training images, where fit recorded it."""
        value = self.manifest["input"].get("training_aspect")
        return (float(value[0]), float(value[1])) if value else None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch-feature grid (of the whole frame, stitched, when tiled)."""
        h, w = self.manifest["features"]["grid"]
        return int(h), int(w)

    @property
    def dim(self) -> int:
        return int(self.manifest["features"]["dim"])

    @property
    def precision(self) -> str:
        """The graph's arithmetic, "int8" or "float32" (bundles from before fit --precision)."""
        return str(self.manifest["features"].get("precision", "float32"))

    @property
    def scoring(self) -> dict[str, Any]:
        return self.manifest["scoring"]

    @property
    def thresholds(self) -> dict[str, Any]:
        return self.manifest.get("thresholds") or {}

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    def training_image_hashes(self) -> set[str]:
        path = self.path / TRAINING_IMAGES_FILE
        if not path.is_file():
            return set()
        return set(json.loads(path.read_text())["sha256"])


def tiling_of(manifest: dict[str, Any]) -> Tiling | None:
    """The manifest's tiling (ValueError where it cannot cut its own input size)."""
    section = manifest.get("tiling")
    if not section:
        return None
    frame = (int(manifest["input"]["height"]), int(manifest["input"]["width"]))
    tile = (int(section["tile"][0]), int(section["tile"][1]))
    return Tiling(frame, tile, int(section["overlap"]), int(section["cell"]))


def _fail(bundle_dir: Path, problem: str) -> UserError:
    return UserError(f"bundle {bundle_dir}: {problem}")


def read_manifest(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest.json, validated against ManifestModel (unknown fields kept)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"bundle {bundle_dir}: no such folder")
    mpath = bundle_dir / MANIFEST
    if not mpath.is_file():
        raise _fail(bundle_dir, f"{MANIFEST} is missing (is this a bundle folder?)")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise _fail(bundle_dir, f"{MANIFEST} is over {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(mpath.read_text())
    # ValueError: bad JSON, bad UTF-8, an integer too long to convert; RecursionError: nesting
    except (OSError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise _fail(bundle_dir, f"{MANIFEST} is not valid JSON ({reason})") from None
    return validate_manifest(bundle_dir, manifest)


def validate_manifest(bundle_dir: Path, manifest: Any) -> dict[str, Any]:
    """`manifest` (parsed JSON) if it fits ManifestModel, else a UserError naming the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(bundle_dir, f"{MANIFEST} is not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise _fail(
            bundle_dir,
            f"format version {version!r} is not supported (this edge-agent reads {FORMAT_VERSION})",
        )
    try:
        model = ManifestModel.model_validate(manifest)
    except ValidationError as exc:
        raise _fail(bundle_dir, f"{MANIFEST}: {_schema_problem(exc)}") from None
    t = model.thresholds
    # calibrate writes image == normalization.threshold: an image threshold outside the
    # recorded range was edited by hand (1e308 would pass every part).
    if t is not None and t.normalization is not None and t.image is not None:
        n = t.normalization
        if not n.low <= t.image <= n.high:
            raise _fail(
                bundle_dir,
                f"{MANIFEST}: thresholds.image: {t.image:g} is outside the calibrated score "
                f"range {n.low:g}..{n.high:g} (thresholds.normalization), so it is not what "
                "calibrate wrote: empty `thresholds` and run `edge-agent calibrate` again",
            )
    return manifest


def verify_files(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files or BANK_FILE not in files:
        raise _fail(bundle_dir, f"{MANIFEST} lists no checksums for {MODEL_FILE} and {BANK_FILE}")
    for name, expected in files.items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise _fail(bundle_dir, f"{MANIFEST} names a file outside the bundle: {name!r}")
        if not path.is_file():
            raise _fail(bundle_dir, f"{name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise _fail(
                bundle_dir,
                f"{name} does not match its checksum (expected {expected[:12]}..., "
                f"found {actual[:12]}...): the file was changed or damaged",
            )


def _load_npy(bundle_dir: Path, name: str, kinds: str) -> np.ndarray:
    """The array as stored; its dtype must be one of numpy's `kinds` ("f": float, "iu": int)."""
    try:
        arr = np.load(bundle_dir / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _fail(bundle_dir, f"{name} is not a readable .npy array ({exc})") from None
    if arr.dtype.kind not in kinds:
        wanted = "floating-point" if kinds == "f" else "integer"
        raise _fail(bundle_dir, f"{name} must hold {wanted} values, not {arr.dtype}")
    return arr


def _onnx_shape(model_path: Path, input_size: tuple[int, int]) -> tuple[int, int]:
    """(patches per image, feature width) of the ONNX graph's output at `input_size`: as
    declared, or by running one blank frame through it when the graph leaves them symbolic.
    Declared input sizes other than `input_size` are refused."""
    import onnxruntime as ort

    bundle_dir = model_path.parent
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise _fail(bundle_dir, f"{MODEL_FILE} cannot be loaded ({_one_line(exc)})") from None
    height, width = input_size
    declared = list(inp.shape)
    if inp.type != "tensor(uint8)" or len(declared) != 4:
        raise _fail(
            bundle_dir,
            f"{MODEL_FILE} takes {inp.type} {declared}, not uint8 frames [batch, H, W, 3]",
        )
    for got, want in zip(declared[1:], (height, width, 3), strict=True):
        if isinstance(got, int) and got != want:
            raise _fail(
                bundle_dir,
                f"{MODEL_FILE} takes frames of shape {declared[1:]} but the manifest's input "
                f"is {height}x{width}x3: model and manifest do not belong together",
            )
    shape = list(out.shape)
    if len(shape) == 3 and isinstance(shape[1], int) and isinstance(shape[2], int):
        return shape[1], shape[2]
    blank = np.zeros((1, height, width, 3), dtype=np.uint8)
    try:
        feats = sess.run(None, {inp.name: blank})[0]
    except Exception as exc:
        raise _fail(
            bundle_dir, f"{MODEL_FILE} cannot run a {width}x{height} frame ({_one_line(exc)})"
        ) from None
    if feats.ndim != 3:
        raise _fail(bundle_dir, f"{MODEL_FILE} outputs shape {feats.shape}, not [B, h*w, D]")
    return int(feats.shape[1]), int(feats.shape[2])


def onnx_output_width(model_path: Path, input_size: tuple[int, int]) -> int:
    """Feature width D of the ONNX graph (see _onnx_shape)."""
    return _onnx_shape(model_path, input_size)[1]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_bundle(bundle_dir: str | os.PathLike[str], *, check_model: bool = True) -> Bundle:
    """Load and verify a bundle; every problem is a UserError naming the file and the fault."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    bank = _load_npy(bundle_dir, BANK_FILE, "f")
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise _fail(bundle_dir, f"{BANK_FILE} must be a non-empty [M, D] array, got {bank.shape}")
    # One NaN row poisons every distance to it; an inf one makes scores inf or NaN.
    if not np.isfinite(bank).all():
        bad = int(np.count_nonzero(~np.isfinite(bank).all(axis=1)))
        raise _fail(bundle_dir, f"{BANK_FILE} has {bad} row(s) with NaN or infinite values")
    peak = float(np.abs(bank).max())
    if peak > MAX_FEATURE_ABS:
        raise _fail(
            bundle_dir,
            f"{BANK_FILE} has values up to {peak:.3g}, beyond any feature a model outputs "
            f"(at most {MAX_FEATURE_ABS:g}): its distances would overflow",
        )
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    rows, dim = bank.shape
    if dim != manifest["features"]["dim"]:
        declared = manifest["features"]["dim"]
        raise _fail(bundle_dir, f"{BANK_FILE} is {dim} wide but the manifest says D={declared}")
    size = (manifest.get("bank") or {}).get("size")
    if size is not None and size != rows:
        raise _fail(
            bundle_dir, f"{BANK_FILE} has {rows} rows but the manifest says bank.size={size}"
        )
    scoring = manifest["scoring"]
    if scoring["k"] > rows:
        raise _fail(
            bundle_dir, f"scoring.k={scoring['k']} neighbours, but {BANK_FILE} has only {rows} rows"
        )
    try:
        tiling = tiling_of(manifest)
    except ValueError as exc:
        raise _fail(bundle_dir, f"tiling: {exc}") from None
    gh, gw = manifest["features"]["grid"]
    if tiling is not None and tiling.grid != (gh, gw):
        raise _fail(
            bundle_dir,
            f"features.grid {gh}x{gw} is not the tiled frame's {tiling.grid[0]}x"
            f"{tiling.grid[1]} patch cells",
        )
    if check_model:
        input_size = (manifest["input"]["height"], manifest["input"]["width"])
        if tiling is not None:  # the graph takes tiles and outputs a tile's patches
            input_size, (gh, gw) = tiling.tile, tiling.tile_grid
        patches, width = _onnx_shape(bundle_dir / MODEL_FILE, input_size)
        if width != dim:
            raise _fail(
                bundle_dir,
                f"{MODEL_FILE} outputs {width}-wide features but {BANK_FILE} is "
                f"{dim} wide: model and bank come from different fits",
            )
        if patches != gh * gw:
            raise _fail(
                bundle_dir,
                f"{'a tile' if tiling else 'features.grid'} {gh}x{gw} is {gh * gw} patches "
                f"but {MODEL_FILE} outputs {patches} at the input size "
                f"{input_size[0]}x{input_size[1]}",
            )
    bank_knn = None
    if BANK_KNN_FILE in manifest["files"]:
        bank_knn = _load_bank_knn(bundle_dir, rows)
    reweight_k = scoring["reweight_k"]
    if scoring["reweight"] and reweight_k >= 2:  # the Scorer's rule for reweighting
        if bank_knn is None:
            raise _fail(bundle_dir, f"scoring.reweight needs {BANK_KNN_FILE}, which is not listed")
        if bank_knn.shape[1] < reweight_k:
            raise _fail(
                bundle_dir,
                f"{BANK_KNN_FILE} has {bank_knn.shape[1]} columns but scoring.reweight_k is "
                f"{reweight_k}",
            )
    ignore = _load_ignore(bundle_dir, manifest)
    return Bundle(path=bundle_dir, manifest=manifest, bank=bank, bank_knn=bank_knn, ignore=ignore)


def _load_ignore(bundle_dir: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The region's ignore mask (checksummed with the other files), as fit wrote it."""
    region = manifest.get("region") or {}
    name = region.get("ignore")
    if not name:
        return None
    if name not in manifest["files"]:
        raise _fail(bundle_dir, f"region.ignore: {name} is not among the checksummed files")
    data = cv2.imread(str(bundle_dir / name), cv2.IMREAD_UNCHANGED)
    if data is None or data.ndim != 2:
        raise _fail(bundle_dir, f"region.ignore: {name} is not a one-channel image")
    roi = region.get("roi")
    if roi and data.shape != (roi[3], roi[2]):
        raise _fail(
            bundle_dir,
            f"region.ignore: {name} is {data.shape[1]}x{data.shape[0]}, the ROI {roi[2]}x{roi[3]}",
        )
    return data > 127


def _load_bank_knn(bundle_dir: Path, rows: int) -> np.ndarray:
    """[M, k] int32 bank rows. Checked before the cast: int64 values would wrap, and numpy
    reads a negative index from the end, so a bad row would silently pick another one."""
    knn = _load_npy(bundle_dir, BANK_KNN_FILE, "iu")
    if knn.ndim != 2 or knn.shape[0] != rows or knn.shape[1] == 0:
        raise _fail(bundle_dir, f"{BANK_KNN_FILE} shape {knn.shape} does not fit the bank")
    if knn.min() < 0 or knn.max() >= rows:
        raise _fail(
            bundle_dir,
            f"{BANK_KNN_FILE} has values {knn.min()}..{knn.max()}, outside the bank's rows "
            f"0..{rows - 1}",
        )
    knn = np.ascontiguousarray(knn, dtype=np.int32)
    # Eq. 7 takes column 0 as the row itself (export.fit.bank_neighbours guarantees it).
    if not np.array_equal(knn[:, 0], np.arange(rows, dtype=np.int32)):
        raise _fail(bundle_dir, f"{BANK_KNN_FILE} column 0 must be each row's own index")
    return knn


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every data file listed in manifest['files'] and write manifest.json atomically.

    `model_id` is derived from the model and bank checksums, so a re-fit gets a new id while a
    threshold change (calibration) keeps it.
    """
    bundle_dir = Path(bundle_dir)
    files = {name: sha256_file(bundle_dir / name) for name in sorted(manifest["files"])}
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
    manifest["model_id"] = sha256_bytes((files[MODEL_FILE] + files[BANK_FILE]).encode())[:16]
    atomic_write(bundle_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def update_thresholds(bundle_dir: Path, thresholds: dict[str, Any]) -> dict[str, Any]:
    """Replace the manifest's thresholds section (calibration), re-verifying files first."""
    manifest = read_manifest(bundle_dir)
    verify_files(Path(bundle_dir), manifest)
    manifest["thresholds"] = thresholds
    manifest.pop("calibration_stale", None)  # thresholds from the current bank again
    # The same schema as at load: never write a section the agent would then refuse.
    validate_manifest(Path(bundle_dir), manifest)
    return write_manifest(Path(bundle_dir), manifest)
