"""Thread pools are set to share a 2-core box (ops/threads.py): the command line sets them
before NumPy loads, a value the user set wins, and ONNX Runtime's workers do not spin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.ops import threads


def _doctor_env(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in threads.KEYS} | extra
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "doctor", "--json"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return str(json.loads(out.strip().splitlines()[-1])["thread_pools"])


def test_command_line_quiets_thread_pools_and_user_values_win() -> None:
    cores = threads.default_threads()
    core = threads.openblas_coretype(threads.cpu_flags()) or "-"
    assert _doctor_env({}) == (
        f"OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS={cores} OPENBLAS_THREAD_TIMEOUT=4 "
        f"OPENBLAS_CORETYPE={core}"
    )
    assert _doctor_env({"OPENBLAS_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Haswell"}) == (
        "OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=1 OPENBLAS_THREAD_TIMEOUT=4 "
        "OPENBLAS_CORETYPE=Haswell"
    )


def test_quiet_thread_pools_only_fills_gaps() -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.quiet_thread_pools(env, flags=frozenset({"sse2", "avx2"})) == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "OPENBLAS_NUM_THREADS": str(threads.default_threads()),
        "OPENBLAS_THREAD_TIMEOUT": "4",
    }
    assert "OPENBLAS_CORETYPE" not in env  # no AVX-512: OpenBLAS chooses


def test_openblas_coretype_needs_every_avx512_subset(tmp_path: Path) -> None:
    full = threads.SKYLAKEX_FLAGS | {"fma", "avx2"}
    assert threads.openblas_coretype(full) == "SkylakeX"
    for missing in threads.SKYLAKEX_FLAGS:
        assert threads.openblas_coretype(full - {missing}) is None
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\nflags\t: other\n")
    assert threads.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512f"}
    assert threads.cpu_flags(str(tmp_path / "missing")) == frozenset()


# Each OpenBLAS the process loaded (NumPy's, FAISS's) says which kernels it runs.
_CORENAMES = """
import ctypes, json, faiss, numpy
paths = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower()})
names = {}
for path in paths:
    lib = ctypes.CDLL(path)
    for fn in ("openblas_get_corename", "scipy_openblas_get_corename64_"):
        if hasattr(lib, fn):
            getattr(lib, fn).restype = ctypes.c_char_p
            names[path.rsplit("/", 1)[-1]] = getattr(lib, fn)().decode()
print(json.dumps(names))
"""


@pytest.mark.skipif(
    threads.openblas_coretype(threads.cpu_flags()) is None, reason="needs an AVX-512 CPU"
)
def test_every_openblas_runs_its_avx512_kernels() -> None:
    """faiss-cpu's bundled OpenBLAS (0.3.15) runs generic Prescott kernels on CPUs newer than
    it, 3-4x slower for flat searches; the entry's settings make it, and NumPy's, run SkylakeX."""
    env = {k: v for k, v in os.environ.items() if k not in threads.KEYS}
    code = (
        "from edge_agent.ops.threads import quiet_thread_pools; quiet_thread_pools()" + _CORENAMES
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        timeout=120,
    ).stdout  # fmt: skip
    names = json.loads(out.strip().splitlines()[-1])
    assert len(names) >= 2, names  # NumPy's and FAISS's
    assert set(names.values()) == {"SkylakeX"}, names


def test_onnx_runtime_workers_do_not_spin(small_bundle: Path) -> None:
    from edge_agent.model.bundle import load_bundle
    from edge_agent.model.scorer import Scorer

    scorer = Scorer(load_bundle(small_bundle), device="cpu", index="flat")
    options = scorer.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
