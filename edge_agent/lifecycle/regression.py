"""An inspection's regression set: the archived rejects an operator confirmed as defects, kept
as data only (a lossless PNG of the inspection's region and a JSON record beside it), and
re-scored by `teach` and `promote`, which refuse a bundle under which any of
them would pass.

    <lifecycle dir>/regression/<inspection>/<archive entry name>.png   the region, BGR
    <lifecycle dir>/regression/<inspection>/<archive entry name>.json  who, when, from where

The region is cut from the archived frame (the original, left of its heat maps) with the
inspection's ROI at the time of the confirmation, so a later bundle is scored on exactly the
pixels it would see. The archive keeps JPEG copies of frames: the region is that copy, as
teach's --good takes it from an archive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.decide.archive import original_of
from edge_agent.decide.decision import ERROR, NG, Thresholds, verdict_for
from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write
from edge_agent.images import BadImage, decode_image
from edge_agent.lifecycle.gates import Rescored
from edge_agent.station.regions import crop

SCHEMA = "edge-agent/confirmed-defect/v1"
REGRESSION_DIR = "regression"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def folder(lifecycle_dir: Path, inspection: str) -> Path:
    return Path(lifecycle_dir) / REGRESSION_DIR / inspection


@dataclass(frozen=True)
class Entry:
    name: str
    region: np.ndarray | None  # BGR; None when it cannot be read (``error`` says why)
    record: Mapping[str, Any]
    error: str | None = None


def read_archive_entry(path: Path) -> tuple[Path, dict[str, Any]]:
    """(sidecar path, sidecar) of an archive entry named by its .json or .jpg; UserError."""
    sidecar = Path(path).with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no archive entry (no {sidecar.name} beside it)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{sidecar}: not a readable archive sidecar ({exc})") from None
    if not isinstance(meta, dict) or "verdict" not in meta:
        raise UserError(f"{sidecar}: not a reject-archive sidecar (no verdict)")
    return sidecar, meta


def pick_inspection(meta: Mapping[str, Any], inspection: str | None) -> str:
    """The inspection a confirmation is about: the one asked for, which must have answered on
    the entry's frame, or the entry's only rejecting one."""
    answered = [i for i in meta.get("inspections") or () if isinstance(i, dict)]
    ids = [str(i.get("id")) for i in answered]
    if inspection is not None:
        if ids and inspection not in ids:
            raise UserError(f"inspection {inspection!r} did not answer on this frame ({ids})")
        return inspection
    rejecting = [str(i.get("id")) for i in answered if i.get("verdict") == NG]
    shadow = meta.get("shadow")
    if isinstance(shadow, dict) and isinstance(shadow.get("inspection"), str):
        rejecting = rejecting or [shadow["inspection"]]
    if len(rejecting) == 1:
        return rejecting[0]
    raise UserError(
        "name the inspection (--inspection): "
        + (f"several rejected on this frame ({rejecting})" if rejecting else "none rejected")
    )


def confirm(
    entry: Path,
    root: Path,
    roi: tuple[int, int, int, int] | None,
    record: Mapping[str, Any],
) -> str:
    """Add an archive entry's region (``roi`` of its original frame) to the set in ``root``;
    its name. UserError when the entry cannot be read or is confirmed already."""
    sidecar, meta = read_archive_entry(entry)
    name = sidecar.stem
    if not _SAFE.match(name):
        raise UserError(f"{sidecar}: not an archive entry name")
    image_path = sidecar.with_suffix(".jpg")
    try:
        bgr = decode_image(image_path.read_bytes())
    except OSError as exc:
        raise UserError(f"{image_path}: cannot read ({exc.strerror or exc})") from None
    except BadImage as exc:
        raise UserError(f"{image_path}: not a usable image ({exc})") from None
    panels = meta.get("panels", 2 if meta.get("verdict") == NG else 1)
    frame = original_of(bgr, int(panels)) if isinstance(panels, int) else None
    if frame is None:
        raise UserError(f"{image_path}: not an archived frame (original | heat maps)")
    try:
        region = crop(frame, roi)
    except ValueError as exc:
        raise UserError(f"{image_path}: {exc}") from None
    root.mkdir(parents=True, exist_ok=True)
    png, meta_path = root / f"{name}.png", root / f"{name}.json"
    if meta_path.exists():
        raise UserError(f"{name}: confirmed already")
    ok, encoded = cv2.imencode(".png", region)
    if not ok:
        raise UserError(f"{image_path}: cannot encode the region")
    atomic_write(png, encoded.tobytes())
    body = {
        "schema": SCHEMA,
        "entry": str(sidecar),
        "roi": list(roi) if roi is not None else None,
        "camera": meta.get("camera"),
        "frame_id": meta.get("frame_id"),
        "archived_verdict": meta.get("verdict"),
        **record,
    }
    atomic_write(meta_path, json.dumps(body, indent=1).encode())  # last: a record has its PNG
    return name


def load(root: Path) -> list[Entry]:
    """Every confirmed defect in ``root``, oldest name first. One that cannot be read is kept
    with its reason: a set must never shrink because a file broke."""
    if not Path(root).is_dir():
        return []
    out = []
    for meta_path in sorted(Path(root).glob("*.json")):
        name = meta_path.stem
        try:
            record = json.loads(meta_path.read_text(encoding="utf-8"))
            region = decode_image(meta_path.with_suffix(".png").read_bytes())
        except (OSError, ValueError, BadImage) as exc:
            out.append(Entry(name, None, {}, f"cannot read ({exc})"))
            continue
        out.append(Entry(name, region, record if isinstance(record, dict) else {}))
    return out


def rescore(
    entries: Sequence[Entry],
    scorer: Any,
    thresholds: Thresholds,
    keep: np.ndarray | None = None,
) -> dict[str, Rescored]:
    """Each entry's verdict under ``scorer`` (a model.scorer.Scorer) and ``thresholds``, as the
    agent would answer its region (``keep``: the inspection's ignored patches left out)."""
    out: dict[str, Rescored] = {}
    for e in entries:
        if e.region is None:
            out[e.name] = Rescored(ERROR, error=e.error)
            continue
        try:
            prepared = scorer.prepare_region(e.region)
            cells = None if keep is None else keep[None]
            score = float(scorer.score(prepared[None], None, cells).image_scores[0])
        except (BadImage, ValueError) as exc:
            out[e.name] = Rescored(ERROR, error=str(exc))
            continue
        out[e.name] = Rescored(verdict_for(score, thresholds), score, thresholds.image)
    return out
