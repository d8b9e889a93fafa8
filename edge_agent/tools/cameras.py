"""`edge-agent cameras`: the cameras this machine can see, for commissioning: the GenICam
devices Aravis finds (id, vendor, model, serial, address; the id goes into a camera's
``source: genicam:<id>``) and the OpenCV (V4L2) device indexes that open (``source: <index>``).

Without Aravis the GenICam part says how to install it and the rest still runs."""

from __future__ import annotations

import argparse
import glob
import json
import re
from typing import Any

import cv2

from edge_agent.capture.genicam import PREFIX
from edge_agent.errors import UserError

GENICAM_COLUMNS = ("id", "vendor", "model", "serial", "address", "protocol")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument(
        "--no-opencv", action="store_true", help="list GenICam devices only (opening is slow)"
    )


def genicam_devices() -> tuple[list[dict[str, str]], str | None]:
    """(devices, None), or ([], why none can be listed)."""
    from edge_agent.capture import genicam

    try:
        return genicam.list_devices(), None
    except UserError as exc:
        return [], str(exc)


def opencv_indexes() -> list[dict[str, Any]]:
    """The /dev/videoN devices OpenCV opens, with the frame size they deliver."""
    found = []
    for path in sorted(glob.glob("/dev/video*"), key=_number):
        index = _number(path)
        cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
        try:
            if not cap.isOpened():
                continue
            width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        finally:
            cap.release()
        found.append({"index": index, "device": path, "size": f"{width}x{height}"})
    return found


def _number(path: str) -> int:
    digits = re.search(r"(\d+)$", path)
    return int(digits[1]) if digits else -1


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in rows:
        cells = (str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    return lines


def run(args: argparse.Namespace) -> int:
    devices, why = genicam_devices()
    indexes = [] if args.no_opencv else opencv_indexes()
    if args.json:
        print(json.dumps({"genicam": devices, "genicam_error": why, "opencv": indexes}))
        return 0
    print(f"GenICam (source: {PREFIX}<id>):")
    if why is not None:
        print(f"  not available: {why}")
    elif not devices:
        print("  none found")
    else:
        print("\n".join("  " + line for line in _table(devices, GENICAM_COLUMNS)))
    if not args.no_opencv:
        print("OpenCV (source: <index>):")
        if indexes:
            print("\n".join("  " + line for line in _table(indexes, ("index", "device", "size"))))
        else:
            print("  none found")
    return 0
