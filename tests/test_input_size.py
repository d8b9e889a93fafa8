"""`fit --image-size auto` (model/geometry.py): the training images' aspect ratio is kept when
they share one, square otherwise; the agent warns once per camera about frames of another
geometry and reports it in health."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.model.geometry import (
    ASPECT_TOLERANCE,
    DEFAULT_SIDE,
    MAX_AREA,
    MAX_SHRINK,
    aspect_mismatch,
    aspect_size,
    auto_input_size,
    one_aspect,
    shrink,
)

from .conftest import require_mtd

ROOT = Path(__file__).resolve().parents[1]


def _brute_force(target: float, multiple: int, side: int = DEFAULT_SIDE) -> tuple[int, int]:
    area = side * side
    best = min(
        (
            abs(math.log(w / h / target)) + abs(math.log(h * w / area)),
            h,
            w,
        )
        for h in range(multiple, 4 * side, multiple)
        for w in range(multiple, 16 * side, multiple)
    )
    return best[1], best[2]


@pytest.mark.parametrize("target", [1.0, 1.33, 2.5, 3.0, 8.0, 0.4, 1 / 3])
@pytest.mark.parametrize("multiple", [16, 32])
def test_aspect_size_is_the_argmin_over_every_multiple(target: float, multiple: int) -> None:
    h, w = aspect_size(target, multiple)
    assert h % multiple == 0 and w % multiple == 0

    def cost(hw: tuple[int, int]) -> float:
        return abs(math.log(hw[1] / hw[0] / target)) + abs(math.log(hw[0] * hw[1] / 288**2))

    assert cost((h, w)) == pytest.approx(cost(_brute_force(target, multiple)), abs=1e-12)


def test_one_shape_keeps_its_aspect_at_about_the_default_patch_count() -> None:
    choice = auto_input_size([(300, 750)] * 5, 16)  # shrunk 1.7x: no need to grow
    h, w = choice.size
    assert abs(w / h / 2.5 - 1) < ASPECT_TOLERANCE
    assert abs(h * w / DEFAULT_SIDE**2 - 1) < 0.15  # the same speed, within rounding
    assert "share one aspect ratio" in choice.reason and choice.aspect_range == (2.5, 2.5)
    assert "grown" not in choice.reason


# -- the frames' scale (issue 34) ---------------------------------------------------------------


def test_large_square_frames_grow_the_input_to_the_budget() -> None:
    choice = auto_input_size([(1024, 1024)] * 4, 16)
    assert choice.size == (448, 448)  # 2.42x 288x288's pixels: the budget (2.5x) rounded down
    assert "grown to 448x448 (the budget's most" in choice.reason
    assert "288x288 would shrink them 3.6x per side" in choice.reason


def test_frames_shrunk_at_most_max_shrink_keep_the_default() -> None:
    just_in = round(DEFAULT_SIDE * MAX_SHRINK) - 2
    assert auto_input_size([(just_in, just_in)], 16).size == (DEFAULT_SIDE, DEFAULT_SIDE)
    grown = auto_input_size([(just_in + 64, just_in + 64)], 16)
    # 638 px / MAX_SHRINK = 319 px, to whole strides: only as much as needed
    assert grown.size == (320, 320) and "grown" in grown.reason


@pytest.mark.parametrize(
    "shape", [(600, 600), (700, 900), (1024, 1024), (480, 1200), (3000, 4000), (2048, 256)]
)
def test_growth_keeps_the_aspect_and_stays_within_the_budget(shape: tuple[int, int]) -> None:
    before = auto_input_size([shape], 16, side=DEFAULT_SIDE)
    choice = auto_input_size([shape] * 3, 16)
    h, w = choice.size
    assert h % 16 == 0 and w % 16 == 0
    # Within the budget, give or take the rounding to whole strides (8 px of ~450).
    assert h * w <= MAX_AREA * DEFAULT_SIDE**2 * 1.08
    # Either the frames now shrink at most MAX_SHRINK times, or the budget is spent.
    assert shrink([shape], (h, w)) <= MAX_SHRINK * 1.04 or h * w >= MAX_AREA * 288**2 * 0.92
    assert abs(math.log(w / h / (shape[1] / shape[0]))) < ASPECT_TOLERANCE + 0.02
    assert h * w >= before.size[0] * before.size[1]


def test_mtd_keeps_its_measured_default() -> None:
    """MTD's crops (~320 px) shrink 1.1x at 288x288: the measured default is untouched."""
    from edge_agent.export.fit import training_shapes
    from edge_agent.images import list_images

    shapes = training_shapes(list_images(require_mtd() / "train" / "good"))
    choice = auto_input_size(shapes, 16)
    assert choice.size == (DEFAULT_SIDE, DEFAULT_SIDE) and "grown" not in choice.reason


