"""`edge-agent teach`: "this good part was rejected, make it stop", without a refit or torch.

    edge-agent teach --bundle B --good DIR [--out B2]
    edge-agent teach --bundle B --rollback

Teach extracts the good images' patch features with the bundle's own ONNX model (the Scorer,
as `run` does), keeps the patches the bank does not already cover, and appends them to the
bank (edge_agent/model/teach.py: the coreset's greedy rule continued until every taught patch
is within the covering radius r of the grown bank, so a taught image then scores at most r;
other images' patch distances can only fall, since the bank only grows). bank_knn.npy (Eq. 7)
is rebuilt as fit builds it, the taught images' SHA-256 join training_images.json (so
calibrate refuses them), and the manifest gets a new model_id, a `history` entry and
`calibration_stale: true` when thresholds were set (run keeps using them; re-run calibrate).

Versions and rollback: the new version is built and verified (load_bundle, ONNX included) in
a staging folder first; nothing in B changes until it passes. Then the files the version
replaces (bank.npy, bank_knn.npy, training_images.json, manifest.json) are copied to
B/.history/<previous model_id>/ (fsynced), and the new ones are renamed over them, manifest
last. A crash during those renames leaves a bundle that load refuses on its checksums;
`--rollback` then restores the snapshot (it prefers .history/<the manifest's model_id>, which
exists only in that case). `--rollback` undoes one teach per call. With `--out B2`, B is left
as it is and B2 is written whole (atomically, like fit) with the same .history, so rollback
works there too. A running agent picks the new version up on SIGHUP, as after calibrate.

Regression set (--regression DIR, an inspection's confirmed defects: edge_agent/lifecycle/
regression.py): the new version re-scores them under its own thresholds before anything is
written, and teach refuses when one would pass (--force teaches anyway and says so).

Errors (a missing folder, a corrupt or wrong-size image, a non-bundle) are one line, exit 2,
and change nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.decide.archive import original_of
from edge_agent.errors import UserError
from edge_agent.fileio import fsync_directory, fsync_tree
from edge_agent.images import BadImage, decode_image, list_images
from edge_agent.model import bundle as fmt
from edge_agent.model.teach import bank_neighbours, estimated_covering_radius, extend_cover

HISTORY_DIR = ".history"
MAX_IMAGES = 1000  # the manifest records every taught image; beyond this, refit
# An image upscaled more than this to the model input has no detail the bank could learn
# (and is most likely not from this line's camera).
MAX_UPSCALE = 8
PROGRESS_EVERY = 10
# Replaced by a teach; model.onnx never changes, so it is not snapshotted.
VERSIONED = (fmt.BANK_FILE, fmt.BANK_KNN_FILE, fmt.TRAINING_IMAGES_FILE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder to teach")
    p.add_argument(
        "--good",
        type=Path,
        metavar="DIR",
        help="good images that were rejected: an image folder (sub-folders included) or a "
        "reject-archive folder (its JSON sidecars name the images)",
    )
    p.add_argument("--out", type=Path, help="write the taught bundle here; B is left unchanged")
    p.add_argument("--rollback", action="store_true", help="return B to its previous version")
    p.add_argument(
        "--regression",
        type=Path,
        metavar="DIR",
        help="the inspection's regression set (confirmed defects: <shadow.dir>/regression/"
        "<recipe>/<inspection>): teach refuses a version under which any of them would pass",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="teach although a confirmed defect would pass (say so in the audit trail)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads")
    p.add_argument("--batch-size", type=int, default=8, help="images per inference batch")


# --------------------------------------------------------------------------- reading images


@dataclass(frozen=True)
class TaughtImage:
    name: str  # relative to --good
    sha256: str  # of the file as it is on disk (what calibrate will hash)
    bgr: np.ndarray


def _check_size(name: str, bgr: np.ndarray, input_size: tuple[int, int]) -> None:
    h, w = bgr.shape[:2]
    if h * MAX_UPSCALE < input_size[0] or w * MAX_UPSCALE < input_size[1]:
        raise UserError(
            f"{name}: {w}x{h} pixels is too small for this bundle's {input_size[1]}x"
            f"{input_size[0]} input (more than {MAX_UPSCALE}x upscaled): wrong image?"
        )


def _decode(path: Path, name: str) -> tuple[bytes, np.ndarray]:
    try:
        data = path.read_bytes()
        return data, decode_image(data)
    except OSError as exc:
        raise UserError(f"{name}: cannot read ({exc.strerror or exc})") from None
    except BadImage as exc:
        raise UserError(f"{name}: not a usable image ({exc})") from None


def _from_archive(folder: Path, sidecars: list[Path]) -> list[tuple[str, Path, str, int]]:
    """(name, image path, note, panels side by side) per sidecar of a reject archive
    (decide/archive.py)."""
    out = []
    for sidecar in sidecars:
        rel = sidecar.relative_to(folder)
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{rel}: not a readable JSON sidecar ({exc})") from None
        if not isinstance(meta, dict) or "reject_image" not in meta or "verdict" not in meta:
            raise UserError(
                f"{rel}: not a reject-archive sidecar (no verdict/reject_image); --good takes "
                "an image folder or an archive folder, not both"
            )
        # The entry's own JPEG first: an archive copied elsewhere keeps its names, not its paths.
        image = sidecar.with_suffix(".jpg")
        if not image.is_file() and isinstance(meta["reject_image"], str):
            image = Path(meta["reject_image"])
        if not image.is_file():
            raise UserError(f"{rel}: its image {meta['reject_image']!r} does not exist")
        note = f" (camera file {meta['source']})" if isinstance(meta.get("source"), str) else ""
        panels = meta.get("panels", 2 if meta["verdict"] == "NG" else 1)  # older entries: none
        if not isinstance(panels, int) or isinstance(panels, bool):
            raise UserError(f"{rel}: panels must be an integer, got {panels!r}")
        out.append((str(rel.with_suffix(".jpg")), image, note, panels))
    return out


def read_good(folder: Path, input_size: tuple[int, int]) -> list[TaughtImage]:
    """Every image of `folder`, decoded; any problem is a UserError naming the file.

    A folder with JSON sidecars is a reject archive: each sidecar's JPEG is taken, and of an
    NG entry (original | overlay side by side) only the original half. Those are JPEG copies
    (quality 90, archive.jpeg_quality) of the frames; where the camera's originals are kept,
    teaching those is better (a plain folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--good {folder}: no such folder")
    sidecars = sorted(p for p in folder.rglob("*.json") if not p.name.startswith("."))
    if sidecars:
        entries = _from_archive(folder, sidecars)
    else:
        entries = [
            (str(p.relative_to(folder)), p, "", 1) for p in list_images(folder, recursive=True)
        ]
    if len(entries) > MAX_IMAGES:
        raise UserError(
            f"--good {folder}: {len(entries)} images; teach takes at most {MAX_IMAGES} "
            "(this many good parts are a refit: edge-agent fit)"
        )
    images = []
    for n, (name, path, note, panels) in enumerate(entries, 1):
        data, bgr = _decode(path, name)
        if panels != 1:
            half = original_of(bgr, panels)
            if half is None:
                raise UserError(f"{name}: not an archived NG image (original | overlay)")
            bgr = half
        _check_size(name, bgr, input_size)
        images.append(TaughtImage(name + note, fmt.sha256_bytes(data), bgr))
        if n % PROGRESS_EVERY == 0 and n < len(entries):
            print(f"read {n}/{len(entries)} images", flush=True)
    return images


# --------------------------------------------------------------------------- teaching


@dataclass(frozen=True)
class TeachResult:
    bundle: Path  # where the new version is
    previous_model_id: str
    model_id: str  # == previous_model_id when nothing was added (nothing written)
    rows_added: int
    bank_size: tuple[int, int]  # before, after
    radius: float
    radius_source: str  # "fit" or "estimate"
    names: list[str]
    before: np.ndarray  # image scores with the old bank
    after: np.ndarray  # with the new one (== before when nothing was added)
    calibration_stale: bool


def _scores(bundle: fmt.Bundle, frames: list[np.ndarray], batch: int, **kw: Any):
    """(image scores [N], patch features [N * P, D]) with the flat (exact) index."""
    from edge_agent.model.scorer import Scorer

    scorer = Scorer(bundle, index="flat", **kw)
    scores, feats = [], []
    for start in range(0, len(frames), batch):
        chunk = np.stack([scorer.prepare(f) for f in frames[start : start + batch]])
        patches = scorer.features(chunk)
        if scorer.kept is not None:  # fit --ignore: ignored patches never enter the bank
            patches = patches[:, scorer.kept.ravel()]
        feats.append(patches.reshape(-1, bundle.dim))
        scores.append(scorer.score(chunk).image_scores)
    return np.concatenate(scores), np.concatenate(feats)


def _radius(bundle: fmt.Bundle) -> tuple[float, str]:
    bank = bundle.manifest.get("bank") or {}
    if bank.get("covering_radius") is not None:
        return float(bank["covering_radius"]), str(bank.get("covering_radius_source", "fit"))
    return estimated_covering_radius(bundle.bank), "estimate"


def _load(bundle_dir: Path) -> fmt.Bundle:
    try:
        return fmt.load_bundle(bundle_dir)
    except UserError as exc:
        if (bundle_dir / HISTORY_DIR).is_dir():
            raise UserError(
                f"{exc} (after an interrupted teach, `edge-agent teach --bundle {bundle_dir} "
                "--rollback` restores the version before it)"
            ) from None
        raise


def _check_out(out: Path, bundle_dir: Path) -> None:
    if out.resolve() == bundle_dir.resolve():
        raise UserError(f"--out {out} is the bundle itself: leave --out away to teach in place")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder")


def teach(
    bundle_dir: Path,
    good_dir: Path,
    out: Path | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
    regression_dir: Path | None = None,
    force: bool = False,
) -> TeachResult:
    """Teach ``good_dir``'s images into ``bundle_dir`` (or ``out``). With ``regression_dir``,
    the new version re-scores the inspection's confirmed defects first and nothing is written
    when one would pass (UserError), unless ``force``."""
    bundle_dir = Path(bundle_dir)
    bundle = _load(bundle_dir)
    if out is not None:
        _check_out(Path(out), bundle_dir)
    images = read_good(good_dir, bundle.input_size)
    radius, source = _radius(bundle)
    frames = [im.bgr for im in images]
    kw = {"device": device, "threads": threads}
    before, feats = _scores(bundle, frames, batch_size, **kw)
    chosen = extend_cover(feats, bundle.bank, radius)
    old_rows = len(bundle.bank)
    names = [im.name for im in images]
    stale = bool({"image", "pixel"} & set(bundle.thresholds))
    if len(chosen) == 0:
        return TeachResult(
            bundle_dir,
            bundle.model_id,
            bundle.model_id,
            0,
            (old_rows, old_rows),
            radius,
            source,
            names,
            before,
            before,
            bool(bundle.manifest.get("calibration_stale", False)),
        )
    bank = np.ascontiguousarray(np.vstack([bundle.bank, feats[chosen]]), dtype=np.float32)
    parent = bundle_dir if out is None else Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".teach-", dir=parent))
    try:
        manifest = _write_version(stage, bundle, bank, images, len(chosen), radius, source, stale)
        new = fmt.load_bundle(stage)  # the whole check `run` will make, before B is touched
        after, _ = _scores(new, frames, batch_size, **kw)
        if regression_dir is not None:
            _check_regression(new, Path(regression_dir), force, **kw)
        if out is None:
            _commit_in_place(bundle_dir, stage, bundle.model_id)
            where = bundle_dir
        else:
            _commit_new_folder(bundle_dir, stage, Path(out), bundle.model_id)
            where = Path(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return TeachResult(
        where,
        bundle.model_id,
        manifest["model_id"],
        len(chosen),
        (old_rows, len(bank)),
        radius,
        source,
        names,
        before,
        after,
        stale or bool(bundle.manifest.get("calibration_stale", False)),
    )


def _check_regression(bundle: fmt.Bundle, folder: Path, force: bool, **kw: Any) -> None:
    """Every confirmed defect in ``folder`` must still be NG under ``bundle``'s thresholds."""
    from edge_agent.decide.decision import resolve_thresholds
    from edge_agent.lifecycle import gates, regression
    from edge_agent.model.scorer import Scorer

    if not folder.is_dir():
        raise UserError(f"--regression {folder}: no such folder")
    thresholds = resolve_thresholds(bundle.thresholds, None, None)
    if thresholds is None:
        raise UserError(
            f"--regression {folder}: the bundle has no thresholds to re-score the confirmed "
            "defects with (edge-agent calibrate first)"
        )
    entries = regression.load(folder)
    scorer = Scorer(bundle, index="flat", **kw)
    misses = gates.regression_misses(regression.rescore(entries, scorer, thresholds))
    if not misses:
        print(f"regression set: all {len(entries)} confirmed defect(s) still rejected")
        return
    if not force:
        raise UserError(
            f"teach refused, nothing written: {'; '.join(misses)} (--force to teach anyway)"
        )
    print(f"FORCED past the regression set: {'; '.join(misses)}")


def _write_version(
    stage: Path,
    bundle: fmt.Bundle,
    bank: np.ndarray,
    images: list[TaughtImage],
    rows_added: int,
    radius: float,
    source: str,
    stale: bool,
) -> dict[str, Any]:
    src = bundle.path
    shutil.copy2(src / fmt.MODEL_FILE, stage / fmt.MODEL_FILE)
    np.save(stage / fmt.BANK_FILE, bank, allow_pickle=False)
    manifest: dict[str, Any] = json.loads(json.dumps(bundle.manifest))  # a deep copy
    files = set(manifest["files"]) | {fmt.BANK_FILE, fmt.TRAINING_IMAGES_FILE}
    if bundle.bank_knn is not None:
        k = max(bundle.bank_knn.shape[1], int(bundle.scoring["reweight_k"]))
        np.save(stage / fmt.BANK_KNN_FILE, bank_neighbours(bank, k), allow_pickle=False)
    training: dict[str, Any] = {"sha256": []}
    if (src / fmt.TRAINING_IMAGES_FILE).is_file():
        training = json.loads((src / fmt.TRAINING_IMAGES_FILE).read_text())
    known = list(training.get("sha256", []))
    training["sha256"] = known + sorted({im.sha256 for im in images} - set(known))
    (stage / fmt.TRAINING_IMAGES_FILE).write_text(json.dumps(training) + "\n")
    manifest["bank"] = {
        **(manifest.get("bank") or {}),
        "size": len(bank),
        "covering_radius": radius,
        "covering_radius_source": source,
    }
    manifest["history"] = [
        *(manifest.get("history") or []),
        {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "action": "teach",
            "previous_model_id": bundle.model_id,
            "images": [{"name": im.name, "sha256": im.sha256} for im in images],
            "rows_added": rows_added,
            "covering_radius": radius,
            "covering_radius_source": source,
        },
    ]
    if stale or manifest.get("calibration_stale"):
        manifest["calibration_stale"] = True
    manifest["files"] = {name: "" for name in sorted(files)}
    size = len(json.dumps(manifest, indent=2))
    if size > fmt.MAX_MANIFEST_BYTES:
        raise UserError(
            f"the manifest would be {size} bytes with this teach's history, over the "
            f"{fmt.MAX_MANIFEST_BYTES} bundles allow: refit (edge-agent fit) instead"
        )
    return fmt.write_manifest(stage, manifest)


def _snapshot(bundle_dir: Path, into: Path) -> None:
    """The files a teach replaces, copied into `into` (created whole or not at all)."""
    into.parent.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=into.parent))
    try:
        for name in (*VERSIONED, fmt.MANIFEST):
            if (bundle_dir / name).is_file():
                shutil.copy2(bundle_dir / name, tmp / name)
        fsync_tree(tmp)
        if into.exists():  # left by a teach that never switched the manifest: same files
            shutil.rmtree(into)
        tmp.rename(into)
        fsync_directory(into.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit_in_place(bundle_dir: Path, stage: Path, previous_id: str) -> None:
    _snapshot(bundle_dir, bundle_dir / HISTORY_DIR / _safe_id(previous_id))
    fsync_tree(stage)
    for name in (*VERSIONED, fmt.MANIFEST):  # the manifest last: it switches the version
        if (stage / name).is_file():
            os.replace(stage / name, bundle_dir / name)
    fsync_directory(bundle_dir)


def _commit_new_folder(bundle_dir: Path, stage: Path, out: Path, previous_id: str) -> None:
    if (bundle_dir / HISTORY_DIR).is_dir():
        shutil.copytree(bundle_dir / HISTORY_DIR, stage / HISTORY_DIR)
    _snapshot(bundle_dir, stage / HISTORY_DIR / _safe_id(previous_id))
    fsync_tree(stage)
    if out.exists():
        out.rmdir()  # empty, checked before
    stage.rename(out)
    fsync_directory(out.parent)


def _safe_id(model_id: str) -> str:
    # The schema allows dots; a folder name must not be "." or "..".
    if model_id.startswith("."):
        raise UserError(f"model_id {model_id!r} cannot name a history folder")
    return model_id


# --------------------------------------------------------------------------- rollback


def rollback(bundle_dir: Path) -> tuple[str, str]:
    """Restore the version before the latest teach: (model_id left, model_id restored)."""
    bundle_dir = Path(bundle_dir)
    manifest = fmt.read_manifest(bundle_dir)  # files may be mid-teach: checked below instead
    current = str(manifest["model_id"])
    history = bundle_dir / HISTORY_DIR
    if (history / _safe_id(current)).is_dir():
        target = current  # a teach from this version stopped before switching the manifest
    else:
        entries = manifest.get("history") or []
        if not entries:
            raise UserError(f"bundle {bundle_dir}: no previous version (it was never taught)")
        target = _safe_id(str(entries[-1]["previous_model_id"]))
    snap = history / target
    if not snap.is_dir():
        raise UserError(
            f"bundle {bundle_dir}: the previous version {target} is not in {HISTORY_DIR}/ "
            "(removed?), so it cannot be restored"
        )
    old = fmt.read_manifest(snap)
    for name, expected in old["files"].items():
        path = snap / name if (snap / name).is_file() else bundle_dir / name
        if name not in (*VERSIONED, fmt.MODEL_FILE) or fmt.sha256_file(path) != expected:
            raise UserError(
                f"bundle {bundle_dir}: {HISTORY_DIR}/{target}/ does not hold an intact copy of "
                f"{name} for version {target}; nothing was changed"
            )
    tmp = Path(tempfile.mkdtemp(prefix=".rollback-", dir=bundle_dir))
    try:
        restore = [n for n in (*VERSIONED, fmt.MANIFEST) if (snap / n).is_file()]
        for name in restore:
            shutil.copy2(snap / name, tmp / name)
        fsync_tree(tmp)
        for name in restore:  # manifest last
            os.replace(tmp / name, bundle_dir / name)
        fsync_directory(bundle_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Files the newer version added and the old one does not list are left: load ignores them.
    shutil.rmtree(snap)
    fsync_directory(history)
    return current, target


# --------------------------------------------------------------------------- command


def _report(r: TeachResult, bundle_arg: Path) -> None:
    for name, b, a in zip(r.names, r.before, r.after, strict=True):
        print(f"  {name}: score {b:.3f} -> {a:.3f}")
    grown = f"bank {r.bank_size[0]} -> {r.bank_size[1]} rows"
    how = "recorded by fit" if r.radius_source == "fit" else "estimated from the bank"
    radius = f"covering radius {r.radius:.4g} ({how})"
    if r.rows_added == 0:
        print(
            f"nothing to add: every patch of these {len(r.names)} images is already within the "
            f"{radius}; {bundle_arg} not changed (these images score like training images: "
            "do not calibrate on them)"
        )
        return
    print(
        f"taught {len(r.names)} images: {r.rows_added} rows added, {grown}, {radius}; "
        f"model {r.previous_model_id} -> {r.model_id} in {r.bundle}"
    )
    if r.calibration_stale:
        print(
            "calibration is stale: the thresholds were set on the previous bank and stay in "
            "force (run keeps them), but scores near them moved; recalibrate on held-out good "
            f"images: edge-agent calibrate --bundle {r.bundle} --good HELD_OUT_GOOD"
        )
    print(
        f"a running agent picks it up on SIGHUP (systemctl reload edge-agent); undo with "
        f"edge-agent teach --bundle {r.bundle} --rollback"
    )


def run(args: argparse.Namespace) -> int:
    if args.rollback:
        if args.good is not None or args.out is not None:
            raise UserError("--rollback takes only --bundle")
        left, restored = rollback(args.bundle)
        print(f"rolled {args.bundle} back: model {left} -> {restored}")
        print("a running agent picks it up on SIGHUP (systemctl reload edge-agent)")
        return 0
    if args.good is None:
        raise UserError("teach needs --good DIR (or --rollback)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    result = teach(
        args.bundle,
        args.good,
        args.out,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        regression_dir=args.regression,
        force=args.force,
    )
    _report(result, args.bundle)
    return 0
