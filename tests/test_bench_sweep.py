"""`edge-agent bench` and `edge-agent sweep` produce the figures BENCHMARKS.md is made of."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli import main
from edge_agent.tools.engine_bench import STAGES


def test_bench_json_has_every_stage_and_batch(
    small_bundle: Path, mtd_small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "--bundle", str(small_bundle), "--data", str(mtd_small / "test"),
                 "--batch", "1", "4", "--limit", "12", "--warmup", "1", "--json"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert [r["batch"] for r in result["by_batch"]] == [1, 4]
    for r in result["by_batch"]:
        assert r["images"] == 12  # warm-up batches are not counted
        assert set(r["stages"]) == set(STAGES)
        assert all(v >= 0 for v in r["stages"].values())
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        # Stages are per image; their sum cannot exceed the wall time per image.
        assert sum(r["stages"].values()) <= 1000 / r["images_per_second"] * 1.05
    assert result["images_per_second"] == max(r["images_per_second"] for r in result["by_batch"])
    assert result["bank_size"] > 0 and result["dim"] == 152


def test_bench_bad_batch(small_bundle: Path, mtd_small: Path) -> None:
    args = ["bench", "--bundle", str(small_bundle), "--data", str(mtd_small), "--batch", "0"]
    assert main(args) == 2


@pytest.mark.slow
def test_sweep_fits_each_embedding_once_and_scores_each_choice(
    mtd_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    code = main(["sweep", str(mtd_small), "--out", str(out), "--image-size", "128",
                 "--backbone", "efficientnet_lite0",
                 "--projection", "none", "pca:32", "--coreset", "0.02",
                 "--reweight-k", "0", "4", "--image-sigma", "0", "1"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    # Eq. 7 (k 4) is scored without smoothing only: fit refuses both at once.
    assert [(r["projection"], r["reweight_k"], r["image_sigma"]) for r in rows] == [
        ("none", 0, 0), ("none", 0, 1), ("none", 4, 0),
        ("pca", 0, 0), ("pca", 0, 1), ("pca", 4, 0),
    ]  # fmt: skip
    assert [r["dim"] for r in rows] == [152, 152, 152, 32, 32, 32]
    assert rows[0]["image_auroc"] != rows[1]["image_auroc"]  # the smoothing was applied
    for r in rows:
        assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pro"] <= 1.0
        assert set(r["per_type"]) == {"blowhole", "break", "crack", "fray", "uneven"}
    # The same bundle serves both scoring choices: identical fit figures.
    assert rows[0]["fit_seconds"] == rows[1]["fit_seconds"]
    table = capsys.readouterr().out
    assert "pca:32" in table and table.count("\n") >= 5
    assert not list(out.glob("bundle-*")), "bundles are removed unless --keep-bundles"


@pytest.mark.slow
def test_sweep_varies_the_precision(mtd_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code = main(["sweep", str(mtd_small), "--out", str(out), "--image-size", "128",
                 "--backbone", "efficientnet_lite0", "--coreset", "0.02", "--image-sigma", "1",
                 "--precision", "float32", "int8", "--keep-bundles"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in rows] == ["float32", "int8"]
    manifests = [json.loads((out / f"bundle-{n}/manifest.json").read_text()) for n in (0, 1)]
    assert [m["features"]["precision"] for m in manifests] == ["float32", "int8"]
    banks = [np.load(out / f"bundle-{n}/bank.npy") for n in (0, 1)]
    assert banks[0].shape == banks[1].shape and not np.allclose(*banks)  # two graphs' features


def test_sweep_needs_an_mvtec_dataset(tmp_path: Path) -> None:
    assert main(["sweep", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_bench_maps_ng_frames_as_the_agent_does(calibrated_bundle: Path, mtd_small: Path) -> None:
    """With thresholds, bench's map stage is the agent's: NG frames only, through exact_map
    (ivf-exact re-checks the patches under the mask), so engine and agent figures compare."""
    from edge_agent.images import list_images
    from edge_agent.model.bundle import load_bundle
    from edge_agent.model.scorer import Scorer
    from edge_agent.tools.engine_bench import bench_batch

    files = [p.read_bytes() for p in list_images(mtd_small / "test", recursive=True)][:12]
    scorer = Scorer(load_bundle(calibrated_bundle), device="cpu", index="ivf-exact")
    scores: list[float] = []
    bench_batch(scorer, files, 4, 0, scores)
    assert any(s >= 30.0 for s in scores) and any(s < 30.0 for s in scores)  # both verdicts
    assert scorer.recheck_stats["map_patches"] > 0  # plain anomaly_map re-checks nothing
