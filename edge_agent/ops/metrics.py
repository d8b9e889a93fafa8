"""Prometheus metrics without prometheus_client: a small thread-safe registry and an
http.server endpoint (text exposition format 0.0.4) in a daemon thread.

Counters, gauges and histograms are keyed by label values. Values owned by other threads
(capture counters, queue depth, spool size) are read at scrape time through collectors,
so the hot path only pays for what it updates itself.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edge_agent.errors import UserError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; covers a sub-millisecond decide step up to a multi-second stall.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> LabelValues:
        key = tuple(str(v) for v in labels)
        if len(key) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {key}")
        return key

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """Monotonic count. `set` mirrors a count kept elsewhere (e.g. capture's frames_in)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, *labels: str, value: float) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def clear(self) -> None:
        """Forget every label set (e.g. an info gauge whose labels changed)."""
        with self._lock:
            self._values.clear()

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        # per label set: [count per bucket (non-cumulative) + overflow], sum, count
        self._data: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, *labels: str, value: float) -> None:
        key = self._key(labels)
        slot = bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[slot] += 1
            total[0] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            data = self._data.get(self._key(labels))
            return sum(data[0]) if data else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._data.items())
        lines = []
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = f'le="{_num(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class Registry:
    """Named metrics plus collectors run before each scrape (they refresh mirrored values)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} registered twice")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels))  # type: ignore[return-value]

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help_text, labels, buckets))  # type: ignore[return-value]

    def add_collector(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._collectors.append(fn)

    def render(self) -> str:
        with self._lock:
            collectors = list(self._collectors)
            metrics = list(self._metrics.values())
        for fn in collectors:
            try:
                fn()
            except Exception:  # a broken collector must not take the endpoint down
                log.exception("metrics collector failed")
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.header())
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class AgentMetrics:
    """The agent's metric set (names documented in docs/agent.md)."""

    STAGES = ("wait", "preprocess", "infer", "decide", "publish")

    def __init__(self) -> None:
        r = self.registry = Registry()
        cam = ("camera",)
        self.frames_in = r.counter("edge_agent_frames_in_total", "Frames captured", cam)
        self.frames_dropped = r.counter(
            "edge_agent_frames_dropped_total", "Frames dropped because the queue was full", cam
        )
        self.frames_inspected = r.counter(
            "edge_agent_frames_inspected_total", "Frames scored and given an OK/NG verdict", cam
        )
        self.ng = r.counter("edge_agent_ng_total", "NG verdicts", cam)
        self.bad_frames = r.counter(
            "edge_agent_bad_frames_total", "Frames answered with an ERROR verdict", cam
        )
        self.trigger_discarded = r.counter(
            "edge_agent_trigger_discarded_total",
            "Frames of trigger-mode cameras discarded (no pending trigger)",
            cam,
        )
        self.reconnects = r.counter(
            "edge_agent_camera_reconnects_total", "Camera reconnect attempts", cam
        )
        self.camera_connected = r.gauge(
            "edge_agent_camera_connected", "1 while the camera delivers frames", cam
        )
        self.stage_seconds = r.histogram(
            "edge_agent_stage_seconds",
            "Per-frame time in each stage: wait (capture to dequeue), preprocess, "
            "infer (ONNX + kNN, per batch) and its parts onnx and knn, decide, publish",
            ("stage",),
        )
        self.latency_seconds = r.histogram(
            "edge_agent_latency_seconds", "Capture to decision, per frame", ()
        )
        self.batch_size = r.histogram(
            "edge_agent_batch_size", "Frames per inference batch", (), buckets=(1, 2, 4, 8, 16, 32)
        )
        self.queue_depth = r.gauge("edge_agent_queue_depth", "Frames waiting for inference")
        self.spool_messages = r.gauge(
            "edge_agent_spool_messages", "Verdicts waiting in the on-disk MQTT spool"
        )
        self.spool_dropped = r.gauge(
            "edge_agent_spool_dropped",
            "Verdicts not kept (full spool or publisher backlog) since start",
        )
        self.archive_saved = r.counter(
            "edge_agent_archive_saved_total", "Frames written to the reject archive"
        )
        self.archive_errors = r.counter(
            "edge_agent_archive_errors_total", "Archive writes that failed or were skipped"
        )
        self.reloads = r.counter("edge_agent_reloads_total", "Bundle reloads (SIGHUP)", ("result",))
        self.model_info = r.gauge(
            "edge_agent_model_info", "The bundle in use (value 1)", ("model_id", "device")
        )
        self.uptime = r.gauge("edge_agent_uptime_seconds", "Seconds since start")


class MetricsServer:
    """GET /metrics (and /) serve the registry; runs in a daemon thread until stop()."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self.registry = registry
        handler = _handler(registry)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UserError(
                f"metrics.port: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            body = registry.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per scrape would be log spam

    return Handler


def parse_text(text: str) -> dict[str, float]:
    """Exposition text -> {'name{labels}': value}; for tests and quick checks."""
    out: dict[str, float] = {}
    for line in _lines(text.splitlines()):
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def _lines(lines: Iterable[str]) -> Iterable[str]:
    return (ln for ln in lines if ln and not ln.startswith("#"))