def test_square_and_near_square_sets_get_exactly_the_default() -> None:
    assert auto_input_size([(512, 512)], 16).size == (DEFAULT_SIDE, DEFAULT_SIDE)
    assert auto_input_size([(500, 510), (505, 512)], 16).size == (DEFAULT_SIDE, DEFAULT_SIDE)


def test_mixed_shapes_fall_back_to_square() -> None:
    choice = auto_input_size([(300, 200), (200, 300), (250, 250)], 16)
    assert choice.size == (DEFAULT_SIDE, DEFAULT_SIDE) and "vary" in choice.reason


def test_the_tolerance_is_where_one_aspect_ends() -> None:
    assert one_aspect(2.0, 2.0 * (1 + ASPECT_TOLERANCE) - 1e-9)
    assert not one_aspect(2.0, 2.0 * (1 + ASPECT_TOLERANCE) + 1e-9)
    just_in = [(100, 200), (100, 209)]  # 4.5% apart
    just_out = [(100, 200), (100, 211)]  # 5.5% apart
    assert auto_input_size(just_in, 16).size != (DEFAULT_SIDE, DEFAULT_SIDE)
    assert auto_input_size(just_out, 16).size == (DEFAULT_SIDE, DEFAULT_SIDE)


def test_aspect_mismatch_outside_the_fitted_range_only() -> None:
    assert aspect_mismatch((100, 250), (2.5, 2.5)) is None
    assert aspect_mismatch((100, 260), (2.5, 2.5)) is None  # 4% off: within tolerance
    why = aspect_mismatch((200, 200), (2.5, 2.5))
    assert why is not None and "200x200 (1.00:1)" in why and "2.50:1" in why
    assert aspect_mismatch((200, 200), (0.4, 2.5)) is None  # a mixed set: any shape inside


# -- fit ---------------------------------------------------------------------------------------


