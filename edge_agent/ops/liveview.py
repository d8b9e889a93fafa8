"""The commissioning live view: an optional HTTP page showing, per camera, the latest frame
(heat map and region boxes on NG frames), the last verdicts, counts, fps, latency and drift.

Two halves with one rule between them: the inference thread must not pay for viewers.

- LiveStore.update() is what the inference thread calls per answered frame: under a lock it
  stores references (frame, decision, message, thresholds) and bumps a few counters, O(1),
  no copy, no JPEG, no overlay;
- LiveViewServer's HTTP threads do the work, only while a viewer asks, only for the latest
  frame, at most MAX_STREAM_FPS per stream, and once per frame however many viewers there are
  (the encoded JPEG is cached per camera and frame version).

A hostile or stuck client cannot pile up threads or file descriptors: at most MAX_CONNECTIONS
at once (more are closed unanswered), at most MAX_STREAMS of them MJPEG streams, every socket
operation bounded by CONNECTION_TIMEOUT_S, and a stream ends after MAX_STREAM_S (the page
reconnects).

Who may do what (lifecycle/roles.py has the table): with no token configured (loopback only)
everyone is a viewer. With `liveview.token` or `liveview.tokens_file`, every request needs a
token (`?token=` or `Authorization: Bearer`): the single `token` is an engineer (as it could do
everything before roles), each line of the tokens file (hashed, `edge-agent liveview-token
add`) names its role and holder. The file is re-read when it changes, so a token is added or
revoked without a restart; a file that turns unreadable lets none of its tokens in.
POST /action/<action> (JSON body: inspection, reason and the action's arguments) hands
confirm, teach, shadow_start, shadow_stop, promote and rollback to the agent's lifecycle handler; a
role that may not do it gets 403 and the refusal goes to the audit trail.

GET /shadow.json is the latest shadow report (the agent's, as published on MQTT): per inspection
a candidate shadows, frames compared and skipped, the agreement matrix, would-be false rejects
and catches, score quantiles. The page draws it. It is the report the loop last built (every
`shadow.report_interval_s` and on each change), never the live counters: those are the loop's.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from edge_agent.decide.decision import Decision, Thresholds
from edge_agent.decide.overlay import heatmap_overlay
from edge_agent.errors import UserError
from edge_agent.images import to_bgr
from edge_agent.lifecycle import roles
from edge_agent.lifecycle.audit import AuditLog, AuditUnavailable
from edge_agent.ops.bounded_http import BoundedHTTPServer, HTTPService
from edge_agent.station.recipes import Inspection

log = logging.getLogger(__name__)

HISTORY = 10  # verdicts listed per camera
FPS_WINDOW = 128  # answer times kept per camera for the fps estimate
FPS_SPAN_S = 10.0
MAX_CONNECTIONS = 16
"""Requests served at once (page, status polls, frames, streams); more are closed unanswered."""
MAX_STREAMS = 8
"""MJPEG streams at once: each holds a thread and a socket for as long as it runs."""
CONNECTION_TIMEOUT_S = 5.0
"""A client that sends no complete request, or stops reading what it is sent, for this long
is dropped."""
MAX_STREAM_FPS = 10.0
MAX_STREAM_S = 300.0  # a forgotten tab does not hold a stream slot forever; the page reconnects
JPEG_QUALITY = 80
BOX_BGR = (0, 0, 255)
ROI_BGR = (255, 200, 0)  # an inspection's region: the operator sees what each one looks at
IGNORED_BGR = np.array([160, 60, 160], dtype=np.float32)  # tint of pixels no inspection scores
IGNORED_ALPHA = 0.45
LIFECYCLE_ACTIONS = ("confirm", "teach", "shadow_start", "shadow_stop", "promote", "rollback")
"""What POST /action/<action> takes (roles.ACTIONS says who may); the agent's
lifecycle_command decides the rest."""
MAX_ACTION_BYTES = 4096  # an action's JSON body: an inspection id, a path, a reason
SOURCE = "liveview"  # the lifecycle handler's and the audit trail's `source`

LifecycleHandler = Callable[[str, "str | None", Mapping[str, Any], str, str], "str | None"]
ShadowReport = Callable[[], Mapping[str, Any]]
"""``report()``: the latest shadow report, contract.shadow_message (the agent's shadow_report);
cheap and safe to call from the HTTP threads."""
NO_SHADOWS: Mapping[str, Any] = {"shadows": []}  # an agent that runs no shadows
"""``handler(action, inspection, args, who, source)``: None when accepted, else the reason it
is refused (the agent's lifecycle_command)."""


class Encoder(Protocol):
    def __call__(self, image: np.ndarray, quality: int) -> bytes: ...


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class _Camera:
    """One camera's latest state; written by the inference thread, read under the lock."""

    version: int = 0  # bumped by every frame that brought an image
    image: np.ndarray | None = None
    decision: Decision | None = None
    message: Mapping[str, Any] | None = None  # the verdict of `image`
    thresholds: Thresholds | None = None
    last: Mapping[str, Any] | None = None  # the latest verdict, with or without an image
    history: deque[Mapping[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    times: deque[float] = field(default_factory=lambda: deque(maxlen=FPS_WINDOW))
    counts: dict[str, int] = field(default_factory=lambda: {"OK": 0, "NG": 0, "ERROR": 0})
    health: Mapping[str, Any] | None = None
    # The active recipe's inspections on this camera (their ROIs and ignored pixels drawn).
    inspections: tuple[Inspection, ...] = ()
    # The rendered JPEG of `version`, shared by every viewer (HTTP threads only).
    jpeg: bytes = b""
    jpeg_version: int = -1
    render_lock: threading.Lock = field(default_factory=threading.Lock)


class LiveStore:
    """The latest state per camera, handed over by the agent; rendering is the readers' cost."""

    def __init__(self, cameras: list[str], encoder: Encoder = encode_jpeg) -> None:
        self.cameras = list(cameras)
        self._encoder = encoder
        self._lock = threading.Lock()
        self._cams = {c: _Camera() for c in self.cameras}
        self.model_id: str | None = None

    def update(
        self,
        camera: str,
        image: np.ndarray | None,
        decision: Decision | None,
        message: Mapping[str, Any],
        thresholds: Thresholds,
    ) -> None:
        """Inference thread, per answered frame: references only. `image` and `message` must
        not be modified afterwards (the agent makes new ones per frame). A frame without an
        image (ERROR) is listed but leaves the last picture up."""
        now = time.monotonic()
        with self._lock:
            cam = self._cams[camera]
            if image is not None:
                cam.version += 1
                cam.image, cam.decision, cam.message = image, decision, message
                cam.thresholds = thresholds
            cam.last = message
            cam.history.appendleft(message)
            cam.times.append(now)
            verdict = message.get("verdict")
            if verdict in cam.counts:
                cam.counts[verdict] += 1
            self.model_id = message.get("model_id")

    def set_inspections(self, camera: str, inspections: Sequence[Inspection]) -> None:
        """The active recipe's inspections on ``camera`` (at start and at each change)."""
        with self._lock:
            cam = self._cams[camera]
            cam.inspections = tuple(inspections)
            cam.version += 1  # redraw the last picture with the new regions

    def set_health(self, camera: str, health: Mapping[str, Any]) -> None:
        """The camera's latest health message (drift, frames in, dropped, connected)."""
        with self._lock:
            self._cams[camera].health = health

    def version(self, camera: str) -> int:
        with self._lock:
            return self._cams[camera].version

    def status(self) -> dict[str, Any]:
        """Everything the page shows but the picture, as JSON-ready values."""
        now = time.monotonic()
        cameras: dict[str, Any] = {}
        with self._lock:
            for cam_id, cam in self._cams.items():
                recent = [t for t in cam.times if now - t <= FPS_SPAN_S]
                health = cam.health or {}
                last = cam.last or {}
                cameras[cam_id] = {
                    "version": cam.version,
                    "last": _summary(last) if last else None,
                    "history": [_summary(m) for m in cam.history],
                    "counts": dict(cam.counts),
                    "fps": _fps(recent),
                    "latency_ms": last.get("latency_ms"),
                    "drift": health.get("drift"),
                    "frames_in": health.get("frames_in"),
                    "dropped": health.get("dropped"),
                    "connected": health.get("connected"),
                    "queue_depth": health.get("queue_depth"),
                    "inspections": [i.id for i in cam.inspections],
                }
            model_id = self.model_id
        return {"time": time.time(), "model_id": model_id, "cameras": cameras}

    def jpeg(self, camera: str) -> tuple[int, bytes] | None:
        """(version, JPEG) of the camera's latest frame with its overlay; None before the first
        frame. Encoded at most once per version, outside the store's lock, so neither the
        inference thread nor other cameras' viewers wait for it."""
        with self._lock:
            cam = self._cams[camera]
            version, image, decision = cam.version, cam.image, cam.decision
            message, thresholds, inspections = cam.message, cam.thresholds, cam.inspections
        if image is None or message is None or thresholds is None:
            return None
        with cam.render_lock:
            if cam.jpeg_version != version:
                picture = render(image, decision, message, thresholds, inspections)
                cam.jpeg = self._encoder(picture, JPEG_QUALITY)
                cam.jpeg_version = version
            return cam.jpeg_version, cam.jpeg


def _fps(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    return round((len(times) - 1) / max(times[-1] - times[0], 1e-6), 2)


def _summary(msg: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "sequence", "verdict", "score", "threshold", "part_id", "timestamp", "latency_ms",
        "recipe", "reject_image",
    )  # fmt: skip
    out = {k: msg.get(k) for k in keys}
    out["regions"] = len(msg.get("regions") or ())
    if msg.get("error"):
        out["error"] = msg["error"]
    # Each inspection's own answer: why the frame's verdict is what it is.
    out["inspections"] = [
        {k: i.get(k) for k in ("id", "verdict", "score", "threshold", "error")}
        for i in msg.get("inspections") or ()
    ]
    return out


def render(
    image: np.ndarray,
    decision: Decision | None,
    message: Mapping[str, Any],
    thresholds: Thresholds,
    inspections: Sequence[Inspection] = (),
) -> np.ndarray:
    """The frame as the operator should see it: on NG the heat map (on the calibrated scale,
    so colours mean the same on every frame), the pixel-threshold outline and region boxes;
    each inspection's ROI outlined with its id and verdict, its ignored pixels tinted; on
    every frame a label with verdict, score and sequence."""
    out = _render_verdict(image, decision, message, thresholds)
    _draw_inspections(out, inspections, message)
    return out


def _draw_inspections(
    out: np.ndarray, inspections: Sequence[Inspection], message: Mapping[str, Any]
) -> None:
    verdicts = {i.get("id"): i.get("verdict") for i in message.get("inspections") or ()}
    height, width = out.shape[:2]
    thickness = 1 if min(height, width) < 512 else 2
    for inspection in inspections:
        x, y, w, h = inspection.roi or (0, 0, width, height)
        if x + w > width or y + h > height:
            continue  # a ROI off this frame: its verdict says so
        if inspection.ignore is not None and inspection.ignore.shape == (h, w):
            view = out[y : y + h, x : x + w]
            tinted = view[inspection.ignore].astype(np.float32)
            tinted = (1 - IGNORED_ALPHA) * tinted + IGNORED_ALPHA * IGNORED_BGR
            view[inspection.ignore] = tinted.astype(np.uint8)
        if inspection.roi is not None:
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), ROI_BGR, thickness)
            text = f"{inspection.id} {verdicts.get(inspection.id) or ''}".strip()
            cv2.putText(
                out,
                text,
                (x + 3, y + h - 4),
                cv2.FONT_HERSHEY_SIMPLEX,
                max(0.35, min(height, width) / 900.0),
                ROI_BGR,
                thickness,
                cv2.LINE_AA,
            )


def _render_verdict(
    image: np.ndarray,
    decision: Decision | None,
    message: Mapping[str, Any],
    thresholds: Thresholds,
) -> np.ndarray:
    verdict = str(message.get("verdict"))
    score = message.get("score")
    label = f"#{message.get('sequence')} {verdict}"
    if isinstance(score, (int, float)) and math.isfinite(score):
        label += f" {score:.2f} / {thresholds.image:g}"
    amap = decision.anomaly_map if decision is not None else None
    if amap is not None:
        scale = thresholds.scale
        out = heatmap_overlay(
            image,
            amap,
            vmin=scale["low"],
            vmax=scale["high"],
            mask=amap >= thresholds.pixel,
            label=label,
        )
        thickness = 1 if min(out.shape[:2]) < 512 else 3
        for region in decision.regions if decision is not None else ():
            x, y, w, h = region.x, region.y, region.width, region.height
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), BOX_BGR, thickness)
        return out
    out = to_bgr(image).copy()
    _label(out, label)
    return out


def _label(out: np.ndarray, text: str) -> None:
    """White on a black box, top left, scaled with the frame (as overlay's label)."""
    scale = max(0.35, min(out.shape[:2]) / 600.0)
    thickness = max(1, round(scale * 1.5))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(4 * scale))
    out[: min(out.shape[0], h + base + 2 * pad), : min(out.shape[1], w + 2 * pad)] = 0
    cv2.putText(
        out,
        text,
        (pad, pad + h),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (255, 255, 255),
        thickness,
        cv2.LINE_AA,
    )


