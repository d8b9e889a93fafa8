"""Thread pools that share a small box politely.

One process holds four thread pools: ONNX Runtime's, FAISS's OpenMP workers and two OpenBLAS
builds (NumPy's and FAISS's). By default each of them spins after its work for the next job,
and on 2 cores a spinning pool takes the core the next stage needs: the ivf-exact re-checks
ran 2.6x slower and ONNX 1.6x slower inside the pipeline than alone (BENCHMARKS.md, thread
contention). The agent's BLAS work is small matrices (map supports, norms), where one thread
is fastest, and FAISS's big searches parallelise with OpenMP, not BLAS.

The settings are environment variables read when the libraries load, so they are set before
anything imports NumPy; a value already in the environment wins. ONNX Runtime's own spinning
is turned off in its session options (model/scorer.py).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SETTINGS: dict[str, str] = {
    # OpenMP workers (FAISS) sleep when idle instead of spinning.
    "OMP_WAIT_POLICY": "PASSIVE",
    # OpenBLAS (NumPy's and FAISS's): one thread, so none spins beside ONNX Runtime.
    "OPENBLAS_NUM_THREADS": "1",
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
