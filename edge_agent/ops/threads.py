"""Thread pools that share a small box politely.

One process holds four thread pools: ONNX Runtime's, FAISS's OpenMP workers and two OpenBLAS
builds (NumPy's and FAISS's). By default each of them spins after its work for the next job,
and on 2 cores a spinning pool takes the core the next stage needs: the ivf-exact re-checks
ran 2.6x slower and ONNX 1.6x slower inside the pipeline than alone (BENCHMARKS.md, thread
contention). OpenBLAS's idle workers spin for 2^28 cycles by default; told to sleep after
2^4, its two threads take ivf-exact's re-check products (a few hundred queries x the bank)
without slowing ONNX Runtime beside them: the engine ran 47.2 / 48.8 img/s against 41.6 / 45.1
with one thread (default bundle, MTD, alternated; with two spinning threads ONNX took 1.5x as
long and the engine lost). FAISS's big searches parallelise with OpenMP.

OpenBLAS picks its kernels by CPU model, and a build older than the CPU does not know it: the
OpenBLAS 0.3.15 inside faiss-cpu 1.15 runs its generic "Prescott" kernels on a 2023 Xeon
(family 6, model 207), where NumPy's newer OpenBLAS picks "SkylakeX". Its flat searches
(evaluate's exact maps, the agent's re-checks of many patches) then took 3-4x as long: 1,296
queries x 19,415 rows x 168 dims, 213 / 307 ms against 69 / 71 ms with SkylakeX's (alternated).
On a CPU with the AVX-512 subsets SkylakeX's kernels use, OPENBLAS_CORETYPE names them for
both builds. Machines without AVX-512 are left to OpenBLAS's own choice (not measured here).

The settings are environment variables read when the libraries load, so they are set before
anything imports NumPy; a value already in the environment wins. ONNX Runtime's own spinning
is turned off in its session options (model/scorer.py).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# A big server need not give one agent all of its cores (ONNX Runtime's and OpenBLAS's default).
MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Threads of a pool when none are asked for: every core, at most MAX_DEFAULT_THREADS."""
    return min(os.cpu_count() or 1, MAX_DEFAULT_THREADS)


SETTINGS: dict[str, str] = {
    # OpenMP workers (FAISS) sleep when idle instead of spinning.
    "OMP_WAIT_POLICY": "PASSIVE",
    # OpenBLAS (NumPy's and FAISS's): its workers sleep after 2^4 cycles idle, not 2^28.
    "OPENBLAS_NUM_THREADS": str(default_threads()),
    "OPENBLAS_THREAD_TIMEOUT": "4",
}


# Every variable this module may set, for `doctor` to show.
KEYS = (*SETTINGS, "OPENBLAS_CORETYPE")
# What OpenBLAS's SkylakeX kernels need (its own check, dynamic.c: support_avx512).
SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (Linux x86); empty where there is no such file."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


# The flags the SIMD kernels of ONNX Runtime (MLAS), FAISS, OpenCV, NumPy and OpenBLAS choose
# by: what a bundle's manifest records of the CPU that fitted it (fit's `platform`).
SIMD_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "fma",
    "f16c",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512cd",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first CPU's model name (Linux x86), e.g. "AMD EPYC" or "Intel(R) Xeon(R) ..."."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return None


def simd_flags(flags: frozenset[str]) -> list[str]:
    """The SIMD_FLAGS among `flags`, in SIMD_FLAGS' order."""
    return [f for f in SIMD_FLAGS if f in flags]


def openblas_coretype(flags: frozenset[str]) -> str | None:
    """OPENBLAS_CORETYPE for a CPU with these flags: SkylakeX with AVX-512, else None."""
    return "SkylakeX" if flags >= SKYLAKEX_FLAGS else None


def settings(flags: frozenset[str] | None = None) -> dict[str, str]:
    """SETTINGS, plus OPENBLAS_CORETYPE where this CPU (or `flags`) calls for one."""
    coretype = openblas_coretype(cpu_flags() if flags is None else flags)
    return SETTINGS | ({"OPENBLAS_CORETYPE": coretype} if coretype else {})


def quiet_thread_pools(
    environ: MutableMapping[str, str] | None = None, flags: frozenset[str] | None = None
) -> dict[str, str]:
    """Set settings() in `environ` (os.environ) where not set already; return what is in force.

    Too late once NumPy is imported (its OpenBLAS has read the variables): the caller is the
    command line's entry, before any subcommand module loads.
    """
    env = os.environ if environ is None else environ
    wanted = settings(flags)
    for key, value in wanted.items():
        env.setdefault(key, value)
    return {key: env[key] for key in wanted}
