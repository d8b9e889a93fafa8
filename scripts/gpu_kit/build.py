"""Build the GPU device kit: the exact wheels a lent GPU machine needs, in parts that each fit
one device call.

    .venv/bin/python scripts/gpu_kit/build.py                 # -> .gpu_kit/ (kit.json, parts/)
    .venv/bin/python scripts/gpu_kit/build.py --arch none     # keep every GPU architecture

Runs where the package registries are: downloads each pin of scripts/gpu_kit/requirements.txt
(``name==version``, no dependencies resolved: the list is the whole closure the device lacks)
for CPython 3.12 on x86-64 Linux into ``--wheels`` (reused on the next build); trims the CUDA
device code of every shared library in them to one architecture (``--arch``, default sm_90 for
the H100 and H200; fatbin.py says how and why it is safe) and stores such a wheel uncompressed
under a local version (``1.31.1+sm90``) so that xz sees the raw code; tars the wheels, compresses
them with xz on one thread and cuts the stream into parts of ``--part-size``. kit.json records
every part's and wheel's SHA-256 for install.py, which reassembles and installs the kit on the
device.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fatbin import ELF_MAGIC, FatbinError, TrimStats, trim_elf
from kitformat import (
    ARCHIVE,
    DEFAULT_ARCH,
    DEFAULT_KIT_DIR,
    DEFAULT_PART_SIZE,
    FORMAT,
    MANIFEST,
    PARTS_DIR,
    REPLACES,
    KitError,
    canonical,
    parse_size,
    part_name,
    sha256_file,
)

HERE = Path(__file__).resolve().parent
DEFAULT_REQUIREMENTS = HERE / "requirements.txt"
DEFAULT_PYTHON = "3.12"
# pip matches manylinux tags exactly: name every glibc level the device (glibc 2.39) can load
# that the pinned wheels are published for.
PLATFORMS = (
    "manylinux_2_39_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
XZ_PRESET = 9


def read_pins(files: list[Path]) -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} from requirement files of ``name==version`` lines."""
    pins: dict[str, tuple[str, str]] = {}
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise KitError(f"cannot read requirements {path}: {e.strerror}") from None
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = (s.strip() for s in line.partition("=="))
            if not sep or not name or not version or any(c in version for c in "<>=!,;* "):
                raise KitError(f"{path}:{number}: pin exactly, as name==version: {line!r}")
            key = canonical(name)
            if key in pins and pins[key][1] != version:
                raise KitError(f"{path}:{number}: {name} pinned twice ({pins[key][1]}, {version})")
            pins[key] = (name, version)
    if not pins:
        raise KitError("the requirements name no wheel")
    return pins


def split_wheel_name(filename: str) -> tuple[str, str, str]:
    """(distribution, version, the rest: build tag and compatibility tags) of a wheel file."""
    stem = filename.removesuffix(".whl")
    parts = stem.split("-")
    if len(parts) not in (5, 6) or not filename.endswith(".whl"):
        raise KitError(f"not a wheel file name: {filename}")
    return parts[0], parts[1], "-".join(parts[2:])


def find_wheel(folder: Path, name: str, version: str) -> Path | None:
    found = []
    for path in sorted(folder.glob("*.whl")):
        dist, ver, _ = split_wheel_name(path.name)
        if canonical(dist) == canonical(name) and ver == version:
            found.append(path)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise KitError(f"{folder} holds several wheels of {name}=={version}: {names}")
    return found[0] if found else None


