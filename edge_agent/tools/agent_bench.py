"""`edge-agent bench --agent`: the product end to end, beside the engine at the same batch size.

`bench` alone times the engine (decode, Scorer.score, map, regions) in one process. What a line
gets is the agent: capture thread -> frame queue -> micro-batches (`batching.max_batch`,
`max_wait_ms`) -> Scorer -> decide -> MQTT outbox -> broker -> a subscriber such as a PLC. This
runs exactly that: a Mosquitto broker on a free loopback port (edge_agent/tools/broker.py), a
subscriber on `<prefix>/<line>/+/verdict` subscribed before the agent starts, and the real
`edge-agent run` as a child process with a generated config. Every verdict's arrival is stamped.

Two modes:

- throughput (default): a folder camera over the --data images, read once with back-pressure,
  the agent started with --exit-when-done. Its latency includes the time a frame waits in the
  frame queue (the folder is read ahead as far as the queue allows), so it is a loaded agent's
  latency, not a live camera's.
- live (--fps F): the images, looped and resized to one frame size, are served as an HTTP
  multipart-JPEG stream paced at F frames/s, the way an IP camera serves /video.mjpg, and the
  agent reads it as a `stream` camera (a folder camera cannot be paced: `fps_limit` applies to
  live sources only, and a folder is read as fast as the queue takes frames). After --seconds
  from the first verdict the agent gets SIGTERM; it answers every frame still queued, and every
  captured frame the queue did not drop (live cameras drop the oldest when inference falls
  behind: counted, reported) must have a verdict.

Figures:

- verdicts/s, steady state: the verdicts after the first WARMUP x max_batch ones, over the
  time from the one before them to the last. Verdicts arrive in bursts, one per batch, so the
  window starts at the burst boundary (the largest arrival gap within one batch after that
  point): otherwise a window starting inside a burst counts verdicts it did not time.
- latency: capture -> verdict received: arrival time minus the verdict's `timestamp` (capture
  time, ms; MQTT contract v1); the same clock, everything runs on this machine. `decided` is
  the verdict's own `latency_ms` (capture -> decision in the agent); the difference is the
  outbox, the broker and the subscriber.
- engine: bench_batch on the same images at max_batch (live mode: at batch 1, a frame alone)
  in this process, before the agent starts so that the two never compete for the CPU. ratio:
  agent verdicts/s over engine images/s (live mode: agent p50 latency over the engine's), the
  figure that carries over from one machine to another.

An uncalibrated bundle gets image and pixel thresholds at the median engine score of these
images (half of them NG) in the agent's config: the agent refuses to run without thresholds,
and NG frames cost it an anomaly map and regions that OK frames skip, so the share of NG
frames is part of what is measured and is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.decide.decision import Thresholds, resolve_thresholds, verdict_for
from edge_agent.errors import UserError
from edge_agent.images import read_image
from edge_agent.model.bundle import Bundle, load_bundle
from edge_agent.tools import broker as brokers
from edge_agent.tools.engine_bench import bench_batch, image_paths

PREFIX = "edge-agent"
LINE = "bench"
CAMERA = "cam1"
# The agent as `edge-agent run` starts it; `-m` with this interpreter, as the demo does, since
# the venv's bin/ may not be on PATH.
AGENT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "edge_agent", "run")
DEFAULT_SECONDS = 20.0
FIRST_VERDICT_TIMEOUT_S = 180.0  # bundle load, ORT session, first runs: slow on a busy box
STALL_TIMEOUT_S = 60.0  # no new verdict for this long while frames are left: stuck
# --against-flat: a re-checked index's image scores are flat's up to float32 rounding (2.5e-6
# relative measured, BENCHMARKS.md); issue 10 asks for 1e-3. Verdict scores carry 6 decimals.
FLAT_RTOL = 1e-3
STOP_TIMEOUT_S = 60.0  # SIGTERM -> exit: it answers up to queue_size queued frames first
QUIET_S = 3.0  # after the agent exited: verdicts still on their way through the broker
SUBSCRIBE_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 15
JPEG_QUALITY = 90


def batching_default(name: str) -> Any:
    """The agent config's default for `batching.<name>`: the schema is its one source."""
    from edge_agent.agent.config import Batching

    return Batching.model_fields[name].default


