"""The bundle: one folder with everything the agent needs, and nothing that runs code on load.

    model.onnx          uint8 NHWC BGR frames [B, H, W, 3] -> patch features [B, h*w, D]
    bank.npy            coreset memory bank [M, D] float32 (loaded with allow_pickle=False)
    bank_knn.npy        optional [M, k] int32: each bank row's nearest bank rows (Eq. 7)
    training_images.json  SHA-256 of every training image (calibration refuses those)
    manifest.json       shapes, preprocessing, scoring, thresholds, SHA-256 of every file

Loading verifies every checksum and that the ONNX output width matches the bank width.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write

FORMAT = "edge-agent-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
BANK_FILE = "bank.npy"
BANK_KNN_FILE = "bank_knn.npy"
TRAINING_IMAGES_FILE = "training_images.json"


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

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        inp = self.manifest["input"]
        return int(inp["height"]), int(inp["width"])

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch-feature grid."""
        h, w = self.manifest["features"]["grid"]
        return int(h), int(w)

    @property
    def dim(self) -> int:
        return int(self.manifest["features"]["dim"])

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


def _fail(bundle_dir: Path, problem: str) -> UserError:
    return UserError(f"bundle {bundle_dir}: {problem}")


def read_manifest(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"bundle {bundle_dir}: no such folder")
    mpath = bundle_dir / MANIFEST
    if not mpath.is_file():
        raise _fail(bundle_dir, f"{MANIFEST} is missing (is this a bundle folder?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(bundle_dir, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(bundle_dir, f"{MANIFEST} is not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            bundle_dir,
            f"format version {version} is not supported (this edge-agent reads {FORMAT_VERSION})",
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


def _load_npy(bundle_dir: Path, name: str, dtype: type) -> np.ndarray:
    try:
        arr = np.load(bundle_dir / name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(bundle_dir, f"{name} is not a readable .npy array ({exc})") from None
    return np.ascontiguousarray(arr, dtype=dtype)


def onnx_output_width(model_path: Path, input_size: tuple[int, int]) -> int:
    """Feature width D of the ONNX graph: as declared, or by running one blank frame through
    it when the graph leaves the width symbolic."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        width = sess.get_outputs()[0].shape[-1]
        if isinstance(width, int):
            return width
        blank = np.zeros((1, *input_size, 3), dtype=np.uint8)
        return int(sess.run(None, {sess.get_inputs()[0].name: blank})[0].shape[-1])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise UserError(
            f"bundle {model_path.parent}: {MODEL_FILE} cannot be loaded ({exc})"
        ) from None


def load_bundle(bundle_dir: str | os.PathLike[str], *, check_model: bool = True) -> Bundle:
    """Load and verify a bundle; every problem is a UserError naming the file and the fault."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    bank = _load_npy(bundle_dir, BANK_FILE, np.float32)
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise _fail(bundle_dir, f"{BANK_FILE} must be a non-empty [M, D] array, got {bank.shape}")
    dim = int(manifest["features"]["dim"])
    if bank.shape[1] != dim:
        raise _fail(
            bundle_dir, f"{BANK_FILE} is {bank.shape[1]} wide but the manifest says D={dim}"
        )
    if check_model:
        size = (int(manifest["input"]["height"]), int(manifest["input"]["width"]))
        width = onnx_output_width(bundle_dir / MODEL_FILE, size)
        if width != bank.shape[1]:
            raise _fail(
                bundle_dir,
                f"{MODEL_FILE} outputs {width}-wide features but {BANK_FILE} is "
                f"{bank.shape[1]} wide: model and bank come from different fits",
            )
    bank_knn = None
    if BANK_KNN_FILE in manifest["files"]:
        bank_knn = _load_npy(bundle_dir, BANK_KNN_FILE, np.int32)
        if bank_knn.ndim != 2 or bank_knn.shape[0] != bank.shape[0]:
            raise _fail(bundle_dir, f"{BANK_KNN_FILE} shape {bank_knn.shape} does not fit the bank")
    return Bundle(path=bundle_dir, manifest=manifest, bank=bank, bank_knn=bank_knn)


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
    return write_manifest(Path(bundle_dir), manifest)
