"""`edge-agent sweep`: fit and evaluate a grid of embedding and scoring choices on an
MVTec-layout dataset and print one table (accuracy, fit time, images/s, bank size).

Each embedding choice (layers x projection x patch size x coreset fraction) is fitted once;
the scoring choices (Eq. 7 reweighting k) are evaluated on that same bundle.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path
from typing import Any

from edge_agent.errors import UserError
from edge_agent.export.backbones import BACKBONES, DEFAULT_LAYERS
from edge_agent.export.fit import PRECISION_CHOICES, FitOptions, fit, parse_image_size
from edge_agent.tools.evaluate import evaluate

log = logging.getLogger(__name__)


def _projection(value: str) -> tuple[str, int | None]:
    kind, _, dim = value.partition(":")
    if kind not in ("none", "adaptive", "random", "pca"):
        raise argparse.ArgumentTypeError(f"unknown projection {kind!r}")
    if (kind == "none") != (dim == ""):
        raise argparse.ArgumentTypeError(f"{value!r}: use none, adaptive:D, random:D or pca:D")
    return kind, int(dim) if dim else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FitOptions()  # the grid defaults to fit's defaults: a sweep varies what it is told to
    p.add_argument("data", type=Path, help="MVTec-layout dataset")
    p.add_argument("--out", type=Path, required=True, help="folder for bundles and results")
    p.add_argument(
        "--layers",
        nargs="+",
        default=[",".join(DEFAULT_LAYERS[d.backbone])],
        help="one or more comma-separated layer sets",
    )
    p.add_argument(
        "--projection",
        nargs="+",
        type=_projection,
        default=[("none", None)],
        help="none, adaptive:D, random:D, pca:D",
    )
    p.add_argument("--patch-size", nargs="+", type=int, default=[d.patch_size])
    p.add_argument("--coreset", nargs="+", type=float, default=[d.coreset])
    p.add_argument("--reweight-k", nargs="+", type=int, default=[d.reweight_k])
    p.add_argument(
        "--image-sigma",
        nargs="+",
        type=float,
        default=[0.0, d.image_sigma],
        help="image-score smoothing in patch cells (fit's --image-sigma); a --reweight-k of 2 "
        "or more is scored with 0, as fit requires",
    )
    p.add_argument(
        "--image-size", nargs="+", default="auto", help="as fit's: auto or HEIGHT [WIDTH]"
    )
    p.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    p.add_argument(
        "--precision", nargs="+", choices=PRECISION_CHOICES, default=[d.precision], help="as fit's"
    )
    p.add_argument("--keep-bundles", action="store_true", help="keep every fitted bundle")


def _row(config: dict[str, Any], fit_m: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {
        **config,
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "pro": result["pro"],
        "recall_at_frr": result["recall_at_frr"],
        "per_type": {
            t: {k: m[k] for k in ("image_auroc", "pixel_auroc", "pro", "recall_at_frr")}
            for t, m in result["per_type"].items()
        },
        "images_per_second": result["images_per_second"],
        "fit_seconds": fit_m["training"]["seconds"],
        "coreset_seconds": fit_m["training"]["coreset_seconds"],
        "peak_rss_mb": fit_m["training"]["peak_rss_mb"],
        "bank_size": fit_m["bank"]["size"],
        "dim": fit_m["features"]["dim"],
    }


RANK_RATE = "0.01"  # the sweep ranks by recall at 1% false rejects, then image AUROC


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: recall at RANK_RATE false rejects, ties broken by image AUROC."""
    return sorted(
        rows, key=lambda r: (r["recall_at_frr"][RANK_RATE], r["image_auroc"]), reverse=True
    )


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'layers':<18}{'proj':<14}{'p':>2}{'core':>6}{'prec':>8}{'rw':>3}{'sig':>4}{'D':>6}{'M':>7}"
        f"{'R@1%':>7}{'image':>7}{'pixel':>7}{'PRO':>7}{'fit s':>7}{'img/s':>7}"
    )
    print("ranked by recall at 1% false rejects (R@1%), then image AUROC")
    print(head)
    for r in ranked(rows):
        proj = r["projection"] + (f":{r['embed_dim']}" if r["embed_dim"] else "")
        print(
            f"{r['layers']:<18}{proj:<14}{r['patch_size']:>2}{r['coreset']:>6.3f}"
            f"{r['precision']:>8}"
            f"{r['reweight_k']:>3}{r['image_sigma']:>4g}{r['dim']:>6}{r['bank_size']:>7}"
            f"{r['recall_at_frr'][RANK_RATE]:>7.3f}{r['image_auroc']:>7.3f}"
            f"{r['pixel_auroc']:>7.3f}{r['pro']:>7.3f}{r['fit_seconds']:>7.0f}"
            f"{r['images_per_second']:>7.1f}"
        )


def run(args: argparse.Namespace) -> int:
    if not (args.data / "test").is_dir():
        raise UserError(f"{args.data}: sweep needs an MVTec-layout dataset with test/")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "sweep.jsonl"
    size = parse_image_size(args.image_size)
    rows = []
    grid = itertools.product(
        args.layers, args.projection, args.patch_size, args.coreset, args.precision
    )
    max_k = max(args.reweight_k)
    # Each scoring choice once, in the order asked: Eq. 7 and smoothing are alternatives.
    choices = list(
        dict.fromkeys(
            (k, 0.0 if k >= 2 else sigma) for k in args.reweight_k for sigma in args.image_sigma
        )
    )
    for n, (layers, (projection, dim), patch, coreset, precision) in enumerate(grid):
        bundle = args.out / f"bundle-{n}"
        opts = FitOptions(
            backbone=args.backbone,
            layers=layers.split(","),
            image_size=size,
            coreset=coreset,
            projection=projection,
            embed_dim=dim,
            patch_size=patch,
            reweight_k=max_k if max_k >= 2 else 0,
            image_sigma=0.0 if max_k >= 2 else max(args.image_sigma),
            precision=precision,
            progress=False,
        )
        log.info("fitting %s %s p=%d coreset=%g %s", layers, projection, patch, coreset, precision)
        manifest = fit(args.data, bundle, opts, force=True)
        for k, sigma in choices:
            scoring = {"reweight": k >= 2, "reweight_k": k, "image_sigma": sigma}
            result, _ = evaluate(bundle, args.data, scoring_overrides=scoring)
            config = {
                "layers": layers,
                "projection": projection,
                "embed_dim": dim,
                "patch_size": patch,
                "coreset": coreset,
                "precision": manifest["features"]["precision"],  # what auto chose
                "reweight_k": k,
                "image_sigma": sigma,
                "image_size": [manifest["input"]["height"], manifest["input"]["width"]],
            }
            row = _row(config, manifest, result)
            rows.append(row)
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info(
                "image %.3f pixel %.3f PRO %.3f",
                *(row[m] for m in ("image_auroc", "pixel_auroc", "pro")),
            )
        if not args.keep_bundles:
            import shutil

            shutil.rmtree(bundle)
    _print_table(rows)
    print(f"results: {results_file}")
    return 0