def add_agent_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--agent", action="store_true",
        help="measure the real agent end to end (camera -> micro-batches -> Scorer -> MQTT -> "
        "a subscriber) beside the engine at the same batch size",
    )  # fmt: skip
    g.add_argument(
        "--max-batch", type=int, metavar="N",
        help=f"the agent's batching.max_batch (default: the config's, "
        f"{batching_default('max_batch')})",
    )  # fmt: skip
    g.add_argument(
        "--max-wait-ms", type=float, metavar="MS",
        help=f"the agent's batching.max_wait_ms (default: the config's, "
        f"{batching_default('max_wait_ms'):g})",
    )  # fmt: skip
    g.add_argument(
        "--fps", type=float, metavar="F",
        help="a live camera: stream the images (looped) at F frames/s, for latency",
    )  # fmt: skip
    g.add_argument(
        "--protocols", action="store_true", default=None,  # None: refuse_agent_options
        help="also run Sparkplug B and the OPC UA server in the agent (their cost on inference)",
    )  # fmt: skip
    g.add_argument(
        "--against-flat", action="store_true", default=None,  # None: refuse_agent_options
        help="also score every image with exact flat search and check each verdict's score "
        f"(relative {FLAT_RTOL:g}) and verdict against it (a folder run, not --fps)",
    )  # fmt: skip
    g.add_argument(
        "--seconds", type=float, metavar="S",
        help=f"with --fps: run S seconds from the first verdict, then SIGTERM "
        f"(default: {DEFAULT_SECONDS:g})",
    )  # fmt: skip


_AGENT_ONLY = ("max_batch", "max_wait_ms", "fps", "seconds", "protocols", "against_flat")


def refuse_agent_options(args: argparse.Namespace) -> None:
    """Engine mode: the agent's options would be silently ignored, so they are an error."""
    for name in _AGENT_ONLY:
        if getattr(args, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} needs --agent")


# -- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    bundle_dir: Path
    data: Path
    paths: list[Path]
    max_batch: int
    max_wait_ms: float
    warmup: int
    fps: float | None
    seconds: float
    device: str
    threads: int | None
    index: str
    nprobe: int
    protocols: bool = False
    against_flat: bool = False

    @property
    def live(self) -> bool:
        return self.fps is not None

    @property
    def skip(self) -> int:
        return self.warmup * self.max_batch


def _plan(args: argparse.Namespace) -> tuple[Plan, Bundle]:
    from pydantic import ValidationError

    from edge_agent.agent.config import Batching

    if args.batch is not None:
        raise UserError("with --agent the batch size is --max-batch (the agent's max_batch)")
    if args.seconds is not None and args.fps is None:
        raise UserError("--seconds needs --fps (without it every image is read once)")
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps must be above 0, got {args.fps:g}")
    seconds = DEFAULT_SECONDS if args.seconds is None else args.seconds
    if not seconds > 0:
        raise UserError(f"--seconds must be above 0, got {seconds:g}")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    if args.against_flat and args.fps is not None:
        raise UserError("--against-flat needs a folder run: a live camera's frames have no file")
    wanted = {
        "max_batch": batching_default("max_batch") if args.max_batch is None else args.max_batch,
        "max_wait_ms": (
            batching_default("max_wait_ms") if args.max_wait_ms is None else args.max_wait_ms
        ),
    }
    try:
        batching = Batching.model_validate(wanted)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise UserError(f"{option}: {error['msg'][:1].lower()}{error['msg'][1:]}") from None
    bundle = load_bundle(args.bundle)  # a clear error before any process is started
    paths = image_paths(args.data, args.limit)
    plan = Plan(
        bundle_dir=args.bundle.resolve(),
        data=args.data,
        paths=paths,
        max_batch=batching.max_batch,
        max_wait_ms=batching.max_wait_ms,
        warmup=args.warmup,
        fps=args.fps,
        seconds=seconds,
        device=args.device,
        threads=args.threads,
        index=args.index,
        nprobe=args.nprobe,
        protocols=bool(args.protocols),
        against_flat=bool(args.against_flat),
    )
    return plan, bundle


# -- the engine, for reference -----------------------------------------------------------------


