"""Fuzz the config loader: whatever the file holds, the answer is a Config or one UserError
line, never another exception and never a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent.config import load_config
from edge_agent.errors import UserError

KEYS = ["bundle", "cameras", "mqtt", "port", "id", "source", "kind", "index", "batching",
        "max_batch", "password", "thresholds", "image", "archive", "dir", "tls"]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["flat", "ivf", "auto", "folder", "0", "rtsp://x", "-1", ".", "a/b"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)
BASE = {"bundle": "bundle", "cameras": [{"id": "cam1", "source": "images"}]}


def _load(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except UserError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_structured_configs(patch: dict) -> None:
    _load(yaml.safe_dump({**BASE, **patch}))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    _load(text)
