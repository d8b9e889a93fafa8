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

systemd (Type=notify): READY=1 once everything is started, WATCHDOG=1 from this loop (a hung
inference stops the pings), STATUS= every few seconds. Logs: one line per event, never per
frame; a final line sums up the run.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from edge_agent import __version__
from edge_agent.agent.config import Config, load_checked_bundle, load_config, thresholds_for
from edge_agent.agent.preflight import preflight
from edge_agent.capture.cameras import LIVE_KINDS, CameraCapture
from edge_agent.capture.frame_queue import Frame, FrameQueue
from edge_agent.decide.archive import RejectArchive
from edge_agent.decide.decision import NG, Decision, Thresholds, decide, verdict_for
from edge_agent.decide.drift import DriftMonitor, DriftReference, DriftState
from edge_agent.errors import UserError
from edge_agent.images import BadImage, to_bgr
from edge_agent.model.bundle import Bundle, load_bundle
from edge_agent.model.geometry import aspect_mismatch
from edge_agent.model.scorer import Scorer
from edge_agent.model.selftest import self_test
from edge_agent.ops.liveview import LiveStore, LiveViewServer
from edge_agent.ops.metrics import AgentMetrics, CameraSnapshot, MetricsServer, Snapshot
from edge_agent.ops.sdnotify import Notifier
from edge_agent.publish.contract import health_message, verdict_message
from edge_agent.publish.opcua_config import camera_state, server_module
from edge_agent.publish.publisher import Publisher
from edge_agent.publish.sparkplug import SparkplugNode, device_values

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
    bundle, thresholds = load_checked_bundle(config)
    _warn_out_of_range(thresholds)
    if args.check:
        preflight(config)
        # The same smoke test as at start: --check must not say OK for a model that cannot score.
        self_test(build_scorer(config, bundle))
        print(
            f"{config.path}: OK: {len(config.cameras)} camera(s), bundle {config.bundle} "
            f"(model {bundle.model_id}), thresholds image {thresholds.image:g} "
            f"pixel {thresholds.pixel:g}"
        )
        return 0
    agent = Agent(
        config,
        bundle,
        thresholds,
        exit_when_done=args.exit_when_done,
        drain_timeout_s=args.drain_timeout,
    )
    return agent.run()


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
    part_id: str | None = None
    image: np.ndarray | None = None  # BGR, original size
    prepared: np.ndarray | None = None  # BGR at the model's input size
    error: str | None = None


@dataclass(frozen=True)
class _Reloaded:
    bundle: Bundle
    thresholds: Thresholds
    scorer: Scorer
    seconds: float


