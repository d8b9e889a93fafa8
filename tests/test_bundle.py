"""Bundle loading refuses anything it cannot trust, with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import UserError
from edge_agent.model import bundle as bf


@pytest.fixture
def bundle_copy(small_bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(small_bundle, dest)
    return dest


def test_loads_and_describes_itself(small_bundle: Path) -> None:
    b = bf.load_bundle(small_bundle)
    m = b.manifest
    assert b.bank.dtype == np.float32 and b.bank.flags.c_contiguous
    assert b.bank.shape == (m["bank"]["size"], m["features"]["dim"])
    assert b.input_size == (224, 224) and b.grid == (28, 28)
    assert set(m["files"]) >= {bf.MODEL_FILE, bf.BANK_FILE, bf.TRAINING_IMAGES_FILE}
    assert m["training"]["n_images"] == 60
    assert len(b.training_image_hashes()) == 60
    assert len(b.model_id) == 16


def test_missing_folder() -> None:
    with pytest.raises(UserError, match="no such folder"):
        bf.load_bundle("/nonexistent/bundle")


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / bf.BANK_FILE).unlink()
    with pytest.raises(UserError, match=r"bank\.npy is missing"):
        bf.load_bundle(bundle_copy)


def test_missing_manifest(bundle_copy: Path) -> None:
    (bundle_copy / bf.MANIFEST).unlink()
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        bf.load_bundle(bundle_copy)


def test_corrupt_manifest(bundle_copy: Path) -> None:
    (bundle_copy / bf.MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        bf.load_bundle(bundle_copy)


def test_tampered_file_fails_checksum(bundle_copy: Path) -> None:
    bank = np.load(bundle_copy / bf.BANK_FILE)
    bank[0, 0] += 1.0
    np.save(bundle_copy / bf.BANK_FILE, bank)
    with pytest.raises(UserError, match="does not match its checksum"):
        bf.load_bundle(bundle_copy)


def test_bank_width_must_match_onnx_output(bundle_copy: Path) -> None:
    bank = np.load(bundle_copy / bf.BANK_FILE)
    np.save(bundle_copy / bf.BANK_FILE, np.ascontiguousarray(bank[:, :-8]))
    manifest = json.loads((bundle_copy / bf.MANIFEST).read_text())
    manifest["features"]["dim"] -= 8  # a consistent manifest, but from another fit
    bf.write_manifest(bundle_copy, manifest)
    with pytest.raises(UserError, match=r"outputs .*-wide features but bank\.npy is"):
        bf.load_bundle(bundle_copy)


def test_pickled_bank_is_refused(bundle_copy: Path) -> None:
    np.save(bundle_copy / bf.BANK_FILE, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bf.write_manifest(bundle_copy, json.loads((bundle_copy / bf.MANIFEST).read_text()))
    with pytest.raises(UserError, match=r"not a readable \.npy"):
        bf.load_bundle(bundle_copy)


def test_unsupported_format_version(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / bf.MANIFEST).read_text())
    manifest["format_version"] = 99
    (bundle_copy / bf.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99 is not supported"):
        bf.load_bundle(bundle_copy)


def test_update_thresholds_keeps_model_id_and_checksums(bundle_copy: Path) -> None:
    before = bf.load_bundle(bundle_copy)
    bf.update_thresholds(bundle_copy, {"image": 1.5, "pixel": 2.0})
    after = bf.load_bundle(bundle_copy)
    assert after.thresholds == {"image": 1.5, "pixel": 2.0}
    assert after.model_id == before.model_id