def _wide_set(folder: Path, n: int = 6, shape: tuple[int, int] = (100, 250)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        noise = cv2.GaussianBlur(rng.normal(128, 40, shape).astype(np.float32), (0, 0), 1.5)
        cv2.imwrite(str(folder / f"{i}.png"), np.clip(noise, 0, 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def wide_auto_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_agent.export.fit import FitOptions, fit

    root = tmp_path_factory.mktemp("wide_auto")
    out = root / "bundle"
    fit(_wide_set(root / "good"), out, FitOptions(coreset=0.1, progress=False))
    return out


@pytest.mark.slow
def test_fit_keeps_the_aspect_of_same_shaped_images(wide_auto_bundle: Path) -> None:
    from edge_agent.model.bundle import load_bundle

    b = load_bundle(wide_auto_bundle)
    h, w = b.input_size
    assert (h, w) == aspect_size(2.5, 16) and b.grid == (h // 8, w // 8)
    assert w / h != pytest.approx(1.0)
    assert b.fitted_aspect == (2.5, 2.5)
    assert (
        "auto: the training images share one aspect ratio (2.50:1)"
        in (b.manifest["input"]["size_choice"])
    )


@pytest.mark.slow
def test_fit_falls_back_to_square_on_mixed_shapes(tmp_path: Path) -> None:
    from edge_agent.export.fit import FitOptions, fit
    from edge_agent.model.bundle import load_bundle

    goods = sorted((require_mtd() / "train" / "good").iterdir())[:8]
    aspects = sorted(w / h for h, w in (cv2.imread(str(p)).shape[:2] for p in goods))
    assert not one_aspect(aspects[0], aspects[-1])  # MTD's crops vary in shape
    folder = tmp_path / "good"
    folder.mkdir()
    for p in goods:
        (folder / p.name).write_bytes(p.read_bytes())
    fit(folder, tmp_path / "b", FitOptions(coreset=0.05, progress=False))
    b = load_bundle(tmp_path / "b")
    assert b.input_size == (DEFAULT_SIDE, DEFAULT_SIDE)
    assert "vary" in b.manifest["input"]["size_choice"]


@pytest.mark.slow
def test_fit_grows_the_input_for_large_frames_and_says_why(tmp_path: Path) -> None:
    data = _wide_set(tmp_path / "good", n=4, shape=(1024, 1024))
    proc = _cli(
        "fit", str(data), "--out", str(tmp_path / "b"), "--backbone", "efficientnet_lite0",
        "--coreset", "0.05", "--precision", "float32", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from edge_agent.model.bundle import load_bundle

    b = load_bundle(tmp_path / "b")
    assert b.input_size == (448, 448) and b.grid == (56, 56)
    reason = b.manifest["input"]["size_choice"]
    assert reason.startswith("auto: the training images are square") and "grown to 448" in reason
    assert f"input 448x448: {reason}" in proc.stdout.splitlines()
    # Pinned sizes win.
    pinned = _cli(
        "fit", str(data), "--out", str(tmp_path / "p"), "--backbone", "efficientnet_lite0",
        "--coreset", "0.05", "--precision", "float32", "--no-progress", "--image-size", "288",
    )  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr
    assert load_bundle(tmp_path / "p").input_size == (288, 288)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image-size", "wide"], "--image-size takes auto or HEIGHT [WIDTH]"),
        (["--tile", "100", "96"], "multiples of 16 px"),
        (["--tile", "96", "96", "--overlap", "12"], "multiple of 8 px"),
        (["--tile", "128", "128", "--overlap", "128"], "overlap"),
    ],
)
def test_bad_geometry_options_are_one_line_errors(tmp_path: Path, args, needle) -> None:
    data = _wide_set(tmp_path / "good", n=2)
    proc = _cli("fit", str(data), "--out", str(tmp_path / "b"), "--no-progress", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edge-agent: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


# -- the agent -----------------------------------------------------------------------------


@pytest.mark.slow
def test_agent_warns_once_per_camera_about_frames_of_another_aspect(
    tmp_path: Path, wide_auto_bundle: Path
) -> None:
    from tests.brokers import Broker, Subscriber
    from tests.test_service import PREFIX, _config, _finish, _start, _verdicts

    square = tmp_path / "square"
    square.mkdir()
    for i, path in enumerate(sorted(_wide_set(tmp_path / "wide").iterdir())):
        frame = cv2.imread(str(path))
        (square / f"{i}.png").write_bytes(cv2.imencode(".png", frame[:, :100])[1].tobytes())
        (tmp_path / "wide_ok").mkdir(exist_ok=True)
        (tmp_path / "wide_ok" / f"{i}.png").write_bytes(path.read_bytes())
    cameras = (
        f"  - {{id: odd, source: {square}}}\n  - {{id: fits, source: {tmp_path / 'wide_ok'}}}\n"
    )
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config = _config(tmp_path, wide_auto_bundle, broker, cameras, thresholds=(1e5, 1e5))
        code, log = _finish(_start(config, "--exit-when-done"))
        assert code == 0, log[-3000:]
        sub.wait_for(lambda m: len(_verdicts(sub, "odd")) >= 6 and len(_verdicts(sub, "fits")) >= 6)
        health = {
            cam: json.loads(sub.on(f"{PREFIX}/{cam}/health")[-1].payload) for cam in ("odd", "fits")
        }
    assert {v["verdict"] for v in _verdicts(sub, "odd")} == {"OK"}  # still scored
    warnings = [ln for ln in log.splitlines() if "fitted on images of" in ln]
    assert len(warnings) == 1 and "camera odd" in warnings[0], log[-3000:]
    assert "100x100 (1.00:1)" in warnings[0] and "2.50:1" in warnings[0]
    assert "100x100" in health["odd"]["aspect_mismatch"]
    assert health["fits"]["aspect_mismatch"] is None
