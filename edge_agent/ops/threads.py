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


def quiet_thread_pools(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set SETTINGS in `environ` (os.environ) where not set already; return what is in force.

    Too late once NumPy is imported (its OpenBLAS has read the variables): the caller is the
    command line's entry, before any subcommand module loads.
    """
    env = os.environ if environ is None else environ
    for key, value in SETTINGS.items():
        env.setdefault(key, value)
    return {key: env[key] for key in SETTINGS}
