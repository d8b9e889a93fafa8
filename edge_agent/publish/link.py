"""One camera's MQTT connection: paho client, network thread, reconnects and the trigger.

Each camera gets its own connection (client id ``<client_id>-<camera>``) because MQTT allows a
single last will per connection and every camera's ``status`` topic must turn ``offline`` when
the agent dies.

The link's thread owns its paho client, its Outbox (edge_agent/publish/outbox.py: the ordered
FIFO of unacknowledged verdicts over the spool) and runs paho's network I/O itself
(``loop_read``/``loop_write``/``loop_misc`` around its own ``select``), so no lock is shared
with paho's callbacks and nothing races. Other threads only append to an in-memory inbox
(bounded by ``INBOX_LIMIT``) and write one byte to a socket pair to wake the thread:
``submit`` never blocks on the network.

The link turns connection events into Outbox calls: CONNACK -> ``on_connect`` (after paho's own
queue of unacknowledged messages is dropped with ``drop_out_messages``, since the outbox
re-sends from its head), connection lost -> ``on_disconnect``, PUBACK (paho's ``on_publish``)
-> ``acknowledge``; each turn of the loop publishes ``next_to_send``. It also reconnects with
exponential back-off and jitter, classifies failures (refused: credentials, ACL, TLS
verification, which ``Publisher.start`` raises as UserError; unreachable: retried quietly),
reports the first outcome to ``Publisher.start``, re-sends the latest retained health after a
reconnect and subscribes to the trigger topic once a handler is set.

Like the outbox's memory, the inbox is not on disk: what it holds is lost if the process is
killed (a clean stop moves it to the spool).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.publish import contract, probe, pump
from edge_agent.publish.contract import OFFLINE, ONLINE, mark_delayed, parse_part_id
from edge_agent.publish.mqtt_settings import MqttSettings
from edge_agent.publish.outbox import Outbox
from edge_agent.publish.spool import Spool, SpoolRecord

log = logging.getLogger(__name__)

INBOX_LIMIT = 20_000
"""Verdicts handed over by the inference thread and not yet taken by the network thread."""
STOP_GRACE_S = 2.0
"""How long a stopping link waits for the PUBACK of ``offline`` and for the DISCONNECT."""
DRAIN_RETRY_MAX_S = 2.0
"""While stopping with verdicts waiting, the longest pause between connection attempts: a broker
back from a restart is found within seconds, not after the running back-off (up to
``mqtt.reconnect_max_s``), so that the stop delivers rather than spools."""
_TICK_S = 0.25

TriggerHandler = Callable[[str, str], None]
CommandHandler = Callable[[bytes], None]
"""Called with a command's payload on the link's network thread: keep it short (hand over)."""
LINE = "_line"
"""The name of the line's own link (part verdicts, recipe state and commands): camera ids
start with a letter or digit, so it cannot be one."""


class LinkState(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"  # CONNECT sent, no CONNACK yet
    UP = "up"
    CLOSING = "closing"  # our DISCONNECT sent while stopping: its end is not a lost connection


class OutcomeKind(enum.Enum):
    CONNECTED = "connected"
    REFUSED = "refused"  # a configuration problem: start() raises it
    UNREACHABLE = "unreachable"  # may heal by itself: retried with back-off


@dataclass(frozen=True)
class Outcome:
    """How a connection attempt ended."""

    kind: OutcomeKind
    message: str = ""
    hint: str = ""

    def describe(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class Backoff:
    """Exponential delay between connection attempts, with ±20 % jitter so that the links of
    several cameras (and agents) do not hit a restarted broker all at once."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.failures = 0
        self.next_attempt = 0.0
        """``time.monotonic()`` before which no attempt is made."""

    def schedule(self) -> None:
        delay = min(self.max_s, self.min_s * 2 ** min(self.failures, 20))
        self.failures += 1
        self.next_attempt = time.monotonic() + delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0

    def cap(self, delay_s: float) -> None:
        """No attempt later than ``delay_s`` from now."""
        self.next_attempt = min(self.next_attempt, time.monotonic() + delay_s)


