"""`edge-agent calibrate`: good samples (and optionally defects) -> thresholds in the bundle.

Scores held-out good images (never the bundle's training images: their scores are too low),
picks the image threshold for a target false-reject rate by an order statistic and reports
what the sample size can promise, sets the pixel threshold so that good images give empty
masks, and writes both with the score normalisation into the manifest. Run-time path: no torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.calibrate import plot
from edge_agent.calibrate import thresholds as th
from edge_agent.cli import add_scorer_options
from edge_agent.errors import UserError
from edge_agent.images import BadImage, list_images, read_image
from edge_agent.model.bundle import Bundle, load_bundle, sha256_file, update_thresholds
from edge_agent.model.scorer import Scorer
from edge_agent.tools.prefetch import score_items

log = logging.getLogger(__name__)

CHOICES = ("target", "f1", "keep-all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, help="bundle folder whose thresholds are set")
    p.add_argument(
        "--good",
        type=Path,
        metavar="DIR",
        help="good images the bundle was NOT fitted on (sub-folders included)",
    )
    p.add_argument(
        "--defects",
        type=Path,
        metavar="DIR",
        help="defect images (optional; sub-folders are reported as defect types)",
    )
    p.add_argument(
        "--false-reject",
        type=float,
        default=0.01,
        metavar="RATE",
        help="target rate of good parts rejected",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="confidence of the reported false-reject bound",
    )
    p.add_argument(
        "--promise",
        action="store_true",
        help="pick the target threshold so that the bound, not the expected rate, meets RATE",
    )
    p.add_argument(
        "--choose",
        choices=CHOICES,
        default="target",
        help="which image threshold to write: the false-reject target, the best F1 "
        "on the defects, or the highest that catches every given defect",
    )
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG score histogram")
    p.add_argument(
        "--holdout-from",
        type=Path,
        metavar="TRAIN_DIR",
        help="split mode: hold out good images from TRAIN_DIR (with --holdout, --split-to)",
    )
    p.add_argument(
        "--holdout", type=float, metavar="N", help="images to hold out (or a fraction below 1)"
    )
    p.add_argument(
        "--split-to", type=Path, metavar="DIR", help="split output: DIR/train/good, DIR/holdout"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the split")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--dry-run", action="store_true", help="report only; leave the bundle as is")
    add_scorer_options(p, index=False)


# --------------------------------------------------------------------------- scoring


@dataclass
class Samples:
    """Scores of one folder of images (unreadable files skipped)."""

    folder: Path
    paths: list[Path]
    scores: np.ndarray  # [N] image scores
    map_maxima: np.ndarray  # [N] largest value of each smoothed anomaly map
    skipped: int = 0
    kinds: list[str] = field(default_factory=list)  # defect type per image (sub-folder)

    def __len__(self) -> int:
        return len(self.paths)


def _read(path: Path, scorer: Scorer) -> tuple[np.ndarray, None] | None:
    try:
        return scorer.prepare(read_image(path)), None
    except BadImage as exc:
        log.warning("skipping %s", exc)
        return None


def score_folder(scorer: Scorer, folder: Path, paths: list[Path], batch_size: int) -> Samples:
    kept: list[Path] = []
    scores: list[float] = []
    maxima: list[float] = []
    for path, _image, _, score, amap in score_items(
        scorer, paths, lambda p: _read(p, scorer), batch_size, f"scoring {folder}"
    ):
        kept.append(path)
        scores.append(score)
        maxima.append(float(amap.max()))
    if not kept:
        raise UserError(f"{folder}: none of the {len(paths)} images could be read")
    skipped = len(paths) - len(kept)
    if skipped:
        log.warning("%s: %d of %d images were unreadable and skipped", folder, skipped, len(paths))
    return Samples(
        folder,
        kept,
        np.asarray(scores, dtype=np.float64),
        np.asarray(maxima),
        skipped,
        [_kind(folder, p) for p in kept],
    )


def _kind(folder: Path, path: Path) -> str:
    """Defect type of an image: its first sub-folder under `folder`, else the folder's name."""
    rel = path.relative_to(folder)
    return rel.parts[0] if len(rel.parts) > 1 else folder.name