def engine_reference(plan: Plan, bundle: Bundle) -> tuple[dict[str, Any], list[float]]:
    """bench_batch at the agent's batch size (live: 1) and the image score of every file."""
    from edge_agent.model.scorer import Scorer

    scorer = Scorer(
        bundle, device=plan.device, threads=plan.threads, index=plan.index, ivf_nprobe=plan.nprobe
    )
    files = [p.read_bytes() for p in plan.paths]
    scores: list[float] = []
    result = bench_batch(scorer, files, 1 if plan.live else plan.max_batch, plan.warmup, scores)
    result["device"] = scorer.device
    del scorer
    gc.collect()  # the ORT session and its threads go before the agent starts
    return result, scores


def compare_with_flat(
    arrivals: list[Arrival], flat: list[float], thresholds: Thresholds, rtol: float = FLAT_RTOL
) -> dict[str, Any]:
    """Each verdict against flat search's score of its file (link_frames names the files by
    their place in `flat`): how many have a score within `rtol` of flat's,
        |score - flat| <= rtol |flat|,
    and the verdict flat's score gives under `thresholds` (verdict_for). ERROR verdicts have no
    score to compare: counted apart, as is a verdict whose source names no file of the run."""
    seen: set[tuple[str, int]] = set()
    compared = within = same_verdict = unscored = 0
    largest = 0.0
    for a in arrivals:
        v = a.verdict
        key = (v["camera"], v["sequence"])
        if key in seen:
            continue
        seen.add(key)
        stem = Path(str(v.get("source", ""))).stem
        if v.get("score") is None or not stem.isdigit() or int(stem) >= len(flat):
            unscored += 1
            continue
        exact = flat[int(stem)]
        difference = abs(float(v["score"]) - exact)
        compared += 1
        within += difference <= rtol * abs(exact)
        largest = max(largest, difference / max(abs(exact), 1e-12))
        same_verdict += v["verdict"] == verdict_for(exact, thresholds)
    return {
        "compared": compared,
        "within": within,
        "verdicts_equal": same_verdict,
        "unscored": unscored,
        "max_relative": largest,
        "rtol": rtol,
    }


def thresholds_for_bench(
    bundle: Bundle, scores: list[float]
) -> tuple[dict[str, float] | None, str]:
    """Thresholds to write into the agent's config (None: the bundle's) and where they are from."""
    found = bundle.thresholds
    if found.get("image") is not None and found.get("pixel") is not None:
        return None, f"the bundle's: image {found['image']:g}, pixel {found['pixel']:g}"
    median = float(np.median(scores))
    return (
        {"image": median, "pixel": median},
        f"bundle not calibrated: image = pixel = {median:g}, the median engine score here",
    )


# -- the pieces that run: subscriber, camera stream, agent -------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float  # time.time() when the subscriber got it
    verdict: dict[str, Any]


