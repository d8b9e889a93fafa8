"""Reassemble and install the GPU device kit (build.py) on a device with no registry.

    python3 scripts/gpu_kit/install.py gather .gpu_kit                # a call carrying parts
    python3 scripts/gpu_kit/install.py install .gpu_kit --require-gpu  # the call with the last
    python3 scripts/gpu_kit/install.py check --require-gpu             # what imports, on what

gather checks the SHA-256 of every part the call carried (KIT/parts/) against KIT/kit.json and
keeps the good ones in --store, outside the checkout, for the next back-to-back call. install
gathers too, then needs every part: it streams them through xz and tar, checks each wheel's
SHA-256 and the whole archive's, uninstalls the CPU builds the GPU ones replace and runs
``pip install --no-index --no-deps`` into this interpreter's environment (or --target), then
check. A missing or corrupt part, a wheel that is not the one built, or a failed install is one
line on stderr and exit status 2; check exits 1 under --require-gpu when ONNX Runtime or FAISS
cannot run on a GPU.

Install into the environment that holds the device's CUDA 13 wheels (site-packages/nvidia/cu13):
the RAPIDS libraries find them by a relative RPATH and onnxruntime.preload_dlls() beside
itself, so a --target folder elsewhere only suits builds without them (and the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as metadata
import io
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitformat import (
    CHUNK,
    DEFAULT_KIT_DIR,
    DEFAULT_STORE,
    MANIFEST,
    PARTS_DIR,
    KitError,
    kit_id,
    load_manifest,
    sha256_file,
)

# What edge-agent imports at run time: distribution -> import name (pyproject.toml dependencies
# and the gpu extra), reported by check.
RUNTIME = {
    "numpy": "numpy",
    "scipy": "scipy",
    "opencv-python-headless": "cv2",
    "paho-mqtt": "paho.mqtt.client",
    "pyyaml": "yaml",
    "prometheus-client": "prometheus_client",
    "pydantic": "pydantic",
    "protobuf": "google.protobuf",
}


def verify_part(path: Path, part: dict[str, Any]) -> None:
    size = path.stat().st_size
    if size != part["bytes"]:
        raise KitError(f"part {part['name']} at {path} has {size} bytes, not {part['bytes']}")
    digest = sha256_file(path)
    if digest != part["sha256"]:
        raise KitError(
            f"part {part['name']} at {path} is corrupt: SHA-256 {digest[:16]}..., "
            f"expected {part['sha256'][:16]}..."
        )


def gather(kit: Path, store: Path) -> tuple[dict[str, Any], Path, list[str]]:
    """Check the parts carried in ``kit`` and keep them in the store; (manifest, the kit's
    store folder, names of the parts still missing)."""
    manifest = load_manifest(kit)
    dest = store / kit_id(manifest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kit / MANIFEST, dest / MANIFEST)
    missing, fresh = [], []
    for part in manifest["parts"]:
        carried, kept = kit / PARTS_DIR / part["name"], dest / part["name"]
        if carried.is_file():
            verify_part(carried, part)
            if not kept.is_file() or not os.path.samefile(carried, kept):
                tmp = kept.with_suffix(".tmp")
                shutil.copyfile(carried, tmp)
                os.replace(tmp, kept)
            fresh.append(part["name"][-3:])
        elif kept.is_file():
            verify_part(kept, part)
        else:
            missing.append(part["name"])
    have = len(manifest["parts"]) - len(missing)
    print(
        f"gpu kit {kit_id(manifest)}: {have}/{len(manifest['parts'])} parts in {dest}"
        f" (this call: {' '.join(fresh) or 'none'}; missing: {' '.join(missing) or 'none'})",
        flush=True,
    )
    return manifest, dest, missing


class ChainReader(io.RawIOBase):
    """The parts read back to back as one stream, hashed as they go."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self.digest = hashlib.sha256()
        self.current: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self.current is None:
                if not self.paths:
                    return 0
                self.current = self.paths.pop(0).open("rb")
            n = self.current.readinto(buffer)
            if n:
                self.digest.update(memoryview(buffer)[:n])
                return n
            self.current.close()
            self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        super().close()


def unpack(manifest: dict[str, Any], store: Path, into: Path) -> list[Path]:
    """The kit's wheels written into ``into``, each checked against the manifest."""
    expected = {w["file"]: w for w in manifest["wheels"]}
    written: list[Path] = []
    reader = ChainReader([store / p["name"] for p in manifest["parts"]])
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, CHUNK), mode="r|xz") as tar:
            for member in tar:
                wheel = expected.get(member.name)
                if wheel is None or not member.isfile():
                    raise KitError(f"the kit's archive holds {member.name!r}, not in kit.json")
                source = tar.extractfile(member)
                assert source is not None
                path = into / member.name
                digest = hashlib.sha256()
                with path.open("wb") as out:
                    while block := source.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != wheel["sha256"]:
                    raise KitError(f"wheel {member.name} in the kit is not the one built")
                written.append(path)
    except (lzma.LZMAError, tarfile.TarError, EOFError) as e:
        raise KitError(f"the kit's archive does not unpack: {e}") from None
    if reader.digest.hexdigest() != manifest["archive"]["sha256"]:
        raise KitError("the reassembled archive's SHA-256 is not the one built")
    lost = sorted(set(expected) - {p.name for p in written})
    if lost:
        raise KitError(f"the kit's archive lacks {', '.join(lost)}")
    return written


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["failed"]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        raise KitError(f"pip {args[0]}: {errors[-1].strip()}")