# --------------------------------------------------------------------------- input checks


def check_not_training(bundle: Bundle, paths: list[Path], good: Path, target: float) -> None:
    """Refuse good samples the bundle was fitted on: they score far lower than new good parts,
    so a threshold from them would reject many good parts on the line."""
    training = bundle.training_image_hashes()
    if not training:
        log.warning("bundle %s lists no training images; cannot check --good", bundle.path)
        return
    hits = sum(sha256_file(p) in training for p in paths)
    if not hits:
        return
    training_info = bundle.manifest.get("training", {})
    source = training_info.get("source", "TRAIN_DIR")
    holdout = suggested_holdout(int(training_info.get("n_images", 0)), target)
    raise UserError(
        f"{good}: {hits} of {len(paths)} images are training images of this bundle; they score "
        "unrealistically low, so the threshold would be far too low. Calibrate on good images "
        "the bundle never saw, e.g. split some off with `edge-agent calibrate --holdout-from "
        f"{source} --holdout {holdout:g} --split-to SPLIT`, refit with "
        "`edge-agent fit SPLIT --out NEW_BUNDLE` and calibrate with --good SPLIT/holdout"
    )


def suggested_holdout(n_training: int, target: float) -> float:
    """Images to hold out: enough for the target's expected rate if the training folder can
    spare them (a quarter at most), else a fifth of it."""
    needed = th.samples_needed(target)
    return needed if needed * 4 <= n_training else 0.2


def _good_paths(folder: Path) -> list[Path]:
    return list_images(folder, recursive=True)


def _defect_paths(folder: Path) -> list[Path]:
    if (folder / "good").is_dir():
        raise UserError(
            f"{folder}: has a 'good' sub-folder; --defects takes defect images only "
            "(e.g. pass each defect folder's parent without its good/)"
        )
    return list_images(folder, recursive=True)


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.false_reject < 1.0:
        raise UserError(f"--false-reject must be a rate in (0, 1), got {args.false_reject}")
    if not 0.0 < args.confidence < 1.0:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.holdout_from is not None:
        if args.holdout is None or args.split_to is None:
            raise UserError("--holdout-from needs --holdout N and --split-to DIR")
        return
    if args.holdout is not None or args.split_to is not None:
        raise UserError("--holdout and --split-to only go with --holdout-from TRAIN_DIR")
    if args.bundle is None or args.good is None:
        raise UserError("calibrate needs --bundle BUNDLE and --good DIR (or --holdout-from)")
    if args.choose != "target" and args.defects is None:
        raise UserError(f"--choose {args.choose} needs defect samples: add --defects DIR")
    if args.plot is not None:
        plot.check_path(args.plot)