class VerdictClock:
    """Subscribes (QoS 1) to every verdict and health message of the bench line and stamps
    each arrival; the callback only stores, decoding waits until the run is over."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self._topics = [(f"{PREFIX}/{LINE}/+/verdict", 1), (f"{PREFIX}/{LINE}/+/health", 1)]
        self._raw: list[tuple[float, str, bytes]] = []
        self._verdicts = 0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.port = port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-agent-bench-{os.getpid()}"
        )
        self.client.on_connect = lambda c, *_: c.subscribe(self._topics)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message

    def __enter__(self) -> VerdictClock:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._subscribed.wait(SUBSCRIBE_TIMEOUT_S):
            self.close()
            raise UserError(f"could not subscribe to the broker on port {self.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        at = time.time()
        with self._cond:
            self._raw.append((at, msg.topic, bytes(msg.payload)))
            if msg.topic.endswith("/verdict"):
                self._verdicts += 1
            self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._verdicts

    def wait_beyond(self, count: int, timeout_s: float) -> int:
        """Wait until more than `count` verdicts arrived or `timeout_s` passed; the count."""
        with self._cond:
            self._cond.wait_for(lambda: self._verdicts > count, timeout_s)
            return self._verdicts

    def settle(self, expected: int) -> int:
        """After the agent exited: wait for `expected` verdicts, or until none came for QUIET_S."""
        seen = self.count
        while seen < expected:
            now = self.wait_beyond(seen, QUIET_S)
            if now == seen:
                break
            seen = now
        return seen

    def verdicts(self) -> list[Arrival]:
        with self._cond:
            raw = list(self._raw)
        return [Arrival(at, json.loads(p)) for at, t, p in raw if t.endswith("/verdict")]

    def last_health(self) -> dict[str, Any] | None:
        with self._cond:
            raw = [p for _, t, p in self._raw if t.endswith("/health")]
        return json.loads(raw[-1]) if raw else None


def stream_frames(paths: list[Path]) -> tuple[list[bytes], tuple[int, int]]:
    """The images as JPEGs of one size (a camera has one resolution): the median width and
    height of the images. Returns the JPEGs and (width, height)."""
    images = [read_image(p) for p in paths]
    w = int(np.median([im.shape[1] for im in images]))
    h = int(np.median([im.shape[0] for im in images]))
    jpegs = []
    for im in images:
        ok, buf = cv2.imencode(
            ".jpg",
            cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA),
            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY],
        )
        if not ok:
            raise UserError("cannot encode the stream's frames as JPEG")
        jpegs.append(buf.tobytes())
    return jpegs, (w, h)


class PacedMjpegServer:
    """`frames` looped as an HTTP multipart-JPEG stream at `fps` frames/s, each client paced
    from its own connection; the part layout is ffmpeg's mpjpeg, which OpenCV reads."""

    BOUNDARY = "ffmpeg"

    def __init__(self, frames: list[bytes], fps: float) -> None:
        self.frames = frames
        self.interval = 1.0 / fps
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bench-camera", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/video.mjpg"

    def __enter__(self) -> PacedMjpegServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _serve(self, wfile: Any) -> None:
        due = time.monotonic()
        i = 0
        while not self._stop.is_set():
            jpeg = self.frames[i % len(self.frames)]
            head = (
                f"--{self.BOUNDARY}\r\nContent-type: image/jpeg\r\n"
                f"Content-length: {len(jpeg)}\r\n\r\n"
            )
            try:
                wfile.write(head.encode() + jpeg + b"\r\n")
                wfile.flush()
            except OSError:  # the agent closed the stream (stopped)
                return
            with self._lock:
                self.sent += 1
            i += 1
            due += self.interval
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -1.0:
                due = time.monotonic()  # a reader that stalled gets the live rate, not a burst

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header(
                    "Content-Type", f"multipart/x-mixed-replace;boundary={camera.BOUNDARY}"
                )
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                camera._serve(self.wfile)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per request on stderr would interleave with the table

        return Handler


class AgentProcess:
    """`edge-agent run --config FILE` as a child process; its output goes to `log`."""

    def __init__(self, config: Path, log: Path, *, exit_when_done: bool) -> None:
        self.argv = [*AGENT_COMMAND, "--config", str(config)]
        if exit_when_done:
            self.argv.append("--exit-when-done")
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AgentProcess:
        with self.log.open("wb") as log:
            # Own session: a Ctrl-C in the terminal reaches only the bench, which stops the
            # agent itself (below) while the broker is still up.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.stop(timeout_s=10.0)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float) -> int:
        """SIGTERM (answer the queue, flush MQTT, exit), SIGKILL after `timeout_s`."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def failed(self, what: str) -> UserError:
        """The error for an agent that `what` (e.g. "exited with code 1"), its log's tail
        printed first: the temporary folder that holds the log is about to go."""
        tail = self.lines()[-LOG_TAIL_LINES:]
        if tail:
            print("agent log, last lines:", file=sys.stderr)
            for line in tail:
                print(f"  {line}", file=sys.stderr)
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        return UserError(f"the agent {what}" + (f"; its log ends: {last.strip()}" if last else ""))

    def summary(self) -> str | None:
        """The agent's last log line, "stopped after ...: frames_in ..., inspected ...", if any."""
        return next((ln for ln in reversed(self.lines()) if "stopped after" in ln), None)


# -- the run -----------------------------------------------------------------------------------


