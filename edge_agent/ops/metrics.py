"""Prometheus metrics with prometheus_client: the agent's metric set in a private registry,
plus its HTTP endpoint in a daemon thread.

Counts the inference thread makes itself are prometheus_client metrics updated in place.
Values owned by other threads (capture counters, queue depth, spool size, archive counts)
are read at scrape time by a custom collector, so the hot path only pays for what it updates
itself and mirrored counts keep their owners' monotonic values instead of being `set`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from edge_agent.ops.bounded_http import BoundedHTTPServer, HTTPService

log = logging.getLogger(__name__)

# Seconds; covers a sub-millisecond decide step up to a multi-second stall.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)

# Which unit each stage is timed over: a batch-level time must not be read as a frame's.
STAGE_PER: Mapping[str, str] = {
    "wait": "frame",
    "preprocess": "frame",
    "decide": "frame",
    "publish": "frame",
    "infer": "batch",
    "onnx": "batch",
    "knn": "batch",
}


@dataclass(frozen=True)
class CameraSnapshot:
    """One camera's counters, as its capture thread keeps them."""

    frames_in: int
    dropped: int
    reconnects: int
    connected: bool
    triggers_rejected: int = 0  # trigger payloads the link refused (bad part id)
    lost_frames: int = 0  # frames the camera or its stream lost (GenICam cameras)


@dataclass(frozen=True)
class Snapshot:
    """Everything the collector mirrors, read once per scrape."""

    cameras: Mapping[str, CameraSnapshot]
    queue_depth: int
    spool_messages: int
    spool_dropped: int
    uptime_s: float
    # None: no reject archive configured, so its counters get no sample (HELP/TYPE only).
    archive_saved: int | None = None
    archive_errors: int | None = None
    # (model_id, device); None before the scorer is built.
    model: tuple[str, str] | None = None
    # The OPC UA server's connection counts (publish/opcua.py CONNECTION_STATS); None: off.
    opcua: Mapping[str, int] | None = None
    # (name, number) of the active recipe (docs/integrators/station.md); None before it runs.
    recipe: tuple[str, int] | None = None


# CONNECTION_STATS' keys -> (family, label value): the open ones and the refusals since start.
OPCUA_OPEN = {"sockets_open": "sockets", "sessions_open": "sessions"}
OPCUA_REFUSED = {
    "sockets_without_hello": "no_hello",
    "sockets_evicted": "evicted",
    "sockets_refused": "sockets",
    "sessions_refused": "sessions",
    "certificates_refused": "certificates",
}