# --------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    bundle: Bundle
    good: Samples
    defects: Samples | None
    target: th.TargetChoice
    f1: th.OperatingPoint | None
    keep_all: th.OperatingPoint | None
    chosen: th.OperatingPoint
    pixel: th.PixelThreshold
    normalization: dict[str, float]
    false_reject: float
    confidence: float
    promise: bool
    device: str

    @property
    def points(self) -> list[th.OperatingPoint]:
        return [p for p in (self.target.point, self.f1, self.keep_all) if p is not None]

    @property
    def defect_scores(self) -> np.ndarray:
        return self.defects.scores if self.defects else np.empty(0)

    def per_type_recall(self) -> dict[str, dict[str, int]]:
        if not self.defects:
            return {}
        kinds = np.array(self.defects.kinds)
        caught = self.defects.scores >= self.chosen.threshold
        return {
            k: {"caught": int(caught[kinds == k].sum()), "total": int((kinds == k).sum())}
            for k in sorted(set(self.defects.kinds))
        }

    def caught_without_region(self) -> tuple[int, int]:
        """(caught defects whose map has no pixel over the pixel threshold, caught defects)."""
        if not self.defects:
            return 0, 0
        caught = self.defects.scores >= self.chosen.threshold
        empty = caught & (self.defects.map_maxima < self.pixel.threshold)
        return int(empty.sum()), int(caught.sum())

    def thresholds_section(self, good_source: Path, defect_source: Path | None) -> dict[str, Any]:
        """The manifest's `thresholds` section (edge_agent.model.bundle.update_thresholds)."""
        frr = self.chosen.frr
        return {
            "image": self.chosen.threshold,
            "pixel": self.pixel.threshold,
            "normalization": self.normalization,
            "calibrated": {
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "rule": "NG when image score >= image; mask where anomaly map >= pixel",
                "n_good": len(self.good),
                "n_defects": len(self.defects) if self.defects else 0,
                "target_false_reject": self.false_reject,
                "target_reachable": self.target.reachable,
                "promise": self.promise,
                "expected_false_reject": frr.expected,
                "false_reject_upper_bound": frr.upper,
                "confidence": self.confidence,
                "good_rejected": frr.rejected,
                # The agent's drift check compares the line's OK scores with these.
                "good_scores": {
                    f"p{q}": float(np.percentile(self.good.scores, q)) for q in (10, 50, 90)
                },
                "recall": self.chosen.recall,
                "choice": self.chosen.name,
                "pixel_rule": "just above the largest good anomaly-map value",
                "good_with_mask_upper_bound": self.pixel.frr.upper,
                "good_source": str(good_source.resolve()),
                "defects_source": str(defect_source.resolve()) if defect_source else None,
            },
        }


def calibrate(
    bundle_dir: Path,
    good_dir: Path,
    defects_dir: Path | None,
    *,
    false_reject: float = 0.01,
    confidence: float = 0.95,
    promise: bool = False,
    choose: str = "target",
    batch_size: int = 8,
    device: str = "auto",
    threads: int | None = None,
) -> Calibration:
    """Score the samples and compute every threshold; writes nothing."""
    good_paths = _good_paths(good_dir)
    defect_paths = _defect_paths(defects_dir) if defects_dir is not None else []
    bundle = load_bundle(bundle_dir)
    check_not_training(bundle, good_paths, good_dir, false_reject)
    scorer = Scorer(bundle, device=device, threads=threads)
    good = score_folder(scorer, good_dir, good_paths, batch_size)
    defects = score_folder(scorer, defects_dir, defect_paths, batch_size) if defects_dir else None
    d = defects.scores if defects else np.empty(0)
    target = th.choose_target(good.scores, d, false_reject, confidence, promise=promise)
    f1 = th.choose_f1(good.scores, d, confidence) if defects else None
    keep_all = th.choose_keep_all(good.scores, d, confidence) if defects else None
    chosen = {"target": target.point, "f1": f1, "keep-all": keep_all}[choose]
    assert chosen is not None  # _check_args: f1/keep-all need defects
    return Calibration(
        bundle=bundle,
        good=good,
        defects=defects,
        target=target,
        f1=f1,
        keep_all=keep_all,
        chosen=chosen,
        pixel=th.choose_pixel(good.map_maxima, confidence),
        normalization=th.normalization(good.scores, chosen.threshold, d),
        false_reject=false_reject,
        confidence=confidence,
        promise=promise,
        device=scorer.device,
    )


# --------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def label_for(point: th.OperatingPoint, cal: Calibration) -> str:
    if point.name == "target":
        return f"target {100 * cal.false_reject:g}%" + (" (promise)" if cal.promise else "")
    return {"f1": "best F1", "keep-all": "keep all"}[point.name]