def write_agent_config(
    folder: Path, plan: Plan, camera: dict[str, Any], port: int, thresholds: dict | None
) -> Path:
    import yaml

    config: dict[str, Any] = {
        "bundle": str(plan.bundle_dir),
        "device": plan.device,
        "index": plan.index,
        "ivf_nprobe": plan.nprobe,
        "batching": {"max_batch": plan.max_batch, "max_wait_ms": plan.max_wait_ms},
        "cameras": [{"id": CAMERA, **camera}],
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "prefix": PREFIX,
            "line": LINE,
            "spool_dir": str(folder / "spool"),
        },
        "metrics": {"port": None},
    }
    if plan.protocols:  # both on, as a plant would run them, beside contract v1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            opcua_port = s.getsockname()[1]
        config["sparkplug"] = {"enabled": True, "group_id": "bench", "edge_node_id": "bench"}
        config["opcua"] = {
            "enabled": True,
            "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}/edge-agent/",
            "allow_anonymous": True,
        }
    if plan.threads:
        config["threads"] = plan.threads
    if thresholds:
        config["thresholds"] = thresholds
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def link_frames(folder: Path, paths: list[Path]) -> Path:
    """A flat folder of the images, in bench's order (a folder camera does not recurse)."""
    folder.mkdir()
    for i, p in enumerate(paths):
        (folder / f"{i:06d}{p.suffix.lower()}").symlink_to(p.resolve())
    return folder


def _run_to_end(agent: AgentProcess, clock: VerdictClock, frames: int) -> None:
    """Throughput mode: the agent reads the folder once and exits by itself."""
    seen, last_new = 0, time.monotonic()
    while agent.running:
        now = clock.wait_beyond(seen, 0.5)
        if now > seen:
            seen, last_new = now, time.monotonic()
            continue
        waited = time.monotonic() - last_new
        if seen == 0 and waited > FIRST_VERDICT_TIMEOUT_S:
            raise agent.failed(f"sent no verdict in {FIRST_VERDICT_TIMEOUT_S:.0f} s")
        if 0 < seen < frames and waited > STALL_TIMEOUT_S:
            raise agent.failed(f"sent no verdict for {STALL_TIMEOUT_S:.0f} s ({seen} of {frames})")
    if agent.returncode != 0:
        raise agent.failed(f"exited with code {agent.returncode}")
    clock.settle(frames)


def _run_live(agent: AgentProcess, clock: VerdictClock, seconds: float) -> None:
    """Live mode: run `seconds` from the first verdict, then SIGTERM and let it drain."""
    started = time.monotonic()
    while clock.wait_beyond(0, 0.5) == 0:
        if not agent.running:
            raise agent.failed(f"exited with code {agent.returncode} before its first verdict")
        if time.monotonic() - started > FIRST_VERDICT_TIMEOUT_S:
            raise agent.failed(f"sent no verdict in {FIRST_VERDICT_TIMEOUT_S:.0f} s")
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if not agent.running:
            raise agent.failed(f"exited with code {agent.returncode} while the camera ran")
        time.sleep(min(0.2, max(0.0, until - time.monotonic())))
    code = agent.stop(timeout_s=STOP_TIMEOUT_S)
    if code != 0:
        raise agent.failed(f"exited with code {code} after SIGTERM")


def _counts(clock: VerdictClock, agent: AgentProcess) -> tuple[int, int]:
    """(frames captured, frames dropped by the queue) once the agent has exited: the summary
    line of its log, written after its last publish; else its last health message (QoS 0,
    so the final one may still be on its way, or lost, when the process is gone)."""
    line = agent.summary() or ""
    found = dict(re.findall(r"(frames_in|dropped) (\d+)", line.split(";")[0]))
    if "frames_in" in found:
        return int(found["frames_in"]), int(found.get("dropped", 0))
    health = clock.last_health()
    if health is None:
        raise agent.failed("reported no frame counts (no summary line, no health message)")
    return int(health["frames_in"]), int(health["dropped"])


