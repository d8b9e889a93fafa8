"""A small MQTT 3.1.1 broker in pure Python, for ``edge-agent demo`` on machines without Mosquitto.

It is good enough for a demo and for tests with paho-mqtt clients on loopback, not for production:
no authentication (username/password are accepted and ignored), no TLS, no persistence, and
clean sessions only.

Supported (MQTT 3.1.1, protocol level 4; the older 3.1 ``MQIsdp`` level 3 is accepted too):

* CONNECT/CONNACK, anonymous; a second connection with the same client id takes over (the old
  one is closed and its will published). Keepalive is honoured loosely: a client silent for more
  than 1.5 x its keepalive is dropped (and its will published).
* SUBSCRIBE/SUBACK with ``+`` and ``#`` wildcards (topics starting with ``$`` are not matched by
  a leading wildcard), UNSUBSCRIBE/UNSUBACK. The granted QoS is at most 1; an invalid filter gets
  the failure code 0x80.
* PUBLISH QoS 0, 1 and 2 from clients (PUBACK; PUBREC/PUBREL/PUBCOMP for QoS 2, forwarded once on
  first receipt). Delivery to subscribers at min(publish QoS, granted QoS), so never QoS 2; QoS 1
  deliveries carry packet ids, and their PUBACKs are accepted. A client with several matching
  subscriptions gets one copy at the highest of their QoS.
* Retained messages: the last one per topic is stored (an empty payload clears it) and sent with
  the retain flag to each new matching subscription; live deliveries have the retain flag off.
* Last will: published when a connection ends without DISCONNECT (socket closed or broken,
  keepalive expired, protocol error, session takeover). Not published when the broker stops.
* PINGREQ/PINGRESP, DISCONNECT.

Not supported: persistent sessions (``clean_session=False`` is treated as clean and CONNACK
says "no session present"), re-delivery of unacknowledged QoS 1 messages, QoS 2 delivery to
subscribers, MQTT 5 (answered with CONNACK "unacceptable protocol version"), websockets, TLS.
Protocol violations close the connection.

Design: one daemon thread runs a ``selectors`` loop over non-blocking sockets; all broker state
is touched only by that thread, so no locks are needed. ``stop()`` wakes it through a socketpair.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from edge_agent.errors import UserError

log = logging.getLogger(__name__)

MAX_PACKET_BYTES = 64 * 1024 * 1024
"""Largest packet accepted (MQTT allows 256 MiB; a demo never comes near this)."""
MAX_OUTBUF_BYTES = 64 * 1024 * 1024
"""A subscriber that falls this far behind is disconnected rather than filling memory."""
CONNECT_TIMEOUT_S = 10.0
"""A connection must send CONNECT within this time."""
_TICK_S = 0.25
_RECV_BYTES = 65536

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

_PROTOCOLS = {("MQTT", 4), ("MQIsdp", 3)}
_CONNACK_BAD_PROTOCOL = 1
_CONNACK_BAD_CLIENT_ID = 2
_SUBACK_FAILURE = 0x80
_MAX_GRANTED_QOS = 1


class ProtocolError(Exception):
    """The client broke the protocol; its connection is closed."""


@dataclass(frozen=True)
class Message:
    """An application message as the broker routes it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(eq=False)
class _Client:
    """One TCP connection and, once CONNECT was accepted, its MQTT session."""

    sock: socket.socket
    peer: str
    opened: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    client_id: str | None = None
    keepalive_s: int = 0
    last_rx: float = 0.0
    will: Message | None = None
    subscriptions: dict[str, tuple[list[str], int]] = field(default_factory=dict)
    inflight: set[int] = field(default_factory=set)
    """Packet ids of QoS 1 deliveries not acknowledged yet (so ids are not reused)."""
    qos2_received: set[int] = field(default_factory=set)
    """Packet ids of QoS 2 publishes forwarded, waiting for PUBREL."""
    next_pid: int = 1
    closing: bool = False
    """Send what is queued (e.g. a refusing CONNACK), then close."""
    closed: bool = False
    writing: bool = False

    @property
    def connected(self) -> bool:
        return self.client_id is not None

    @property
    def label(self) -> str:
        return f"{self.client_id!r} ({self.peer})" if self.connected else self.peer


# ------------------------------------------------------------------------------ wire format


