"""Thread pools are set to share a 2-core box (ops/threads.py): the command line sets them
before NumPy loads, a value the user set wins, and ONNX Runtime's workers do not spin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edge_agent.ops import threads


def _doctor_env(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in threads.SETTINGS} | extra
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "doctor", "--json"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return str(json.loads(out.strip().splitlines()[-1])["thread_pools"])


def test_command_line_quiets_thread_pools_and_user_values_win() -> None:
    cores = threads.default_threads()
    assert _doctor_env({}) == (
        f"OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS={cores} OPENBLAS_THREAD_TIMEOUT=4"
    )
    assert _doctor_env({"OPENBLAS_NUM_THREADS": "1"}) == (
        "OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=1 OPENBLAS_THREAD_TIMEOUT=4"
    )


def test_quiet_thread_pools_only_fills_gaps() -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.quiet_thread_pools(env) == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "OPENBLAS_NUM_THREADS": str(threads.default_threads()),
        "OPENBLAS_THREAD_TIMEOUT": "4",
    }


def test_onnx_runtime_workers_do_not_spin(small_bundle: Path) -> None:
    from edge_agent.model.bundle import load_bundle
    from edge_agent.model.scorer import Scorer

    scorer = Scorer(load_bundle(small_bundle), device="cpu", index="flat")
    options = scorer.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
