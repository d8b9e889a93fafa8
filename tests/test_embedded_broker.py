"""The embedded MQTT broker, exercised by real paho-mqtt clients (and raw sockets) on loopback."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.errors import UserError
from edge_agent.tools.embedded_broker import (
    EmbeddedBroker,
    ProtocolError,
    encode_length,
    filter_matches,
    split_packet,
    valid_filter,
)

WAIT_S = 5.0


class Client:
    """A paho client running its own network thread, collecting every message it receives."""

    def __init__(self, port: int, client_id: str = "", will: tuple | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self.mqtt = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
        )
        if will is not None:
            self.mqtt.will_set(*will)
        self.mqtt.on_connect = lambda *_a: self.connected.set()
        self.mqtt.on_disconnect = lambda *_a: self.disconnected.set()
        self.mqtt.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.mqtt.on_subscribe = lambda _c, _u, mid, _r, _p: self._ack(mid)
        self.mqtt.on_unsubscribe = lambda _c, _u, mid, _r, _p: self._ack(mid)
        self.port = port

    def _ack(self, mid: int) -> None:
        self._acks.setdefault(mid, threading.Event()).set()

    def start(self) -> Client:
        self.mqtt.connect("127.0.0.1", self.port, keepalive=30)
        self.mqtt.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"
        return self

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        _, mid = self.mqtt.subscribe(topic_filter, qos)
        assert self._acks.setdefault(mid, threading.Event()).wait(WAIT_S), "no SUBACK"

    def unsubscribe(self, topic_filter: str) -> None:
        _, mid = self.mqtt.unsubscribe(topic_filter)
        assert self._acks.setdefault(mid, threading.Event()).wait(WAIT_S), "no UNSUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def take(self, n: int) -> list[mqtt.MQTTMessage]:
        return [self.messages.get(timeout=WAIT_S) for _ in range(n)]

    def take_until(self, topic: str) -> list[mqtt.MQTTMessage]:
        """Messages up to and including the first one on ``topic`` (a sentinel: anything sent
        before it by the same publisher has been routed by then)."""
        got = []
        while True:
            msg = self.messages.get(timeout=WAIT_S)
            got.append(msg)
            if msg.topic == topic:
                return got

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def client(broker: EmbeddedBroker) -> Iterator:
    made: list[Client] = []

    def make(client_id: str = "", will: tuple | None = None) -> Client:
        c = Client(broker.port, client_id, will).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ------------------------------------------------------------------------------ raw MQTT


def raw_connect(
    port: int, client_id: str = "raw", keepalive: int = 30, will: tuple | None = None, level=4
) -> bytes:
    """A CONNECT packet built by hand (independent of paho)."""

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    flags = 0x02
    payload = s(client_id.encode())
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += s(topic.encode()) + s(message)
    body = s(b"MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big") + payload
    return bytes([0x10]) + encode_length(len(body)) + body


def raw_publish(topic: str, payload: bytes, qos: int = 0, pid: int = 1) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += pid.to_bytes(2, "big")
    body += payload
    return bytes([0x30 | qos << 1]) + encode_length(len(body)) + body


def raw_subscribe(topic_filter: str, qos: int = 1, pid: int = 1) -> bytes:
    body = pid.to_bytes(2, "big") + len(topic_filter).to_bytes(2, "big")
    body += topic_filter.encode() + bytes([qos])
    return bytes([0x82]) + encode_length(len(body)) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One packet, decoded independently of the broker's parser."""
    sock.settimeout(WAIT_S)
    first = recv_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = recv_exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return first, recv_exactly(sock, length)


def assert_closed_by_broker(sock: socket.socket) -> None:
    sock.settimeout(WAIT_S)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b"", "broker sent data instead of closing"


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(("pub_qos", "sub_qos"), [(0, 1), (1, 1), (1, 0)])
def test_pubsub_keeps_order_of_200_messages(client, pub_qos: int, sub_qos: int) -> None:
    sub = client("sub")
    sub.subscribe("line/cam/verdict", qos=sub_qos)
    pub = client("pub")
    infos = [pub.mqtt.publish("line/cam/verdict", str(i).encode(), qos=pub_qos) for i in range(200)]
    got = sub.take(200)
    assert [m.payload for m in got] == [str(i).encode() for i in range(200)]
    assert {m.qos for m in got} == {min(pub_qos, sub_qos)}
    assert not any(m.retain for m in got)
    for info in infos:  # QoS 1: each publish got its PUBACK
        info.wait_for_publish(WAIT_S)
        assert info.is_published()