def encode_length(n: int) -> bytes:
    """MQTT "remaining length": 7 bits per byte, least significant first, high bit = more."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def split_packet(buf: bytearray | bytes) -> tuple[int, bytes, int] | None:
    """``(first byte, body, bytes used)`` for the first whole packet in ``buf``, or None if more
    bytes are needed. Raises ProtocolError for a malformed or oversized length."""
    length, multiplier = 0, 1
    for i in range(1, 5):
        if i >= len(buf):
            return None
        byte = buf[i]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("remaining length longer than 4 bytes")
    if length > MAX_PACKET_BYTES:
        raise ProtocolError(f"packet of {length} bytes is over {MAX_PACKET_BYTES}")
    start = i + 1
    end = start + length
    if len(buf) < end:
        return None
    return buf[0], bytes(buf[start:end]), end


def packet(first: int, body: bytes = b"") -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def encode_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def encode_publish(msg: Message, pid: int | None, dup: bool = False) -> bytes:
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (msg.qos << 1) | (1 if msg.retain else 0)
    body = encode_string(msg.topic)
    if msg.qos:
        assert pid is not None
        body += pid.to_bytes(2, "big")
    return packet(first, body + msg.payload)


class _Reader:
    """Reads the fields of one packet body; running past the end is a protocol error."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise ProtocolError("packet shorter than its fields")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            text = self.binary().decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc
        if "\0" in text:
            raise ProtocolError("string contains U+0000")
        return text

    def rest(self) -> bytes:
        chunk = self.body[self.pos :]
        self.pos = len(self.body)
        return chunk

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.body)


# ------------------------------------------------------------------------------ topics