@dataclass(frozen=True)
class _Families:
    """The collector's metric families, fresh (no samples) for each scrape."""

    frames_in: CounterMetricFamily
    frames_dropped: CounterMetricFamily
    reconnects: CounterMetricFamily
    camera_connected: GaugeMetricFamily
    triggers_rejected: CounterMetricFamily
    frames_lost: CounterMetricFamily
    queue_depth: GaugeMetricFamily
    spool_messages: GaugeMetricFamily
    spool_dropped: CounterMetricFamily
    archive_saved: CounterMetricFamily
    archive_errors: CounterMetricFamily
    model_info: GaugeMetricFamily
    uptime: GaugeMetricFamily
    opcua_open: GaugeMetricFamily
    opcua_refused: CounterMetricFamily
    recipe_info: GaugeMetricFamily

    @classmethod
    def new(cls) -> _Families:
        cam = ["camera"]
        return cls(
            frames_in=CounterMetricFamily(
                "edge_agent_frames_in_total", "Frames captured", labels=cam
            ),
            frames_dropped=CounterMetricFamily(
                "edge_agent_frames_dropped_total",
                "Frames dropped because the queue was full",
                labels=cam,
            ),
            reconnects=CounterMetricFamily(
                "edge_agent_camera_reconnects_total", "Camera reconnect attempts", labels=cam
            ),
            camera_connected=GaugeMetricFamily(
                "edge_agent_camera_connected", "1 while the camera delivers frames", labels=cam
            ),
            triggers_rejected=CounterMetricFamily(
                "edge_agent_triggers_rejected_total",
                "Trigger messages refused: no usable part id (empty, too long, control "
                "characters, malformed JSON)",
                labels=cam,
            ),
            frames_lost=CounterMetricFamily(
                "edge_agent_frames_lost_total",
                "Frames the camera or its stream lost (GenICam: frame ids skipped, incomplete "
                "frames, software triggers unanswered or not fired)",
                labels=cam,
            ),
            queue_depth=GaugeMetricFamily("edge_agent_queue_depth", "Frames waiting for inference"),
            spool_messages=GaugeMetricFamily(
                "edge_agent_spool_messages", "Verdicts waiting in the on-disk MQTT spool"
            ),
            spool_dropped=CounterMetricFamily(
                "edge_agent_spool_dropped_total",
                "Verdicts not kept (full spool or publisher backlog) since start",
            ),
            archive_saved=CounterMetricFamily(
                "edge_agent_archive_saved_total", "Frames written to the reject archive"
            ),
            archive_errors=CounterMetricFamily(
                "edge_agent_archive_errors_total", "Archive writes that failed or were skipped"
            ),
            model_info=GaugeMetricFamily(
                "edge_agent_model_info",
                "The bundle in use (value 1)",
                labels=["model_id", "device"],
            ),
            uptime=GaugeMetricFamily("edge_agent_uptime_seconds", "Seconds since start"),
            recipe_info=GaugeMetricFamily(
                "edge_agent_recipe_info",
                "The active recipe (value 1)",
                labels=["recipe", "number"],
            ),
            opcua_open=GaugeMetricFamily(
                "edge_agent_opcua_open",
                "OPC UA server: open sockets and logged-in sessions",
                labels=["kind"],
            ),
            opcua_refused=CounterMetricFamily(
                "edge_agent_opcua_refused_total",
                "OPC UA server: sockets closed without a Hello (no_hello) or at the socket cap "
                "(evicted), connections and sessions refused at their caps, client "
                "certificates refused",
                labels=["reason"],
            ),
        )

    def all(self) -> list[Metric]:
        return [getattr(self, f.name) for f in fields(self)]


