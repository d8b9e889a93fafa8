"""`edge-agent run`: the long-running agent, cameras -> batched inference -> verdicts over MQTT.

Threads: one capture thread per camera (edge_agent.capture.cameras) feeding one bounded FrameQueue;
the MAIN thread is the inference thread: it owns the Scorer (ONNX Runtime session + FAISS
index), forms micro-batches across cameras (up to `max_batch`, waiting at most `max_wait_ms`
for stragglers), decides, archives rejects and hands verdicts to the publisher, which never
blocks it. Being the main thread also means the signal handlers run here, between batches:

- SIGTERM/SIGINT: stop the cameras, answer every frame already queued, flush MQTT, publish
  `offline` (and, with Sparkplug B on, NDEATH: edge_agent/publish/sparkplug.py), exit 0;
- SIGHUP: reload the bundle (same path): a helper thread loads it and builds a new Scorer
  while the old one keeps inspecting; it is swapped in between two batches. A broken bundle,
  or one that fails the smoke test (model.selftest: synthetic frames must score finite), is
  rejected with one log line and the old model keeps running. The same smoke test runs at
  start and for `--check`.

Model changes on the running line (shadow candidates, promotion, rollback) have their own room,
edge_agent/agent/lifecycle.py: this loop hands it each batch and applies its swaps between two
batches, as it does a recipe switch.

systemd (Type=notify): READY=1 once everything is started, WATCHDOG=1 from this loop (a hung
inference stops the pings), STATUS= every few seconds. Logs: one line per event, never per
frame; a final line sums up the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from edge_agent import __version__
from edge_agent.agent import inspect
from edge_agent.agent.config import Config, load_config
from edge_agent.agent.lifecycle import LineChanges, apply_promotions
from edge_agent.agent.models import Model, Run, bind, load_models
from edge_agent.agent.preflight import modbus_module, preflight, server_module
from edge_agent.capture.cameras import LIVE_KINDS, CameraCapture
from edge_agent.capture.frame_queue import Frame, FrameQueue
from edge_agent.decide.archive import RejectArchive
from edge_agent.decide.decision import Decision, Thresholds
from edge_agent.decide.drift import DriftMonitor, DriftReference, DriftState
from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write
from edge_agent.images import BadImage, to_bgr
from edge_agent.lifecycle.audit import AuditLog, AuditUnavailable
from edge_agent.model.bundle import Bundle
from edge_agent.model.geometry import aspect_mismatch
from edge_agent.model.scorer import Scorer
from edge_agent.ops.liveview import LiveStore, LiveViewServer
from edge_agent.ops.metrics import AgentMetrics, CameraSnapshot, MetricsServer, Snapshot
from edge_agent.ops.sdnotify import Notifier
from edge_agent.publish.contract import (
    health_message,
    inspection_message,
    part_message,
    recipe_message,
    verdict_message,
)
from edge_agent.publish.opcua_config import camera_state
from edge_agent.publish.publisher import Publisher
from edge_agent.publish.sparkplug import SparkplugNode, device_values
from edge_agent.station.part import Part, PartAssembler
from edge_agent.station.recipes import Recipe, Select, parse_select

log = logging.getLogger(__name__)

TICK_S = 0.25  # longest the loop sleeps without frames: bounds signal and watchdog latency
STATUS_INTERVAL_S = 5.0
MAX_PENDING_TRIGGERS = 64
MAX_FAILED_BATCHES = 3  # consecutive inference failures before giving up (systemd restarts)
CAPTURE_STOP_S = 5.0
DRAIN_TIMEOUT_S = 60.0
"""--drain-timeout's default: how long a stop waits for the brokers to acknowledge the verdicts
still waiting, connecting again meanwhile (systemd's TimeoutStopSec leaves room for it)."""
UNDELIVERED_EXIT = 3
"""--exit-when-done's status when verdicts are still undelivered after the drain (0 would tell
a script that the run's results arrived)."""
RECIPE_HISTORY = 8  # recipe switches kept for frames captured before them and still queued
RECIPE_STATE_FILE = "recipe.json"  # in mqtt.spool_dir: the recipe selected last
SPARKPLUG_BIRTH_WAIT_S = 2.0  # the first frames' DDATA then goes out live, not historical


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="YAML config")
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit 0 once every file/folder source has been read and every frame answered "
        "(offline runs, tests, demos); live cameras never finish",
    )
    p.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=DRAIN_TIMEOUT_S,
        metavar="S",
        help="on stop, wait up to S seconds for the broker to acknowledge the verdicts still "
        "waiting, connecting again if it is down; what is left stays in the spool for the next "
        f"run, and --exit-when-done then exits with status {UNDELIVERED_EXIT}",
    )
    p.add_argument(
        "--check", action="store_true", help="validate the config and the bundle, then exit"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(config.log_level.upper())
    config, bases = apply_promotions(config)
    models = load_station(config, everything=args.check)
    if args.check:
        preflight(config)
        print(describe_station(config, models))
        return 0
    agent = Agent(
        config,
        models,
        exit_when_done=args.exit_when_done,
        drain_timeout_s=args.drain_timeout,
        bases=bases,
    )
    return agent.run()


def load_station(config: Config, *, everything: bool = False) -> dict[Path, Model]:
    """The models to start with: every recipe's bundles, validated and self-tested now (a
    broken one stops the agent at start, never at a changeover), or with `recipes.preload`
    false (and not ``everything``) the active recipe's only, the others loaded when selected.
    Every recipe whose models are loaded has its thresholds settled here too (UserError)."""
    book = config.station
    paths = book.bundles() if (book.preload or everything) else active_recipe(config).bundles()
    models = load_models(config, paths, lambda b: build_scorer(config, b))
    for recipe in book.recipes.values():
        if all(path in models for path in recipe.bundles()):
            for runs in bind(config, recipe, models).values():
                for r in runs:
                    _warn_out_of_range(r.thresholds)
    return models


def describe_station(config: Config, models: Mapping[Path, Model]) -> str:
    """`run --check`'s report: the station as it was read, then OK."""
    book = config.station
    lines = [f"{config.path}: the station as read"]
    for recipe in book.recipes.values():
        mark = " (active at start)" if recipe.name == book.active else ""
        runs = bind(config, recipe, models)
        mb = sum(models[path].megabytes for path in recipe.bundles())
        lines.append(f"  recipe {recipe.name} #{recipe.number}{mark}: {mb:.0f} MB of models")
        for camera, camera_runs in runs.items():
            for r in camera_runs:
                roi = "whole frame" if r.spec.roi is None else f"roi {list(r.spec.roi)}"
                ignore = f", ignore {r.spec.ignore_file}" if r.spec.ignore_file else ""
                lines.append(
                    f"    {r.id} on {camera}: {roi}{ignore}, bundle {r.spec.bundle} "
                    f"(model {r.model.bundle.model_id}), thresholds image "
                    f"{r.thresholds.image:g} pixel {r.thresholds.pixel:g}"
                )
    lines.append(
        f"{config.path}: OK: {len(config.cameras)} camera(s), {len(book.recipes)} recipe(s), "
        f"{len(models)} model(s) loaded and self-tested"
    )
    return "\n".join(lines)


def active_recipe(config: Config) -> Recipe:
    """The recipe to start with: the one selected last (remembered in the state file) while
    the config still has it, else the config's `recipes.active`."""
    book = config.station
    path = recipe_state_file(config)
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("active")
    except FileNotFoundError:
        name = None
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); starting with recipe %s", path, exc, book.active)
        name = None
    if isinstance(name, str) and name in book.recipes:
        return book.recipes[name]
    if name is not None:
        log.warning(
            "recipe %r (selected last) is not in the config: starting with %s", name, book.active
        )
    return book.recipes[book.active]