def test_wildcards_match_only_their_topics(client) -> None:
    plus, hash_, everything = client("plus"), client("hash"), client("all")
    plus.subscribe("f/+/temp")
    hash_.subscribe("f/#")
    everything.subscribe("#")
    pub = client("pub")
    for topic in ("f/a/temp", "f/a/b/temp", "f", "g/a/temp", "f/a/hum", "$SYS/x", "f/end/temp"):
        pub.mqtt.publish(topic, topic.encode(), qos=1)
    assert [m.topic for m in plus.take_until("f/end/temp")] == ["f/a/temp", "f/end/temp"]
    assert [m.topic for m in hash_.take_until("f/end/temp")] == [
        "f/a/temp",
        "f/a/b/temp",
        "f",
        "f/a/hum",
        "f/end/temp",
    ]
    assert [m.topic for m in everything.take_until("f/end/temp")] == [
        "f/a/temp",
        "f/a/b/temp",
        "f",
        "g/a/temp",
        "f/a/hum",
        "f/end/temp",
    ]  # no $SYS/x: leading wildcards do not match $-topics

    hash_.unsubscribe("f/#")
    hash_.subscribe("end")
    pub.mqtt.publish("f/a/temp", b"after", qos=1)
    pub.mqtt.publish("end", b"", qos=1)
    assert [m.topic for m in hash_.take_until("end")] == ["end"]


def test_overlapping_subscriptions_deliver_one_copy_at_highest_qos(client) -> None:
    sub = client("sub")
    sub.subscribe("a/#", qos=1)
    sub.subscribe("a/+", qos=0)
    pub = client("pub")
    pub.mqtt.publish("a/b", b"x", qos=1)
    pub.mqtt.publish("a/end", b"", qos=1)
    got = sub.take_until("a/end")
    assert [(m.topic, m.qos) for m in got] == [("a/b", 1), ("a/end", 1)]


def test_split_packet_lengths() -> None:
    assert split_packet(b"") is None and split_packet(b"\x30") is None
    assert split_packet(b"\x30\x80\x80\x80") is None  # length not complete yet
    assert split_packet(b"\x30\x03ab") is None  # body not complete yet
    assert split_packet(b"\x30\x03abcEXTRA") == (0x30, b"abc", 5)
    assert split_packet(b"\xc0\x00\xc0\x00") == (0xC0, b"", 2)
    body = b"z" * 16384
    assert split_packet(b"\x30\x80\x80\x01" + body) == (0x30, body, 4 + 16384)
    with pytest.raises(ProtocolError):
        split_packet(b"\x30\x80\x80\x80\x80\x00")  # 5 length bytes, even for length 0
    with pytest.raises(ProtocolError):
        split_packet(b"\x30\xff\xff\xff\x7f")  # 256 MiB: over MAX_PACKET_BYTES


def test_topic_filter_rules() -> None:
    def match(f: str, t: str) -> bool:
        return filter_matches(f.split("/"), t.split("/"))

    assert match("a/#", "a") and match("a/#", "a/b/c") and match("#", "a/b")
    assert match("a/+/c", "a/b/c") and match("+", "a") and match("+/+", "/x")
    assert not match("a/+", "a/b/c") and not match("a/+/c", "a/c") and not match("a/b", "a")
    assert not match("+/x", "$SYS/x") and match("$SYS/#", "$SYS/x")
    assert all(valid_filter(f) for f in ("#", "a/+/b", "+", "a/#", "/"))
    assert not any(valid_filter(f) for f in ("", "a#", "a/#/b", "a+", "a/b+/c"))


def test_retained_message_for_late_subscriber_and_cleared_by_empty(client) -> None:
    pub = client("pub")
    pub.publish("r/a", b"v1", qos=1, retain=True)
    pub.publish("r/a", b"v2", qos=1, retain=True)  # replaces v1
    pub.publish("r/b", b"b", qos=0, retain=True)
    pub.publish("done", b"x", qos=1, retain=True)

    late = client("late")
    late.subscribe("r/+")
    late.subscribe("done")  # its retained message comes after those for r/+
    got = late.take_until("done")
    assert sorted((m.topic, m.payload, m.qos, m.retain) for m in got[:-1]) == [
        ("r/a", b"v2", 1, True),
        ("r/b", b"b", 0, True),
    ]
    pub.publish("r/a", b"live", qos=1, retain=True)
    live = late.take(1)[0]
    assert (live.payload, live.retain) == (b"live", False)  # live delivery: retain flag off

    pub.publish("r/a", b"", qos=1, retain=True)  # clears r/a
    assert late.take(1)[0].payload == b""  # still delivered to current subscribers
    later = client("later")
    later.subscribe("r/+")
    later.subscribe("done")
    assert [m.topic for m in later.take_until("done")] == ["r/b", "done"]