def markers_for(cal: Calibration) -> list[plot.Marker]:
    out = []
    for p in cal.points:
        text = f"{label_for(p, cal)}: {p.threshold:.4g}"
        if p is cal.chosen:
            text += " (chosen)"
        out.append(plot.Marker(text, p.threshold, plot.LINE_BGR[p.name], bold=p is cal.chosen))
    return out


def notes(cal: Calibration) -> list[str]:
    """What the sample size can and cannot promise, in words."""
    n, r, c = len(cal.good), cal.false_reject, cal.confidence
    frr = cal.target.point.frr
    out = []
    if not cal.target.reachable:
        what = "promise" if cal.promise else "support"
        out.append(
            f"{n} good images cannot {what} a {_pct(r)} false-reject target: even just above the "
            f"highest good score the expected rate is {_pct(frr.expected)} (at most "
            f"{_pct(frr.upper)} with {c:.0%} confidence). For an expected {_pct(r)} use at "
            f"least {th.samples_needed(r)} good images; to promise it with {c:.0%} confidence, "
            f"at least {th.samples_needed(r, c)}."
        )
    elif frr.upper > r:
        out.append(
            f"expected false rejects {_pct(frr.expected)}, but {n} good images only promise "
            f"at most {_pct(frr.upper)} with {c:.0%} confidence; {th.samples_needed(r, c)} "
            f"would promise {_pct(r)} (with --promise)."
        )
    if cal.chosen.name != "target" and cal.chosen.frr.upper > r:
        out.append(
            f"the chosen {cal.chosen.name!r} threshold may reject up to "
            f"{_pct(cal.chosen.frr.upper)} of good parts ({c:.0%} confidence)."
        )
    empty, caught = cal.caught_without_region()
    if empty:
        out.append(
            f"{empty} of {caught} caught defects show no region at the pixel threshold "
            "(their anomaly map stays below it): they are NG without a marked area."
        )
    return out


def print_report(cal: Calibration, written: str) -> None:
    good, defects = cal.good, cal.defects
    print(
        f"bundle {cal.bundle.path} (model {cal.bundle.model_id}): {len(good)} good images "
        f"from {good.folder}"
        + (
            f", {len(defects)} defect images from {defects.folder} "
            f"({len(set(defects.kinds))} types)"
            if defects
            else ""
        )
    )
    c = f"{cal.confidence:.0%}"
    print(
        f"\n{'threshold':<22}{'score':>10}  {'expected FRR':>12}  {c + ' bound':>9}  "
        f"{'seen':>7}  {'recall':>7}  {'F1':>5}"
    )
    for p in cal.points:
        seen = f"{p.frr.rejected}/{p.frr.n}"
        f1 = "-" if p.f1 is None else f"{p.f1:.3f}"
        mark = "  <- " + written if p is cal.chosen else ""
        print(
            f"{label_for(p, cal):<22}{p.threshold:>10.5g}  {_pct(p.frr.expected):>12}  "
            f"{_pct(p.frr.upper):>9}  {seen:>7}  {_pct(p.recall):>7}  {f1:>5}{mark}"
        )
    recall = cal.per_type_recall()
    if recall:
        print(
            "recall by type: "
            + ", ".join(f"{k} {v['caught']}/{v['total']}" for k, v in recall.items())
        )
    px = cal.pixel
    print(
        f"pixel threshold {px.threshold:.5g}: good images with any masked pixel "
        f"{px.frr.rejected}/{px.frr.n} (new good images: expected {_pct(px.frr.expected)}, "
        f"at most {_pct(px.frr.upper)} with {c} confidence)"
    )
    norm = cal.normalization
    print(
        f"normalised score: {norm['low']:.5g} -> 0, {norm['threshold']:.5g} -> 0.5, "
        f"{norm['high']:.5g} -> 1"
    )
    for note in notes(cal):
        print(f"note: {note}")