class Agent:
    def __init__(
        self,
        config: Config,
        bundle: Bundle,
        thresholds: Thresholds,
        *,
        exit_when_done: bool,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.thresholds = thresholds
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
        self.publisher = Publisher(config.mqtt, [c.id for c in config.cameras])
        self.sparkplug = (
            SparkplugNode(config.sparkplug, [c.id for c in config.cameras], version=__version__)
            if config.sparkplug is not None
            else None
        )
        # The OPC UA server (asyncua, the optional `opcua` extra) is imported only when enabled.
        self.opcua: Any = (
            server_module().OpcUaServer(config.opcua, self._on_opcua_trigger)
            if config.opcua is not None
            else None
        )
        self._capture_by_id = {c.settings.id: c for c in self.captures}
        self.drift: dict[str, DriftMonitor] = {}
        self._drift_alarm: dict[str, bool] = {}
        self._reset_drift()
        self.archive = RejectArchive(config.archive) if config.archive else None
        self.metrics_server: MetricsServer | None = None
        # The live view's store: the inference thread only hands it references.
        self.live = LiveStore(list(self.counts)) if config.liveview is not None else None
        self.liveview_server: LiveViewServer | None = None
        self.scorer: Scorer | None = None
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

    def _start(self, cleanup: list[Callable[[], None]]) -> None:
        scorer = self._build_scorer(self.bundle)
        self_test(scorer)  # before anything is started: a UserError here is exit 2, nothing sent
        self.scorer = scorer
        h, w = self.scorer.input_size
        log.info(
            "model %s on %s (input %dx%d, bank %d x %d, thresholds image %g pixel %g)",
            self.bundle.model_id,
            self.scorer.device,
            w,
            h,
            *self.bundle.bank.shape,
            self.thresholds.image,
            self.thresholds.pixel,
        )
        self.publisher.set_trigger_handler(self._on_trigger)
        self.publisher.start(connect_timeout_s=5.0)
        cleanup.append(
            lambda: self.publisher.stop(self._drain_left(), keepalive=self.notifier.watchdog_due)
        )
        if self.sparkplug is not None:
            node = self.sparkplug
            self._update_sparkplug_node()  # before start: the first NBIRTH carries them
            node.start(wait_s=SPARKPLUG_BIRTH_WAIT_S)
            cleanup.append(lambda: node.stop(timeout_s=self._drain_left()))
        if self.opcua is not None:
            self.opcua.start([c.id for c in self.config.cameras], self.bundle.model_id)
            cleanup.append(self.opcua.stop)
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
            viewer = LiveViewServer(self.live, lv.host, lv.port, token)
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

    def _build_scorer(self, bundle: Bundle) -> Scorer:
        return build_scorer(self.config, bundle)

    def _loop(self) -> int:
        b = self.config.batching
        while True:
            batch = self.queue.get_batch(b.max_batch, b.max_wait_ms / 1000.0, timeout_s=TICK_S)
            if batch:
                self._process(batch)
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
        if self.scorer is not None and self.publisher.started:
            try:
                self._publish_health()  # the final counts, retained
            except Exception:
                log.exception("cannot publish the final health")
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
        with self._trigger_lock:
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

    def _on_opcua_trigger(self, camera: str, part_id: str) -> bool:
        """From asyncua's worker thread: Trigger(partId), as an MQTT trigger. False (the call
        answers BadInvalidState) for a camera that is not in trigger mode."""
        if camera not in self.trigger_mode:
            return False
        self._on_trigger(camera, part_id)
        return True

    def _take_trigger(self, frame: Frame) -> tuple[bool, str | None]:
        """(inspect?, part id) for a trigger-mode frame: only frames taken after a trigger."""
        with self._trigger_lock:
            pending = self._triggers[frame.camera]
            if pending and frame.captured_at >= pending[0][0]:
                return True, pending.popleft()[1]
        return False, None

    # -- the inference path -----------------------------------------------------------------

    def _process(self, frames: list[Frame]) -> None:
        assert self.scorer is not None
        scorer = self.scorer
        m = self.metrics
        now = time.time()
        items: list[_Item] = []
        for frame in frames:
            m.observe_stage("wait", max(0.0, now - frame.captured_at))
            part_id = None
            if frame.camera in self.trigger_mode:
                inspect, part_id = self._take_trigger(frame)
                if not inspect:
                    self.counts[frame.camera].discarded += 1
                    m.trigger_discarded.labels(frame.camera).inc()
                    continue
            items.append(_Item(frame, part_id))
        if not items:
            return
        m.batch_size.observe(len(items))

        t0 = time.perf_counter()
        for item in items:
            # The capture's reason for a frame without an image (unreadable file, over the
            # pixel limit, undecodable video frame) is the verdict's, not "empty frame".
            error = item.frame.error
            if error is None:
                try:
                    item.image = to_bgr(item.frame.image)
                    self._check_aspect(item.frame.camera, item.image.shape[:2])
                    item.prepared = scorer.prepare(item.image)
                except BadImage as exc:
                    error = str(exc)
                except Exception as exc:  # one odd frame gets ERROR, not the whole agent
                    error = f"cannot prepare the frame ({type(exc).__name__}: {exc})"
                    log.warning("camera %s: %s", item.frame.camera, error)
            if error is not None:
                name = item.frame.source_name
                item.error = f"{name}: {error}" if name else error
        good = [item for item in items if item.error is None]
        prep_s = time.perf_counter() - t0
        for _ in items:
            m.observe_stage("preprocess", prep_s / len(items))

        scores = None
        failure: Exception | None = None
        if good:
            t1 = time.perf_counter()
            stage_s: dict[str, float] = {}
            try:
                scores = scorer.score(np.stack([item.prepared for item in good]), stage_s)
            except Exception as exc:  # ORT/FAISS failures: answer the frames, then decide
                failure = exc
                self._failed_batches += 1
                log.error("inference failed on a batch of %d: %r", len(good), exc)
                for item in good:
                    item.error = f"inference failed: {type(exc).__name__}"
            else:
                self._failed_batches = 0
                m.observe_stage("infer", time.perf_counter() - t1)
                # Its two costly parts, per batch: where a slow box spends its time.
                m.observe_stage("onnx", stage_s["onnx"])
                m.observe_stage("knn", stage_s["knn"])

        answered = iter(range(len(good)))
        for item in items:
            if item.error is None and scores is not None:
                self._answer(item, scores.image_scores, scores.patch_scores, next(answered))
            else:
                self._answer_error(item)
        if failure is not None and self._failed_batches >= MAX_FAILED_BATCHES:
            # Likely permanent (GPU lost, out of memory): exit 1 so systemd restarts us.
            raise RuntimeError(f"inference failed {self._failed_batches} times in a row")

    def _check_aspect(self, camera: str, shape: tuple[int, int]) -> None:
        """A frame of another aspect ratio than the training images' is still scored (a
        squeezed part is a worse inspection, not a reason to stop the line), with one warning
        per camera and `aspect_mismatch` in its health until its frames fit again."""
        counts = self.counts[camera]
        if shape == counts.shape:
            return
        counts.shape = shape
        fitted = self.bundle.fitted_aspect
        counts.aspect_mismatch = aspect_mismatch(shape, fitted) if fitted else None
        if counts.aspect_mismatch is not None and not counts.aspect_warned:
            counts.aspect_warned = True
            log.warning("camera %s: %s", camera, counts.aspect_mismatch)

    def _answer(
        self, item: _Item, image_scores: np.ndarray, patch_scores: np.ndarray, i: int
    ) -> None:
        assert self.scorer is not None and item.image is not None
        frame, m, t = item.frame, self.metrics, self.thresholds
        t0 = time.perf_counter()
        score = float(image_scores[i])
        # The map costs a blur and a resize: only NG frames report regions (decide()).
        ng = verdict_for(score, t) == NG
        amap = self.scorer.exact_map(patch_scores, i, threshold=t.pixel) if ng else None
        decision = decide(score, amap, item.image.shape[:2], t)
        decided_at = time.time()
        msg = self._message(item, decision, decided_at)
        if self.archive is not None and self.archive.wants(decision.verdict):
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
        m.observe_stage("decide", time.perf_counter() - t0)
        m.latency_seconds.observe(max(0.0, decided_at - frame.captured_at))
        counts = self.counts[frame.camera]
        if decision.is_error:  # NaN/inf score: never OK; counted as an ERROR and on its own
            counts.errors += 1
            counts.nonfinite += 1
            m.bad_frames.labels(frame.camera).inc()
            m.nonfinite_scores.labels(frame.camera).inc()
            log.error("camera %s: %s: answered ERROR", frame.camera, decision.error)
            self._publish(frame.camera, msg, counts)
            return
        counts.inspected += 1
        m.frames_inspected.labels(frame.camera).inc()
        monitor = self.drift.get(frame.camera)
        if monitor is not None:
            monitor.add(score, decision.is_ng)
        if decision.is_ng:
            counts.ng += 1
            m.ng.labels(frame.camera).inc()
        self._publish(frame.camera, msg, counts)

    def _answer_error(self, item: _Item) -> None:
        frame = item.frame
        msg = self._message(item, None, time.time())
        if self.live is not None:
            self.live.update(frame.camera, item.image, None, msg, self.thresholds)
        counts = self.counts[frame.camera]
        counts.errors += 1
        self.metrics.bad_frames.labels(frame.camera).inc()
        self._publish(frame.camera, msg, counts)

    def _message(self, item: _Item, decision: Decision | None, decided_at: float) -> dict[str, Any]:
        """The verdict payload of one frame (None: ERROR with the item's reason)."""
        frame = item.frame
        return verdict_message(
            decision,
            camera=frame.camera,
            sequence=frame.sequence,
            frame_id=frame.frame_id,
            captured_at=frame.captured_at,
            decided_at=decided_at,
            model_id=self.bundle.model_id,
            part_id=item.part_id,
            source=frame.source_name,
            error=item.error if decision is None else None,
        )

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

    # -- reload -----------------------------------------------------------------------------

    def _start_reload(self) -> None:
        """SIGHUP: load and build the new bundle on a helper thread while the running model
        keeps inspecting, so a reload costs no frames even on live cameras."""
        self._reload_requested = False
        self.notifier.reloading()
        log.info(
            "SIGHUP: loading the bundle %s (the running model keeps going)", self.config.bundle
        )

        def build() -> None:
            started = time.perf_counter()
            try:
                bundle = load_bundle(self.config.bundle)
                thresholds = thresholds_for(self.config, bundle)
                # Built here, used only by the inference thread once swapped in.
                scorer = self._build_scorer(bundle)
                self_test(scorer)  # a bundle that cannot score never replaces one that can
            except Exception as exc:  # UserError or anything ORT/FAISS raise: keep running
                self._reload_result = exc
            else:
                self._reload_result = _Reloaded(
                    bundle, thresholds, scorer, time.perf_counter() - started
                )

        self._reload_thread = threading.Thread(target=build, name="reload", daemon=True)
        self._reload_thread.start()

    @property
    def _reloading(self) -> bool:
        return self._reload_thread is not None and self._reload_thread.is_alive()

    def _finish_reload(self) -> None:
        """Between two batches: swap the new model in, or report why it was rejected."""
        if self._reload_thread is None or self._reload_thread.is_alive():
            return  # the result is only complete once the thread has ended
        result, self._reload_result, self._reload_thread = self._reload_result, None, None
        if result is None:
            return
        old = self.bundle.model_id
        if isinstance(result, Exception):
            self.metrics.reloads.labels("rejected").inc()
            log.error("reload rejected, model %s keeps running: %s", old, result)
        else:
            self.bundle, self.thresholds, self.scorer = (
                result.bundle,
                result.thresholds,
                result.scorer,
            )
            self.metrics.reloads.labels("ok").inc()
            self._reset_drift()  # a new model: a new reference and fresh windows
            for counts in self.counts.values():  # and maybe another geometry
                counts.shape, counts.aspect_mismatch, counts.aspect_warned = None, None, False
            if self.opcua is not None:
                self.opcua.set_model_id(result.bundle.model_id)
            _warn_out_of_range(result.thresholds)
            log.info(
                "reloaded in %.1f s: model %s (was %s) on %s, thresholds image %g pixel %g",
                result.seconds,
                result.bundle.model_id,
                old,
                result.scorer.device,
                result.thresholds.image,
                result.thresholds.pixel,
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
        device = self.scorer.device if self.scorer is not None else None
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
                model_id=self.bundle.model_id,
                device=device,
                uptime_s=now - self._started_at,
                nonfinite_scores=counts.nonfinite,
                threshold_override_out_of_range=bool(self.thresholds.out_of_range),
                triggers_dropped=counts.triggers_dropped,
                triggers_rejected=link.get("triggers_rejected", 0),
                drift=drift_state.as_dict() if drift_state is not None else None,
                aspect_mismatch=counts.aspect_mismatch,
            )
            self.publisher.publish_health(cam, health)
            if self.live is not None:
                self.live.set_health(cam, health)

    def _reset_drift(self) -> None:
        """Drift monitors for the bundle and thresholds in force (none without a reference)."""
        settings = self.config.drift
        reference = (
            DriftReference.from_calibration(
                self.bundle.thresholds.get("calibrated"), self.thresholds.image
            )
            if settings is not None
            else None
        )
        self._drift_alarm = {}
        if settings is None or reference is None:
            self.drift = {}
            if settings is not None:
                log.info(
                    "drift check off: the bundle's calibration records no good scores "
                    "(calibrate it again with this version)"
                )
            return
        rules = settings.model_dump(exclude={"enabled"})
        self.drift = {cam: DriftMonitor(reference, **rules) for cam in self.counts}

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
        )


def _is_endless(capture: CameraCapture) -> bool:
    return capture.kind in LIVE_KINDS or capture.settings.loop