# -- who is asking --------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    role: str
    name: str  # the audit trail's `who`


ANONYMOUS = Login(roles.ANONYMOUS_ROLE, "anonymous")
LEGACY_NAME = "liveview.token"


class Access:
    """The tokens a request may carry and the login each one is. Thread-safe."""

    def __init__(self, token: str | None = None, tokens_file: Path | None = None) -> None:
        self._legacy = token.encode() if token is not None else None
        self._file = tokens_file
        self._lock = threading.Lock()
        self._entries: tuple[roles.TokenEntry, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        if tokens_file is not None:
            # at start a broken file is the user's to fix: one line, the agent does not start
            self._entries, self._stamp = _read_tokens(tokens_file)

    @property
    def required(self) -> bool:
        return self._legacy is not None or self._file is not None

    def login(self, given: str | None) -> Login | None:
        """The login of a request's token; None: refused (401)."""
        if not self.required:
            return ANONYMOUS
        if not given:
            return None
        legacy = self._legacy is not None and hmac.compare_digest(given.encode(), self._legacy)
        entry = roles.match_token(given, self._current())
        if entry is not None:
            return Login(entry.role, entry.name)
        return Login(roles.LEGACY_ROLE, LEGACY_NAME) if legacy else None

    def _current(self) -> tuple[roles.TokenEntry, ...]:
        if self._file is None:
            return ()
        with self._lock:
            try:
                stat = self._file.stat()
                stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._entries, self._stamp = _read_tokens(self._file)
                    log.info("liveview: %s re-read, %d tokens", self._file, len(self._entries))
                except UserError as exc:
                    self._entries = ()  # fail closed: a revoked token must not live on
                    log.error("%s; none of its tokens is accepted until it is fixed", exc)
            return self._entries


def _read_tokens(path: Path) -> tuple[tuple[roles.TokenEntry, ...], tuple[int, int, int]]:
    key = "liveview.tokens_file"
    try:
        with path.open("rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read(1024 * 1024)
        return roles.parse_tokens(data.decode("utf-8")), (
            stat.st_mtime_ns,
            stat.st_size,
            stat.st_ino,
        )
    except OSError as exc:
        raise UserError(f"{key}: cannot read {path} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{key}: {path}: {exc}") from None


# -- HTTP ------------------------------------------------------------------------------------


class _LiveServer(BoundedHTTPServer):
    """The bounded server (ops/bounded_http.py) plus the stream slots and the stop flag that
    ends open MJPEG streams."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.stopping = threading.Event()
        super().__init__(address, handler, max_connections=MAX_CONNECTIONS, label="liveview")


def _handler(
    store: LiveStore,
    access: Access,
    lifecycle: LifecycleHandler | None,
    audit: AuditLog | None,
    shadows: ShadowReport | None,
) -> type[BaseHTTPRequestHandler]:
    page = PAGE.encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_S
        server: _LiveServer
        protocol_version = "HTTP/1.0"  # one request per connection: a slot is never idle

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the agent's log

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            login = self._login(url.query)
            if login is None:
                self._send(401, b"token required\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                return
            path = url.path
            if path == "/whoami.json":
                body = {"role": login.role, "name": login.name}
                body["permissions"] = list(roles.permissions(login.role))
                self._json(200, body)
                return
            route: Callable[[str], None] | None = None
            arg = ""
            if path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
                return
            if path == "/status.json":
                body = json.dumps(store.status(), allow_nan=False).encode()
                self._send(200, body, "application/json")
                return
            if path == "/shadow.json":
                report = shadows() if shadows is not None else NO_SHADOWS
                self._send(200, json.dumps(report, allow_nan=False).encode(), "application/json")
                return
            for prefix, suffix, fn in (
                ("/frame/", ".jpg", self._frame),
                ("/stream/", ".mjpg", self._stream),
            ):
                if path.startswith(prefix) and path.endswith(suffix):
                    arg = path[len(prefix) : -len(suffix)]
                    route = fn
            if route is None or arg not in store.cameras:
                self._send(404, b"not found\n", "text/plain")
                return
            route(arg)

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            login = self._login(url.query)
            if login is None:
                self._send(401, b"token required\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                return
            action = url.path.removeprefix("/action/")
            if not url.path.startswith("/action/") or action not in LIFECYCLE_ACTIONS:
                self._send(404, b"not found\n", "text/plain")
                return
            request = self._action_body()
            if isinstance(request, str):
                self._json(400, {"refused": request})
                return
            inspection, args = request
            who, where = login.name, self.client_address[0]
            if not roles.allows(login.role, action):
                reason = roles.refusal(login.role, action)
                what = {"role": login.role, "inspection": inspection, "args": args}
                _audit_refusal(audit, action, who, where, what, reason)
                log.warning("liveview: %s refused for %s (%s): %s", action, who, where, reason)
                self._json(403, {"refused": reason})
                return
            if lifecycle is None:
                self._json(503, {"refused": "this agent takes no lifecycle commands"})
                return
            try:
                reason = lifecycle(action, inspection, args, who, SOURCE)
            except Exception:
                log.exception("liveview: the lifecycle handler failed for %s", action)
                self._json(500, {"refused": "the agent failed to take it"})
                return
            if reason is not None:
                self._json(409, {"refused": reason})
                return
            self._json(200, {"accepted": True})

        def _action_body(self) -> tuple[str | None, dict[str, Any]] | str:
            """(inspection, the other arguments) from the JSON body, else why not. JSON only:
            a cross-site form cannot send it without the browser asking first."""
            if self.headers.get_content_type() != "application/json":
                return "send the arguments as application/json"
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return "Content-Length required"
            if not 0 <= length <= MAX_ACTION_BYTES:
                return f"at most {MAX_ACTION_BYTES} bytes of arguments"
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except (UnicodeDecodeError, ValueError):
                return "the arguments are not JSON"
            if not isinstance(body, dict):
                return "the arguments must be a JSON object"
            inspection = body.pop("inspection", None)
            if inspection is not None and not isinstance(inspection, str):
                return "inspection must be a string"
            args = {k: v for k, v in body.items() if v is not None}  # null: not given
            for key, value in args.items():
                if not isinstance(value, (str, int, float, bool)):
                    return f"{key} must be a string, number or boolean"
            return inspection, args

        def _login(self, query: str) -> Login | None:
            given = parse_qs(query).get("token", [""])[0]
            auth = self.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            return access.login(given)

        def _json(self, code: int, body: Mapping[str, Any]) -> None:
            self._send(code, json.dumps(body).encode(), "application/json")

        def _frame(self, camera: str) -> None:
            shot = store.jpeg(camera)
            if shot is None:
                self._send(404, b"no frame yet\n", "text/plain")
                return
            version, jpeg = shot
            self._send(200, jpeg, "image/jpeg", {"X-Frame-Version": str(version)})

        def _stream(self, camera: str) -> None:
            if not self.server.streams.acquire(blocking=False):
                self._send(503, b"too many streams\n", "text/plain", {"Retry-After": "5"})
                return
            try:
                self._stream_frames(camera)
            finally:
                self.server.streams.release()

        def _stream_frames(self, camera: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            sent = -1
            period = 1.0 / MAX_STREAM_FPS
            ends = time.monotonic() + MAX_STREAM_S
            while time.monotonic() < ends and not self.server.stopping.is_set():
                started = time.monotonic()
                if store.version(camera) != sent:
                    shot = store.jpeg(camera)
                    if shot is not None:
                        sent, jpeg = shot
                        # A client that stops reading makes this write time out (the
                        # socket's timeout): the thread ends, the slot is freed.
                        head = (
                            "--frame\r\nContent-Type: image/jpeg\r\n"
                            f"Content-Length: {len(jpeg)}\r\nX-Frame-Version: {sent}\r\n\r\n"
                        )
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                self.server.stopping.wait(max(0.0, period - (time.monotonic() - started)))

        def _send(
            self, code: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _audit_refusal(
    audit: AuditLog | None,
    action: str,
    who: str,
    where: str,
    what: Mapping[str, Any],
    reason: str,
) -> None:
    if audit is None:
        return
    try:
        audit.record(
            roles.audit_action(action),
            who=who,
            source=SOURCE,
            where=where,
            what=what,
            reason=reason,
            result="refused",
        )
    except (AuditUnavailable, ValueError) as exc:  # refused all the same
        log.error("liveview: could not audit a refused %s: %s", action, exc)


class LiveViewServer(HTTPService):
    """The page and its endpoints from a daemon thread, from start() until stop().
    `token`: the single legacy token (an engineer); `tokens_file`: one hashed token per line,
    each with its role; `lifecycle`: the agent's lifecycle_command; `audit`: where refusals
    are recorded; `shadows`: the agent's shadow_report."""

    key = "liveview.port"

    def __init__(
        self,
        store: LiveStore,
        host: str,
        port: int,
        token: str | None = None,
        *,
        tokens_file: Path | None = None,
        lifecycle: LifecycleHandler | None = None,
        audit: AuditLog | None = None,
        shadows: ShadowReport | None = None,
    ) -> None:
        super().__init__(host, port)
        self.store = store
        self.access = Access(token, tokens_file)
        self._lifecycle = lifecycle
        self._audit = audit
        self._shadows = shadows

    def _make_server(self) -> _LiveServer:
        handler = _handler(self.store, self.access, self._lifecycle, self._audit, self._shadows)
        return _LiveServer((self.host, self.port), handler)

    def start(self) -> None:
        super().start()
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        auth = " (token required)" if self.access.required else " (viewers only: no token)"
        log.info("live view on http://%s:%d/%s", shown, port, auth)

    def stop(self) -> None:
        if isinstance(self._server, _LiveServer):
            self._server.stopping.set()  # streams end at their next frame wait
        super().stop()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edge-agent live view</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#111;color:#ddd}
header{padding:8px 16px;background:#222;display:flex;gap:16px;align-items:baseline}
h1{font-size:16px;margin:0}#err{color:#f66}
main{display:flex;flex-wrap:wrap;gap:16px;padding:16px}
.cam{background:#1b1b1b;border:1px solid #333;border-radius:6px;padding:8px;width:560px}
.cam h2{font-size:15px;margin:0 0 6px}
.cam img{width:100%;background:#000;min-height:120px;display:block}
.v{font-weight:bold;padding:0 6px;border-radius:3px}
.OK{background:#264d26;color:#9f9}.NG{background:#5c1f1f;color:#f99}.ERROR{background:#554;color:#ff9}
table{border-collapse:collapse;width:100%;margin-top:6px}
td,th{padding:2px 6px;text-align:left;border-bottom:1px solid #2a2a2a}
td{font-variant-numeric:tabular-nums}
.stats{display:grid;grid-template-columns:repeat(4,1fr);gap:4px;margin-top:6px}
.stats div{background:#222;padding:3px 6px;border-radius:3px}.alarm{color:#f66;font-weight:bold}
.actions{margin-top:6px;display:flex;flex-wrap:wrap;gap:4px;align-items:center}
button{font:12px system-ui,sans-serif;background:#333;color:#ddd;border:1px solid #555;
border-radius:3px}
#shadows{display:flex;flex-wrap:wrap;gap:16px;padding:16px 16px 0}
.shadow{background:#1b1b24;border:1px solid #446;border-radius:6px;padding:8px;width:560px}
.shadow h2{font-size:15px;margin:0 0 6px}.shadow .off{color:#fc6;font-weight:bold}
.shadow td,.shadow th{text-align:right}.shadow .sub{color:#999;font-size:12px}
</style></head>
<body><header><h1>edge-agent live view</h1><span id="model"></span><span id="role"></span>
<span id="msg"></span><span id="err"></span></header>
<section id="shadows" hidden></section>
<main id="cams"></main>
<script>
"use strict";
const qs = new URLSearchParams(location.search);
const token = qs.get("token");
const poll = qs.has("poll");  // JPEG polling instead of MJPEG (proxies that buffer streams)
const auth = token ? "token=" + encodeURIComponent(token) : "";
const url = (p, extra) => p + "?" + [auth, extra || ""].filter(Boolean).join("&");
const cams = {};
let allowed = [];  // this token's permissions (/whoami.json); the server checks them again
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x, d) { return (typeof x === "number") ? x.toFixed(d) : "-"; }
function camera(id) {
  if (cams[id]) return cams[id];
  const box = el("section", {class: "cam", id: "cam-" + id});
  box.append(el("h2", {}, id));
  const img = el("img", {alt: "camera " + id, "data-camera": id});
  const line = el("div", {class: "last"});
  const stats = el("div", {class: "stats"});
  const table = el("table");
  table.append(el("thead"));
  table.tHead.innerHTML = "<tr><th>#</th><th>verdict</th><th>score / threshold</th>" +
    "<th>part</th><th>time</th><th>ms</th></tr>";
  const body = el("tbody");
  table.append(body);
  const actions = el("div", {class: "actions"});
  box.append(img, line, stats, actions, table);
  document.getElementById("cams").append(box);
  const c = cams[id] = {img, line, stats, body, actions, shown: -1, inspections: ""};
  if (!poll) {
    const stream = "/stream/" + encodeURIComponent(id) + ".mjpg";
    const src = () => { img.src = url(stream, "t=" + Date.now()); };
    img.onerror = () => setTimeout(src, 2000);  // stream ended or refused: reconnect
    src();
  }
  return c;
}
async function act(action, args) {
  const reason = prompt(action.replace("_", " ") + ": the reason, for the audit trail");
  if (reason === null) return;
  const headers = {"Content-Type": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  const msg = document.getElementById("msg");
  try {
    const r = await fetch("/action/" + action, {method: "POST", headers,
      body: JSON.stringify(Object.assign({reason}, args))});
    const answer = await r.json();
    msg.textContent = action + ": " + (answer.accepted ? "accepted" : "refused: " + answer.refused);
  } catch (e) { msg.textContent = action + ": failed (" + e.message + ")"; }
}
function button(action, label, args, ask) {
  const b = el("button", {"data-action": action}, label);
  b.onclick = () => {
    const extra = {};
    if (ask) { const v = prompt(ask); if (!v) return; extra[ask.split(" ")[0]] = v; }
    act(action, Object.assign(extra, args));
  };
  return b;
}
function actionButtons(c, ids) {
  const key = ids.join(",") + "|" + allowed.join(",");
  if (c.inspections === key) return;
  c.inspections = key;
  c.actions.replaceChildren();
  for (const i of ids) {
    const row = [["shadow_start", "shadow", "bundle (the candidate's folder)"],
      ["shadow_stop", "stop shadow"], ["promote", "promote"], ["rollback", "rollback"]]
      .filter(([a]) => allowed.includes(a))
      .map(([a, label, ask]) => button(a, label, {inspection: i}, ask));
    if (row.length) c.actions.append(el("span", {}, i + ":"), ...row);
  }
}
function verdictCell(v) { return el("span", {class: "v " + (v || "ERROR")}, v || "?"); }
function render(s) {
  document.getElementById("model").textContent = s.model_id ? "model " + s.model_id : "";
  for (const [id, st] of Object.entries(s.cameras)) {
    const c = camera(id);
    if (poll && st.version > 0 && st.version !== c.shown) {
      c.shown = st.version;
      c.img.src = url("/frame/" + encodeURIComponent(id) + ".jpg", "v=" + st.version);
    }
    c.line.replaceChildren();
    const l = st.last;
    c.line.dataset.sequence = l ? l.sequence : "";
    if (l) {
      c.line.append("last: #" + l.sequence + " ", verdictCell(l.verdict),
        " score " + fmt(l.score, 3) + " / " + fmt(l.threshold, 3) +
        (l.part_id ? " part " + l.part_id : "") + (l.error ? " " + l.error : "") +
        (l.recipe ? " recipe " + l.recipe : ""));
      if (l.inspections.length > 1) {
        const list = el("div", {class: "inspections"});
        for (const i of l.inspections) {
          const item = el("span", {class: "inspection", "data-inspection": i.id});
          item.append(i.id + " ", verdictCell(i.verdict), " " + fmt(i.score, 3) + " / " +
            fmt(i.threshold, 3) + (i.error ? " " + i.error : "") + "  ");
          list.append(item);
        }
        c.line.append(list);
      }
    } else c.line.append("waiting for the first frame");
    const d = st.drift;
    const drift = d ? (d.alarm ? "ALARM: " + d.reason : "ok, shift " + fmt(d.shift, 2) +
      ", NG rate " + fmt(d.ng_rate, 3) + " (" + d.frames + " frames)") : "off";
    c.stats.replaceChildren(
      el("div", {}, "OK " + st.counts.OK), el("div", {}, "NG " + st.counts.NG),
      el("div", {}, "ERROR " + st.counts.ERROR), el("div", {}, fmt(st.fps, 1) + " fps"),
      el("div", {}, "latency " + fmt(st.latency_ms, 1) + " ms"),
      el("div", {}, "in " + (st.frames_in ?? "-") + ", dropped " + (st.dropped ?? "-")),
      el("div", {class: d && d.alarm ? "alarm" : ""}, "drift " + drift));
    actionButtons(c, st.inspections || []);
    c.body.replaceChildren(...st.history.map(h => {
      const tr = el("tr", {class: "verdict", "data-verdict": h.verdict || ""});
      const td = x => { const t = el("td"); t.append(x); return t; };
      tr.append(td(String(h.sequence)), td(verdictCell(h.verdict)),
        td(fmt(h.score, 3) + " / " + fmt(h.threshold, 3)), td(h.part_id || ""),
        td(new Date(h.timestamp).toLocaleTimeString()), td(fmt(h.latency_ms, 1)));
      if (h.verdict === "NG" && h.reject_image && allowed.includes("confirm"))
        tr.append(td(button("confirm", "confirm defect", {entry: h.reject_image,
          inspection: (h.inspections[0] || {}).id})));
      return tr;
    }));
  }
}
function pct(r) { return (typeof r === "number") ? (100 * r).toFixed(1) + "%" : "-"; }
function grid(head, rows) {  // rows: [label, [cells], attrs per cell]
  const t = el("table");
  t.append(el("thead"));
  t.tHead.innerHTML = "<tr>" + head.map(h => "<th>" + h + "</th>").join("") + "</tr>";
  const body = el("tbody");
  for (const [label, cells] of rows) {
    const tr = el("tr");
    tr.append(el("th", {}, label), ...cells.map(([text, attrs]) => el("td", attrs, text)));
    body.append(tr);
  }
  t.append(body);
  return t;
}
function shadowBox(s, at) {  // one inspection's candidate against production
  const c = s.candidate || {};
  const box = el("div", {class: "shadow", "data-shadow": s.inspection, "data-state": s.state});
  box.append(el("h2", {}, "shadow " + s.inspection + " (recipe " + s.recipe + "): candidate " +
    c.model_id + ", " + s.state));
  box.append(el("div", {class: "sub"}, c.bundle + ", threshold " + fmt(c.threshold, 3) +
    "; report of " + new Date(at).toLocaleTimeString()));
  const figures = [
    ["frames", "compared " + s.frames],
    ["skipped", "skipped " + s.skipped + " (budget)"],
    ["false_rejects", "would-be false rejects " + s.false_rejects + " of " + s.passed +
      " passed (" + pct(s.false_reject_rate) + ")"],
    ["catches", "would-be catches " + s.catches + " of " + s.rejected + " rejected (" +
      pct(s.catch_rate) + ")"],
    ["disagreements", "disagreements " + s.disagreements + ", " + s.archived + " archived"],
    ["regression", "confirmed defects " + s.regression.confirmed + ", " +
      s.regression.missed + " would pass"]];
  const stats = el("div", {class: "stats"});
  stats.append(...figures.map(([k, text]) => el("div", {"data-figure": k}, text)));
  const verdicts = ["OK", "NG", "ERROR"];
  const matrix = grid(["production / candidate", ...verdicts], verdicts.map(p => [p,
    verdicts.map(q => [String(s.matrix[p][q]),
      {"data-cell": p + "-" + q, class: p !== q && s.matrix[p][q] ? "off" : ""}])]));
  const keys = ["p50", "p90", "p99", "max"];
  const scores = grid(["score", ...keys], ["production", "candidate"].map(who => [who,
    keys.map(k => [fmt((s.quantiles[who] || {})[k], 3), {}])]));
  box.append(stats, matrix, scores);
  return box;
}
function renderShadows(report) {
  const list = report.shadows || [];
  const box = document.getElementById("shadows");
  box.hidden = !list.length;
  box.replaceChildren(...list.map(s => shadowBox(s, report.timestamp)));
}
async function shadows() {
  try {
    const r = await fetch(url("/shadow.json"), {cache: "no-store"});
    if (r.ok) renderShadows(await r.json());
  } catch (e) { /* the status poll reports an unreachable agent */ }
  setTimeout(shadows, 2000);
}
async function whoami() {
  try {
    const r = await fetch(url("/whoami.json"), {cache: "no-store"});
    const w = await r.json();
    allowed = w.permissions;
    document.getElementById("role").textContent = w.name + " (" + w.role + ")";
  } catch (e) { allowed = []; }
}
async function tick() {
  try {
    const r = await fetch(url("/status.json"), {cache: "no-store"});
    if (!r.ok) throw new Error("status " + r.status);
    render(await r.json());
    document.getElementById("err").textContent = "";
  } catch (e) {
    document.getElementById("err").textContent = "agent unreachable (" + e.message + ")";
  }
  setTimeout(tick, 500);
}
whoami().then(() => { tick(); shadows(); });
</script></body></html>
"""