def steady_start(times: list[float], skip: int, max_batch: int) -> int:
    """Index of the first verdict counted in the steady state: the first of a burst (a batch's
    verdicts, published back to back), within one batch after `skip`; 1 when too few."""
    n = len(times)
    if n < 2:
        return 0
    lo = max(1, skip) if skip < n - 1 else 1
    hi = min(n - 1, lo + max_batch - 1)
    return max(range(lo, hi + 1), key=lambda i: times[i] - times[i - 1])


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def agent_figures(arrivals: list[Arrival], skip: int, max_batch: int) -> dict[str, Any]:
    ordered = sorted(arrivals, key=lambda a: a.at)
    times = [a.at for a in ordered]
    start = steady_start(times, skip, max_batch)
    window = ordered[start:]
    rate = 0.0
    if start >= 1 and window:
        rate = len(window) / max(times[-1] - times[start - 1], 1e-9)
    unique = {(a.verdict["camera"], a.verdict["sequence"]) for a in ordered}
    return {
        "verdicts": len(unique),
        "duplicates": len(ordered) - len(unique),
        "counted": len(window),
        "verdicts_per_second": rate,
        "latency_ms": _pct([a.at * 1000.0 - a.verdict["timestamp"] for a in window]),
        "decided_ms": _pct([float(a.verdict["latency_ms"]) for a in window]),
        "ng": sum(a.verdict["verdict"] == "NG" for a in ordered),
        "errors": sum(a.verdict["verdict"] == "ERROR" for a in ordered),
    }


def run_agent_bench(args: argparse.Namespace) -> int:
    plan, bundle = _plan(args)
    broker = brokers.choose_broker("bench --agent")  # before the engine's minute, not after it
    frames_label = f"{len(plan.paths)} images from {plan.data}"
    print(f"engine: {frames_label}, batch {1 if plan.live else plan.max_batch}", flush=True)
    engine, scores = engine_reference(plan, bundle)
    thresholds, thresholds_from = thresholds_for_bench(bundle, scores)
    flat: tuple[dict[str, Any], list[float]] | None = None
    if plan.against_flat:
        print(f"engine with flat search: {frames_label}, batch {plan.max_batch}", flush=True)
        flat = engine_reference(replace(plan, index="flat"), bundle)
    # The thresholds the agent decides by: the bench's config overrides, else the bundle's.
    written = thresholds or {}
    decided_by = resolve_thresholds(bundle.thresholds, written.get("image"), written.get("pixel"))
    del bundle
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-agent-bench-")))
        port = stack.enter_context(brokers.mqtt_broker(broker, tmp))
        clock = stack.enter_context(VerdictClock(port))
        size: tuple[int, int] | None = None
        camera: PacedMjpegServer | None = None
        if plan.live:
            assert plan.fps is not None
            jpegs, size = stream_frames(plan.paths)
            camera = stack.enter_context(PacedMjpegServer(jpegs, plan.fps))
            source: dict[str, Any] = {"source": camera.url, "kind": "stream"}
        else:
            source = {"source": str(link_frames(tmp / "frames", plan.paths)), "kind": "folder"}
        config = write_agent_config(tmp, plan, source, port, thresholds)
        print(
            f"agent: max_batch {plan.max_batch}, max_wait_ms {plan.max_wait_ms:g}, "
            + (
                f"a {size[0]}x{size[1]} camera at {plan.fps:g} fps for {plan.seconds:g} s"
                if plan.live and size
                else "a folder camera, every image once"
            )
            + f"; thresholds {thresholds_from}"
            + ("; Sparkplug B and OPC UA on" if plan.protocols else ""),
            flush=True,
        )
        agent = stack.enter_context(
            AgentProcess(config, tmp / "agent.log", exit_when_done=not plan.live)
        )
        if plan.live:
            _run_live(agent, clock, plan.seconds)
            captured, dropped = _counts(clock, agent)
            clock.settle(captured - dropped)
        else:
            _run_to_end(agent, clock, len(plan.paths))
            captured, dropped = _counts(clock, agent)
        arrivals = clock.verdicts()
        figures = agent_figures(arrivals, plan.skip, plan.max_batch)
        summary = agent.summary()
        sent = camera.sent if camera is not None else None
    against = None
    if flat is not None:
        assert decided_by is not None  # an uncalibrated bundle got thresholds_for_bench's
        against = {"engine": flat[0], **compare_with_flat(arrivals, flat[1], decided_by)}
    return _report(
        args, plan, broker.name, engine, figures, captured, dropped, sent, summary, against
    )


