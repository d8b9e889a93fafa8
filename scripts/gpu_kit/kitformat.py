"""What build.py writes and install.py reads: names, defaults and the manifest's checks.

Standard library only: install.py runs on a device with no registry and few packages.

A kit is a folder (default ``.gpu_kit/``, git-ignored)::

    kit.json               the manifest: the parts and the archive (SHA-256, bytes), each wheel
                           (SHA-256, the upstream wheel's SHA-256, what was trimmed)
    parts/kit.tar.xz.000   the xz-compressed tar of the wheels, cut into parts that each fit
    parts/kit.tar.xz.001   one device call beside the working tree
    ...
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "kit.json"
PARTS_DIR = "parts"
ARCHIVE = "kit.tar.xz"
DEFAULT_KIT_DIR = Path(".gpu_kit")
# The device call carries at most 64 MiB, the working tree (about 5 MiB) included.
DEFAULT_PART_SIZE = "48M"
DEFAULT_ARCH = "90"  # H100 and H200: sm_90
# Where gather keeps verified parts on the device between back-to-back calls (outside the
# checkout, so a later call's carried paths cannot replace them).
DEFAULT_STORE = Path("/tmp/gpu_kit")
# A GPU build installed into an environment that holds the CPU build of the same import package
# would leave both claiming its files: install.py uninstalls these first.
REPLACES: dict[str, tuple[str, ...]] = {
    "onnxruntime-gpu": ("onnxruntime",),
    "faiss-gpu-cu13-cuvs": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu"),
}
CHUNK = 1 << 20


class KitError(Exception):
    """Bad input or a kit that fails its checks: one line for the user, exit status 2."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name (what wheel file names and pins are compared by)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def part_name(index: int) -> str:
    return f"{ARCHIVE}.{index:03d}"


def parse_size(text: str) -> int:
    """Bytes from ``N``, ``NK``, ``NM`` or ``NG`` (binary units: 48M = 48 x 2^20)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    if not match or int(match.group(1)) == 0:
        raise KitError(f"part size must be a positive number of bytes, K, M or G: {text!r}")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(kit: Path) -> dict[str, Any]:
    """The kit's manifest, checked for the fields install.py relies on."""
    path = kit / MANIFEST if kit.is_dir() else kit
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        hint = "build one with scripts/gpu_kit/build.py"
        raise KitError(f"no kit manifest at {path} ({hint})") from None
    except (OSError, ValueError) as e:
        raise KitError(f"kit manifest {path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KitError(f"kit manifest {path} is not format {FORMAT}")
    try:
        for part in manifest["parts"]:
            if not re.fullmatch(re.escape(ARCHIVE) + r"\.\d{3}", part["name"]):
                raise KitError(f"kit manifest {path} names an odd part {part['name']!r}")
            _ = str(part["sha256"]), int(part["bytes"])
        for wheel in manifest["wheels"]:
            if "/" in wheel["file"] or not wheel["file"].endswith(".whl"):
                raise KitError(f"kit manifest {path} names an odd wheel {wheel['file']!r}")
            _ = str(wheel["sha256"])
        _ = str(manifest["archive"]["sha256"]), int(manifest["archive"]["bytes"])
    except (KeyError, TypeError, ValueError) as e:
        raise KitError(f"kit manifest {path} lacks a field: {e}") from None
    return manifest


def kit_id(manifest: dict[str, Any]) -> str:
    """Short name of a kit: its archive's digest, so two kits never share a store folder."""
    return str(manifest["archive"]["sha256"])[:16]
