"""Shared fixtures: the real MTD data beside the project and a real bundle fitted from it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from edge_agent.export.fit import FitOptions

ROOT = Path(__file__).resolve().parents[1]
MTD = Path(os.environ.get("EDGE_AGENT_MTD", ROOT.parent / "shared" / "datasets" / "mtd"))


def require_mtd() -> Path:
    if not (MTD / "train" / "good").is_dir():
        message = f"MTD dataset not found at {MTD} (set EDGE_AGENT_MTD)"
        if os.environ.get("EDGE_AGENT_REQUIRE_MTD"):
            pytest.fail(message)  # CI: the real-data tests must run, never skip quietly
        pytest.skip(message)
    return MTD


def unavailable(message: str) -> None:
    """Skip a test whose real component is missing here; in CI (which installs everything,
    scripts/setup.sh) fail instead, so a missing install step cannot pass quietly."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def mtd_subset(dest: Path, *, n_train: int, n_test_good: int, n_per_defect: int) -> Path:
    """A small MVTec-layout copy of MTD: the first files of each folder, masks included."""
    src = require_mtd()
    pick = {"train/good": n_train, "test/good": n_test_good}
    for defect in sorted(p.name for p in (src / "test").iterdir() if p.name != "good"):
        pick[f"test/{defect}"] = n_per_defect
    for rel, n in pick.items():
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / rel).iterdir())[:n]:
            shutil.copy(f, dest / rel / f.name)
            if rel.startswith("test/") and rel != "test/good":
                defect = rel.split("/")[1]
                mask = src / "ground_truth" / defect / f"{f.stem}_mask.png"
                (dest / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, dest / "ground_truth" / defect / mask.name)
    return dest


@pytest.fixture(scope="session")
def mtd_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 good training tiles; 20 good and 6 of each defect type for testing."""
    return mtd_subset(
        tmp_path_factory.mktemp("mtd_small"), n_train=60, n_test_good=20, n_per_defect=6
    )


@pytest.fixture(scope="session")
def small_bundle(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle (ONNX + coreset bank), fitted once per test session at 224x224 (smaller
    than the default input, to keep the suite fast) with the fast backbone, Lite0, and Eq. 7
    reweighting, so the tests that read its figures and its bank_knn table keep them; the
    default image score (smoothed, image_sigma) is tested on it through scoring_overrides.
    Float32, as those figures were measured; the default int8 trunk has its own bundle
    (test_quantize.py)."""
    from edge_agent.export.fit import fit

    out = tmp_path_factory.mktemp("bundles") / "small"
    fit(mtd_small, out, small_fit_options())
    return out


def small_fit_options() -> FitOptions:
    """small_bundle's fit: a test that fits another bundle "alike" (on other images) takes it
    from here, so the two cannot drift apart."""
    from edge_agent.export.fit import FitOptions

    return FitOptions(
        backbone="efficientnet_lite0",
        image_size=(224, 224),
        coreset=0.05,
        image_sigma=0.0,
        reweight_k=9,
        precision="float32",
        progress=False,
    )


def stop_agent(proc: subprocess.Popen) -> str:
    """SIGTERM an agent subprocess (stdout piped, text) and return its output; the test fails
    when it does not stop within 60 s or exits with anything but 0."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the agent did not stop:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="session")
def calibrated_bundle(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of small_bundle with thresholds written (image 30, pixel 28), as calibrate
    would leave it; for tests that need a runnable agent config."""
    from edge_agent.model.bundle import update_thresholds

    bundle = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(small_bundle, bundle)
    update_thresholds(bundle, {"image": 30.0, "pixel": 28.0})
    return bundle