def download(folder: Path, name: str, version: str, python: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp", "--abi"]
    cmd += [f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(folder), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or ["failed"]
        raise KitError(f"pip download {name}=={version}: {errors[-1]}")
    wheel = find_wheel(folder, name, version)
    if wheel is None:
        raise KitError(f"pip download {name}=={version} saved no wheel in {folder}")
    return wheel


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def local_version(version: str, arch: str) -> str:
    """The version a trimmed wheel carries: ``1.31.1`` -> ``1.31.1+sm90`` (PEP 440 local label,
    so ``==1.31.1`` pins still match it and pip shows that it is not the upstream build)."""
    label = f"sm{arch}"
    return f"{version}.{label}" if "+" in version else f"{version}+{label}"


def trim_wheel(src: Path, dest: Path, arch: str) -> tuple[Path, list[dict[str, Any]]] | None:
    """Write ``src`` with every shared library's device code trimmed to ``arch`` into folder
    ``dest`` (members stored uncompressed, RECORD rewritten, local version); None when no
    library in it has device code for other architectures."""
    trimmed: dict[str, bytes] = {}
    report = []
    with zipfile.ZipFile(src) as zin:
        for info in zin.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if not (base.endswith(".so") or ".so." in base):
                continue
            data = zin.read(info)
            if data[:4] != ELF_MAGIC:
                continue
            try:
                result = trim_elf(data, int(arch))
            except FatbinError as e:
                raise KitError(f"{src.name}: {info.filename}: {e}") from None
            if result is None or result[1].trimmed == 0:
                continue
            trimmed[info.filename] = result[0]
            stats: TrimStats = result[1]
            report.append({"member": info.filename, "bytes": len(data), **asdict(stats)})
        if not trimmed:
            return None
        dist, version, rest = split_wheel_name(src.name)
        new_version = local_version(version, arch)
        renames = {}
        for info in zin.infolist():
            top = info.filename.split("/", 1)[0]
            for suffix in (".dist-info", ".data"):
                if top.endswith(f"-{version}{suffix}"):
                    renames[top] = (
                        top.removesuffix(f"-{version}{suffix}") + f"-{new_version}{suffix}"
                    )
        dist_info = next((new for old, new in renames.items() if new.endswith(".dist-info")), None)
        if dist_info is None:
            raise KitError(f"{src.name}: no {dist}-{version}.dist-info folder in the wheel")
        out = dest / f"{dist}-{new_version}-{rest}.whl"
        record_name = f"{dist_info}/RECORD"
        records = []
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                top, _, tail = info.filename.partition("/")
                name = f"{renames.get(top, top)}/{tail}" if tail else info.filename
                if name == record_name or info.is_dir():
                    continue
                data = trimmed.get(info.filename)
                if data is None:
                    data = zin.read(info)
                if name == f"{dist_info}/METADATA":
                    line = f"\nVersion: {version}\n".encode()
                    if line not in data:
                        raise KitError(f"{src.name}: METADATA does not say Version: {version}")
                    data = data.replace(line, f"\nVersion: {new_version}\n".encode(), 1)
                member = zipfile.ZipInfo(name, date_time=info.date_time)
                member.external_attr = info.external_attr
                zout.writestr(member, data)
                records.append(f"{name},{_record_hash(data)},{len(data)}")
            records.append(f"{record_name},,")
            member = zipfile.ZipInfo(record_name, date_time=(1980, 1, 1, 0, 0, 0))
            member.external_attr = 0o644 << 16
            zout.writestr(member, "\n".join(records) + "\n")
    return out, report


class PartWriter:
    """A binary sink that xz-compresses what is written and cuts it into numbered parts of at
    most ``part_size`` bytes, hashing each part and the whole stream."""

    def __init__(self, folder: Path, part_size: int, preset: int) -> None:
        self.folder = folder
        self.part_size = part_size
        self.compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=preset)
        self.whole = hashlib.sha256()
        self.parts: list[dict[str, Any]] = []
        self.total = 0
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._size = 0

    def _emit(self, data: bytes) -> None:
        self.whole.update(data)
        self.total += len(data)
        view = memoryview(data)
        while view:
            if self._file is None:
                name = part_name(len(self.parts))
                self._file = (self.folder / name).open("wb")
                self.parts.append({"name": name})
            room = self.part_size - self._size
            chunk, view = view[:room], view[room:]
            self._file.write(chunk)
            self._digest.update(chunk)
            self._size += len(chunk)
            if self._size == self.part_size:
                self._close_part()

    def _close_part(self) -> None:
        assert self._file is not None
        self._file.close()
        self.parts[-1].update(sha256=self._digest.hexdigest(), bytes=self._size)
        self._file, self._digest, self._size = None, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._emit(self.compressor.compress(data))
        return len(data)

    def close(self) -> None:
        self._emit(self.compressor.flush())
        if self._file is not None:
            self._close_part()


def pack(wheels: list[Path], folder: Path, part_size: int, preset: int) -> PartWriter:
    """Tar ``wheels`` (flat, in order, no owner or time) through xz into parts in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{ARCHIVE}.*"):
        old.unlink()
    sink = PartWriter(folder, part_size, preset)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for wheel in wheels:
            info = tarfile.TarInfo(wheel.name)
            info.size = wheel.stat().st_size
            info.mode = 0o644
            with wheel.open("rb") as f:
                tar.addfile(info, f)
    sink.close()
    return sink


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def build(args: argparse.Namespace) -> dict[str, Any]:
    part_size = parse_size(args.part_size)
    arch = None if args.arch.lower() == "none" else args.arch.lower().removeprefix("sm_")
    if arch is not None and not arch.isdigit():
        raise KitError(f"--arch must be a compute capability such as 90 (sm_90), or none: {arch}")
    pins = read_pins(args.requirements or [DEFAULT_REQUIREMENTS])
    wheels_dir: Path = args.wheels or args.out / "wheels"
    stage = args.out / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    packed: list[Path] = []
    entries = []
    for name, version in pins.values():
        upstream = find_wheel(wheels_dir, name, version) if wheels_dir.is_dir() else None
        if upstream is None:
            if args.offline:
                raise KitError(f"{name}=={version} is not in {wheels_dir} (and --offline)")
            print(f"downloading {name}=={version}", flush=True)
            upstream = download(wheels_dir, name, version, args.python)
        t = time.perf_counter()
        trimmed = trim_wheel(upstream, stage, arch) if arch else None
        wheel, report = trimmed if trimmed else (upstream, [])
        if report:
            seconds = time.perf_counter() - t
            print(f"trimmed {upstream.name} to sm_{arch} in {seconds:.1f} s", flush=True)
        packed.append(wheel)
        entries.append(
            {
                "file": wheel.name,
                "name": name,
                "version": version,
                "sha256": sha256_file(wheel),
                "bytes": wheel.stat().st_size,
                "upstream": upstream.name,
                "upstream_sha256": sha256_file(upstream),
                "upstream_bytes": upstream.stat().st_size,
                "trimmed": report,
            }
        )
    t = time.perf_counter()
    sink = pack(packed, args.out / PARTS_DIR, part_size, args.xz_preset)
    manifest = {
        "format": FORMAT,
        "python": args.python,
        "arch": f"sm_{arch}" if arch else None,
        "part_size": part_size,
        "archive": {"name": ARCHIVE, "sha256": sink.whole.hexdigest(), "bytes": sink.total},
        "parts": sink.parts,
        "wheels": entries,
        "replaces": {k: list(v) for k, v in REPLACES.items() if canonical(k) in pins},
        "xz_seconds": round(time.perf_counter() - t, 1),
    }
    tmp = args.out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, args.out / MANIFEST)
    shutil.rmtree(stage)  # the parts hold the trimmed wheels; the cache keeps the upstream ones
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "-r",
        "--requirements",
        type=Path,
        action="append",
        help=f"name==version pins (repeatable; default {DEFAULT_REQUIREMENTS.name})",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_KIT_DIR, help="the kit folder")
    p.add_argument("--wheels", type=Path, help="downloaded wheels (default OUT/wheels)")
    p.add_argument("--arch", default=DEFAULT_ARCH, help="keep device code for sm_ARCH; none")
    p.add_argument("--part-size", default=DEFAULT_PART_SIZE, help="bytes a part, K/M/G suffix")
    p.add_argument("--python", default=DEFAULT_PYTHON, help="the device's Python (X.Y)")
    p.add_argument("--xz-preset", type=int, default=XZ_PRESET, choices=range(10))
    p.add_argument("--offline", action="store_true", help="use --wheels only, download nothing")
    args = p.parse_args(argv)
    try:
        manifest = build(args)
    except KitError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 2
    for wheel in manifest["wheels"]:
        note = ""
        if wheel["trimmed"]:
            before = sum(t["bytes_before"] for t in wheel["trimmed"])
            after = sum(t["bytes_after"] for t in wheel["trimmed"])
            note = (
                f" stored (upstream {mb(wheel['upstream_bytes'])} deflated);"
                f" device code {mb(before)} -> {mb(after)}"
            )
        print(f"  {wheel['file']}: {mb(wheel['bytes'])}{note}")
    parts = ", ".join(mb(p["bytes"]) for p in manifest["parts"])
    total = mb(manifest["archive"]["bytes"])
    print(f"kit {args.out}: {len(manifest['parts'])} parts ({parts}), {total} in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