def valid_topic(topic: str) -> bool:
    """A topic name to publish to: non-empty, no wildcards."""
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_filter(topic_filter: str) -> bool:
    """A subscription filter: ``+`` fills a whole level, ``#`` is a whole last level."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_matches(filter_levels: list[str], topic_levels: list[str]) -> bool:
    """Whether a filter (split on ``/``) matches a topic name (split on ``/``)."""
    if topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False  # MQTT 4.7.2: $-topics (e.g. $SYS) are not matched by leading wildcards
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


# ------------------------------------------------------------------------------ broker


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker on a background thread (see the module docstring).

    ``port=0`` picks a free port; read it from ``.port`` after ``start()``. Use as a context
    manager or call ``start()``/``stop()``. A stopped broker cannot be started again.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = False
        self._clients: set[_Client] = set()
        self._by_id: dict[str, _Client] = {}
        self._retained: dict[str, Message] = {}
        self._auto_ids = itertools.count(1)

    # -------------------------------------------------------------- public API

    @property
    def port(self) -> int:
        """The port listened on (known once started)."""
        if self._port is None:
            raise RuntimeError("EmbeddedBroker.port is known only after start()")
        return self._port

    def start(self) -> None:
        """Listen, then serve on a daemon thread. Raises UserError if the address is unusable."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("a stopped EmbeddedBroker cannot be started again")
            if self._thread is not None:
                return
            self._listener = self._listen()
            self._port = self._listener.getsockname()[1]
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel.register(self._listener, selectors.EVENT_READ, "listener")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(
                target=self._serve, name=f"mqtt-broker:{self._port}", daemon=True
            )
            self._thread.start()
        log.debug("embedded MQTT broker listening on %s:%d", self.host, self._port)

    def stop(self) -> None:
        """Close every client and the listening socket, and end the thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            assert self._wake_w is not None
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        thread.join(timeout=5.0)
        if thread.is_alive():
            log.warning("embedded MQTT broker thread did not stop within 5 s")
        log.debug("embedded MQTT broker on port %s stopped", self._port)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- setup and loop

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets a new broker reuse the port while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise UserError(
                f"embedded MQTT broker: cannot listen on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}"
            ) from exc
        return sock

    def _serve(self) -> None:
        assert self._sel is not None
        try:
            while not self._stopping:
                for key, mask in self._sel.select(timeout=_TICK_S):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._on_event(key.data, mask)
                self._check_timeouts(time.monotonic())
        except Exception:
            log.exception("embedded MQTT broker failed")
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)

    def _shutdown(self) -> None:
        for client in list(self._clients):
            self._close(client)
        assert self._sel is not None
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
        self._sel.close()

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the clients we have
                log.warning("embedded MQTT broker: accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(sock=sock, peer=f"{addr[0]}:{addr[1]}", opened=time.monotonic())
            self._clients.add(client)
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_event(self, client: _Client, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not client.closing:
                self._on_readable(client)
            if mask & selectors.EVENT_WRITE and not client.closed:
                self._on_writable(client)
        except ProtocolError as exc:
            log.debug("MQTT client %s broke the protocol: %s", client.label, exc)
            self._drop(client)
        except OSError as exc:
            log.debug("MQTT client %s connection lost: %s", client.label, exc)
            self._drop(client)
        except Exception:  # a bug must cost one connection, not the whole broker
            log.exception("embedded MQTT broker: error serving %s", client.label)
            self._drop(client)

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            log.debug("MQTT client %s closed the connection without DISCONNECT", client.label)
            self._drop(client)
            return
        client.last_rx = time.monotonic()
        client.inbuf += data
        while not (client.closed or client.closing):
            found = split_packet(client.inbuf)
            if found is None:
                return
            first, body, used = found
            del client.inbuf[:used]
            self._handle(client, first, body)

    def _on_writable(self, client: _Client) -> None:
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            del client.out[:sent]
        if not client.out:
            if client.closing:
                self._close(client)
            else:
                self._set_writing(client, False)

    def _send(self, client: _Client, data: bytes) -> None:
        if client.closed:
            return
        client.out += data
        if len(client.out) > MAX_OUTBUF_BYTES:
            log.warning("MQTT client %s is too slow; disconnecting it", client.label)
            self._drop(client)
            return
        self._set_writing(client, True)

    def _set_writing(self, client: _Client, on: bool) -> None:
        if client.writing != on and not client.closed:
            client.writing = on
            self._update_events(client)

    def _update_events(self, client: _Client) -> None:
        # A closing connection is no longer read, so it must not wake the loop for reading.
        assert self._sel is not None
        events = 0 if client.closing else selectors.EVENT_READ
        if client.writing:
            events |= selectors.EVENT_WRITE
        self._sel.modify(client.sock, events, client)

    def _check_timeouts(self, now: float) -> None:
        for client in list(self._clients):
            if client.closed:
                continue
            if not client.connected:
                if now - client.opened > CONNECT_TIMEOUT_S:
                    log.debug("MQTT connection from %s sent no CONNECT; closing", client.peer)
                    self._close(client)
            elif client.keepalive_s and now - client.last_rx > 1.5 * client.keepalive_s:
                log.debug("MQTT client %s keepalive expired", client.label)
                self._drop(client)

    # -------------------------------------------------------------- connection end

    def _drop(self, client: _Client) -> None:
        """End a connection that did not DISCONNECT: close it, then publish its will."""
        will, client.will = client.will, None
        self._close(client)
        if will is not None:
            self._route(will)

    def _close(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        assert self._sel is not None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        if client.out:  # best effort, e.g. the CONNACK before a protocol error in the same read
            with contextlib.suppress(OSError):
                client.sock.send(client.out)
        client.sock.close()
        self._clients.discard(client)
        if client.client_id is not None and self._by_id.get(client.client_id) is client:
            del self._by_id[client.client_id]
            log.debug("MQTT client %s disconnected", client.label)

    # -------------------------------------------------------------- packets

    def _handle(self, client: _Client, first: int, body: bytes) -> None:
        kind, flags = first >> 4, first & 0x0F
        if not client.connected:
            if kind != CONNECT:
                raise ProtocolError(f"first packet is type {kind}, not CONNECT")
            self._on_connect(client, _Reader(body))
            return
        if kind in (SUBSCRIBE, UNSUBSCRIBE, PUBREL) and flags != 0x2:
            raise ProtocolError(f"packet type {kind} with flags {flags:#x}")
        reader = _Reader(body)
        if kind == PUBLISH:
            self._on_publish(client, flags, reader)
        elif kind == PUBACK:
            client.inflight.discard(reader.u16())
        elif kind == PUBREL:
            pid = reader.u16()
            client.qos2_received.discard(pid)
            self._send(client, packet(PUBCOMP << 4, pid.to_bytes(2, "big")))
        elif kind == SUBSCRIBE:
            self._on_subscribe(client, reader)
        elif kind == UNSUBSCRIBE:
            self._on_unsubscribe(client, reader)
        elif kind == PINGREQ:
            self._send(client, packet(PINGRESP << 4))
        elif kind == DISCONNECT:  # _close, not _drop: the will is discarded
            log.debug("MQTT client %s sent DISCONNECT", client.label)
            self._close(client)
        elif kind in (PUBREC, PUBCOMP):
            pass  # we never send QoS 2, so these can only be stray; harmless
        else:
            raise ProtocolError(f"unexpected packet type {kind}")

    def _on_connect(self, client: _Client, r: _Reader) -> None:
        name, level = r.string(), r.u8()
        if (name, level) not in _PROTOCOLS:
            if name not in ("MQTT", "MQIsdp"):
                raise ProtocolError(f"unknown protocol name {name!r}")
            log.debug("MQTT client %s: protocol level %d refused", client.peer, level)
            self._refuse(client, _CONNACK_BAD_PROTOCOL)
            return
        flags = r.u8()
        if flags & 0x01:
            raise ProtocolError("CONNECT reserved flag set")
        clean, has_will = bool(flags & 0x02), bool(flags & 0x04)
        will_qos, will_retain = (flags >> 3) & 0x03, bool(flags & 0x20)
        has_password, has_user = bool(flags & 0x40), bool(flags & 0x80)
        if will_qos == 3 or (not has_will and (will_qos or will_retain)):
            raise ProtocolError("CONNECT will flags inconsistent")
        if has_password and not has_user and level == 4:
            raise ProtocolError("CONNECT password without user name")
        keepalive = r.u16()
        client_id = r.string()
        will = None
        if has_will:
            topic, payload = r.string(), r.binary()
            if not valid_topic(topic):
                raise ProtocolError(f"invalid will topic {topic!r}")
            will = Message(topic, payload, will_qos, will_retain)
        if has_user:
            r.string()  # accepted and ignored: anonymous broker, and never logged
        if has_password:
            r.binary()
        if not client_id:
            if not clean:
                self._refuse(client, _CONNACK_BAD_CLIENT_ID)
                return
            client_id = f"auto-{next(self._auto_ids)}"
        old = self._by_id.get(client_id)
        if old is not None:
            log.debug("MQTT client %s taken over by a new connection", old.label)
            self._drop(old)
        client.client_id, client.keepalive_s, client.will = client_id, keepalive, will
        client.last_rx = time.monotonic()
        self._by_id[client_id] = client
        log.debug("MQTT client %s connected (keepalive %d s)", client.label, keepalive)
        # Session present is always 0: sessions are never kept (clean sessions only).
        self._send(client, packet(CONNACK << 4, bytes([0, 0])))

    def _refuse(self, client: _Client, code: int) -> None:
        """Send a refusing CONNACK, then close once it is written."""
        self._send(client, packet(CONNACK << 4, bytes([0, code])))
        if not client.closed:
            client.closing = True
            self._update_events(client)

    def _on_publish(self, client: _Client, flags: int, r: _Reader) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        topic = r.string()
        if not valid_topic(topic):
            raise ProtocolError(f"PUBLISH to invalid topic {topic!r}")
        pid = r.u16() if qos else 0
        if qos and pid == 0:
            raise ProtocolError("PUBLISH with packet id 0")
        msg = Message(topic, r.rest(), qos, retain)
        if qos == 1:
            self._send(client, packet(PUBACK << 4, pid.to_bytes(2, "big")))
        elif qos == 2:
            self._send(client, packet(PUBREC << 4, pid.to_bytes(2, "big")))
            if pid in client.qos2_received:
                return  # a re-send before PUBREL: already forwarded once
            client.qos2_received.add(pid)
        self._route(msg)

    def _on_subscribe(self, client: _Client, r: _Reader) -> None:
        pid = r.u16()
        if r.at_end:
            raise ProtocolError("SUBSCRIBE without topic filters")
        codes: list[int] = []
        granted: list[tuple[list[str], int]] = []
        while not r.at_end:
            topic_filter, requested = r.string(), r.u8()
            if requested > 2:
                raise ProtocolError(f"SUBSCRIBE with requested QoS byte {requested:#x}")
            if not valid_filter(topic_filter):
                codes.append(_SUBACK_FAILURE)
                continue
            qos = min(requested, _MAX_GRANTED_QOS)
            levels = topic_filter.split("/")
            client.subscriptions[topic_filter] = (levels, qos)
            granted.append((levels, qos))
            codes.append(qos)
        self._send(client, packet(SUBACK << 4, pid.to_bytes(2, "big") + bytes(codes)))
        for levels, qos in granted:
            for msg in list(self._retained.values()):
                if filter_matches(levels, msg.topic.split("/")):
                    self._deliver(client, Message(msg.topic, msg.payload, min(qos, msg.qos), True))

    def _on_unsubscribe(self, client: _Client, r: _Reader) -> None:
        pid = r.u16()
        if r.at_end:
            raise ProtocolError("UNSUBSCRIBE without topic filters")
        while not r.at_end:
            client.subscriptions.pop(r.string(), None)
        self._send(client, packet(UNSUBACK << 4, pid.to_bytes(2, "big")))

    # -------------------------------------------------------------- routing

    def _route(self, msg: Message) -> None:
        """Store (or clear) a retained message and forward to every matching subscriber."""
        if msg.retain:
            if msg.payload:
                self._retained[msg.topic] = msg
            else:
                self._retained.pop(msg.topic, None)
        levels = msg.topic.split("/")
        for client in list(self._by_id.values()):
            best = -1
            for filter_levels, qos in client.subscriptions.values():
                if qos > best and filter_matches(filter_levels, levels):
                    best = qos
            if best >= 0:
                self._deliver(client, Message(msg.topic, msg.payload, min(msg.qos, best), False))

    def _deliver(self, client: _Client, msg: Message) -> None:
        pid = None
        if msg.qos:
            pid = self._next_pid(client)
            if pid is None:
                log.warning("MQTT client %s has 65535 unacknowledged messages", client.label)
                self._drop(client)
                return
            client.inflight.add(pid)
        self._send(client, encode_publish(msg, pid))

    @staticmethod
    def _next_pid(client: _Client) -> int | None:
        if len(client.inflight) >= 65535:
            return None
        while True:
            pid = client.next_pid
            client.next_pid = pid % 65535 + 1
            if pid not in client.inflight:
                return pid