def result_json(cal: Calibration, written: bool, plot: Path | None) -> dict[str, Any]:
    empty, caught = cal.caught_without_region()
    return {
        "bundle": str(cal.bundle.path),
        "model_id": cal.bundle.model_id,
        "written": written,
        "choice": cal.chosen.name,
        "image_threshold": cal.chosen.threshold,
        "pixel_threshold": cal.pixel.threshold,
        "normalization": cal.normalization,
        "n_good": len(cal.good),
        "n_defects": len(cal.defects) if cal.defects else 0,
        "n_skipped": cal.good.skipped + (cal.defects.skipped if cal.defects else 0),
        "target_false_reject": cal.false_reject,
        "target_reachable": cal.target.reachable,
        "promise": cal.promise,
        "confidence": cal.confidence,
        "samples_needed": {
            "expected": th.samples_needed(cal.false_reject),
            "promise": th.samples_needed(cal.false_reject, cal.confidence),
        },
        "operating_points": {p.name: p.as_dict() for p in cal.points},
        "recall_by_type": cal.per_type_recall(),
        "pixel": {
            "threshold": cal.pixel.threshold,
            "good_with_mask": cal.pixel.good_with_mask,
            "good_with_mask_expected": cal.pixel.frr.expected,
            "good_with_mask_upper_bound": cal.pixel.frr.upper,
            "caught_without_region": empty,
            "caught": caught,
        },
        "notes": notes(cal),
        "device": cal.device,
        "plot": str(plot) if plot else None,
    }


# --------------------------------------------------------------------------- entry points


def _split(args: argparse.Namespace) -> int:
    split = th.split_holdout(args.holdout_from, args.split_to, args.holdout, args.seed)
    how = "hard links" if split.linked else "copies"
    print(
        f"split {args.holdout_from}: {split.n_train} images to fit on in {split.train_dir}, "
        f"{split.n_holdout} held out in {split.holdout_dir} ({how}; the source is unchanged)"
    )
    print(f"next: edge-agent fit {args.split_to} --out NEW_BUNDLE")
    print(f"      edge-agent calibrate --bundle NEW_BUNDLE --good {split.holdout_dir}")
    if args.json:
        print(
            json.dumps(
                {
                    "train_dir": str(split.train_dir),
                    "holdout_dir": str(split.holdout_dir),
                    "n_train": split.n_train,
                    "n_holdout": split.n_holdout,
                    "linked": split.linked,
                }
            )
        )
    return 0


def _previous(bundle: Bundle) -> str:
    old = bundle.thresholds
    if "image" not in old:
        return ""
    date = (old.get("calibrated") or {}).get("date", "an unknown date")
    return f", replacing image threshold {float(old['image']):.5g} from {date}"


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.holdout_from is not None:
        return _split(args)
    cal = calibrate(
        args.bundle,
        args.good,
        args.defects,
        false_reject=args.false_reject,
        confidence=args.confidence,
        promise=args.promise,
        choose=args.choose,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
    )
    print_report(cal, "dry run" if args.dry_run else "written")
    if args.plot:
        title = f"image scores, bundle {cal.bundle.path.name} (model {cal.bundle.model_id})"
        plot.score_histogram(cal.good.scores, cal.defect_scores, markers_for(cal), title, args.plot)
        print(f"plot: {args.plot}")
    if args.dry_run:
        print(f"dry run: {args.bundle} not changed")
    else:
        section = cal.thresholds_section(args.good, args.defects)
        manifest = update_thresholds(args.bundle, section)
        same = "unchanged" if manifest["model_id"] == cal.bundle.model_id else "CHANGED"
        print(
            f"wrote thresholds to {args.bundle}/manifest.json (model_id {manifest['model_id']} "
            f"{same}{_previous(cal.bundle)})"
        )
        log.info(
            "calibrated %s: image threshold %.5g, pixel threshold %.5g from %d good images",
            args.bundle,
            cal.chosen.threshold,
            cal.pixel.threshold,
            len(cal.good),
        )
    if args.json:
        print(json.dumps(result_json(cal, not args.dry_run, args.plot)))
    return 0