def test_last_will_when_paho_socket_dies(client, broker: EmbeddedBroker) -> None:
    watcher = client("watcher")
    watcher.subscribe("status/#")
    dying = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="dying")
    dying.will_set("status/dying", b"offline", qos=1, retain=True)
    dying.connect("127.0.0.1", broker.port)
    deadline = time.monotonic() + WAIT_S
    while not dying.is_connected() and time.monotonic() < deadline:
        dying.loop(timeout=0.05)
    assert dying.is_connected()
    sock = dying.socket()
    assert sock is not None
    sock.close()  # no DISCONNECT: as if the process died

    will = watcher.take(1)[0]
    assert (will.topic, will.payload, will.qos) == ("status/dying", b"offline", 1)
    late = client("late")
    late.subscribe("status/dying")
    stored = late.take(1)[0]
    assert (stored.payload, stored.retain) == (b"offline", True)


def test_last_will_from_raw_client_and_not_after_disconnect(client, broker) -> None:
    watcher = client("watcher")
    watcher.subscribe("will/#", qos=0)
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.sendall(raw_connect(broker.port, "polite", will=("will/polite", b"gone", 0, False)))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        sock.sendall(b"\xe0\x00")  # DISCONNECT: the will must be discarded
        assert_closed_by_broker(sock)
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.sendall(raw_connect(broker.port, "rude", will=("will/rude", b"gone", 1, False)))
        assert read_packet(sock) == (0x20, b"\x00\x00")
    assert [(m.topic, m.payload) for m in watcher.take(1)] == [("will/rude", b"gone")]
    watcher.mqtt.publish("will/end", b"", qos=1)
    assert [m.topic for m in watcher.take_until("will/end")] == ["will/end"]


def test_keepalive_expiry_publishes_the_will(client, broker) -> None:
    watcher = client("watcher")
    watcher.subscribe("will/#")
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.sendall(raw_connect(broker.port, "mute", keepalive=1, will=("will/mute", b"x", 0, 0)))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        sock.sendall(b"\xc0\x00")  # PINGREQ
        assert read_packet(sock) == (0xD0, b"")
        started = time.monotonic()
        assert watcher.take(1)[0].topic == "will/mute"
        assert 1.0 < time.monotonic() - started < 3.0
        assert_closed_by_broker(sock)


def test_two_subscribers_both_receive(client) -> None:
    a, b = client("a"), client("b")
    a.subscribe("x/y")
    b.subscribe("x/+", qos=0)
    pub = client("pub")
    for i in range(50):
        pub.mqtt.publish("x/y", bytes([i]), qos=1)
    assert [m.payload for m in a.take(50)] == [bytes([i]) for i in range(50)]
    assert [m.payload for m in b.take(50)] == [bytes([i]) for i in range(50)]


def test_qos2_publish_completes_and_is_delivered_once_at_qos1(client) -> None:
    sub = client("sub")
    sub.subscribe("q2", qos=2)
    pub = client("pub")
    pub.publish("q2", b"exactly", qos=2)  # waits for the PUBREC/PUBREL/PUBCOMP exchange
    pub.publish("q2", b"end", qos=1)
    got = sub.take(2)
    assert [(m.payload, m.qos) for m in got] == [(b"exactly", 1), (b"end", 1)]


def test_qos2_resend_is_forwarded_once_and_invalid_filter_refused(broker) -> None:
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.sendall(raw_connect(broker.port) + raw_subscribe("q/#", qos=2, pid=3))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        assert read_packet(sock) == (0x90, b"\x00\x03\x01")
        sock.sendall(
            raw_publish("q/a", b"1", qos=2, pid=5) + raw_publish("q/a", b"1", qos=2, pid=5)
        )
        replies = [read_packet(sock) for _ in range(3)]
        assert replies.count((0x50, b"\x00\x05")) == 2  # PUBREC for each copy
        assert [b for f, b in replies if f >> 4 == 3] == [b"\x00\x03q/a\x00\x01" + b"1"]
        sock.sendall(b"\x62\x02\x00\x05")  # PUBREL
        assert read_packet(sock) == (0x70, b"\x00\x05")  # PUBCOMP
        sock.sendall(raw_subscribe("q/#/x", pid=4))
        assert read_packet(sock) == (0x90, b"\x00\x04\x80")  # failure code
        sock.sendall(raw_publish("q/a", b"2", qos=2, pid=5))  # pid free again after PUBCOMP
        replies = [read_packet(sock) for _ in range(2)]
        assert (0x32, b"\x00\x03q/a\x00\x02" + b"2") in replies