def recipe_state_file(config: Config) -> Path:
    return Path(config.mqtt.spool_dir) / RECIPE_STATE_FILE


def build_scorer(config: Config, bundle: Bundle) -> Scorer:
    """The Scorer the config asks for: one place, so --check tests what the run will use."""
    c = config
    return Scorer(
        bundle, device=c.device, threads=c.threads, index=c.index, ivf_nprobe=c.ivf_nprobe
    )


def _warn_out_of_range(thresholds: Thresholds) -> None:
    for problem in thresholds.out_of_range:
        log.warning("%s (health: threshold_override_out_of_range)", problem)


@dataclass
class CameraCounts:
    """What the inference side did with one camera's frames (main thread only)."""

    inspected: int = 0
    ng: int = 0
    errors: int = 0
    discarded: int = 0  # trigger mode: frames with no pending trigger
    nonfinite: int = 0  # answered ERROR because the score was NaN or infinite (also in errors)
    triggers_dropped: int = 0  # trigger mode: triggers beyond MAX_PENDING_TRIGGERS (network thread)
    # The latest frame's geometry against the model's (model/geometry.aspect_mismatch): why
    # its aspect ratio is not the training images', or None; checked when the shape changes.
    aspect_mismatch: str | None = None
    shape: tuple[int, int] | None = None
    aspect_warned: bool = False
    window: deque[float] = field(default_factory=lambda: deque(maxlen=512))  # answer times

    def fps(self, now: float, span_s: float = 10.0) -> float:
        recent = [t for t in self.window if now - t <= span_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


@dataclass
class _Item:
    frame: Frame
    recipe: Recipe  # in force when the frame was captured
    runs: tuple[Run, ...]  # the recipe's inspections on the frame's camera
    part_id: str | None = None
    image: np.ndarray | None = None  # BGR, original size
    tasks: list[inspect.Task] = field(default_factory=list)
    error: str | None = None  # the frame could not be inspected at all


@dataclass(frozen=True)
class _Reloaded:
    recipe: Recipe
    models: dict[Path, Model]
    runs: dict[str, tuple[Run, ...]]
    seconds: float


class Agent:
    def __init__(
        self,
        config: Config,
        models: Mapping[Path, Model],
        *,
        exit_when_done: bool,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        bases: Mapping[str, Path] | None = None,
    ) -> None:
        """``models``: at least the active recipe's bundles, loaded and self-tested
        (load_models), all of them with ``recipes.preload``. ``bases``: each inspection's
        bundle as the config names it, where promotions replaced it (apply_promotions)."""
        self.config = config
        self.book = config.station
        self.models: dict[Path, Model] = dict(models)
        self.recipe = active_recipe(config)
        self.runs = bind(config, self.recipe, self.models)
        # Which recipe decides a frame: the newest switched to before it was captured (a
        # frame boundary, whatever the batch); a few switches back are kept for queued frames.
        self._history: deque[tuple[float, Recipe, dict[str, tuple[Run, ...]]]] = deque(
            [(-math.inf, self.recipe, self.runs)], maxlen=RECIPE_HISTORY
        )
        self._commands: deque[tuple[Select, float]] = deque()
        self._recipe_changed_at = time.time()
        self._switch_thread: threading.Thread | None = None
        self._switch_result: tuple[Recipe, Select, dict[Path, Model]] | Exception | None = None
        self._switching: Select | None = None
        self.parts = PartAssembler(self.book.part_timeout_s)
        self.exit_when_done = exit_when_done
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline = math.inf  # set when the shutdown starts: one budget for all links
        self.metrics = AgentMetrics()
        self.notifier = Notifier()
        self.queue = FrameQueue(config.batching.queue_size)
        run_id = uuid.uuid4().hex[:8]  # frame ids stay unique across restarts
        self.captures = [CameraCapture(c, self.queue, run_id=run_id) for c in config.cameras]
        self.trigger_mode = {c.id for c in config.cameras if c.mode == "trigger"}
        self.counts = {c.id: CameraCounts() for c in config.cameras}
        for camera in self.counts:  # every camera's series exists from the first scrape
            for counter in (self.metrics.triggers_dropped, self.metrics.nonfinite_scores):
                counter.labels(camera)
        # The line's own link (part verdicts, recipe state and commands) where a station needs
        # it: recipes to switch, trigger cameras whose frames make parts, or model changes.
        self.lifecycle = config.shadow
        self.line_link = (
            config.bundle is None or bool(self.trigger_mode) or self.lifecycle is not None
        )
        self.publisher = Publisher(config.mqtt, [c.id for c in config.cameras], line=self.line_link)
        self.sparkplug = (
            SparkplugNode(config.sparkplug, [c.id for c in config.cameras], version=__version__)
            if config.sparkplug is not None
            else None
        )
        # The audit trail: every protocol's commands and refusals, and the agent's own events.
        self.audit = AuditLog(config.audit, publish=self._publish_audit)
        # The OPC UA server (asyncua, the optional `opcua` extra) is imported only when enabled.
        self.opcua: Any = (
            server_module().OpcUaServer(config.opcua, self._on_opcua_trigger, audit=self.audit)
            if config.opcua is not None
            else None
        )
        if self.opcua is not None:  # model changes come through one door too
            self.opcua.set_lifecycle_handler(self.lifecycle_command)
        # pymodbus (the optional `modbus` extra) too is imported only when enabled.
        self.modbus: Any = (
            modbus_module().ModbusServer(config.modbus, part_timeout_s=self.book.part_timeout_s)
            if config.modbus is not None
            else None
        )
        if self.modbus is not None:
            self.modbus.set_trigger_handler(self._on_modbus_trigger)
        # Recipe selections from every protocol come through one door (select_recipe).
        for adapter in (self.sparkplug, self.opcua, self.modbus):
            if adapter is not None:
                adapter.set_recipe_handler(self.select_recipe)
        self._capture_by_id = {c.settings.id: c for c in self.captures}
        self.drift: dict[str, DriftMonitor] = {}
        self._drift_alarm: dict[str, bool] = {}
        self._reset_drift()
        self.archive = RejectArchive(config.archive) if config.archive else None
        self.metrics_server: MetricsServer | None = None
        # The live view's store: the inference thread only hands it references.
        self.live = LiveStore(list(self.counts)) if config.liveview is not None else None
        self._show_inspections()
        self.liveview_server: LiveViewServer | None = None
        self._running = False  # _start got as far as the publisher: the final health goes out
        self._triggers: dict[str, deque[tuple[float, str]]] = {c: deque() for c in self.counts}
        self._trigger_lock = threading.Lock()
        self._trigger_overflow_logged = False
        self._stop_reason: str | None = None
        self._reload_requested = False
        self._reload_thread: threading.Thread | None = None
        self._reload_result: _Reloaded | Exception | None = None
        self._draining = False
        self._failed_batches = 0
        self._started_at = time.monotonic()
        self._next_status = 0.0
        self._next_health = 0.0
        # Changing a model on the running line: its own room (agent/lifecycle.py).
        self.changes = LineChanges(
            self,
            bases=apply_promotions(config)[1] if bases is None else bases,
            audit=self.audit,
            archive=self.archive,
            registry=self.metrics.registry,
            publish_lifecycle=self._publish_lifecycle,
            publish_shadow=self._publish_shadow,
        )

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        cleanup: list[Callable[[], None]] = []
        previous = self._install_signal_handlers()
        try:
            self._start(cleanup)
            code = self._loop()
        except (UserError, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("the agent failed; stopping")
            code = 1
        finally:
            self._stop_captures()
            self._shutdown(cleanup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        undelivered = self.publisher.undelivered
        if undelivered and self.exit_when_done and code == 0:
            log.error(
                "%d verdict(s) not delivered within --drain-timeout %g s: kept in %s for the "
                "next run; exit status %d",
                undelivered,
                self.drain_timeout_s,
                ", ".join(str(d) for d in self.publisher.spool_dirs()),
                UNDELIVERED_EXIT,
            )
            code = UNDELIVERED_EXIT
        return code

    def _drain_left(self) -> float:
        return max(0.0, self._drain_deadline - time.monotonic())

    # -- the models in force ----------------------------------------------------------------

    @property
    def primary(self) -> Run:
        """The active recipe's first inspection: whose model health and the protocols name
        (one model per camera in a config with a top-level bundle: all the same)."""
        return next(r for runs in self.runs.values() for r in runs)

    def _camera_run(self, camera: str) -> Run:
        """A camera's first inspection in the active recipe (its health's model, its drift)."""
        runs = self.runs.get(camera)
        return runs[0] if runs else self.primary

    @property
    def bundle(self) -> Bundle:
        return self.primary.model.bundle

    @property
    def scorer(self) -> Scorer:
        return self.primary.model.scorer

    @property
    def thresholds(self) -> Thresholds:
        return self.primary.thresholds

    def _start(self, cleanup: list[Callable[[], None]]) -> None:
        for camera, runs in self.runs.items():
            for r in runs:
                h, w = r.model.scorer.input_size
                log.info(
                    "recipe %s, %s on %s: model %s on %s (input %dx%d, bank %d x %d, "
                    "thresholds image %g pixel %g)",
                    self.recipe.name,
                    r.id,
                    camera,
                    r.model.bundle.model_id,
                    r.model.scorer.device,
                    w,
                    h,
                    *r.model.bundle.bank.shape,
                    r.thresholds.image,
                    r.thresholds.pixel,
                )
        self.publisher.set_trigger_handler(self._on_trigger)
        self.publisher.start(connect_timeout_s=5.0)
        self._running = True
        cleanup.append(
            lambda: self.publisher.stop(self._drain_left(), keepalive=self.notifier.watchdog_due)
        )
        # Before the Sparkplug node and the OPC UA server start: their births carry it.
        self._publish_recipe("ok", "started", None)
        self._audit_event(
            "agent.start",
            {"version": __version__, "config": str(self.config.path), "recipe": self.recipe.name,
             "inspections": self._in_force()},
        )  # fmt: skip
        if self.lifecycle is not None:
            self.publisher.on_lifecycle_command(self.changes.on_mqtt_command)
        if self.line_link:
            self.publisher.on_recipe_command(self._on_recipe_command)
            # Parts still open at a stop go out as they stand (ERROR, their silent inspections
            # named) before the links flush: cleanup runs in reverse order.
            cleanup.append(self._close_parts)
        if self.sparkplug is not None:
            node = self.sparkplug
            self._update_sparkplug_node()  # before start: the first NBIRTH carries them
            node.start(wait_s=SPARKPLUG_BIRTH_WAIT_S)
            cleanup.append(lambda: node.stop(timeout_s=self._drain_left()))
        if self.opcua is not None:
            self.opcua.start([c.id for c in self.config.cameras], self.bundle.model_id)
            cleanup.append(self.opcua.stop)
        if self.modbus is not None:
            self.modbus.start()
            cleanup.append(self.modbus.stop)
        if self.config.metrics.port is not None:
            server = MetricsServer(
                self.metrics.registry, self.config.metrics.host, self.config.metrics.port
            )
            server.start()
            self.metrics_server = server
            cleanup.append(server.stop)
        self.metrics.watch(self._collect)
        lv = self.config.liveview
        if lv is not None and self.live is not None:
            token = lv.token.get_secret_value() if lv.token is not None else None
            viewer = LiveViewServer(
                self.live,
                lv.host,
                lv.port,
                token,
                tokens_file=lv.tokens_file,
                lifecycle=self.lifecycle_command,
                audit=self.audit,
                shadows=self.shadow_report,
            )
            viewer.start()
            self.liveview_server = viewer
            cleanup.append(viewer.stop)
        if self.archive is not None:
            self.archive.start()
            cleanup.append(self.archive.close)
        for capture in self.captures:
            capture.start()
        if self.exit_when_done:
            live = [c.settings.id for c in self.captures if _is_endless(c)]
            if live:
                log.warning(
                    "--exit-when-done: camera(s) %s never end; the agent exits on a signal only",
                    ", ".join(live),
                )
        self._publish_health()
        self.notifier.ready(self._status_line())
        log.info(
            "running: %d camera(s), batches of up to %d (wait %g ms), queue %d",
            len(self.captures),
            self.config.batching.max_batch,
            self.config.batching.max_wait_ms,
            self.config.batching.queue_size,
        )

    def build_scorer(self, bundle: Bundle) -> Scorer:
        """The config's scorer for a bundle (the module's build_scorer)."""
        return build_scorer(self.config, bundle)

    def _loop(self) -> int:
        b = self.config.batching
        while True:
            batch = self.queue.get_batch(b.max_batch, b.max_wait_ms / 1000.0, timeout_s=TICK_S)
            # Commands before the batch: one received while it formed decides its frames
            # captured after it (_recipe_for), not the next batch's only.
            self._finish_switch()
            self._apply_commands()
            self.changes.between_batches()
            if batch:
                started = time.perf_counter()
                items = self._process(batch)
                # Production's verdicts are out; the candidates' turn, within their budget.
                self.changes.compare(items, time.perf_counter() - started)
            self._send_parts(time.monotonic())
            self.notifier.watchdog_due()
            self._housekeeping()
            self._finish_reload()
            if self._reload_requested and not self._draining and not self._reloading:
                self._start_reload()  # a SIGHUP during a reload starts another after it
            if self._stop_reason is None:
                failed = [c for c in self.captures if c.failed]
                if failed:
                    self._stop_reason = self._capture_failed(failed)
                elif self.exit_when_done and self._sources_done():
                    self._stop_reason = "every source has been read"
            if self._stop_reason is not None and not self._draining:
                self._begin_drain(self._stop_reason)
            if self._draining and self.queue.closed and not batch and self.queue.depth() == 0:
                break
        if self._reloading:  # its daemon thread dies with us; say so rather than go quiet
            log.warning("stopping with a reload still loading: the new bundle was not used")
        # A dead camera is a failure even after a clean drain: exit 1 so systemd restarts us.
        return 1 if any(c.failed for c in self.captures) else 0

    def _sources_done(self) -> bool:
        # finished, not merely "not running": a capture thread that died before the end of
        # its source must not look like a source that has been read (see _capture_failed).
        return all(c.finished for c in self.captures)

    def _capture_failed(self, failed: list[CameraCapture]) -> str:
        """A capture thread died before its source was done: the camera delivers nothing
        more. Say so (log, health: connected false, last_error) and stop the agent."""
        for capture in failed:
            log.error(
                "camera %s: capture stopped before the end of its source (%s); stopping the "
                "agent with exit status 1 so that it is restarted",
                capture.settings.id,
                capture.stats["last_error"],
            )
        self._publish_health()
        return f"capture failed on camera(s) {', '.join(c.settings.id for c in failed)}"

    def _begin_drain(self, reason: str) -> None:
        self._draining = True
        depth = self.queue.depth()
        log.info("stopping (%s): answering %d queued frame(s)", reason, depth)
        self.notifier.stopping(f"stopping: answering {depth} queued frame(s)")

        def stop_then_close() -> None:
            self._stop_captures()
            self.queue.close()

        # Captures are stopped off this thread so that it keeps draining the queue: a camera
        # blocked on a full queue (back-pressure) needs room to notice its stop.
        threading.Thread(target=stop_then_close, name="stop-captures", daemon=True).start()

    def _stop_captures(self) -> None:
        for capture in self.captures:
            capture.stop(timeout_s=CAPTURE_STOP_S)

    def _shutdown(self, cleanup: list[Callable[[], None]]) -> None:
        self.queue.close()
        self._drain_deadline = time.monotonic() + self.drain_timeout_s
        # Only once the publisher has its links: a start that failed (a read-only spool, a
        # refusing broker) ends with its one-line error, not a traceback from here.
        if self._running and self.publisher.started:
            try:
                self._publish_health()  # the final counts, retained
            except Exception:
                log.exception("cannot publish the final health")
            self._audit_event("agent.stop", {"inspections": self._in_force()}, self._stop_reason)
        for fn in reversed(cleanup):
            self.notifier.watchdog()  # flushing MQTT can take seconds: still alive
            try:
                fn()
            except Exception:  # the rest of the clean-up must still run
                log.exception("error while shutting down")
        frames_in = sum(c.stats["frames_in"] for c in self.captures)
        dropped = sum(self.queue.dropped.values())
        totals = {
            k: sum(getattr(n, k) for n in self.counts.values())
            for k in ("inspected", "ng", "errors", "discarded")
        }
        ps = self.publisher.stats
        log.info(
            "stopped after %.0f s: frames_in %d, inspected %d, NG %d, errors %d, dropped %d, "
            "discarded %d; MQTT published %d, spooled %d, dropped %d",
            time.monotonic() - self._started_at,
            frames_in,
            totals["inspected"],
            totals["ng"],
            totals["errors"],
            dropped,
            totals["discarded"],
            ps["published"],
            ps["spooled"],
            ps["dropped"],
        )
        self.notifier.close()

    # -- signals and triggers (other contexts: keep them to flag setting) -------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # run in a thread (tests): the caller stops us with request_stop()
        for sig, handler in (
            (signal.SIGTERM, self._on_stop_signal),
            (signal.SIGINT, self._on_stop_signal),
            (signal.SIGHUP, self._on_hup),
        ):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop_reason is None:
            self._stop_reason = signal.Signals(signum).name

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True

    def request_stop(self, reason: str = "requested") -> None:
        """Stop as on SIGTERM (for callers that run the agent in a thread)."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _on_trigger(self, camera: str, part_id: str) -> None:
        """From the publisher's network thread: inspect the next frame of `camera`."""
        if camera not in self.trigger_mode:
            return
        recipe = self.recipe
        expected = self._part_inspections(recipe)
        with self._trigger_lock:
            if self.line_link and expected:  # the part's clock starts at its first trigger
                self.parts.open(part_id, recipe.name, expected, time.monotonic())
            pending = self._triggers[camera]
            if len(pending) >= MAX_PENDING_TRIGGERS:
                pending.popleft()
                self.counts[camera].triggers_dropped += 1
                self.metrics.triggers_dropped.labels(camera).inc()
                first = not self._trigger_overflow_logged
                self._trigger_overflow_logged = True
            else:
                first = False
            pending.append((time.time(), part_id))
        if first:
            log.warning(
                "camera %s: more than %d triggers pending (no frames?); dropping the oldest",
                camera,
                MAX_PENDING_TRIGGERS,
            )
        # After the id waits: a GenICam camera with a software trigger is fired now, so the
        # frame it takes is this part's (other cameras ignore it).
        self._capture_by_id[camera].trigger(part_id)

    def _on_opcua_trigger(self, camera: str, part_id: str) -> bool:
        """From asyncua's worker thread: Trigger(partId), as an MQTT trigger. False (the call
        answers BadInvalidState) for a camera that is not in trigger mode."""
        if camera not in self.trigger_mode:
            return False
        self._on_trigger(camera, part_id)
        return True

    def _on_modbus_trigger(self, part_id: str) -> str | None:
        """From the Modbus adapter's worker thread: a TRIGGER edge, PART_ID as the part id, for
        `modbus.trigger_cameras` (default: the active recipe's trigger-mode cameras). The
        reason it cannot be taken, or None."""
        if self._stop_reason is not None:
            return "the agent is stopping"
        assert self.config.modbus is not None
        wanted = self.config.modbus.trigger_cameras or self.recipe.cameras()
        cameras = [c for c in wanted if c in self.trigger_mode]
        if not cameras:
            return f"no trigger-mode camera in recipe {self.recipe.name}"
        for camera in cameras:
            self._on_trigger(camera, part_id)  # the verdicts carry the part id
        return None

    def _take_trigger(self, frame: Frame) -> tuple[bool, str | None]:
        """(inspect?, part id) for a trigger-mode frame: only frames taken after a trigger."""
        with self._trigger_lock:
            pending = self._triggers[frame.camera]
            if pending and frame.captured_at >= pending[0][0]:
                return True, pending.popleft()[1]
        return False, None

    # -- the inference path -----------------------------------------------------------------

    def _process(self, frames: list[Frame]) -> list[_Item]:
        m = self.metrics
        now = time.time()
        items: list[_Item] = []
        for frame in frames:
            m.observe_stage("wait", max(0.0, now - frame.captured_at))
            part_id = None
            if frame.camera in self.trigger_mode:
                inspect_it, part_id = self._take_trigger(frame)
                if not inspect_it:
                    self.counts[frame.camera].discarded += 1
                    m.trigger_discarded.labels(frame.camera).inc()
                    continue
            recipe, runs = self._recipe_for(frame.captured_at)
            if frame.camera not in runs:  # this recipe inspects nothing on this camera
                self.counts[frame.camera].discarded += 1
                continue
            items.append(_Item(frame, recipe, runs[frame.camera], part_id))
        if not items:
            return items
        m.batch_size.observe(len(items))

        t0 = time.perf_counter()
        tasks: list[inspect.Task] = []
        for item in items:
            # The capture's reason for a frame without an image (unreadable file, over the
            # pixel limit, undecodable video frame) is the verdict's, not "empty frame".
            error = item.frame.error
            if error is None:
                try:
                    item.image = to_bgr(item.frame.image)
                    first = item.runs[0]
                    self._check_aspect(item.frame.camera, item.image.shape[:2], first)
                    item.tasks = [inspect.prepare(item.image, r) for r in item.runs]
                except BadImage as exc:
                    error = str(exc)
                except Exception as exc:  # one odd frame gets ERROR, not the whole agent
                    error = f"cannot prepare the frame ({type(exc).__name__}: {exc})"
                    log.warning("camera %s: %s", item.frame.camera, error)
            if error is not None:
                name = item.frame.source_name
                item.error = f"{name}: {error}" if name else error
            else:
                tasks.extend(item.tasks)
        prep_s = time.perf_counter() - t0
        for _ in items:
            m.observe_stage("preprocess", prep_s / len(items))

        failure: Exception | None = None
        if any(t.error is None for t in tasks):
            t1 = time.perf_counter()
            stage_s: dict[str, float] = {}
            failure = inspect.score(tasks, stage_s)
            if failure is not None:  # ORT/FAISS failures: answer the frames, then decide
                self._failed_batches += 1
                log.error("inference failed on a batch of %d: %r", len(tasks), failure)
            else:
                self._failed_batches = 0
                m.observe_stage("infer", time.perf_counter() - t1 - stage_s.get("decide", 0.0))
                # Its two costly parts, per batch: where a slow box spends its time.
                m.observe_stage("onnx", stage_s["onnx"])
                m.observe_stage("knn", stage_s["knn"])
            for _ in items:
                m.observe_stage("decide", stage_s.get("decide", 0.0) / len(items))

        for item in items:
            self._answer(item)
        if failure is not None and self._failed_batches >= MAX_FAILED_BATCHES:
            # Likely permanent (GPU lost, out of memory): exit 1 so systemd restarts us.
            raise RuntimeError(f"inference failed {self._failed_batches} times in a row")
        return items

    def _check_aspect(self, camera: str, shape: tuple[int, int], run: Run) -> None:
        """A frame of another aspect ratio than the training images' is still scored (a
        squeezed part is a worse inspection, not a reason to stop the line), with one warning
        per camera and `aspect_mismatch` in its health until its frames fit again. Checked
        for the camera's first inspection of a whole frame (a ROI's shape is the config's)."""
        if run.spec.roi is not None:
            return
        counts = self.counts[camera]
        if shape == counts.shape:
            return
        counts.shape = shape
        fitted = run.model.bundle.fitted_aspect
        counts.aspect_mismatch = aspect_mismatch(shape, fitted) if fitted else None
        if counts.aspect_mismatch is not None and not counts.aspect_warned:
            counts.aspect_warned = True
            log.warning("camera %s: %s", camera, counts.aspect_mismatch)

    def _answer(self, item: _Item) -> None:
        """One frame's verdict: its inspections' answers, the worst in the v1 fields."""
        frame, m = item.frame, self.metrics
        decided_at = time.time()
        frame_hw = item.image.shape[:2] if item.image is not None else (0, 0)
        results = [
            inspection_message(
                task.run.id,
                frame.camera,
                inspect.in_frame(task, frame_hw, with_map=False),
                task.error,
            )
            for task in item.tasks
        ]
        if item.error is not None or not item.tasks:
            results = [inspection_message(r.id, frame.camera, None, item.error) for r in item.runs]
            decision, worst_run = None, item.runs[0]
        else:
            worst = inspect.worst_task(item.tasks)
            decision, worst_run = inspect.in_frame(worst, frame_hw), worst.run
            # Which inspection failed, where a frame has several.
            named = worst.error if len(item.tasks) == 1 else f"{worst.run.id}: {worst.error}"
            item.error = None if decision is not None else named
        msg = verdict_message(
            decision,
            camera=frame.camera,
            sequence=frame.sequence,
            frame_id=frame.frame_id,
            captured_at=frame.captured_at,
            decided_at=decided_at,
            model_id=worst_run.model.bundle.model_id,
            part_id=item.part_id,
            source=frame.source_name,
            error=item.error if decision is None else None,
        )
        msg["recipe"] = item.recipe.name
        msg["inspections"] = results
        t = worst_run.thresholds
        if (
            decision is not None
            and self.archive is not None
            and self.archive.wants(decision.verdict)
        ):
            scale = t.scale
            msg["reject_image"] = self.archive.submit(
                item.image,
                msg,
                amap=decision.anomaly_map,
                vmin=scale["low"],
                vmax=scale["high"],
                pixel_threshold=t.pixel,
            )
        if self.live is not None:
            self.live.update(frame.camera, item.image, decision, msg, t)
        if item.part_id is not None:
            expected = self._part_inspections(item.recipe)
            with self._trigger_lock:
                for result in results:
                    self.parts.add(
                        item.part_id, item.recipe.name, expected, result["id"], result,
                        time.monotonic(),
                    )  # fmt: skip
        m.latency_seconds.observe(max(0.0, decided_at - frame.captured_at))
        self._count(item, decision, results)
        self._publish(frame.camera, msg, self.counts[frame.camera])

    def _count(self, item: _Item, decision: Decision | None, results: list[dict]) -> None:
        """The camera's counters and drift for one answered frame."""
        camera, m = item.frame.camera, self.metrics
        counts = self.counts[camera]
        nonfinite = [t for t in item.tasks if t.decision is not None and t.decision.is_error]
        if nonfinite:  # NaN/inf score: never OK; counted as an ERROR and on its own
            counts.nonfinite += 1
            m.nonfinite_scores.labels(camera).inc()
            log.error("camera %s: %s: answered ERROR", camera, nonfinite[0].decision.error)
        if decision is None or decision.is_error:
            counts.errors += 1
            m.bad_frames.labels(camera).inc()
            return
        counts.inspected += 1
        m.frames_inspected.labels(camera).inc()
        # Drift watches the camera's first inspection: its scores against its bundle's
        # calibration (the reference _reset_drift took).
        first = item.tasks[0].decision
        monitor = self.drift.get(camera)
        if monitor is not None and first is not None and not first.is_error:
            monitor.add(first.score, first.is_ng)
        if decision.is_ng:
            counts.ng += 1
            m.ng.labels(camera).inc()

    def _publish(self, camera: str, msg: dict[str, Any], counts: CameraCounts) -> None:
        t0 = time.perf_counter()
        self.publisher.publish_verdict(camera, msg)
        if self.sparkplug is not None:
            stats = self._capture_by_id[camera].stats
            values = device_values(
                msg,
                inspected=counts.inspected,
                ng=counts.ng,
                dropped=stats["dropped"],
                errors=counts.errors,
                connected=stats["connected"],
            )
            self.sparkplug.publish_verdict(camera, values, msg["timestamp"])
        if self.opcua is not None:
            self.opcua.publish(camera, msg)  # never waits: a lock and a wake-up
        self.metrics.observe_stage("publish", time.perf_counter() - t0)
        counts.window.append(time.monotonic())

    # -- the station: recipes and parts -------------------------------------------------------

    def _recipe_for(self, captured_at: float) -> tuple[Recipe, dict[str, tuple[Run, ...]]]:
        """The recipe (and its runs) in force when a frame was captured: the newest switched
        to at or before it."""
        for since, recipe, runs in reversed(self._history):
            if since <= captured_at:
                return recipe, runs
        _, recipe, runs = self._history[0]
        return recipe, runs

    def _part_inspections(self, recipe: Recipe) -> tuple[str, ...]:
        """What a part of ``recipe`` waits for: its inspections on triggered cameras (a
        free-running camera's frames carry no part id)."""
        return tuple(i.id for i in recipe.inspections if i.camera in self.trigger_mode)

    def _send_parts(self, now: float) -> None:
        if not self.line_link:
            return
        with self._trigger_lock:
            done = self.parts.poll(now)
        for part in done:
            self._publish_part(part)

    def _close_parts(self) -> None:
        with self._trigger_lock:
            left = self.parts.close_all()
        for part in left:
            self._publish_part(part)

    def _publish_part(self, part: Part) -> None:
        msg = part.verdict_message()
        if msg["missing"]:
            log.warning(
                "part %r: no answer from %s within %g ms: ERROR",
                part.part_id,
                ", ".join(msg["missing"]),
                self.book.part_timeout_s * 1000,
            )
        # One part, every protocol: each adapter renders it and decides nothing.
        message = part_message(msg, time.time())
        if self.line_link:
            self.publisher.publish_part(message)
        if self.sparkplug is not None:
            self.sparkplug.publish_part(message)
        if self.opcua is not None:
            self.opcua.publish_part(message)
        if self.modbus is not None:
            self.modbus.publish_part(message)

    def _on_recipe_command(self, payload: bytes) -> None:
        """MQTT's recipe/set, on the line link's network thread."""
        select = parse_select(payload)
        if isinstance(select, str):
            self._refuse(select, None, "mqtt")
            return
        self.select_recipe(select, "mqtt")

    def select_recipe(self, select: Select, source: str) -> str | None:
        """The one way in for a recipe selection, whichever protocol carried it (``source``:
        mqtt, sparkplug, opcua), called from its own thread: refused at once, with the reason
        returned and published, when no recipe answers it; else queued for the loop, which
        switches at the next frame boundary (None: accepted; the state says when it is done)."""
        found = self.book.find(select)
        if isinstance(found, str):
            self._refuse(found, select.request_id, source)
            return found
        with self._trigger_lock:
            self._commands.append((select, time.time()))
        return None

    def _refuse(self, reason: str, request_id: str | None, source: str) -> None:
        try:
            self.audit.record(
                "recipe.change",
                who=source,
                source=source,
                what={"request_id": request_id},
                reason=reason,
                result="refused",
            )
        except (AuditUnavailable, ValueError) as exc:
            log.error("cannot audit a refused recipe command: %s", exc)
        self.metrics.recipe_commands.labels("refused").inc()
        log.warning("recipe command (%s) refused: %s", source, reason)
        self._publish_recipe("refused", reason, request_id)

    def _apply_commands(self) -> None:
        with self._trigger_lock:
            commands = list(self._commands)
            self._commands.clear()
        for select, received_at in commands:
            self._select(select, received_at)

    def _select(self, select: Select, received_at: float) -> None:
        found = self.book.find(select)
        if isinstance(found, str):  # select_recipe checked it; the book does not change
            self._refuse(found, select.request_id, "loop")
            return
        if self._switching is not None:
            reason = f"busy: recipe {self._switching.describe()} is still loading"
            self._refuse(reason, select.request_id, "loop")
            return
        missing = [p for p in found.bundles() if p not in self.models]
        if not missing:
            self._switch(found, self.models, received_at, select)
            return
        # preload: false: load in the background, switch when ready (frames meanwhile stay
        # under the running recipe).
        self._switching = select
        self._publish_recipe("loading", f"loading recipe {found.name}", select.request_id)
        have = dict(self.models)

        def load() -> None:
            try:
                models = load_models(self.config, found.bundles(), self.build_scorer, have)
                self._switch_result = (found, select, {**have, **models})
            except Exception as exc:  # UserError or anything ORT/FAISS raise: keep running
                self._switch_result = exc

        self._switch_thread = threading.Thread(target=load, name="recipe-load", daemon=True)
        self._switch_thread.start()

    def _finish_switch(self) -> None:
        if self._switch_thread is None or self._switch_thread.is_alive():
            return
        result, self._switch_result, self._switch_thread = self._switch_result, None, None
        select, self._switching = self._switching, None
        if isinstance(result, Exception) or result is None:
            reason = f"cannot load: {result}; recipe {self.recipe.name} keeps running"
            self._refuse(reason, select.request_id if select else None, "loop")
            return
        recipe, select, models = result
        self._switch(recipe, models, time.time(), select)

    def _switch(
        self, recipe: Recipe, models: Mapping[Path, Model], since: float, select: Select
    ) -> None:
        try:
            runs = bind(self.config, recipe, models)
        except UserError as exc:  # an uncalibrated bundle without thresholds in the config
            self._refuse(str(exc), select.request_id, "loop")
            return
        previous = self.recipe.name
        self.models = dict(models)
        self.recipe, self.runs = recipe, runs
        self._history.append((since, recipe, runs))
        self._recipe_changed_at = since
        self.metrics.recipe_commands.labels("ok").inc()
        self._remember_recipe()
        self._show_inspections()
        self._reset_drift()
        for counts in self.counts.values():  # maybe another geometry
            counts.shape, counts.aspect_mismatch, counts.aspect_warned = None, None, False
        log.info("recipe %s -> %s (%s)", previous, recipe.name, select.describe())
        self.changes.stop_shadows("stopped")  # they compared against the old recipe
        what = {"from": previous, "to": recipe.name, "inspections": self._in_force()}
        self._audit_event("recipe.change", {**what, "request_id": select.request_id})
        self._publish_recipe("ok", None, select.request_id)
        self._publish_health()

    def _show_inspections(self) -> None:
        """The live view draws the regions and ignored pixels of the inspections in force."""
        if self.live is not None:
            for camera in self.counts:
                self.live.set_inspections(camera, [r.spec for r in self.runs.get(camera, ())])

    def _remember_recipe(self) -> None:
        """The selected recipe survives a restart (atomic write; a failure costs only that)."""
        path = recipe_state_file(self.config)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"active": self.recipe.name}).encode())
        except OSError as exc:
            log.error("cannot remember recipe %s in %s: %s", self.recipe.name, path, exc)

    def _publish_recipe(self, result: str, reason: str | None, request_id: str | None) -> None:
        """The recipe's state, every protocol (each adapter renders it, none decides)."""
        message = recipe_message(
            active=self.recipe.name,
            number=self.recipe.number,
            result=result,
            reason=reason,
            request_id=request_id,
            changed_at=self._recipe_changed_at,
        )
        if self.line_link:
            self.publisher.publish_recipe(message)
        if self.sparkplug is not None:
            self.sparkplug.set_recipe(message)
        if self.opcua is not None:
            self.opcua.set_recipe(message)
        if self.modbus is not None:
            self.modbus.set_recipe(message)

    # -- changing a model on the running line (docs/model-engineers/lifecycle.md) --

    def lifecycle_command(
        self,
        action: str,
        inspection: str | None,
        args: Mapping[str, Any],
        who: str,
        source: str,
    ) -> str | None:
        """The one door for model changes (LineChanges.command), for every protocol."""
        return self.changes.command(action, inspection, args, who, source)

    def shadow_report(self) -> dict[str, Any]:
        """The latest shadow report (LineChanges.report), for the live view."""
        return self.changes.report()

    def _publish_lifecycle(self, message: dict[str, Any]) -> None:
        if self.line_link and self.publisher.started:
            self.publisher.publish_lifecycle(message)

    def _publish_shadow(self, message: dict[str, Any]) -> None:
        if self.line_link and self.publisher.started:
            self.publisher.publish_shadow(message)

    def _publish_audit(self, entry: dict[str, Any]) -> None:
        if self.line_link and self.publisher.started:
            self.publisher.publish_audit(entry)

    def _audit_event(self, action: str, what: Mapping[str, Any], reason: str | None = None) -> None:
        """The agent's own events (start, stop, reload, recipe change): recorded, never
        refused (the line does not stop because the trail's disk failed; that is logged)."""
        try:
            self.audit.record(action, who="agent", source="agent", what=what, reason=reason)
        except (AuditUnavailable, ValueError) as exc:
            log.error("cannot audit %s: %s", action, exc)

    def _in_force(self) -> dict[str, Any]:
        """What the active recipe runs: per inspection its bundle, model and thresholds."""
        return {
            r.id: {
                "bundle": str(r.model.bundle.path),
                "model_id": r.model.bundle.model_id,
                "thresholds": {"image": r.thresholds.image, "pixel": r.thresholds.pixel},
            }
            for runs in self.runs.values()
            for r in runs
        }

    # -- what LineChanges asks of the agent (lifecycle.Line) ------------------------------

    def stopping(self) -> bool:
        return self._stop_reason is not None

    def loading_recipe(self) -> str | None:
        return self._switching.describe() if self._switching is not None else None

    def install(
        self,
        recipe_name: str,
        recipe: Recipe,
        runs: dict[str, tuple[Run, ...]],
        models: dict[Path, Model],
    ) -> None:
        """Swap a replacement in at a frame boundary: frames captured from now on are decided
        by it, those already queued by what was in force when they were captured."""
        self.book = dataclasses.replace(
            self.book, recipes={**self.book.recipes, recipe_name: recipe}
        )
        self.config = dataclasses.replace(self.config, station=self.book)
        used = set(self.book.bundles())
        self.models = {p: m for p, m in models.items() if p in used}
        if recipe_name != self.recipe.name:
            return
        self.recipe, self.runs = recipe, runs
        self._history.append((time.time(), recipe, runs))
        self._show_inspections()
        self._reset_drift()  # a new model: a new reference and fresh windows
        for counts in self.counts.values():  # and maybe another geometry
            counts.shape, counts.aspect_mismatch, counts.aspect_warned = None, None, False
        if self.opcua is not None:
            self.opcua.set_model_id(self.bundle.model_id)
        self._publish_health()

    # -- reload -----------------------------------------------------------------------------

    def _start_reload(self) -> None:
        """SIGHUP: load and build every loaded bundle again (same paths) on a helper thread
        while the running models keep inspecting, so a reload costs no frames even on live
        cameras."""
        self._reload_requested = False
        self.notifier.reloading()
        paths, recipe = tuple(self.models), self.recipe
        log.info(
            "SIGHUP: loading %s (the running models keep going)",
            ", ".join(str(p) for p in paths),
        )

        def build() -> None:
            started = time.perf_counter()
            try:
                # Built here, used only by the inference thread once swapped in; a bundle
                # that cannot score (self-test) never replaces one that can.
                models = load_models(self.config, paths, self.build_scorer)
                runs = bind(self.config, recipe, models)
            except Exception as exc:  # UserError or anything ORT/FAISS raise: keep running
                self._reload_result = exc
            else:
                seconds = time.perf_counter() - started
                self._reload_result = _Reloaded(recipe, models, runs, seconds)

        self._reload_thread = threading.Thread(target=build, name="reload", daemon=True)
        self._reload_thread.start()

    @property
    def _reloading(self) -> bool:
        return self._reload_thread is not None and self._reload_thread.is_alive()

    def _finish_reload(self) -> None:
        """Between two batches: swap the new models in, or report why they were rejected."""
        if self._reload_thread is None or self._reload_thread.is_alive():
            return  # the result is only complete once the thread has ended
        result, self._reload_result, self._reload_thread = self._reload_result, None, None
        if result is None:
            return
        old = self.bundle.model_id
        if isinstance(result, Exception):
            self.metrics.reloads.labels("rejected").inc()
            log.error("reload rejected, model %s keeps running: %s", old, result)
            self._audit_event("bundle.reload", {"kept": old}, f"rejected: {result}")
        elif self._switching is not None or result.recipe is not self.recipe:
            # A recipe change while it loaded: its runs are the ones in force now.
            self.metrics.reloads.labels("rejected").inc()
            log.error("reload rejected: the recipe changed while it loaded; send SIGHUP again")
        else:
            self.models, self.runs = result.models, result.runs
            # Queued frames of earlier recipes are decided by the reloaded recipe from now on.
            self._history = deque([(-math.inf, self.recipe, self.runs)], maxlen=RECIPE_HISTORY)
            self.metrics.reloads.labels("ok").inc()
            self._reset_drift()  # a new model: a new reference and fresh windows
            for counts in self.counts.values():  # and maybe another geometry
                counts.shape, counts.aspect_mismatch, counts.aspect_warned = None, None, False
            if self.opcua is not None:
                self.opcua.set_model_id(self.bundle.model_id)
            for runs in self.runs.values():
                for r in runs:
                    _warn_out_of_range(r.thresholds)
            self._audit_event("bundle.reload", {"inspections": self._in_force(), "was": old})
            log.info(
                "reloaded in %.1f s: model %s (was %s) on %s, thresholds image %g pixel %g",
                result.seconds,
                self.bundle.model_id,
                old,
                self.scorer.device,
                self.thresholds.image,
                self.thresholds.pixel,
            )
        self.notifier.ready(self._status_line())
        self._publish_health()

    # -- status, health, metrics ------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.opcua is not None:  # set_state reaches the server only when a state changes
            for capture in self.captures:
                state = camera_state(capture.stats, stopping=self._draining)
                self.opcua.set_state(capture.settings.id, state)
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL_S
            self.notifier.status(self._status_line())
        if now >= self._next_health:
            self._publish_health()
        self.changes.housekeeping(now)

    def _status_line(self) -> str:
        now = time.monotonic()
        inspected = sum(c.inspected for c in self.counts.values())
        ng = sum(c.ng for c in self.counts.values())
        fps = sum(c.fps(now) for c in self.counts.values())
        drifting = sorted(cam for cam, on in self._drift_alarm.items() if on)
        alarm = f", drift alarm: {', '.join(drifting)}" if drifting else ""
        return f"inspected {inspected}, NG {ng}, fps {fps:.1f}, queue {self.queue.depth()}{alarm}"

    def _publish_health(self) -> None:
        now = time.monotonic()
        self._next_health = now + self.config.health_interval_s
        per_link = self.publisher.stats.get("cameras", {})
        if self.sparkplug is not None:
            self._update_sparkplug_node()
            for capture in self.captures:
                stats = capture.stats
                self.sparkplug.update_camera(
                    capture.settings.id, dropped=stats["dropped"], connected=stats["connected"]
                )
        for capture in self.captures:
            cam = capture.settings.id
            stats = capture.stats
            counts = self.counts[cam]
            link = per_link.get(cam, {})
            drift_state = self._check_drift(cam)
            run = self._camera_run(cam)
            health = health_message(
                camera=cam,
                timestamp=time.time(),
                fps=counts.fps(now),
                frames_in=stats["frames_in"],
                dropped=stats["dropped"],
                inspected=counts.inspected,
                ng=counts.ng,
                errors=counts.errors,
                discarded=counts.discarded,
                queue_depth=self.queue.depth(),
                spool=link.get("spooled", 0) + link.get("pending", 0),
                connected=stats["connected"],
                finished=stats["finished"],
                last_error=stats["last_error"],
                model_id=run.model.bundle.model_id,
                device=run.model.scorer.device,
                uptime_s=now - self._started_at,
                nonfinite_scores=counts.nonfinite,
                threshold_override_out_of_range=bool(run.thresholds.out_of_range),
                triggers_dropped=counts.triggers_dropped,
                triggers_rejected=link.get("triggers_rejected", 0),
                drift=drift_state.as_dict() if drift_state is not None else None,
                aspect_mismatch=counts.aspect_mismatch,
                recipe=self.recipe.name,
            )
            if "genicam" in stats:  # what the camera took, lost frames, Aravis' counters
                health["genicam"] = stats["genicam"]
            self.publisher.publish_health(cam, health)
            if self.live is not None:
                self.live.set_health(cam, health)

    def _reset_drift(self) -> None:
        """Drift monitors for the models and thresholds in force: per camera, of its first
        inspection in the active recipe (none without a reference)."""
        settings = self.config.drift
        self._drift_alarm = {}
        self.drift = {}
        if settings is None:
            return
        rules = settings.model_dump(exclude={"enabled"})
        without = []
        for cam, runs in self.runs.items():
            run = runs[0]
            calibrated = run.model.bundle.thresholds.get("calibrated")
            reference = DriftReference.from_calibration(calibrated, run.thresholds.image)
            if reference is None:
                without.append(cam)
            else:
                self.drift[cam] = DriftMonitor(reference, **rules)
        if without:
            log.info(
                "drift check off for %s: the bundle's calibration records no good scores "
                "(calibrate it again with this version)",
                ", ".join(without),
            )

    def _check_drift(self, camera: str) -> DriftState | None:
        """The camera's drift state, its gauges set, and one log line when the alarm turns
        on or off."""
        monitor = self.drift.get(camera)
        if monitor is None:
            return None
        state = monitor.state()
        self.metrics.drift_alarm.labels(camera).set(1 if state.alarm else 0)
        if state.shift is not None:
            self.metrics.drift_shift.labels(camera).set(state.shift)
        was = self._drift_alarm.get(camera, False)
        if state.alarm and not was:
            log.warning("camera %s: drift: %s", camera, state.reason)
        elif was and not state.alarm:
            log.info("camera %s: drift back within bounds", camera)
        self._drift_alarm[camera] = state.alarm
        return state

    def _update_sparkplug_node(self) -> None:
        assert self.sparkplug is not None
        self.sparkplug.update_node(
            **{
                "Properties/Model ID": self.bundle.model_id,
                "Properties/Device": self.scorer.device if self.scorer is not None else None,
            }
        )

    def _collect(self) -> Snapshot:
        """Scrape time: read the values other threads own, for the metrics collector."""
        cameras: dict[str, CameraSnapshot] = {}
        links = self.publisher.stats.get("cameras", {})
        for capture in self.captures:
            stats = capture.stats
            cameras[capture.settings.id] = CameraSnapshot(
                frames_in=stats["frames_in"],
                dropped=stats["dropped"],
                reconnects=stats["reconnect_attempts"],
                connected=stats["connected"],
                triggers_rejected=links.get(capture.settings.id, {}).get("triggers_rejected", 0),
                lost_frames=sum(stats.get("genicam", {}).get("lost_frames", {}).values()),
            )
        ps = self.publisher.stats
        a = self.archive.stats if self.archive is not None else None
        scorer = self.scorer
        return Snapshot(
            cameras=cameras,
            queue_depth=self.queue.depth(),
            spool_messages=ps["spooled"],
            spool_dropped=ps["dropped"],
            uptime_s=round(time.monotonic() - self._started_at, 1),
            archive_saved=a["saved"] if a is not None else None,
            archive_errors=a["errors"] + a["skipped"] if a is not None else None,
            model=(self.bundle.model_id, scorer.device) if scorer is not None else None,
            opcua=self.opcua.connection_stats if self.opcua is not None else None,
            recipe=(self.recipe.name, self.recipe.number),
        )


def _is_endless(capture: CameraCapture) -> bool:
    return capture.kind in LIVE_KINDS or capture.settings.loop
