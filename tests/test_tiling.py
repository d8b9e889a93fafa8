"""Tiling (model/tiling.py): the pure geometry against brute force, then real fits on a
synthetic line-scan set: a thin scratch that a squeezed model misses is found by a tiled one at
its spot, the stitching leaves no tile borders, and every tool honours a tiled bundle."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.model.tiling import Tiling, axis_weights, default_overlap, starts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [
        (384, 128, 32),
        (384, 128, 0),
        (300, 128, 32),
        (128, 128, 64),
        (1000, 96, 88),
        (4096, 288, 96),
    ],
)
def test_starts_cover_the_axis_with_at_least_the_overlap(length, tile, overlap) -> None:
    p = starts(length, tile, overlap)
    assert p[0] == 0 and p[-1] + tile == length
    assert all(b - a >= 1 for a, b in itertools.pairwise(p))
    assert all(a + tile - b >= overlap for a, b in itertools.pairwise(p))  # shared px
    covered = np.zeros(length, bool)
    for s in p:
        covered[s : s + tile] = True
    assert covered.all()
    # no tile more than needed: without the last one, the axis would not be covered
    assert len(p) == 1 or p[-2] + tile < length


def _weights_by_hand(length: int, tile: int, overlap: int, cell: int) -> np.ndarray:
    p = starts(length, tile, overlap)
    out = np.zeros((length // cell, len(p)))
    for j in range(length // cell):
        x = (j + 0.5) * cell
        for i, s in enumerate(p):
            if not s < x < s + tile:
                continue
            depth = min(x - s if s > 0 else np.inf, s + tile - x if s + tile < length else np.inf)
            out[j, i] = min(1.0, depth / max(overlap, cell))
        out[j] /= out[j].sum()
    return out


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(384, 128, 32), (384, 128, 0), (296, 128, 64), (128, 128, 0)]
)
def test_axis_weights_are_the_depth_ramp(length, tile, overlap) -> None:
    w = axis_weights(length, tile, overlap, 8)
    np.testing.assert_allclose(w, _weights_by_hand(length, tile, overlap, 8), atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    if overlap == 0:  # a hard cut: each cell from exactly one tile
        assert set(np.unique(w)) <= {0.0, 1.0} and (w == 1.0).sum() == len(w)


def _cell_means(frames: np.ndarray, cell: int) -> np.ndarray:
    """A 'model' with no padding effects: [B, H, W, 3] -> [B, cells, 3] means per cell."""
    b, h, w, c = frames.shape
    blocks = frames.reshape(b, h // cell, cell, w // cell, cell, c).astype(np.float32)
    return blocks.mean(axis=(2, 4)).reshape(b, -1, c)


@pytest.mark.parametrize(
    ("frame", "tile", "overlap"),
    [((128, 384), (128, 128), 32), ((296, 296), (128, 128), 32), ((200, 520), (96, 160), 48)],
)
def test_cut_and_stitch_give_each_cell_its_own_pixels(frame, tile, overlap) -> None:
    # For a model whose features are each cell's own pixels, tiling must change nothing:
    # every tile sees a cell's pixels at the right place, and blending equal values keeps them.
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, *frame, 3), dtype=np.uint8)
    t = Tiling(frame, tile, overlap, 8)
    tiles = t.cut(frames)
    assert tiles.shape == (2 * t.count, *tile, 3)
    stitched = t.features(frames, lambda x: _cell_means(x, 8), tiles_per_run=5)
    np.testing.assert_allclose(stitched, _cell_means(frames, 8), rtol=1e-5)
    assert t.grid == (frame[0] // 8, frame[1] // 8)


@pytest.mark.parametrize(
    ("frame", "tile", "overlap", "problem"),
    [
        ((128, 384), (128, 130), 32, "multiples"),
        ((128, 384), (256, 128), 32, "larger than"),
        ((128, 384), (128, 128), 128, "overlap"),
        ((128, 383), (128, 128), 32, "multiples"),
    ],
)
def test_a_tiling_that_cannot_cut_its_frame_is_refused(frame, tile, overlap, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        Tiling(frame, tile, overlap, 8)


def test_default_overlap_is_at_most_half_a_tile() -> None:
    assert default_overlap((288, 288), 8) == 96
    assert default_overlap((128, 512), 8) == 64
    assert default_overlap((40, 40), 8) == 16


# -- real fits on a synthetic line-scan set ---------------------------------------------------

H, W, SCRATCH = 128, 1024, 3  # 8:1 strips of a stationary texture; a 3 px vertical scratch


def _texture(rng: np.random.Generator) -> np.ndarray:
    t = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 2.0)
    t = 128 + 40 * t / t.std()
    return cv2.cvtColor(np.clip(t, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def line_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec layout: 16 good strips to train on, 8 good and 8 scratched ones to test, with
    masks, and spots.json: each scratch's centre (y, x)."""
    root = tmp_path_factory.mktemp("line_scan")
    rng = np.random.default_rng(0)
    for d in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / d).mkdir(parents=True)
    for i in range(16):
        cv2.imwrite(str(root / f"train/good/{i:03d}.png"), _texture(rng))
    for i in range(8):
        cv2.imwrite(str(root / f"test/good/{i:03d}.png"), _texture(rng))
    spots = {}
    for i in range(8):
        frame = _texture(rng)
        x, y0 = int(rng.integers(W // 10, W - W // 10)), int(rng.integers(H // 8, H // 2))
        mask = np.zeros((H, W), np.uint8)
        cv2.line(mask, (x, y0), (x, y0 + H // 3), 255, SCRATCH)
        frame[mask > 0] = (frame[mask > 0] * 0.3).astype(np.uint8)
        cv2.imwrite(str(root / f"test/scratch/{i:03d}.png"), frame)
        cv2.imwrite(str(root / f"ground_truth/scratch/{i:03d}_mask.png"), mask)
        spots[f"{i:03d}"] = (y0 + H // 6, x)
    (root / "spots.json").write_text(json.dumps(spots))
    return root


def _fit(data: Path, out: Path, **opts) -> Path:
    from edge_agent.export.fit import FitOptions, fit

    # Lite0: the fast backbone, which the geometry figures of this module were measured with.
    opts = {"backbone": "efficientnet_lite0", **opts}
    fit(data / "train" / "good", out, FitOptions(coreset=0.1, progress=False, **opts))
    return out


@pytest.fixture(scope="module")
def line_bundles(line_scan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("line_bundles")
    return {
        "squeezed": _fit(line_scan, out / "squeezed", image_size=(288, 288)),
        "auto": _fit(line_scan, out / "auto"),
        "tiled": _fit(line_scan, out / "tiled", tile=(128, 128)),
        "cut": _fit(line_scan, out / "cut", tile=(128, 128), overlap=0),
    }


def _localised(bundle: Path, data: Path) -> tuple[int, int]:
    """(scratches where the map peaks at the scratch, scratches scored above every good strip)."""
    from edge_agent.images import read_image

    scorer = _scorer(bundle)
    goods = [read_image(p) for p in sorted((data / "test" / "good").iterdir())]
    worst_good = float(scorer.score_frames(goods).image_scores.max())
    at_spot = above = 0
    for name, (y, x) in json.loads((data / "spots.json").read_text()).items():
        frame = read_image(data / "test" / "scratch" / f"{name}.png")
        scores = scorer.score_frames([frame])
        amap = cv2.resize(scorer.anomaly_map(scores.patch_scores[0]), (W, H))
        py, px = np.unravel_index(int(amap.argmax()), amap.shape)
        at_spot += abs(int(px) - x) <= 16 and abs(int(py) - y) <= H // 3
        above += float(scores.image_scores[0]) > worst_good
    return at_spot, above


@pytest.mark.slow
def test_a_thin_scratch_the_squeezed_model_misses_is_found_at_its_spot(
    line_scan: Path, line_bundles: dict[str, Path]
) -> None:
    from edge_agent.model.bundle import load_bundle

    auto, tiled = load_bundle(line_bundles["auto"]), load_bundle(line_bundles["tiled"])
    assert auto.input_size == (96, 768) and auto.tiling is None  # 8:1 kept, ~288^2 pixels
    assert tiled.input_size == (H, W) and tiled.tiling is not None
    assert tiled.tiling.tile == (128, 128) and tiled.grid == (H // 8, W // 8)
    # Squeezed 1024 -> 288 px wide, a 3 px scratch is under a pixel: not seen at all.
    assert _localised(line_bundles["squeezed"], line_scan) == (0, 0)
    assert _localised(line_bundles["auto"], line_scan) >= (7, 7)
    at_spot, above = _localised(line_bundles["tiled"], line_scan)
    assert at_spot >= 6 and above >= 6


def _scorer(bundle: Path):
    from edge_agent.model.bundle import load_bundle
    from edge_agent.model.scorer import Scorer

    return Scorer(load_bundle(bundle), device="cpu", index="flat")


def _largest_step(bundle: Path) -> float:
    """The largest step between neighbouring columns of a constant frame's patch scores, away
    from the frame's edges, relative to the mean score."""
    scores = _scorer(bundle).score_frames([np.full((H, W, 3), 110, np.uint8)]).patch_scores[0]
    profile = scores[4:-4].mean(axis=0)
    return float(np.abs(np.diff(profile))[8:-8].max() / profile.mean())


def _seam_ratio(bundle: Path, data: Path) -> float:
    """Good strips' mean patch score in the columns where tiles meet over that elsewhere
    (away from the frame's edges): 1 when the seams do not show."""
    from edge_agent.images import read_image

    scorer = _scorer(bundle)
    tiling = scorer.tiling
    goods = [read_image(p) for p in sorted((data / "test" / "good").iterdir())]
    profile = scorer.score_frames(goods).patch_scores.mean(axis=(0, 1))
    cols = np.arange(len(profile))
    step = (tiling.tile[1] - tiling.overlap) // tiling.cell
    seam = (cols % step == 0) & (cols > 0)
    seam |= np.roll(seam, -1)  # the cells on both sides of where a tile starts
    inner = (cols >= 8) & (cols < len(profile) - 8)
    return float(profile[seam & inner].mean() / profile[~seam & inner].mean())


@pytest.mark.slow
def test_the_stitching_leaves_no_tile_borders(
    line_scan: Path, line_bundles: dict[str, Path]
) -> None:
    # A hard cut between tiles shows where tiles meet: on a constant frame as steps in the
    # map (each tile's padding bends its edge features), on good parts as a band of other
    # scores. The blend keeps a constant frame's map within a small ripple (module docstring:
    # the padding's reach does not fit in 128 px tiles) and good parts' seams invisible.
    # With the pretrained BatchNorm statistics (fit's fix) a cut steps by 16.5%, the blend by
    # 7.1%; the seams on good parts 0.87 and 1.015 of the rest (measured; the shifted
    # statistics before gave a cut's step above 21%).
    cut, blended = _largest_step(line_bundles["cut"]), _largest_step(line_bundles["tiled"])
    assert cut > 0.15 and blended < cut / 2 and blended < 0.08, (cut, blended)
    assert abs(_seam_ratio(line_bundles["cut"], line_scan) - 1) > 0.08
    assert abs(_seam_ratio(line_bundles["tiled"], line_scan) - 1) < 0.03


@pytest.mark.slow
def test_calibrate_evaluate_and_bench_honour_a_tiled_bundle(
    line_scan: Path, line_bundles: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from edge_agent.model.bundle import load_bundle

    bundle = tmp_path / "tiled"
    shutil.copytree(line_bundles["tiled"], bundle)

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "edge_agent", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    cli("calibrate", "--bundle", str(bundle), "--good", str(line_scan / "test" / "good"))
    assert load_bundle(bundle).thresholds["image"] > 0
    last = lambda out: json.loads(out.strip().splitlines()[-1])  # noqa: E731
    result = last(cli("evaluate", "--bundle", str(bundle), "--data", str(line_scan), "--json"))
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.9
    bench = last(cli("bench", "--bundle", str(bundle), "--data", str(line_scan / "test"), "--json"))
    assert bench["images_per_second"] > 0 and bench["by_batch"][0]["images"] == 16


@pytest.mark.slow
def test_the_agent_scores_a_tiled_bundle_and_reports_regions_in_frame_pixels(
    line_scan: Path, line_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from edge_agent.images import read_image
    from tests.brokers import Broker, Subscriber
    from tests.test_service import _config, _finish, _start, _verdicts

    scorer = _scorer(line_bundles["tiled"])
    goods = [read_image(p) for p in sorted((line_scan / "test" / "good").iterdir())]
    worst = float(scorer.score_frames(goods).image_scores.max())
    maps = scorer.score_frames(goods).patch_scores.max()
    spots = json.loads((line_scan / "spots.json").read_text())
    cameras = f"  - {{id: scan, source: {line_scan / 'test' / 'scratch'}}}\n"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config = _config(
            tmp_path,
            line_bundles["tiled"],
            broker,
            cameras,
            thresholds=(worst * 1.01, float(maps) * 1.01),
        )
        code, log = _finish(_start(config, "--exit-when-done"))
        assert code == 0, log[-3000:]
        sub.wait_for(lambda m: len(_verdicts(sub, "scan")) >= len(spots))
    verdicts = _verdicts(sub, "scan")
    assert "Traceback" not in log and len(verdicts) == len(spots)
    found = 0
    for v in verdicts:
        y, x = spots[Path(v["source"]).stem]
        if v["verdict"] != "NG":
            continue
        for region in v["regions"]:
            bx, by, bw, bh = region["bbox"]
            assert bx >= 0 and bx + bw <= W and by >= 0 and by + bh <= H  # frame pixels
            found += bx - 8 <= x <= bx + bw + 8 and by - 8 <= y <= by + bh + 8
    # 5 of 8 here: with a pixel threshold above every good strip's map, some scratches are
    # NG by their image score alone. The regions are far beyond one 128 px tile: frame pixels.
    assert found >= 5, [(v["verdict"], v["regions"]) for v in verdicts]
    assert max(r["bbox"][0] for v in verdicts for r in v["regions"]) > 384
