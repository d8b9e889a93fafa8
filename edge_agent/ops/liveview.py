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
reconnects). With a token set, every request needs it (`?token=` or `Authorization: Bearer`).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from edge_agent.decide.decision import Decision, Thresholds
from edge_agent.decide.overlay import heatmap_overlay
from edge_agent.images import to_bgr
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
        "recipe",
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


# -- HTTP ------------------------------------------------------------------------------------


class _LiveServer(BoundedHTTPServer):
    """The bounded server (ops/bounded_http.py) plus the stream slots and the stop flag that
    ends open MJPEG streams."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.stopping = threading.Event()
        super().__init__(address, handler, max_connections=MAX_CONNECTIONS, label="liveview")


def _handler(store: LiveStore, token: str | None) -> type[BaseHTTPRequestHandler]:
    expected = token.encode() if token is not None else None
    page = PAGE.encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_S
        server: _LiveServer
        protocol_version = "HTTP/1.0"  # one request per connection: a slot is never idle

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the agent's log

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if not self._authorized(url.query):
                self._send(401, b"token required\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                return
            path = url.path
            route: Callable[[str], None] | None = None
            arg = ""
            if path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
                return
            if path == "/status.json":
                body = json.dumps(store.status(), allow_nan=False).encode()
                self._send(200, body, "application/json")
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

        def _authorized(self, query: str) -> bool:
            if expected is None:
                return True
            given = parse_qs(query).get("token", [""])[0]
            auth = self.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            return hmac.compare_digest(given.encode(), expected)

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


class LiveViewServer(HTTPService):
    """The page and its endpoints from a daemon thread, from start() until stop()."""

    key = "liveview.port"

    def __init__(self, store: LiveStore, host: str, port: int, token: str | None = None) -> None:
        super().__init__(host, port)
        self.store = store
        self._token = token

    def _make_server(self) -> _LiveServer:
        return _LiveServer((self.host, self.port), _handler(self.store, self._token))

    def start(self) -> None:
        super().start()
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        auth = " (token required)" if self._token is not None else ""
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
</style></head>
<body><header><h1>edge-agent live view</h1><span id="model"></span><span id="err"></span></header>
<main id="cams"></main>
<script>
"use strict";
const qs = new URLSearchParams(location.search);
const token = qs.get("token");
const poll = qs.has("poll");  // JPEG polling instead of MJPEG (proxies that buffer streams)
const auth = token ? "token=" + encodeURIComponent(token) : "";
const url = (p, extra) => p + "?" + [auth, extra || ""].filter(Boolean).join("&");
const cams = {};
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
  box.append(img, line, stats, table);
  document.getElementById("cams").append(box);
  const c = cams[id] = {img, line, stats, body, shown: -1};
  if (!poll) {
    const stream = "/stream/" + encodeURIComponent(id) + ".mjpg";
    const src = () => { img.src = url(stream, "t=" + Date.now()); };
    img.onerror = () => setTimeout(src, 2000);  // stream ended or refused: reconnect
    src();
  }
  return c;
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
    c.body.replaceChildren(...st.history.map(h => {
      const tr = el("tr", {class: "verdict", "data-verdict": h.verdict || ""});
      const td = x => { const t = el("td"); t.append(x); return t; };
      tr.append(td(String(h.sequence)), td(verdictCell(h.verdict)),
        td(fmt(h.score, 3) + " / " + fmt(h.threshold, 3)), td(h.part_id || ""),
        td(new Date(h.timestamp).toLocaleTimeString()), td(fmt(h.latency_ms, 1)));
      return tr;
    }));
  }
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
tick();
</script></body></html>
"""
