"""The GPU device kit (scripts/gpu_kit/): fatbin trimming on ELF files laid out as CUDA's, and a
kit built from small local wheels, cut into parts, gathered over "calls", reassembled and
installed by the real pip; corrupt and missing parts refused in one line. Offline and quick:
the real wheels (hundreds of MB) are measured in docs/model-engineers/gpu.md, not downloaded."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "scripts" / "gpu_kit"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fatbin = _load("fatbin")
kitformat = _load("kitformat")
build = _load("build")

PTX, SASS = 1, 2


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    """A fatbin entry as nvcc writes it: a 64-byte header (arch at offset 28), the payload
    padded to 8 bytes."""
    payload += bytes(-len(payload) % 8)
    head = struct.pack("<HHIQ", kind, 0x101, 64, len(payload))
    head += struct.pack("<IIHHI", len(payload), 0, 0, 1, arch)
    return head + bytes(64 - len(head)) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", fatbin.FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(section: bytes, prefix: bytes = b"host code") -> bytes:
    """A minimal ELF64 file: some bytes, then ``section`` as .nv_fatbin, a string table and the
    section headers (all that trim_elf reads)."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    data_off = 64 + len(prefix)
    str_off = data_off + len(section)
    sh_off = str_off + len(names) + (-(str_off + len(names)) % 8)
    head = bytearray(64)
    head[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHIQQQIHHHHHH", head, 16, 3, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)

    def header(name: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 2, 0, offset, size, 0, 0, 8, 0)

    body = bytes(head) + prefix + section + names
    body += bytes(sh_off - len(body))
    return body + bytes(64) + header(1, 1, data_off, len(section)) + header(12, 3, str_off, 22)


SM80 = _entry(SASS, 80, b"sass for sm_80" * 9)
SM90 = _entry(SASS, 90, b"sass for sm_90" * 7)
SM120 = _entry(SASS, 120, b"sass for sm_120" * 5)
PTX80 = _entry(PTX, 80, b"ptx for compute_80" * 3)
PTX120 = _entry(PTX, 120, b"ptx for compute_120")


def _containers(section: bytes) -> list[tuple[int, bytes]]:
    """(offset, entries' bytes) of each container, read back as the CUDA runtime reads it."""
    found, pos = [], 0
    while pos + 16 <= len(section):
        magic, _, size_h, size = struct.unpack_from("<IHHQ", section, pos)
        if magic != fatbin.FATBIN_MAGIC:
            pos += 8
            continue
        found.append((pos, section[pos + size_h : pos + size_h + size]))
        pos += size_h + size
    return found


def test_trim_keeps_the_architectures_sass_in_place_and_zeroes_the_rest() -> None:
    first, second = _container(SM80, SM90, SM120, PTX120), _container(SM90, SM80)
    section = first + bytes(8) + second  # containers are 8-byte aligned: padding may sit between
    elf = _elf(section)
    out, stats = fatbin.trim_elf(elf, 90)
    assert len(out) == len(elf)
    start = elf.index(section)
    assert out[:start] == elf[:start] and out[start + len(section) :] == elf[start + len(section) :]
    trimmed = out[start : start + len(section)]
    # Both containers keep their addresses and hold exactly the sm_90 entry, byte for byte.
    assert _containers(trimmed) == [(0, SM90), (len(first) + 8, SM90)]
    assert not any(trimmed[16 + len(SM90) : len(first)])
    assert (stats.containers, stats.trimmed, stats.untouched) == (2, 2, 0)
    assert stats.bytes_after == 2 * len(SM90)
    # Idempotent: a trimmed library has nothing left to trim.
    again, stats2 = fatbin.trim_elf(out, 90)
    assert again == out and stats2.trimmed == 0


def test_trim_falls_back_to_ptx_and_leaves_containers_without_code_for_the_gpu() -> None:
    section = _container(SM80, PTX80, PTX120) + _container(SM120)
    out, stats = fatbin.trim_elf(_elf(section), 90)
    # No sm_90 SASS: the newest PTX not newer than compute_90, which the driver JIT-compiles.
    start = out.index(struct.pack("<I", fatbin.FATBIN_MAGIC))
    kept = _containers(out[start : start + len(section)])
    assert kept == [(0, PTX80), (16 + len(SM80) + len(PTX80) + len(PTX120), SM120)]
    assert (stats.trimmed, stats.untouched) == (1, 1)


def test_trim_refuses_a_layout_it_does_not_know() -> None:
    assert fatbin.trim_elf(_elf(b""), 90) == (_elf(b""), fatbin.TrimStats())
    with pytest.raises(fatbin.FatbinError, match="no fatbin container"):
        fatbin.trim_elf(_elf(_container(SM90) + b"junk".ljust(16, b"!")), 90)
    broken = bytearray(_container(SM80, SM90))
    struct.pack_into("<Q", broken, 8, len(broken))  # entries' bytes past the section's end
    with pytest.raises(fatbin.FatbinError, match="runs past"):
        fatbin.trim_elf(_elf(bytes(broken)), 90)
    with pytest.raises(fatbin.FatbinError, match="not an ELF"):
        fatbin.trim_elf(b"MZ" + bytes(100), 90)


def _wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (py3-none-any) holding ``files``."""
    info = f"{dist}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return path


LIBRARY = _elf(_container(SM80, SM90, SM120) + _container(SM90, PTX120))


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    """A kit of two wheels (one with a CUDA-like library) cut into 1 KiB parts."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "kitdemo_gpu", "1.0", {
        "kitdemo_gpu/__init__.py": b"VALUE = 'gpu'\n",
        "kitdemo_gpu/_kernels.so": LIBRARY,
        "kitdemo_gpu/noise.bin": os.urandom(3000),  # incompressible: several parts
    })  # fmt: skip
    _wheel(wheels, "kitdemo_pure", "2.0", {"kitdemo_pure.py": b"VALUE = 'pure'\n"})
    pins = tmp_path / "pins.txt"
    pins.write_text("# the test's kit\nkitdemo-gpu==1.0\nKitdemo.Pure == 2.0  # normalised\n")
    out = tmp_path / "kit"
    proc = _run(
        "build.py", "-r", pins, "--wheels", wheels, "--out", out, "--offline",
        "--part-size", "1K", "--python", PYTHON,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kitdemo_gpu-1.0+sm90-py3-none-any.whl" in proc.stdout
    return out


def _run(
    script: str, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(KIT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _one_line_error(proc: subprocess.CompletedProcess, script: str, text: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: ") and text in lines[0], lines


def test_kit_parts_fit_and_reassemble_across_calls_into_an_installed_trimmed_wheel(
    kit: Path, tmp_path: Path
) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    parts = sorted((kit / "parts").iterdir())
    assert len(parts) == len(manifest["parts"]) >= 3
    assert all(p.stat().st_size <= 1024 for p in parts)
    # Three device calls: each carries one part (and kit.json); the last one installs.
    store, target = tmp_path / "store", tmp_path / "site"
    calls = []
    for i, part in enumerate(parts):
        call = tmp_path / f"call{i}"
        (call / "parts").mkdir(parents=True)
        shutil.copy(kit / "kit.json", call)
        shutil.copy(part, call / "parts")
        calls.append(call)
    for call in calls[:-1]:
        proc = _run("install.py", "gather", call, "--store", store)
        assert proc.returncode == 0 and "missing: kit.tar.xz" in proc.stdout, proc.stderr
    proc = _run(
        "install.py", "install", calls[-1], "--store", store, "--target", target, "--no-check"
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{len(parts)}/{len(parts)} parts" in proc.stdout
    code = "import kitdemo_gpu, kitdemo_pure; print(kitdemo_gpu.VALUE, kitdemo_pure.VALUE)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.stdout.split() == ["gpu", "pure"], out.stderr
    # The installed library is the trimmed one: only sm_90 left, at the same size.
    installed = (target / "kitdemo_gpu" / "_kernels.so").read_bytes()
    assert len(installed) == len(LIBRARY) and installed != LIBRARY
    assert fatbin.trim_elf(installed, 90)[0] == installed
    # pip recorded the local version, and RECORD's hashes are the installed files'.
    info = target / "kitdemo_gpu-1.0+sm90.dist-info"
    assert "Version: 1.0+sm90" in (info / "METADATA").read_text()
    for line in (info / "RECORD").read_text().splitlines():
        name, digest, _ = line.rsplit(",", 2)
        if digest and not name.endswith(".pyc"):
            data = (target / name).read_bytes()
            b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={b64}", name


def test_a_corrupt_or_missing_part_is_refused_in_one_line(kit: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    part = sorted((kit / "parts").iterdir())[1]
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(data)
    proc = _run("install.py", "install", kit, "--store", tmp_path / "s1", "--target", target)
    _one_line_error(proc, "install.py", f"part {part.name}")
    assert "corrupt" in proc.stderr and not target.exists()
    part.unlink()
    proc = _run("install.py", "install", kit, "--store", tmp_path / "s2", "--target", target)
    _one_line_error(proc, "install.py", f"lacks {part.name}")
    proc = _run("install.py", "install", tmp_path / "nowhere", "--store", tmp_path / "s3")
    _one_line_error(proc, "install.py", "no kit manifest")


def test_build_refuses_loose_pins_and_missing_wheels_in_one_line(tmp_path: Path) -> None:
    pins = tmp_path / "pins.txt"
    pins.write_text("onnxruntime-gpu>=1.17\n")
    proc = _run("build.py", "-r", pins, "--out", tmp_path / "kit", "--offline")
    _one_line_error(proc, "build.py", "pin exactly")
    pins.write_text("kitdemo==1.0\n")
    proc = _run("build.py", "-r", pins, "--out", tmp_path / "kit", "--offline")
    _one_line_error(proc, "build.py", "kitdemo==1.0 is not in")
    proc = _run("build.py", "-r", pins, "--part-size", "0", "--out", tmp_path / "kit")
    _one_line_error(proc, "build.py", "part size")


def test_build_refuses_a_library_whose_device_code_it_cannot_read(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    odd = _elf(_container(SM80, SM90) + b"not a fatbin".ljust(16, b"?"))
    _wheel(wheels, "kitdemo_odd", "1.0", {"kitdemo_odd/libodd.so.1": odd})
    pins = tmp_path / "pins.txt"
    pins.write_text("kitdemo-odd==1.0\n")
    args = ("-r", pins, "--wheels", wheels, "--out", tmp_path / "kit", "--offline")
    _one_line_error(_run("build.py", *args), "build.py", "libodd.so.1: no fatbin container")
    # --arch none carries it as it is.
    assert _run("build.py", *args, "--arch", "none").returncode == 0


def test_check_reports_the_cpu_builds_here_and_fails_when_a_gpu_is_required() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("faiss")
    proc = _run("install.py", "check")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert report["packages"]["pydantic"][0].isdigit()
    if "CUDAExecutionProvider" in report["onnxruntime"]["providers"] and report["faiss"]["gpus"]:
        pytest.skip("this machine has a GPU path: --require-gpu would pass")
    proc = _run("install.py", "check", "--require-gpu")
    assert proc.returncode == 1 and "GPU path not usable" in proc.stderr


def test_the_kit_pins_what_the_gpu_extra_asks_for() -> None:
    """One set of GPU wheels: every requirement of pyproject's gpu extra is pinned by the kit at
    a version it admits (the kit is the device's exact closure of that extra)."""
    pins = {
        key: version for key, (_, version) in build.read_pins([build.DEFAULT_REQUIREMENTS]).items()
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["optional-dependencies"]["gpu"]:
        req = Requirement(text)
        name = kitformat.canonical(req.name)
        assert name in pins, f"the gpu extra's {req.name} is not in the kit"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    for text in project["dependencies"]:
        req = Requirement(text)
        name = kitformat.canonical(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name]), (text, pins[name])