class Link:
    """One camera's MQTT connection, network thread, outbox and counters."""

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
        self.spool = spool  # the link still syncs and closes it; its content is the outbox's
        self.verdict_topic = settings.topic(camera, contract.VERDICT)
        self.status_topic = settings.topic(camera, contract.STATUS)
        self.health_topic = settings.topic(camera, contract.HEALTH)
        self.trigger_topic = settings.topic(camera, contract.TRIGGER)
        if camera == LINE:  # the line's link: <prefix>/<line>/status is its will
            self.status_topic = contract.line_topic(settings.prefix, settings.line, contract.STATUS)
        self._label = f"MQTT {camera}"
        # Shared with other threads (guarded by _lock or single atomic assignments).
        self._lock = threading.Lock()
        self._inbox: deque[SpoolRecord] = deque()
        self._closed = False
        self._wakeup = pump.Wakeup()
        self._health: bytes | None = None
        self._handler: TriggerHandler | None = None
        self._commands: dict[str, CommandHandler] = {}
        self._stop_deadline: float | None = None
        self.first_outcome: Outcome | None = None
        self.first_event = threading.Event()
        self.start_reports_first_failure = False
        # Owned by the network thread.
        self.outbox = Outbox(spool, window=settings.inflight_window)
        self._state = LinkState.DOWN
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._ever_connected = False
        self._lost_at: float | None = None
        self._failure_logged = False
        self._refusal: str | None = None
        self._health_sent: bytes | None = None
        self._subscribed: set[str] = set()
        self._spool_full_logged = False
        self._reject_logged = False
        self._drained_logged = True
        # Counters (ints written by the network thread, read anywhere).
        self.rejected = 0  # inbox overflow or after stop; spool-full rejections are in spool
        self.reconnects = 0
        self.triggers_rejected = 0  # unusable trigger payloads (contract.parse_part_id)
        self._left: int | None = None  # set when the thread ends: verdicts left in the spool
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

    def on_command(self, topic: str, handler: CommandHandler) -> None:
        """Subscribe to ``topic`` (QoS 1) and call ``handler(payload)`` for each message on it
        that the broker did not keep (a retained command is an old one, not a new order)."""
        with self._lock:
            self._commands = {**self._commands, topic: handler}
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
        return self._state is LinkState.UP

    @property
    def undelivered(self) -> int:
        """Verdicts not acknowledged by the broker: the final count once the thread has ended,
        until then a reading of a moving figure (never too low to be safe: a thread that did
        not stop in time is still counted by what it holds)."""
        if self._left is not None:
            return self._left
        return len(self.outbox) + len(self._inbox)

    def stats(self) -> dict[str, Any]:
        box = self.outbox.stats()
        return {
            "published": box["published"],
            "delayed_published": box["delayed_published"],
            "spooled": box["spooled"],
            "pending": box["in_memory"] + len(self._inbox),
            "spool_dropped": box["spool_dropped"],
            "dropped": box["spool_dropped"] + self.rejected,
            "connected": self.connected,
            "reconnects": self.reconnects,
            "triggers_rejected": self.triggers_rejected,
        }

    def _wake(self) -> None:
        self._wakeup.set()

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
        client.drop_out_messages()  # the outbox re-sends from its head, in order
        self._state = LinkState.UP
        self._backoff.reset()
        self._failure_logged = False
        self.outbox.on_connect()
        self._health_sent = None
        self._subscribed = set()
        client.publish(self.status_topic, ONLINE, qos=contract.STATUS_QOS, retain=True)
        backlog = len(self.outbox)
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
        self._set_first(Outcome(OutcomeKind.CONNECTED))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        previous = self._state
        self._state = LinkState.DOWN
        self.outbox.on_disconnect()
        if previous is LinkState.CLOSING:
            return
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            self._connection_failed(
                Outcome(
                    OutcomeKind.REFUSED,
                    f"MQTT broker {self.settings.address} refused the connection: {refusal}",
                    "check mqtt.username / mqtt.password (or the client certificate) and the "
                    "broker's ACL",
                )
            )
        elif previous is LinkState.UP:
            self._lost_at = time.monotonic()
            self._backoff.schedule()
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
                self._protocol_mismatch()
                or Outcome(
                    OutcomeKind.UNREACHABLE,
                    f"MQTT broker {self.settings.address} closed the connection before accepting "
                    "it",
                    "is mqtt.tls right for this port, and does the listener require a client "
                    "certificate (mqtt.cert_file)?",
                )
            )

    def _on_publish(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        if not self.outbox.acknowledge(mid):
            return  # status, health, or behind an unacknowledged verdict
        if not self._drained_logged and not self.outbox:
            self._drained_logged = True
            log.info(
                "%s: spool drained (%d delayed verdict(s) sent so far)",
                self._label,
                self.outbox.delayed_published,
            )

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        # paho re-raises a callback's exception out of its loop and the link then drops the
        # connection (issue 29); the parsers refuse bad payloads themselves: the last resort.
        try:
            command = self._commands.get(message.topic)
            if command is not None:
                self._on_command(message, command)
            else:
                self._on_trigger(message)
        except Exception:
            self.triggers_rejected += 1
            log.exception("%s: ignored a message on %s that failed", self._label, message.topic)

    def _on_command(self, message: mqtt.MQTTMessage, handler: CommandHandler) -> None:
        if message.retain:
            log.warning("%s: ignored a retained command on %s", self._label, message.topic)
            return
        handler(message.payload)

    def _on_trigger(self, message: mqtt.MQTTMessage) -> None:
        handler = self._handler
        if handler is None or message.topic != self.trigger_topic:
            return
        if message.retain:  # an old trigger kept by the broker, not a new part
            log.warning("%s: ignored a retained trigger on %s", self._label, message.topic)
            return
        part_id = parse_part_id(message.payload)
        if part_id is None:
            self.triggers_rejected += 1
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
        if stopping and self._stop_now():
            return True
        if self._state is LinkState.DOWN:
            now = time.monotonic()
            if stopping:
                self._backoff.cap(DRAIN_RETRY_MAX_S)
            if now >= self._backoff.next_attempt:
                self._connect()
            else:
                self._wait(min(self._backoff.next_attempt - now, _TICK_S))
            return False
        if self._state is LinkState.UP:
            self._send_pending()
        self._io(_TICK_S)
        return False

    def _stop_now(self) -> bool:
        """While stopping: is the flush over? Verdicts still waiting keep it going (connecting
        again if the link is down) until the deadline; the last health (the final counts, set
        just before the stop) goes out too, but only over a link that is up: it is retained
        state, not worth a reconnect."""
        assert self._stop_deadline is not None
        if time.monotonic() >= self._stop_deadline:
            return True
        if self.outbox or self._inbox:
            return False
        health_due = self._health is not None and self._health is not self._health_sent
        return self._state is not LinkState.UP or not health_due

    def _take_inbox(self) -> None:
        with self._lock:
            records = list(self._inbox)
            self._inbox.clear()
        for record in records:
            self._enqueue(record)

    def _enqueue(self, record: SpoolRecord) -> None:
        accepted = self.outbox.enqueue(record)
        # One line when the spool fills up and one when it accepts again, not one per verdict.
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

    def _send_pending(self) -> None:
        self._send_health()
        self._subscribe_if_wanted()
        for item in self.outbox.next_to_send():
            record = item.record
            payload = mark_delayed(record.payload) if item.delayed else record.payload
            info = self.client.publish(record.topic, payload, qos=record.qos, retain=record.retain)
            # paho writes at once, so a dead socket surfaces here and _on_disconnect has
            # already reset the window: the rest of the batch must not be registered.
            if info.rc != mqtt.MQTT_ERR_SUCCESS or not self.outbox.connected:
                break
            self.outbox.sent(info.mid)

    def _send_health(self) -> None:
        health = self._health
        if health is not None and health is not self._health_sent:
            self.client.publish(self.health_topic, health, qos=contract.HEALTH_QOS, retain=True)
            self._health_sent = health

    def _subscribe_if_wanted(self) -> None:
        wanted = set(self._commands)
        if self._handler is not None:
            wanted.add(self.trigger_topic)
        for topic in sorted(wanted - self._subscribed):
            self.client.subscribe(topic, qos=contract.TRIGGER_QOS)
            self._subscribed.add(topic)

    def _connect(self) -> None:
        self._state = LinkState.CONNECTING
        address = self.settings.address
        tls_hint = "check mqtt.ca_file (the CA that signed the broker's certificate), "
        tls_hint += "mqtt.host (must match the certificate) and mqtt.tls_insecure"
        try:
            self.client.reconnect()
            return
        except ssl.SSLCertVerificationError as err:
            detail = f"{err.reason}: {err.verify_message}" if err.verify_message else str(err)
            outcome = Outcome(
                OutcomeKind.REFUSED,
                f"TLS connection to MQTT broker {address} failed: {detail}",
                tls_hint,
            )
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError) as err:
            # The transport went away mid-handshake: a restarting broker, or a port without
            # TLS; only the latter is a refusal.
            outcome = self._protocol_mismatch() or Outcome(
                OutcomeKind.UNREACHABLE, f"MQTT broker {address} closed the TLS handshake ({err})"
            )
        except (ssl.SSLError, ssl.CertificateError) as err:
            detail = getattr(err, "reason", None) or str(err)
            outcome = Outcome(
                OutcomeKind.REFUSED,
                f"TLS connection to MQTT broker {address} failed: {detail}",
                tls_hint,
            )
        except (OSError, ValueError) as err:
            detail = getattr(err, "strerror", None) or str(err) or type(err).__name__
            # A reset (not a refusal: something listens) is what a TLS handshake to a plain
            # listener gets; probe before calling it an outage.
            hung_up = isinstance(err, (ConnectionResetError, BrokenPipeError))
            outcome = (self._protocol_mismatch() if hung_up else None) or Outcome(
                OutcomeKind.UNREACHABLE, f"MQTT broker {address} is not reachable ({detail})"
            )
        self._state = LinkState.DOWN
        self._connection_failed(outcome)

    def _protocol_mismatch(self) -> Outcome | None:
        """After the broker closed a connection it never accepted: a REFUSED outcome if the
        port speaks the other protocol than mqtt.tls says (a configuration error, not an
        outage), else None."""
        s = self.settings
        if s.tls and probe.speaks_plain_mqtt(s.host, s.port):
            return Outcome(
                OutcomeKind.REFUSED,
                f"mqtt.tls is true but MQTT broker {s.address} answers without TLS",
                "set mqtt.tls: false, or use the broker's TLS listener (usually port 8883)",
            )
        if not s.tls and probe.speaks_tls(s.host, s.port):
            return Outcome(
                OutcomeKind.REFUSED,
                f"mqtt.tls is false but MQTT broker {s.address} speaks TLS",
                "set mqtt.tls: true (with mqtt.ca_file), or use its plain port (usually 1883)",
            )
        return None

    def _connection_failed(self, outcome: Outcome) -> None:
        """Schedule a retry and log the first failure of a streak (start() logs the very
        first one itself)."""
        self._backoff.schedule()
        first_ever = self.first_outcome is None
        self._set_first(outcome)
        if self._failure_logged:
            log.debug("%s: %s", self._label, outcome.message)
            return
        self._failure_logged = True
        if first_ever and self.start_reports_first_failure:
            return
        level = logging.ERROR if outcome.kind is OutcomeKind.REFUSED else logging.WARNING
        log.log(
            level,
            "%s: %s; retrying with back-off up to %g s",
            self._label,
            outcome.describe(),
            self.settings.reconnect_max_s,
        )

    def _set_first(self, outcome: Outcome) -> None:
        if self.first_outcome is None:
            self.first_outcome = outcome
            self.first_event.set()

    def _io(self, timeout: float) -> None:
        if not pump.pump(self.client, self._wakeup, timeout):
            self._force_down()

    def _wait(self, timeout: float) -> None:
        pump.wait(self._wakeup, timeout)

    def _force_down(self) -> None:
        """Drop the connection after an unexpected state; the FIFO is kept."""
        pump.drop_socket(self.client)
        if self._state is not LinkState.DOWN:
            self._on_disconnect(self.client, None, None, "connection reset", None)

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
        self._take_inbox()
        self.outbox.spill()
        if self._state is LinkState.UP:
            self._say_offline()
        try:
            self.spool.close()
        except OSError as err:
            log.error("%s: closing the spool failed: %s", self._label, err)
        left = self._left = len(self.outbox)
        if left:
            log.info(
                "%s: stopped; %d verdict(s) kept in the spool %s for the next run",
                self._label,
                left,
                self.spool.directory,
            )
        self._wakeup.close()

    def _say_offline(self) -> None:
        """Publish retained ``offline``, wait for its PUBACK briefly, then DISCONNECT."""
        info = self.client.publish(self.status_topic, OFFLINE, qos=contract.STATUS_QOS, retain=True)
        deadline = time.monotonic() + STOP_GRACE_S
        while (
            not info.is_published() and self._state is LinkState.UP and time.monotonic() < deadline
        ):
            self._io(0.05)
        if self._state is LinkState.UP:
            self._state = LinkState.CLOSING
            self.client.disconnect()
            while self.client.socket() is not None and time.monotonic() < deadline:
                self._io(0.05)
        self._state = LinkState.DOWN