def _report(
    args: argparse.Namespace,
    plan: Plan,
    broker_name: str,
    engine: dict[str, Any],
    agent: dict[str, Any],
    captured: int,
    dropped: int,
    sent: int | None,
    summary: str | None,
    against: dict[str, Any] | None = None,
) -> int:
    frames = captured if plan.live else len(plan.paths)
    expected = frames - dropped
    answered = agent["verdicts"]
    all_answered = answered == expected and (plan.live or captured == len(plan.paths))
    if plan.live:
        ratio_name = "latency_ratio"
        ratio = agent["latency_ms"]["p50"] / engine["latency_ms"]["p50"]
    else:
        ratio_name = "ratio"
        ratio = agent["verdicts_per_second"] / engine["images_per_second"]
    e, a = engine, agent
    print(f"{'':<22}{'frames':>7}{'per s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    print(
        f"{'engine (batch ' + str(e['batch']) + ')':<22}{e['images']:>7}"
        f"{e['images_per_second']:>8.1f}{e['latency_ms']['p50']:>9.1f}{e['latency_ms']['p99']:>9.1f}"
        "   in process: decode .. regions"
    )
    print(
        f"{'agent':<22}{answered:>7}{a['verdicts_per_second']:>8.1f}"
        f"{a['latency_ms']['p50']:>9.1f}{a['latency_ms']['p99']:>9.1f}"
        "   capture -> verdict received over MQTT"
    )
    print(
        f"{'  of which decided':<22}{'':>7}{'':>8}{a['decided_ms']['p50']:>9.1f}"
        f"{a['decided_ms']['p99']:>9.1f}   capture -> decision in the agent"
    )
    if plan.live:
        print(
            f"agent/engine p50 latency {ratio:.2f}; camera sent {sent}, agent captured {captured}, "
            f"queue dropped {dropped}, answered {answered}"
        )
        if dropped:
            print(
                f"the agent did not keep up with {plan.fps:g} fps: the full frame queue dropped "
                f"{dropped} frames (live cameras drop the oldest)"
            )
    else:
        print(
            f"agent/engine {ratio:.2f} (verdicts/s over images/s); latency includes the frame "
            "queue (a folder is read ahead): see --fps for a live camera's"
        )
    verdict_line = f"NG {a['ng']}, ERROR {a['errors']}; steady state over {a['counted']} verdicts"
    if all_answered:
        print(f"every frame answered: {answered} of {expected}; {verdict_line}")
    else:
        print(f"NOT every frame answered: {answered} of {expected} verdicts; {verdict_line}")
    flat_equal = True
    if against is not None:
        f = against["engine"]
        flat_equal = against["within"] == against["verdicts_equal"] == against["compared"] > 0
        print(
            f"{'engine, flat search':<22}{f['images']:>7}{f['images_per_second']:>8.1f}"
            f"{f['latency_ms']['p50']:>9.1f}{f['latency_ms']['p99']:>9.1f}"
            "   exact kNN of every patch, same images"
        )
        print(
            f"{'' if flat_equal else 'NOT '}equal to flat search: {against['within']} of "
            f"{against['compared']} scores within {against['rtol']:g} relative (largest "
            f"difference {against['max_relative']:.1e}), {against['verdicts_equal']} of "
            f"{against['compared']} verdicts the same"
            + (f"; {against['unscored']} without a score" if against["unscored"] else "")
        )
    if summary:
        # The logging format is "<time> <level> <logger>: <message>": the message is enough.
        print(f"agent log: {summary.split(': ', 1)[-1]}")
    if args.json:
        result: dict[str, Any] = {
            "mode": "live" if plan.live else "throughput",
            "frames": frames,
            "verdicts": answered,
            "all_answered": all_answered,
            "verdicts_per_second": a["verdicts_per_second"],
            "latency_ms": a["latency_ms"],
            "decided_ms": a["decided_ms"],
            "counted": a["counted"],
            "ng": a["ng"],
            "errors": a["errors"],
            "duplicates": a["duplicates"],
            "captured": captured,
            "dropped": dropped,
            "max_batch": plan.max_batch,
            "max_wait_ms": plan.max_wait_ms,
            "protocols": plan.protocols,
            "warmup_verdicts": plan.skip,
            "engine": e,
            ratio_name: ratio,
            "broker": broker_name,
            "device": e["device"],
        }
        if plan.live:
            result.update(fps=plan.fps, seconds=plan.seconds, sent=sent)
        if against is not None:
            result["against_flat"] = {**against, "equal": flat_equal}
        print(json.dumps(result))
    return 0 if all_answered and flat_equal else 1
