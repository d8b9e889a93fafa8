"""The Grafana dashboard (deploy/grafana/edge-agent.json) queries only what the agent serves: every
metric and label a panel names is checked against a real scrape of the agent's metrics endpoint,
so a renamed metric or label fails here instead of leaving an empty panel on a plant's screen."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent.lifecycle import shadow_gauges
from edge_agent.ops.metrics import AgentMetrics, CameraSnapshot, MetricsServer, Snapshot

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "edge-agent.json"
# PromQL words that look like names but are functions, keywords or Grafana's variables.
NAME = re.compile(r"\b(edge_agent_[a-z0-9_]+)\b(\{[^}]*\})?")
SELECTOR_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _every_series_exposed(metrics: AgentMetrics) -> None:
    """A sample for every labelled series, as a running agent with one camera and
    shadow.enabled has (the agent registers the shadow gauges on its registry then)."""
    shadow = shadow_gauges(metrics.registry)
    for value in [*vars(metrics).values(), *shadow.values()]:
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*["x"] * len(value._labelnames))
    metrics.drift_shift.labels("cam1").set(0.1)
    metrics.watch(
        lambda: Snapshot(
            cameras={"cam1": CameraSnapshot(frames_in=3, dropped=0, reconnects=0, connected=True)},
            queue_depth=0,
            spool_messages=0,
            spool_dropped=0,
            uptime_s=1.0,
            archive_saved=0,
            archive_errors=0,
            model=("m", "onnx:cpu"),
            opcua={},
            recipe=("default", 1),
        )
    )


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, set[str]]]:
    """Sample name -> its label names, from a real scrape of a started metrics server."""
    metrics = AgentMetrics()
    _every_series_exposed(metrics)
    server = MetricsServer(metrics.registry, "127.0.0.1", 0)
    server.start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    finally:
        server.stop()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    yield labels


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def problems(queries: list[tuple[str, str]], served: dict[str, set[str]]) -> list[str]:
    """Every metric a query names that is not served, and every label it selects or groups by
    that none of its metrics carries."""
    found = []
    for title, expr in queries:
        names = NAME.findall(expr)
        assert names, f"{title}: queries no edge_agent metric: {expr}"
        carried: set[str] = set()
        for name, selector in names:
            if name not in served:
                found.append(f"{title}: {name} is not served")
                continue
            carried |= served[name]
            for label in SELECTOR_LABEL.findall(selector):
                if label not in served[name]:
                    found.append(f"{title}: {name} has no label {label}")
        grouped = {g.strip() for group in GROUPING.findall(expr) for g in group.split(",")}
        found += [f"{title}: no metric carries {g}" for g in sorted(grouped - carried - {""})]
    return found


def test_every_queried_metric_and_label_is_served(served: dict[str, set[str]]) -> None:
    queries = _queries()
    assert len(queries) >= 20
    assert problems(queries, served) == []


def test_the_check_catches_a_renamed_metric_or_label(served: dict[str, set[str]]) -> None:
    bad = [
        ("renamed", "rate(edge_agent_ng_count[5m])"),
        ("label", 'edge_agent_queue_depth{camera="a"}'),
        ("grouping", "sum by (inspection) (rate(edge_agent_ng_total[5m]))"),
    ]
    assert len(problems(bad, served)) == 3


def test_the_panels_the_issue_asks_for_are_there() -> None:
    queried = " ".join(expr for _, expr in _queries())
    for metric in (
        "edge_agent_frames_inspected_total",  # verdict rate (OK = inspected - NG)
        "edge_agent_ng_total",
        "edge_agent_bad_frames_total",
        "edge_agent_latency_seconds_bucket",
        "edge_agent_queue_depth",
        "edge_agent_frames_dropped_total",
        "edge_agent_spool_messages",
        "edge_agent_drift_shift",
        "edge_agent_drift_alarm",
    ):
        assert metric in queried, metric
    assert 'camera=~"$camera"' in queried
