"""The MQTT publisher on a real Mosquitto: order, status, will, outages, spool, TLS, triggers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import UserError
from edge_agent.publish.publisher import MqttSettings, Publisher
from tests.brokers import (  # noqa: F401  (fixtures broker, secure_broker, tls_certs)
    USERS,
    Broker,
    Certs,
    Gate,
    Received,
    Subscriber,
    broker_fixture,
    free_port,
    secure_broker_fixture,
    tls_certs_fixture,
)

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edge-agent/line1"


def make_settings(port: int, tmp_path: Path, **overrides: Any) -> MqttSettings:
    """Fast reconnects so outages in tests are short."""
    base = MqttSettings(
        port=port,
        client_id=f"test-{os.getpid()}",
        spool_dir=tmp_path / "spool",
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        keepalive_s=10,
    )
    return replace(base, **overrides)


def verdict(seq: int, camera: str = "camA") -> dict[str, Any]:
    """What the service fills in (docs/integrators/mqtt.md, "Verdict")."""
    return {
        "schema": "edge-agent/verdict/v1",
        "timestamp": 1_700_000_000_000 + seq,
        "camera": camera,
        "sequence": seq,
        "frame_id": seq,
        "part_id": None,
        "verdict": "NG" if seq % 7 == 0 else "OK",
        "score": 1.5,
        "normalised_score": 0.4,
        "threshold": 2.0,
        "regions": [{"bbox": [1, 2, 3, 4], "area": 12, "peak": 2.5}],
        "latency_ms": 12.5,
        "model_id": "mtd-abc123",
        "reject_image": None,
    }


def verdicts_on(sub: Subscriber, camera: str = "camA") -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(f"{PREFIX}/{camera}/verdict")]


def first_occurrences(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [s for s in seqs if not (s in seen or seen.add(s))]


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def retained(port: int, topic: str) -> Received | None:
    """The retained message a new subscriber gets on ``topic`` (None if none)."""
    with Subscriber(port, topic) as sub:
        sub.wait_for(lambda m: len(m) > 0, timeout_s=1.0)
        got = sub.messages
    return got[0] if got else None


def test_the_health_set_just_before_stop_is_the_retained_one(
    broker: Broker, tmp_path: Path
) -> None:
    """The agent publishes its final counts as health and stops at once: that health, not an
    older one, must be what a SCADA reading the retained topic finds afterwards (it raced:
    with every verdict acknowledged the link stopped before sending it)."""
    for run in range(8):
        pub = Publisher(make_settings(broker.port, tmp_path / f"run{run}"), ["camA"])
        pub.start()
        pub.publish_health("camA", {"run": run, "final": False})
        pub.publish_verdict("camA", verdict(0))
        assert wait_until(lambda pub=pub: pub.stats["published"] == 1)
        pub.publish_health("camA", {"run": run, "final": True})
        pub.stop()
        health = retained(broker.port, f"{PREFIX}/camA/health")
        assert health is not None and json.loads(health.payload) == {"run": run, "final": True}


def test_verdicts_arrive_once_in_order_with_status_and_health(
    broker: Broker, tmp_path: Path
) -> None:
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        pub = Publisher(make_settings(broker.port, tmp_path), ["camA", "camB"])
        pub.start()
        assert pub.stats["connected"]
        for i in range(300):
            pub.publish_verdict("camA", verdict(i))
            if i % 3 == 0:
                pub.publish_verdict("camB", verdict(i // 3, "camB"))
        pub.publish_health("camA", {"fps": 12.5, "frames_in": 300, "queue_depth": 0})
        assert sub.wait_for(lambda m: sum(x.topic.endswith("/verdict") for x in m) >= 400)
        time.sleep(0.2)  # nothing more may come
        a, b = verdicts_on(sub, "camA"), verdicts_on(sub, "camB")
        assert [v["sequence"] for v in a] == list(range(300))
        assert [v["sequence"] for v in b] == list(range(100))
        assert a[5] == {**verdict(5), "delayed": False}
        assert all(m.qos == 1 for m in sub.on(f"{PREFIX}/camA/verdict"))
        assert wait_until(lambda: pub.stats["published"] == 400)

        online = retained(broker.port, f"{PREFIX}/camB/status")
        assert online is not None and online.payload == b"online" and online.retain
        health = retained(broker.port, f"{PREFIX}/camA/health")
        assert health is not None and health.retain
        assert json.loads(health.payload)["fps"] == 12.5

        pub.stop()
        # stop() returns once the broker acknowledged "offline"; forwarding it to this
        # subscriber may still be under way.
        sub.wait_for(lambda m: sum(x.topic.endswith("/status") for x in m) >= 4)
        for camera in ("camA", "camB"):
            status = [m.payload for m in sub.on(f"{PREFIX}/{camera}/status")]
            assert status == [b"online", b"offline"]
            offline = retained(broker.port, f"{PREFIX}/{camera}/status")
            assert offline is not None and offline.payload == b"offline"
        stats = pub.stats
        assert stats["spooled"] == 0 and stats["dropped"] == 0 and stats["delayed_published"] == 0
    assert not any((tmp_path / "spool" / "camA").glob("*.seg")), "nothing left to spool"


WILL_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from edge_agent.publish.publisher import MqttSettings, Publisher
pub = Publisher(MqttSettings(port=int(sys.argv[1]), client_id="will-child",
                             spool_dir=Path(sys.argv[2])), ["camA", "camB"])
pub.start()
print("ready", pub.stats["connected"], flush=True)
time.sleep(60)
"""