class SnapshotCollector(Collector):
    """Turns a Snapshot taken at scrape time into counter and gauge families."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        # Names only, so the registry can refuse a clash without calling the source.
        return _Families.new().all()

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self._source()
        except Exception:  # a broken source must not take the whole endpoint down
            log.exception("metrics collector failed")
            return
        f = _Families.new()
        for cam, c in sorted(snap.cameras.items()):
            f.frames_in.add_metric([cam], c.frames_in)
            f.frames_dropped.add_metric([cam], c.dropped)
            f.reconnects.add_metric([cam], c.reconnects)
            f.camera_connected.add_metric([cam], 1 if c.connected else 0)
            f.triggers_rejected.add_metric([cam], c.triggers_rejected)
            f.frames_lost.add_metric([cam], c.lost_frames)
        f.queue_depth.add_metric([], snap.queue_depth)
        f.spool_messages.add_metric([], snap.spool_messages)
        f.spool_dropped.add_metric([], snap.spool_dropped)
        if snap.archive_saved is not None:
            f.archive_saved.add_metric([], snap.archive_saved)
        if snap.archive_errors is not None:
            f.archive_errors.add_metric([], snap.archive_errors)
        if snap.model is not None:
            # Built anew each scrape, so a reload's new labels replace the old ones.
            f.model_info.add_metric(list(snap.model), 1)
        f.uptime.add_metric([], snap.uptime_s)
        if snap.recipe is not None:
            f.recipe_info.add_metric([snap.recipe[0], str(snap.recipe[1])], 1)
        if snap.opcua is not None:
            for key, kind in OPCUA_OPEN.items():
                f.opcua_open.add_metric([kind], snap.opcua.get(key, 0))
            for key, reason in OPCUA_REFUSED.items():
                f.opcua_refused.add_metric([reason], snap.opcua.get(key, 0))
        yield from f.all()


class AgentMetrics:
    """The agent's metric set (docs/reference/metrics.md is generated from it)."""

    STAGES = tuple(STAGE_PER)

    def __init__(self) -> None:
        # Private, not prometheus_client's global REGISTRY: several agents (tests) in one
        # process must not clash, and process/platform collectors are not ours to serve.
        r = self.registry = CollectorRegistry()
        cam = ["camera"]
        self.frames_inspected = Counter(
            "edge_agent_frames_inspected_total",
            "Frames scored and given an OK/NG verdict",
            cam,
            registry=r,
        )
        self.ng = Counter("edge_agent_ng_total", "NG verdicts", cam, registry=r)
        self.bad_frames = Counter(
            "edge_agent_bad_frames_total", "Frames answered with an ERROR verdict", cam, registry=r
        )
        self.nonfinite_scores = Counter(
            "edge_agent_nonfinite_scores_total",
            "Frames whose image score was NaN or infinite (answered ERROR, also in bad_frames)",
            cam,
            registry=r,
        )
        # Drift (decide/drift.py), set with each health message; no sample without a
        # calibration reference.
        self.drift_alarm = Gauge(
            "edge_agent_drift_alarm",
            "1 while the camera's OK-score median or NG rate is past its drift bound",
            cam,
            registry=r,
        )
        self.drift_shift = Gauge(
            "edge_agent_drift_shift",
            "OK-score median over the window, as a share of the way from the calibrated good "
            "median (0) to the image threshold (1)",
            cam,
            registry=r,
        )
        self.triggers_dropped = Counter(
            "edge_agent_triggers_dropped_total",
            "Triggers dropped because more than MAX_PENDING_TRIGGERS waited for a frame",
            cam,
            registry=r,
        )
        self.trigger_discarded = Counter(
            "edge_agent_trigger_discarded_total",
            "Frames of trigger-mode cameras discarded (no pending trigger)",
            cam,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "edge_agent_stage_seconds",
            "Time in each stage; per=frame: wait (capture to dequeue), preprocess, decide, "
            "publish; per=batch: infer (ONNX + kNN) and its parts onnx and knn",
            ["per", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Every stage shows from the first scrape (count 0), not only once it has happened.
        for stage, per in STAGE_PER.items():
            self.stage_seconds.labels(per, stage)
        self.latency_seconds = Histogram(
            "edge_agent_latency_seconds",
            "Capture to decision, per frame",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edge_agent_batch_size",
            "Frames per inference batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            "edge_agent_reloads_total", "Bundle reloads (SIGHUP)", ["result"], registry=r
        )
        self.recipe_commands = Counter(
            "edge_agent_recipe_commands_total",
            "Recipe selections, by result (ok, refused)",
            ["result"],
            registry=r,
        )

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One stage time; its `per` label comes from STAGE_PER, so it cannot be mislabelled."""
        try:
            per = STAGE_PER[stage]
        except KeyError:
            raise ValueError(f"unknown stage {stage!r}, expected one of {self.STAGES}") from None
        self.stage_seconds.labels(per, stage).observe(seconds)

    def watch(self, source: Callable[[], Snapshot]) -> None:
        """Read `source` at each scrape for the values other threads own (once per agent)."""
        self.registry.register(SnapshotCollector(source))


MAX_CONNECTIONS = 16
"""Scrapes served at once; Prometheus needs one. More are closed at once, unanswered, so idle
or slow clients cannot take the process's file descriptors (which the cameras, the spool and
MQTT need) or its threads."""
CONNECTION_TIMEOUT_S = 5.0
"""A client that sends no complete request (or does not read the answer) within this long is
dropped."""


class MetricsServer(HTTPService):
    """GET /metrics serves the registry from a daemon thread, from start() until stop(); at
    most MAX_CONNECTIONS at once, each bounded by CONNECTION_TIMEOUT_S."""

    key = "metrics.port"

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        super().__init__(host, port)
        self.registry = registry

    def _make_server(self) -> BoundedHTTPServer:
        handler = type(
            "Handler", (MetricsHandler.factory(self.registry),), {"timeout": CONNECTION_TIMEOUT_S}
        )
        return BoundedHTTPServer(
            (self.host, self.port), handler, max_connections=MAX_CONNECTIONS, label="metrics"
        )

    def start(self) -> None:
        super().start()
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics", host, port)