def install(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    manifest, dest, missing = gather(args.kit, args.store)
    if missing:
        raise KitError(
            f"kit {kit_id(manifest)} lacks {', '.join(missing)}: carry them to "
            f"{args.kit / PARTS_DIR} in this call or an earlier back-to-back one"
        )
    want = manifest.get("python")
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if want and want != have:
        raise KitError(f"this kit is for Python {want}, this is {have} ({sys.executable})")
    with tempfile.TemporaryDirectory(prefix="wheels-", dir=dest) as tmp:
        wheels = unpack(manifest, dest, Path(tmp))
        t1 = time.perf_counter()
        target = ["--target", str(args.target), "--upgrade"] if args.target else []
        if not args.target:
            installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
            gone = [n for names in manifest.get("replaces", {}).values() for n in names]
            gone = [n for n in gone if n.lower() in installed]
            if gone:
                print(f"uninstalling {', '.join(gone)} (the GPU builds replace them)", flush=True)
                pip("uninstall", "-y", *gone)
        pip("install", "--no-index", "--no-deps", "--no-compile", *target, *map(str, wheels))
    t2 = time.perf_counter()
    print(
        f"installed {len(wheels)} wheels into {args.target or sys.prefix}: "
        f"unpacked in {t1 - t0:.1f} s, pip {t2 - t1:.1f} s",
        flush=True,
    )
    if args.no_check:
        return 0
    env = dict(os.environ)
    if args.target:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.target), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "check"] + (["--require-gpu"] if args.require_gpu else [])
    return subprocess.run(cmd, env=env).returncode


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def probe() -> dict[str, Any]:
    """What this interpreter imports, and whether ONNX Runtime and FAISS run on a GPU."""
    report: dict[str, Any] = {"python": platform.python_version(), "packages": {}}
    for dist, module in RUNTIME.items():
        try:
            importlib.import_module(module)
            report["packages"][dist] = _version(dist) or "?"
        except Exception as e:  # a broken wheel is a finding to print, not a crash
            report["packages"][dist] = f"missing: {type(e).__name__}: {e}"
    try:
        import numpy as np
    except ImportError:
        return report
    try:
        import onnxruntime as ort

        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()  # the CUDA and cuDNN wheels' libraries (it prints what fails)
        report["onnxruntime"] = {
            "version": ort.__version__,
            "gpu_build": _version("onnxruntime-gpu"),
            "providers": ort.get_available_providers(),
        }
        report["onnxruntime"]["session"] = _ort_session(ort, np)
    except Exception as e:
        report["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import faiss

        gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        report["faiss"] = {"version": faiss.__version__, "gpus": gpus}
        if gpus:
            report["faiss"]["flat_search"] = _faiss_gpu_flat(faiss, np)
    except Exception as e:
        report["faiss"] = {"error": f"{type(e).__name__}: {e}"}
    return report


def _ort_session(ort: Any, np: Any) -> dict[str, Any] | str:
    """A one-node model run on the CUDA provider where there is one (needs the onnx package)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDA provider"
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return "onnx not installed: no session tried"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "k", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})
    session = ort.InferenceSession(model.SerializeToString(), providers=[cuda])
    a = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
    out = session.run(None, {"x": a})[0]
    ref = a.astype(np.float64) @ a.astype(np.float64)
    return {
        "providers": session.get_providers(),
        "max_relative_error": float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))),
    }


def _faiss_gpu_flat(faiss: Any, np: Any) -> dict[str, Any]:
    """Exact search on GPU 0 against the CPU's, on random rows."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((4096, 64), dtype=np.float32)
    queries = rng.standard_normal((256, 64), dtype=np.float32)
    cpu = faiss.IndexFlatL2(64)
    cpu.add(bank)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    d_cpu, i_cpu = cpu.search(queries, 1)
    d_gpu, i_gpu = gpu.search(queries, 1)
    return {
        "same_neighbours": float(np.mean(i_cpu == i_gpu)),
        "max_relative_difference": float(np.max(np.abs(d_cpu - d_gpu) / np.maximum(d_cpu, 1e-12))),
    }


def check(require_gpu: bool) -> int:
    report = probe()
    print(json.dumps(report), flush=True)
    if not require_gpu:
        return 0
    ort_info, faiss_info = report.get("onnxruntime", {}), report.get("faiss", {})
    session = ort_info.get("session")
    problems = []
    if "CUDAExecutionProvider" not in ort_info.get("providers", []):
        problems.append("ONNX Runtime has no CUDA provider")
    elif isinstance(session, dict) and session["providers"][0] != "CUDAExecutionProvider":
        problems.append("ONNX Runtime's CUDA provider did not load")
    if not faiss_info.get("gpus"):
        problems.append("FAISS sees no GPU")
    if problems:
        print(f"install.py: GPU path not usable: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("gather", "install"):
        s = sub.add_parser(name)
        s.add_argument("kit", type=Path, nargs="?", default=DEFAULT_KIT_DIR)
        s.add_argument("--store", type=Path, default=DEFAULT_STORE, help="parts kept between calls")
    s.add_argument("--target", type=Path, help="pip --target folder instead of this environment")
    s.add_argument("--no-check", action="store_true", help="skip check after installing")
    s.add_argument("--require-gpu", action="store_true", help="check: exit 1 unless on a GPU")
    c = sub.add_parser("check")
    c.add_argument("--require-gpu", action="store_true", help="exit 1 unless on a GPU")
    args = p.parse_args(argv)
    try:
        if args.command == "gather":
            gather(args.kit, args.store)
            return 0
        if args.command == "install":
            return install(args)
        return check(args.require_gpu)
    except KitError as e:
        print(f"install.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"install.py: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