def test_last_will_offline_when_the_agent_process_is_killed(broker: Broker, tmp_path: Path) -> None:
    with Subscriber(broker.port, f"{PREFIX}/+/status") as sub:
        child = subprocess.Popen(
            [sys.executable, "-c", WILL_CHILD, str(broker.port), str(tmp_path), str(ROOT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().split() == ["ready", "True"]
            assert sub.wait_for(lambda m: len(m) == 2)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            child.kill()
        assert sub.wait_for(lambda m: len(m) == 4)
        for camera in ("camA", "camB"):
            assert [m.payload for m in sub.on(f"{PREFIX}/{camera}/status")] == [
                b"online",
                b"offline",
            ]
            will = retained(broker.port, f"{PREFIX}/{camera}/status")
            assert will is not None and will.payload == b"offline", "the will is retained"


@pytest.mark.slow
def test_broker_killed_three_times_while_publishing(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every sequence number arrives, in order; what waited in the spool is marked delayed."""
    caplog.set_level(logging.INFO, logger="edge_agent.publish")
    outages: list[tuple[float, float]] = []
    sent_at: list[float] = []
    stop_feeding = threading.Event()
    with Gate(broker.port) as gate, Subscriber(broker.port, f"{PREFIX}/camA/verdict") as sub:
        pub = Publisher(make_settings(gate.port, tmp_path), ["camA"])
        pub.start()
        pub.publish_health("camA", {"fps": 250.0})

        def feed() -> None:  # an inference thread: ~250 verdicts/s, never waits on MQTT
            while not stop_feeding.is_set():
                sent_at.append(time.monotonic())
                pub.publish_verdict("camA", verdict(len(sent_at) - 1))
                time.sleep(0.004)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            for _ in range(3):
                time.sleep(0.4)  # live traffic
                broker.kill()
                gate.close()  # the publisher only gets back once the subscriber is back
                killed = time.monotonic()
                sub.wait_disconnected()
                time.sleep(0.4)  # outage: verdicts spool
                broker.start()
                sub.wait_subscribed()
                reopened = time.monotonic()
                gate.open()
                outages.append((killed, reopened))
            time.sleep(0.4)
        finally:
            stop_feeding.set()
            feeder.join()
        total = len(sent_at)
        assert sub.wait_for(
            lambda m: len({json.loads(x.payload)["sequence"] for x in m}) >= total, 15
        ), f"missing: {set(range(total)) - {v['sequence'] for v in verdicts_on(sub)}}"
        # The restarted broker (no persistence) learnt status and health again.
        status = retained(broker.port, f"{PREFIX}/camA/status")
        assert status is not None and status.payload == b"online"
        assert retained(broker.port, f"{PREFIX}/camA/health") is not None
        pub.stop()

    received = verdicts_on(sub)
    seqs = [v["sequence"] for v in received]
    assert first_occurrences(seqs) == list(range(total)), "order kept per camera"
    # Verdicts handed over well inside an outage can only have travelled through the spool.
    during = {
        i for i, t in enumerate(sent_at) if any(start + 0.1 < t < end for start, end in outages)
    }
    assert len(during) > 30
    assert all(v["delayed"] for v in received if v["sequence"] in during)
    assert not all(v["delayed"] for v in received), "live verdicts are not delayed"
    stats = pub.stats
    assert stats["reconnects"] == 3
    assert stats["published"] >= total and stats["delayed_published"] >= len(during)
    assert stats["spooled"] == 0 and stats["dropped"] == 0
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    back = [r for r in caplog.records if "reconnected" in r.getMessage()]
    assert len(lost) == 3 and len(back) == 3, "one log line per event, not per message"


def test_broker_down_at_start_then_spool_comes_out_in_order(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Gate(broker.port, is_open=False) as gate:
        pub = Publisher(make_settings(gate.port, tmp_path), ["camA"])
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="edge_agent.publish"):
            pub.start(connect_timeout_s=2.0)  # must not raise
        assert time.monotonic() - t0 < 2.0
        assert "not reachable" in caplog.text and "spooled" in caplog.text
        assert not pub.stats["connected"]
        for i in range(50):
            pub.publish_verdict("camA", verdict(i))
        assert wait_until(lambda: pub.stats["spooled"] == 50)
        assert list((tmp_path / "spool" / "camA").glob("*.seg")), "spooled on disk"

        with Subscriber(broker.port, f"{PREFIX}/camA/verdict") as sub:
            gate.open()  # the broker becomes reachable
            assert sub.wait_for(lambda m: len(m) >= 50)
            # Until the last spooled verdict is acknowledged, new ones queue behind it.
            assert wait_until(lambda: pub.stats["spooled"] == 0)
            for i in range(50, 60):
                pub.publish_verdict("camA", verdict(i))
            assert sub.wait_for(lambda m: len(m) >= 60)
            got = verdicts_on(sub)
        pub.stop()
    assert [v["sequence"] for v in got] == list(range(60))
    assert all(v["delayed"] for v in got[:50]) and not any(v["delayed"] for v in got[50:])
    assert got[0]["timestamp"] == verdict(0)["timestamp"], "original timestamp kept"
    stats = pub.stats
    assert (stats["published"], stats["delayed_published"], stats["spooled"]) == (60, 50, 0)


def test_spool_of_a_previous_run_goes_first(broker: Broker, tmp_path: Path) -> None:
    first = Publisher(make_settings(free_port(), tmp_path), ["camA"])
    first.start(connect_timeout_s=1.0)
    for i in range(20):
        first.publish_verdict("camA", verdict(i))
    first.stop(timeout_s=1.0)
    assert first.stats["spooled"] == 20

    with Subscriber(broker.port, f"{PREFIX}/camA/verdict") as sub:
        second = Publisher(make_settings(broker.port, tmp_path), ["camA"])
        second.start()
        assert sub.wait_for(lambda m: len(m) >= 20)
        assert wait_until(lambda: second.stats["spooled"] == 0)
        for i in range(20, 30):
            second.publish_verdict("camA", verdict(i))
        assert sub.wait_for(lambda m: len(m) >= 30)
        second.stop()
    got = verdicts_on(sub)
    assert [v["sequence"] for v in got] == list(range(30))
    assert [v["delayed"] for v in got] == [True] * 20 + [False] * 10


def test_spool_full_is_counted_not_fatal(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(0, tmp_path, spool_max_messages=10)
    with Gate(broker.port, is_open=False) as gate:
        pub = Publisher(replace(settings, port=gate.port), ["camA"])
        pub.start(connect_timeout_s=1.0)
        with caplog.at_level(logging.ERROR, logger="edge_agent.publish"):
            for i in range(25):
                pub.publish_verdict("camA", verdict(i))
            assert wait_until(lambda: pub.stats["spooled"] + pub.stats["dropped"] == 25)
        stats = pub.stats
        assert (stats["spooled"], stats["spool_dropped"], stats["dropped"]) == (10, 15, 15)
        assert caplog.text.count("spool full") == 1, "logged once, not per verdict"
        with Subscriber(broker.port, f"{PREFIX}/camA/verdict") as sub:
            gate.open()
            assert sub.wait_for(lambda m: len(m) >= 10)
            pub.publish_verdict("camA", verdict(99))
            assert sub.wait_for(lambda m: len(m) >= 11)
            got = [v["sequence"] for v in verdicts_on(sub)]
        pub.stop()
    assert got == [*range(10), 99], "the oldest are kept, newer ones rejected"


def test_stop_flushes_and_keeps_the_rest(broker: Broker, tmp_path: Path) -> None:
    with Subscriber(broker.port, f"{PREFIX}/camA/verdict") as sub:
        pub = Publisher(make_settings(broker.port, tmp_path), ["camA"])
        pub.start()
        for i in range(2000):
            pub.publish_verdict("camA", verdict(i))
        pub.stop(timeout_s=10.0)
        stats = pub.stats
        assert stats["published"] + stats["spooled"] == 2000
        assert stats["published"] == 2000, "a live broker takes everything within the timeout"
        assert sub.wait_for(lambda m: len(m) >= 2000)


def test_stop_with_broker_down_keeps_everything_by_its_deadline(tmp_path: Path) -> None:
    pub = Publisher(make_settings(free_port(), tmp_path), ["camA"])
    pub.start(connect_timeout_s=0.5)
    t0 = time.monotonic()
    for i in range(1000):
        pub.publish_verdict("camA", verdict(i))
    assert time.monotonic() - t0 < 2.0, "publish_verdict does not wait for the network"
    t1 = time.monotonic()
    assert pub.stop(timeout_s=1.0) == 1000, "stop() says how many were not delivered"
    assert time.monotonic() - t1 < 3.0, "the drain ends at its deadline (plus the grace)"
    assert pub.stats["spooled"] == 1000 and pub.stats["dropped"] == 0
    assert pub.stop() == 1000, "idempotent"
    pub.publish_verdict("camA", verdict(1000))  # after stop: rejected and counted, no crash
    assert pub.stats["dropped"] == 1


def test_stop_reconnects_and_delivers_when_the_broker_comes_back(
    broker: Broker, tmp_path: Path
) -> None:
    """The broker is away when the stop begins and back within the drain: the stop delivers
    everything, in order, instead of leaving it in the spool (issue 29: an offline run used to
    exit at once with its verdicts spooled)."""
    with (
        Gate(broker.port, is_open=False) as gate,
        Subscriber(broker.port, f"{PREFIX}/camA/verdict") as sub,
    ):
        pub = Publisher(make_settings(gate.port, tmp_path, reconnect_max_s=30.0), ["camA"])
        pub.start(connect_timeout_s=0.5)
        for i in range(300):
            pub.publish_verdict("camA", verdict(i))
        assert wait_until(lambda: pub.stats["spooled"] == 300)
        result: list[int] = []
        stopper = threading.Thread(target=lambda: result.append(pub.stop(timeout_s=30.0)))
        stopper.start()
        time.sleep(1.0)  # the stop is under way with the link down
        assert stopper.is_alive(), "stop() waits for the broker while verdicts wait"
        gate.open()
        stopper.join(20.0)
        assert not stopper.is_alive(), "stop() returns once everything is acknowledged"
        assert result == [0]
        assert sub.wait_for(lambda m: len(m) >= 300)
        got = verdicts_on(sub)
    assert first_occurrences([v["sequence"] for v in got]) == list(range(300))
    assert pub.stats["spooled"] == 0 and pub.stats["published"] == 300


# ------------------------------------------------------------------------------ TLS and auth


def test_tls_with_password_delivers(
    secure_broker: Broker, tls_certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert secure_broker.tls_port is not None
    password = USERS["agent"]
    settings = make_settings(
        secure_broker.tls_port,
        tmp_path,
        tls=True,
        ca_file=tls_certs.ca,
        username="agent",
        password=password,
    )
    assert password not in repr(settings)
    caplog.set_level(logging.DEBUG)
    with Subscriber(secure_broker.port, f"{PREFIX}/camA/verdict") as sub:
        pub = Publisher(settings, ["camA"])
        pub.start()
        for i in range(20):
            pub.publish_verdict("camA", verdict(i))
        assert sub.wait_for(lambda m: len(m) >= 20)
        pub.stop()
    assert [v["sequence"] for v in verdicts_on(sub)] == list(range(20))
    assert password not in caplog.text


def test_tls_client_certificate_delivers(
    secure_broker: Broker, tls_certs: Certs, tmp_path: Path
) -> None:
    assert secure_broker.mtls_port is not None
    settings = make_settings(
        secure_broker.mtls_port,
        tmp_path,
        tls=True,
        ca_file=tls_certs.ca,
        cert_file=tls_certs.client_cert,
        key_file=tls_certs.client_key,
        host="localhost",  # the server certificate names 127.0.0.1 and localhost
    )
    with Subscriber(secure_broker.port, f"{PREFIX}/camA/verdict") as sub:
        pub = Publisher(settings, ["camA"])
        pub.start()
        pub.publish_verdict("camA", verdict(0))
        assert sub.wait_for(lambda m: len(m) >= 1)
        pub.stop()


def test_wrong_password_is_a_clear_user_error(
    secure_broker: Broker, tls_certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert secure_broker.auth_port is not None and secure_broker.tls_port is not None
    caplog.set_level(logging.DEBUG)
    for port, tls in ((secure_broker.auth_port, False), (secure_broker.tls_port, True)):
        settings = make_settings(
            port,
            tmp_path,
            username="agent",
            password="not-the-Password-123",
            tls=tls,
            ca_file=tls_certs.ca if tls else None,
        )
        pub = Publisher(settings, ["camA"])
        t0 = time.monotonic()
        with pytest.raises(UserError) as err:
            pub.start()
        assert time.monotonic() - t0 < 3.0
        message = str(err.value)
        assert "refused" in message and "mqtt.password" in message and "\n" not in message
        assert "not-the-Password-123" not in message + caplog.text
        assert not pub.stats["connected"]


def test_wrong_ca_is_a_clear_user_error(
    secure_broker: Broker, tls_certs: Certs, tmp_path: Path
) -> None:
    assert secure_broker.tls_port is not None
    settings = make_settings(
        secure_broker.tls_port,
        tmp_path,
        tls=True,
        ca_file=tls_certs.other_ca,
        username="agent",
        password=USERS["agent"],
    )
    with pytest.raises(UserError, match=r"CERTIFICATE_VERIFY_FAILED.*mqtt\.ca_file"):
        Publisher(settings, ["camA"]).start()


def test_settings_are_checked(tmp_path: Path, tls_certs: Certs) -> None:
    good = make_settings(1883, tmp_path)
    bad = [
        (replace(good, port=0), "mqtt.port"),
        (replace(good, password="x"), "mqtt.password"),
        (replace(good, ca_file=tls_certs.ca), "mqtt.tls"),
        (replace(good, tls=True, ca_file=tmp_path / "missing.pem"), "mqtt.ca_file"),
        (replace(good, tls=True, ca_file=tls_certs.server_key), "mqtt.ca_file"),
        (replace(good, tls=True, key_file=tls_certs.client_key), "mqtt.key_file"),
        (
            replace(good, tls=True, cert_file=tls_certs.client_cert, key_file=tls_certs.ca),
            "mqtt.cert_file",
        ),
        (replace(good, prefix="a/#"), "mqtt.prefix"),
        (replace(good, prefix="a//b"), "mqtt.prefix"),
        (replace(good, inflight_window=65535), "mqtt.inflight_window"),
    ]
    for settings, key in bad:
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            Publisher(settings, ["camA"])
    Publisher(replace(good, prefix="plant/hall2"), ["camA"])  # levels are fine
    with pytest.raises(UserError, match="camera"):
        Publisher(good, ["cam+1"])
    with pytest.raises(UserError, match="unique"):
        Publisher(good, ["camA", "camA"])


# ------------------------------------------------------------------------------ triggers


def test_trigger_calls_the_handler(broker: Broker, tmp_path: Path) -> None:
    import paho.mqtt.publish as single

    calls: list[tuple[str, str]] = []
    opts: dict[str, Any] = {"hostname": "127.0.0.1", "port": broker.port, "qos": 1}
    single.single(f"{PREFIX}/camA/trigger", "OLD-PART", retain=True, **opts)

    pub = Publisher(make_settings(broker.port, tmp_path), ["camA", "camB"])
    pub.start()
    pub.set_trigger_handler(lambda camera, part_id: calls.append((camera, part_id)))
    # The subscription is made on the network thread: probe until it is in place.
    assert wait_until(
        lambda: bool(calls) or single.single(f"{PREFIX}/camB/trigger", "probe", **opts) or False,
        timeout_s=5,
    )
    assert wait_until(lambda: ("camB", "probe") in calls)
    time.sleep(0.2)
    assert all(part == "probe" for _, part in calls), "retained OLD-PART must be ignored"
    calls.clear()
    single.single(f"{PREFIX}/camA/trigger", "{not json", **opts)  # ignored
    single.single(f"{PREFIX}/camA/trigger", "P-123", **opts)
    single.single(f"{PREFIX}/camB/trigger", json.dumps({"part_id": "P-9"}), **opts)
    single.single(f"{PREFIX}/camC/trigger", "P-0", **opts)  # not our camera
    assert wait_until(lambda: len(calls) >= 2)
    time.sleep(0.2)
    pub.stop()
    assert calls == [("camA", "P-123"), ("camB", "P-9")]


def test_tls_setting_that_does_not_fit_the_port_is_a_clear_user_error(
    secure_broker: Broker, tls_certs: Certs, tmp_path: Path
) -> None:
    # Either way the listener just hangs up, as a restarting broker would: the agent must say
    # which setting is wrong instead of spooling for ever.
    assert secure_broker.tls_port is not None
    cases = (
        (secure_broker.port, True, "mqtt.tls is true but MQTT broker .* answers without TLS"),
        (secure_broker.tls_port, False, "mqtt.tls is false but MQTT broker .* speaks TLS"),
    )
    for port, tls, expected in cases:
        settings = make_settings(port, tmp_path, tls=tls, ca_file=tls_certs.ca if tls else None)
        pub = Publisher(settings, ["camA"])
        started = time.monotonic()
        with pytest.raises(UserError, match=expected) as err:
            pub.start(connect_timeout_s=8.0)
        assert "\n" not in str(err.value) and time.monotonic() - started < 6.0
