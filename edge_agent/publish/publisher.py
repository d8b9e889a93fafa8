"""MQTT publishing of verdicts, health and status (contract v1: README.md, "MQTT contract v1").

Design: one MQTT connection and one network thread per camera (``_Link``). MQTT allows a
single last will per connection, and every camera's ``status`` topic must turn ``offline`` when
the agent dies, so each camera gets its own connection (client id ``<client_id>-<camera>``).

Each link's thread owns its spool and its paho client and runs paho's network I/O itself
(``loop_read``/``loop_write``/``loop_misc`` around its own ``select``), so no lock is shared
with paho's callbacks and nothing races. The inference thread only appends to an in-memory
inbox and writes one byte to wake the thread: ``publish_verdict`` never blocks.

Ordering: the verdicts waiting to be sent form one FIFO, ``spool (on disk, oldest) ++ memory``.
While the link is connected and the spool is empty, verdicts stay in memory. When the connection
drops (or the backlog grows past ``MEMORY_BACKLOG``), everything not yet acknowledged, in-flight
messages included, moves to the spool, and new verdicts queue behind it. Messages are sent from
the head of the FIFO with at most ``inflight_window`` unacknowledged, and removed only when their
PUBACK arrives (paho's ``on_publish``). After a reconnect, paho's own queue of unacknowledged
messages is dropped (``drop_out_messages``) and everything is re-sent from the head of the FIFO,
so the order per camera is kept, at the cost of possible duplicates (QoS 1 semantics).
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.errors import UserError
from edge_agent.publish import contract
from edge_agent.publish.contract import OFFLINE, ONLINE, encode_json, mark_delayed, parse_part_id
from edge_agent.publish.spool import Spool, SpoolRecord

log = logging.getLogger(__name__)

MEMORY_BACKLOG = 1000
"""Unsent verdicts kept in memory while connected; beyond that they go to the spool."""
INBOX_LIMIT = 20_000
"""Verdicts handed over by the inference thread and not yet taken by the network thread."""
MAX_INFLIGHT_WINDOW = 10_000
_TICK_S = 0.25
_STOP_GRACE_S = 2.0
_FORBIDDEN_IN_NAMES = set("/+#\0")

TriggerHandler = Callable[[str, str], None]


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection, topic and spool settings (config section ``mqtt``)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "edge-agent"
    prefix: str = "edge-agent"
    line: str = "line1"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = False
    tls_insecure: bool = False
    keepalive_s: int = 30
    spool_dir: Path = Path("/var/lib/edge-agent/spool")
    spool_max_messages: int = 100_000
    spool_max_bytes: int = 256 * 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    inflight_window: int = 64

    def validate(self) -> None:
        """Raise UserError naming the first bad key."""
        if not self.host:
            raise UserError("mqtt.host is empty")
        if not 0 < self.port < 65536:
            raise UserError(f"mqtt.port must be 1..65535, got {self.port}")
        for key in ("client_id", "line"):
            _check_name(f"mqtt.{key}", getattr(self, key))
        for level in self.prefix.split("/"):  # a prefix may have levels: "plant/hall2"
            _check_name("mqtt.prefix level", level)
        if self.password is not None and self.username is None:
            raise UserError("mqtt.password is set but mqtt.username is not")
        if (self.ca_file or self.cert_file or self.key_file or self.tls_insecure) and not self.tls:
            raise UserError(
                "mqtt.ca_file/cert_file/key_file/tls_insecure need mqtt.tls: true "
                "(and usually mqtt.port: 8883)"
            )
        if self.key_file and not self.cert_file:
            raise UserError("mqtt.key_file is set but mqtt.cert_file is not")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise UserError(f"mqtt.{key}: {path} is not a file")
        if self.keepalive_s < 5:
            raise UserError(f"mqtt.keepalive_s must be at least 5, got {self.keepalive_s}")
        if self.spool_max_messages < 1 or self.spool_max_bytes < 4096:
            raise UserError("mqtt.spool_max_messages must be >= 1 and spool_max_bytes >= 4096")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise UserError("mqtt.reconnect_min_s must be > 0 and <= mqtt.reconnect_max_s")
        if not 1 <= self.inflight_window <= MAX_INFLIGHT_WINDOW:
            # MQTT message ids are 16 bits; status and health need ids of their own.
            raise UserError(f"mqtt.inflight_window must be 1..{MAX_INFLIGHT_WINDOW}")

    def topic(self, camera: str, leaf: str) -> str:
        return contract.topic(self.prefix, self.line, camera, leaf)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _check_name(key: str, value: str) -> None:
    if not value or _FORBIDDEN_IN_NAMES & set(value) or value in (".", ".."):
        raise UserError(f"{key} {value!r} must be non-empty, not '.'/'..', without / + # or NUL")


def build_ssl_context(settings: MqttSettings) -> ssl.SSLContext:
    """A verifying client context from the settings; UserError naming the bad file."""
    ca = str(settings.ca_file) if settings.ca_file else None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (ssl.SSLError, OSError) as err:
        raise UserError(
            f"mqtt.ca_file {settings.ca_file}: not a PEM CA certificate ({err})"
        ) from err
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file:
        try:
            # The callback stops OpenSSL from prompting on a terminal for an encrypted key.
            context.load_cert_chain(
                str(settings.cert_file),
                str(settings.key_file) if settings.key_file else None,
                password=lambda: b"",
            )
        except (ssl.SSLError, OSError) as err:
            raise UserError(
                f"mqtt.cert_file/key_file {settings.cert_file}: cannot load the client "
                f"certificate and key (wrong format, mismatch or encrypted key): {err}"
            ) from err
    if settings.tls_insecure:
        context.check_hostname = False  # the chain is still verified
    return context


@dataclass
class _InFlight:
    mid: int
    delayed: bool
    acked: bool = False


@dataclass(frozen=True)
class _Outcome:
    kind: str  # "connected" | "refused" | "unreachable"
    message: str = ""
    hint: str = ""

    def describe(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class _Link:
    """One camera's MQTT connection, network thread, spool and counters."""

    def __init__(
        self,
        settings: MqttSettings,
        camera: str,
        spool: Spool,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.settings = settings
        self._tls_context = tls_context
        self.camera = camera
        self.spool = spool
        self.verdict_topic = settings.topic(camera, contract.VERDICT)
        self.status_topic = settings.topic(camera, contract.STATUS)
        self.health_topic = settings.topic(camera, contract.HEALTH)
        self.trigger_topic = settings.topic(camera, contract.TRIGGER)
        self._label = f"MQTT {camera}"
        # Shared with other threads (guarded by _lock or single atomic assignments).
        self._lock = threading.Lock()
        self._inbox: deque[SpoolRecord] = deque()
        self._closed = False
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._health: bytes | None = None
        self._handler: TriggerHandler | None = None
        self._stop_deadline: float | None = None
        self.first_outcome: _Outcome | None = None
        self.first_event = threading.Event()
        self.start_reports_first_failure = False
        # Owned by the network thread.
        self._mem: deque[SpoolRecord] = deque()
        self._inflight: deque[_InFlight] = deque()
        self._by_mid: dict[int, _InFlight] = {}
        self._state = "down"  # down | connecting | up
        self._next_attempt = 0.0
        self._failures = 0
        self._ever_connected = False
        self._lost_at: float | None = None
        self._failure_logged = False
        self._refusal: str | None = None
        self._health_sent: bytes | None = None
        self._subscribed = False
        self._spool_full_logged = False
        self._reject_logged = False
        self._drained_logged = True
        # Counters (ints written by the network thread, read anywhere).
        self.published = 0
        self.delayed_published = 0
        self.rejected = 0  # inbox overflow or after stop; spool-full rejections are in spool
        self.reconnects = 0
        self.client = self._make_client()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{camera}", daemon=True)

    # ------------------------------------------------------------------ other threads

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: SpoolRecord) -> None:
        """Queue a verdict for the network thread (never blocks beyond a short lock)."""
        with self._lock:
            if self._closed or len(self._inbox) >= INBOX_LIMIT:
                self.rejected += 1
                first = not self._reject_logged
                self._reject_logged = True
            else:
                self._inbox.append(record)
                first = self._reject_logged = False
        if first:
            why = "after stop()" if self._closed else "the network thread is not keeping up"
            log.error("%s: verdict rejected (%s); counted in stats 'dropped'", self._label, why)
        self._wake()

    def set_health(self, payload: bytes) -> None:
        self._health = payload
        self._wake()

    def set_handler(self, handler: TriggerHandler) -> None:
        self._handler = handler
        self._wake()

    def request_stop(self, deadline: float) -> None:
        self._stop_deadline = deadline
        self._wake()

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._state == "up"

    def stats(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "delayed_published": self.delayed_published,
            "spooled": len(self.spool),
            "pending": len(self._mem) + len(self._inbox),
            "spool_dropped": self.spool.dropped,
            "dropped": self.spool.dropped + self.rejected,
            "connected": self.connected,
            "reconnects": self.reconnects,
        }

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        # A full buffer (BlockingIOError) means the thread is being woken anyway.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ paho client

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{s.client_id}-{self.camera}",
            clean_session=True,  # stale triggers must not be replayed after an outage
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages = 0  # our window limits it; paho must not queue on its own
        client.max_queued_messages = 0
        client.connect_timeout = 5.0
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
            if s.tls_insecure:
                client.tls_insecure_set(True)
        client.will_set(self.status_topic, OFFLINE, qos=contract.STATUS_QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            return  # the broker closes the socket; paho then calls _on_disconnect
        client.drop_out_messages()  # we re-send from our own FIFO, in order
        self._state = "up"
        self._failures = 0
        self._failure_logged = False
        self._inflight.clear()
        self._by_mid.clear()
        self._health_sent = None
        self._subscribed = False
        client.publish(self.status_topic, ONLINE, qos=contract.STATUS_QOS, retain=True)
        backlog = len(self.spool) + len(self._mem)
        if self._ever_connected:
            self.reconnects += 1
            outage = time.monotonic() - self._lost_at if self._lost_at else 0.0
            log.info(
                "%s: reconnected to %s after %.1f s; %d verdict(s) to send",
                self._label,
                self.settings.address,
                outage,
                backlog,
            )
        else:
            log.info(
                "%s: connected to %s; %d verdict(s) to send",
                self._label,
                self.settings.address,
                backlog,
            )
        self._ever_connected = True
        self._drained_logged = backlog == 0
        self._set_first(_Outcome("connected"))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        previous = self._state
        self._state = "down"
        self._inflight.clear()
        self._by_mid.clear()
        self._spill_memory()
        if previous == "closing":
            return
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            self._connection_failed(
                _Outcome(
                    "refused",
                    f"MQTT broker {self.settings.address} refused the connection: {refusal}",
                    "check mqtt.username / mqtt.password (or the client certificate) and the "
                    "broker's ACL",
                )
            )
        elif previous == "up":
            self._lost_at = time.monotonic()
            self._schedule_retry()
            if self._stop_deadline is None:
                log.warning(
                    "%s: connection to %s lost (%s); verdicts go to the spool %s",
                    self._label,
                    self.settings.address,
                    reason,
                    self.spool.directory,
                )
        else:
            self._connection_failed(
                _Outcome(
                    "unreachable",
                    f"MQTT broker {self.settings.address} closed the connection before accepting "
                    "it",
                    "is mqtt.tls right for this port, and does the listener require a client "
                    "certificate (mqtt.cert_file)?",
                )
            )

    def _on_publish(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        entry = self._by_mid.pop(mid, None)
        if entry is None:
            return  # status or health
        entry.acked = True
        done = delayed = 0
        while self._inflight and self._inflight[0].acked:
            delayed += self._inflight.popleft().delayed
            done += 1
        if not done:
            return
        from_spool = min(done, len(self.spool))
        if from_spool:
            self.spool.pop(from_spool)
        for _ in range(done - from_spool):
            self._mem.popleft()
        self.published += done
        self.delayed_published += delayed
        if not self._drained_logged and not self.spool and not self._mem:
            self._drained_logged = True
            log.info(
                "%s: spool drained (%d delayed verdict(s) sent so far)",
                self._label,
                self.delayed_published,
            )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        handler = self._handler
        if handler is None or message.topic != self.trigger_topic:
            return
        if message.retain:  # an old trigger kept by the broker, not a new part
            log.warning("%s: ignored a retained trigger on %s", self._label, message.topic)
            return
        part_id = parse_part_id(message.payload)
        if part_id is None:
            log.warning(
                "%s: ignored a trigger with an unusable payload (%d bytes)",
                self._label,
                len(message.payload),
            )
            return
        try:
            handler(self.camera, part_id)
        except Exception:
            log.exception("%s: trigger handler failed for part %r", self._label, part_id)

    # ------------------------------------------------------------------ network thread

    def _run(self) -> None:
        errors = 0
        while True:
            try:
                if self._step():
                    break
                errors = 0
            except Exception:
                # A bug must not end publishing for months: log, drop the connection, go on.
                errors += 1
                if errors == 1:
                    log.exception("%s: unexpected error in the network thread", self._label)
                with contextlib.suppress(Exception):
                    self._force_down()
                if self._stop_deadline is not None:
                    break
                self._wait(min(1.0 * errors, 10.0))
        try:
            self._shutdown()
        except Exception:
            log.exception("%s: error while stopping", self._label)

    def _step(self) -> bool:
        """One turn of the loop; True when it is time to shut down."""
        self._take_inbox()
        self.spool.sync_if_due()
        stopping = self._stop_deadline is not None
        if stopping and (
            self._state != "up"
            or time.monotonic() >= self._stop_deadline
            or not (self.spool or self._mem or self._inbox)
        ):
            return True
        if self._state == "down":
            now = time.monotonic()
            if now >= self._next_attempt:
                self._connect()
            else:
                self._wait(min(self._next_attempt - now, _TICK_S))
            return False
        if self._state == "up":
            self._send_pending()
        self._io(_TICK_S)
        return False

    def _take_inbox(self) -> None:
        with self._lock:
            records = list(self._inbox)
            self._inbox.clear()
        for record in records:
            self._enqueue(record)

    def _enqueue(self, record: SpoolRecord) -> None:
        if self._state == "up" and not self.spool and len(self._mem) < MEMORY_BACKLOG:
            self._mem.append(record)
            return
        self._spill_memory()
        if self._mem:  # the spool is full and older verdicts still wait in memory
            self.spool.dropped += 1
            accepted = False
        else:
            accepted = self.spool.append(record)
        if not accepted and not self._spool_full_logged:
            self._spool_full_logged = True
            log.error(
                "%s: spool full (%d messages, %d bytes); verdicts are rejected and "
                "counted until it drains",
                self._label,
                len(self.spool),
                self.spool.bytes,
            )
        elif accepted and self._spool_full_logged:
            self._spool_full_logged = False
            log.info(
                "%s: spool accepts verdicts again (%d rejected so far)",
                self._label,
                self.spool.dropped,
            )

    def _spill_memory(self) -> None:
        """Move unacknowledged in-memory verdicts to the spool tail (they are its newest)."""
        while self._mem and self.spool.append(self._mem[0], count_rejection=False):
            self._mem.popleft()

    def _send_pending(self) -> None:
        self._send_health()
        self._subscribe_if_wanted()
        start = len(self._inflight)
        n_spool = len(self.spool)
        end = min(self.settings.inflight_window, n_spool + len(self._mem))
        if start >= end:
            return
        batch: list[tuple[SpoolRecord, bool]] = []
        if start < n_spool:
            batch += [(r, True) for r in self.spool.peek(start, end - start)]
        batch += [(self._mem[i - n_spool], False) for i in range(start + len(batch), end)]
        for record, delayed in batch:
            payload = mark_delayed(record.payload) if delayed else record.payload
            info = self.client.publish(record.topic, payload, qos=record.qos, retain=record.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # the connection just dropped; _on_disconnect resets the window
            entry = _InFlight(info.mid, delayed)
            self._inflight.append(entry)
            self._by_mid[info.mid] = entry

    def _send_health(self) -> None:
        health = self._health
        if health is not None and health is not self._health_sent:
            self.client.publish(self.health_topic, health, qos=contract.HEALTH_QOS, retain=True)
            self._health_sent = health

    def _subscribe_if_wanted(self) -> None:
        if self._handler is not None and not self._subscribed:
            self.client.subscribe(self.trigger_topic, qos=contract.TRIGGER_QOS)
            self._subscribed = True

    def _connect(self) -> None:
        self._state = "connecting"
        address = self.settings.address
        tls_hint = "check mqtt.ca_file (the CA that signed the broker's certificate), "
        tls_hint += "mqtt.host (must match the certificate) and mqtt.tls_insecure"
        try:
            self.client.reconnect()
            return
        except ssl.SSLCertVerificationError as err:
            detail = f"{err.reason}: {err.verify_message}" if err.verify_message else str(err)
            outcome = _Outcome(
                "refused", f"TLS connection to MQTT broker {address} failed: {detail}", tls_hint
            )
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError) as err:
            # The transport went away mid-handshake (a restarting broker): not a refusal.
            outcome = _Outcome(
                "unreachable", f"MQTT broker {address} closed the TLS handshake ({err})"
            )
        except (ssl.SSLError, ssl.CertificateError) as err:
            detail = getattr(err, "reason", None) or str(err)
            outcome = _Outcome(
                "refused", f"TLS connection to MQTT broker {address} failed: {detail}", tls_hint
            )
        except (OSError, ValueError) as err:
            detail = getattr(err, "strerror", None) or str(err) or type(err).__name__
            outcome = _Outcome("unreachable", f"MQTT broker {address} is not reachable ({detail})")
        self._state = "down"
        self._connection_failed(outcome)

    def _connection_failed(self, outcome: _Outcome) -> None:
        """Schedule a retry and log the first failure of a streak (start() logs the very
        first one itself)."""
        self._schedule_retry()
        first_ever = self.first_outcome is None
        self._set_first(outcome)
        if self._failure_logged:
            log.debug("%s: %s", self._label, outcome.message)
            return
        self._failure_logged = True
        if first_ever and self.start_reports_first_failure:
            return
        level = logging.ERROR if outcome.kind == "refused" else logging.WARNING
        log.log(
            level,
            "%s: %s; retrying with back-off up to %g s",
            self._label,
            outcome.describe(),
            self.settings.reconnect_max_s,
        )

    def _schedule_retry(self) -> None:
        s = self.settings
        delay = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(self._failures, 20))
        self._failures += 1
        self._next_attempt = time.monotonic() + delay * random.uniform(0.8, 1.2)

    def _set_first(self, outcome: _Outcome) -> None:
        if self.first_outcome is None:
            self.first_outcome = outcome
            self.first_event.set()

    def _io(self, timeout: float) -> None:
        sock = self.client.socket()
        if sock is None:
            self._force_down()
            return
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        wlist = [sock] if self.client.want_write() else []
        readable, writable, _ = select.select(
            [sock, self._wake_r], wlist, [], 0 if pending else timeout
        )
        if self._wake_r in readable:
            self._drain_wake()
        if sock in readable or pending:
            self.client.loop_read()
        if sock in writable and self.client.socket() is not None:
            self.client.loop_write()
        if self.client.socket() is not None:
            self.client.loop_misc()

    def _wait(self, timeout: float) -> None:
        readable, _, _ = select.select([self._wake_r], [], [], max(timeout, 0.0))
        if readable:
            self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._wake_pending = False

    def _force_down(self) -> None:
        """Drop the connection after an unexpected state; the FIFO is kept."""
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if self._state != "down":
            self._on_disconnect(self.client, None, None, "connection reset", None)

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
        self._take_inbox()
        self._spill_memory()
        if self._state == "up":
            self._say_offline()
        try:
            self.spool.close()
        except OSError as err:
            log.error("%s: closing the spool failed: %s", self._label, err)
        left = len(self.spool) + len(self._mem)
        if left:
            log.info(
                "%s: stopped; %d verdict(s) kept in the spool %s for the next run",
                self._label,
                left,
                self.spool.directory,
            )
        self._wake_r.close()
        self._wake_w.close()

    def _say_offline(self) -> None:
        """Publish retained ``offline``, wait for its PUBACK briefly, then DISCONNECT."""
        info = self.client.publish(self.status_topic, OFFLINE, qos=contract.STATUS_QOS, retain=True)
        deadline = time.monotonic() + _STOP_GRACE_S
        while not info.is_published() and self._state == "up" and time.monotonic() < deadline:
            self._io(0.05)
        if self._state == "up":
            self._state = "closing"
            self.client.disconnect()
            while self.client.socket() is not None and time.monotonic() < deadline:
                self._io(0.05)
        self._state = "down"


_STAT_KEYS = (
    "published",
    "delayed_published",
    "spooled",
    "pending",
    "spool_dropped",
    "dropped",
    "reconnects",
)


class Publisher:
    """Verdicts, health and status of several cameras over MQTT, with store and forward.

    See the README ("MQTT contract v1") for topics and payloads. Thread-safe: ``publish_*``
    may be called from any thread and never block on the network.
    """

    def __init__(self, settings: MqttSettings, cameras: Sequence[str]) -> None:
        settings.validate()
        cameras = list(cameras)
        if not cameras:
            raise UserError("no cameras configured for MQTT publishing")
        for camera in cameras:
            _check_name("camera id", camera)
        if len(set(cameras)) != len(cameras):
            raise UserError(f"camera ids must be unique, got {cameras}")
        self.settings = settings
        self.cameras = cameras
        self._tls_context = build_ssl_context(settings) if settings.tls else None
        self._links: dict[str, _Link] = {}
        self._handler: TriggerHandler | None = None
        self._started = False
        self._stopped = False

    def start(self, connect_timeout_s: float = 5.0) -> None:
        """Open the spools, connect in the background and wait up to the timeout for the broker.

        Raises UserError if the broker refuses (bad credentials, not authorised, TLS failure).
        If it is merely unreachable, logs one warning and returns: verdicts are spooled and the
        links keep reconnecting with back-off.
        """
        if self._started:
            raise RuntimeError("Publisher.start() called twice")
        self._started = True
        s = self.settings
        n = len(self.cameras)
        spools: list[Spool] = []
        try:
            for camera in self.cameras:
                spools.append(
                    Spool(
                        Path(s.spool_dir) / camera,
                        max_messages=max(1, s.spool_max_messages // n),
                        max_bytes=max(4096, s.spool_max_bytes // n),
                    )
                )
        except BaseException:
            for spool in spools:
                spool.close()
            raise
        for camera, spool in zip(self.cameras, spools, strict=True):
            link = _Link(s, camera, spool, self._tls_context)
            link.start_reports_first_failure = True
            if self._handler is not None:
                link.set_handler(self._handler)
            self._links[camera] = link
        for link in self._links.values():
            link.start()
        deadline = time.monotonic() + connect_timeout_s
        for link in self._links.values():
            link.first_event.wait(max(0.0, deadline - time.monotonic()))
        for link in self._links.values():
            link.start_reports_first_failure = False
        outcomes = [link.first_outcome for link in self._links.values()]
        refused = next((o for o in outcomes if o is not None and o.kind == "refused"), None)
        if refused is not None:
            self.stop(timeout_s=0.0)
            raise UserError(refused.describe())
        if all(o is not None and o.kind == "connected" for o in outcomes):
            return
        why = next(
            (o.describe() for o in outcomes if o is not None and o.kind != "connected"),
            f"MQTT broker {s.address} did not answer within {connect_timeout_s:g} s",
        )
        log.warning("%s; verdicts are spooled under %s and sent when it is back", why, s.spool_dir)

    def publish_verdict(self, camera: str, verdict: Mapping[str, Any]) -> None:
        """Queue a verdict (QoS 1, not retained) on ``<prefix>/<line>/<camera>/verdict``.

        Never blocks. ``delayed`` is set to false here and to true if the verdict waited in the
        spool. Raises KeyError for an unknown camera, TypeError for a value JSON cannot hold.
        """
        link = self._link(camera)
        payload = encode_json({**verdict, "delayed": False})
        link.submit(
            SpoolRecord(
                link.verdict_topic,
                payload,
                qos=contract.VERDICT_QOS,
                retain=False,
                created=time.time(),
            )
        )

    def publish_health(self, camera: str, health: Mapping[str, Any]) -> None:
        """Retained QoS 0 ``health``; only the latest is kept (re-sent after a reconnect)."""
        self._link(camera).set_health(encode_json(health))

    def set_trigger_handler(self, handler: TriggerHandler) -> None:
        """Call ``handler(camera, part_id)`` for each message on ``.../<camera>/trigger``.

        Runs on the camera's network thread: keep it short (hand over to a queue).
        """
        self._handler = handler
        for link in self._links.values():
            link.set_handler(handler)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Flush what the broker acknowledges within ``timeout_s``, keep the rest on disk,
        publish retained ``offline`` and disconnect cleanly. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + max(0.0, timeout_s)
        for link in self._links.values():
            link.request_stop(deadline)
        for link in self._links.values():
            remaining = deadline - time.monotonic() + _STOP_GRACE_S + 1.0
            if not link.join(max(0.1, remaining)):
                log.error("MQTT %s: network thread did not stop in time", link.camera)

    @property
    def stats(self) -> dict[str, Any]:
        """Totals over cameras, plus ``cameras``: the same per camera."""
        per = {camera: link.stats() for camera, link in self._links.items()}
        total: dict[str, Any] = {key: sum(p[key] for p in per.values()) for key in _STAT_KEYS}
        total["connected"] = bool(per) and all(p["connected"] for p in per.values())
        total["cameras"] = per
        return total

    def _link(self, camera: str) -> _Link:
        link = self._links.get(camera)
        if link is None:
            if not self._started:
                raise RuntimeError("Publisher.start() has not been called")
            raise KeyError(f"unknown camera {camera!r} (configured: {self.cameras})")
        return link