def test_fragmented_and_coalesced_packets_and_long_lengths(broker) -> None:
    big = bytes(range(256)) * 8200  # 2_099_200 bytes: a 4-byte remaining length
    mid = b"m" * 20_000  # 3-byte remaining length
    stream = (
        raw_connect(broker.port, "raw")
        + raw_subscribe("loop/#", qos=1)
        + raw_publish("loop/a", b"small", qos=0)
        + raw_publish("loop/b", mid, qos=1, pid=7)
        + raw_publish("loop/c", big, qos=0)
    )
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(12):  # first bytes one at a time: partial fixed headers and fields
            sock.send(stream[i : i + 1])
            time.sleep(0.005)
        sock.sendall(stream[12:])
        assert read_packet(sock) == (0x20, b"\x00\x00")
        assert read_packet(sock) == (0x90, b"\x00\x01\x01")  # SUBACK, granted QoS 1
        first, body = read_packet(sock)
        assert first == 0x30 and body == b"\x00\x06loop/asmall"
        packets = [read_packet(sock) for _ in range(3)]
        assert (0x40, b"\x00\x07") in packets  # PUBACK for pid 7
        published = [(f, b) for f, b in packets if f >> 4 == 3]
        assert published[0][0] == 0x32  # delivered at QoS 1, with a packet id
        assert published[0][1][:8] == b"\x00\x06loop/b" and published[0][1][10:] == mid
        assert published[1] == (0x30, b"\x00\x06loop/c" + big)
    assert len(encode_length(len(big))) == 4 and len(encode_length(len(mid))) == 3


@pytest.mark.parametrize(
    ("stream", "reply"),
    [
        (raw_publish("a", b"x"), None),  # PUBLISH before CONNECT
        (b"\x10\xff\xff\xff\xff\x01", None),  # remaining length of 5 bytes
        (raw_connect(0, level=5), b"\x20\x02\x00\x01"),  # MQTT 5: unacceptable version
        (raw_connect(0) + raw_publish("a/+", b"x"), b"\x20\x02\x00\x00"),  # wildcard topic
        (raw_connect(0) + raw_publish("a", b"x", qos=3), b"\x20\x02\x00\x00"),
    ],
)
def test_protocol_errors_close_the_connection(broker, client, stream: bytes, reply) -> None:
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.sendall(stream)
        if reply is not None:
            first, body = read_packet(sock)
            assert bytes([first]) + encode_length(len(body)) + body == reply
        assert_closed_by_broker(sock)
    ok = client("after")  # the broker still serves others
    ok.subscribe("t")
    ok.publish("t", b"fine", qos=1)
    assert ok.take(1)[0].payload == b"fine"


def test_same_client_id_takes_over(client) -> None:
    first = client("same")
    first.mqtt.reconnect_delay_set(60, 60)  # or it would take the id back a second later
    second = client("same")
    assert first.disconnected.wait(WAIT_S)
    second.subscribe("t")
    second.publish("t", b"x", qos=1)
    assert second.take(1)[0].payload == b"x"


def test_stop_closes_clients_and_releases_the_port() -> None:
    broker = EmbeddedBroker()
    broker.start()
    port = broker.port
    c = Client(port, "c")
    c.mqtt.reconnect_delay_set(60, 60)  # so it stays down and we can see the disconnect
    c.start()
    thread = broker._thread
    assert thread is not None and thread.is_alive()
    try:
        broker.stop()
        assert c.disconnected.wait(WAIT_S)
        assert not thread.is_alive()
        with pytest.raises(ConnectionRefusedError), socket.socket() as probe:
            probe.connect(("127.0.0.1", port))
        broker.stop()  # idempotent
        with EmbeddedBroker(port=port) as again:  # the same port can be listened on again
            assert again.port == port
            c2 = Client(port, "c2").start()
            c2.subscribe("t")
            c2.publish("t", b"y", qos=1)
            assert c2.take(1)[0].payload == b"y"
            c2.close()
    finally:
        c.close()


def test_busy_port_is_a_user_error(broker) -> None:
    with pytest.raises(UserError, match=f"127.0.0.1:{broker.port}"):
        EmbeddedBroker(port=broker.port).start()
