"""The OPC UA server against a real asyncua client over loopback: address space, last result,
one event per verdict, the Trigger method, users, Basic256Sha256, and a publish that never
waits for the server or its clients."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from asyncua import Client, Node, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from edge_agent.errors import UserError
from edge_agent.publish.opcua import (
    COUNTERS,
    EVENT_TYPE,
    MAX_PENDING_EVENTS,
    RESULT_FIELDS,
    OpcUaServer,
    check_settings,
)
from edge_agent.publish.opcua_config import (
    ERROR,
    HALTED,
    OPERATIONAL,
    PREOPERATIONAL,
    SECURITY_MODES,
    OpcUaModel,
    camera_state,
)

NS = "urn:edge-agent:test"
CAMERAS = ["read", "events", "trigger", "slow", "line.3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(tmp: Path, **values: Any) -> OpcUaModel:
    raw = {"enabled": True, "namespace_uri": NS, **values}
    raw.setdefault("endpoint", f"opc.tcp://127.0.0.1:{free_port()}/edge-agent/")
    return OpcUaModel.model_validate(raw, context={"base": tmp})


def verdict(seq: int, verdict: str = "OK", **over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "schema": "edge-agent/verdict/v1",
        "timestamp": 1_700_000_000_000 + seq,
        "camera": "x",
        "sequence": seq,
        "frame_id": f"run1-{seq}",
        "part_id": f"P{seq}",
        "verdict": verdict,
        "score": 1.5 + seq,
        "normalised_score": 0.5,
        "threshold": 10.0,
        "regions": [],
        "latency_ms": 3.0,
        "model_id": "model-a",
        "reject_image": None,
        "delayed": False,
    }
    msg.update(over)
    return msg


class Triggers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def __call__(self, camera: str, part_id: str) -> bool | None:
        self.calls.append((camera, part_id))
        return False if camera in self.refuse else None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpcUaServer, Triggers]]:
    triggers = Triggers()
    server = OpcUaServer(settings(tmp_path_factory.mktemp("opcua"), allow_anonymous=True), triggers)
    server.start(CAMERAS, "model-a")
    yield server, triggers
    server.stop()


def run(server: OpcUaServer, body: Callable[[Client, int], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Client(server.settings.endpoint, timeout=5) as client:
            await body(client, await client.get_namespace_index(NS))

    asyncio.run(main())


def node(client: Client, idx: int, ident: str) -> Node:
    return client.get_node(ua.NodeId(ident, idx))


async def until(read: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool]) -> Any:
    """The value once `ok` holds (the server applies hand-overs on its own loop)."""
    deadline = time.monotonic() + 5.0
    while True:
        value = await read()
        if ok(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def children(n: Node) -> dict[str, Node]:
    return {(await c.read_browse_name()).Name: c for c in await n.get_children()}


# -- address space and last result -----------------------------------------------------------


def test_browse_the_tree_with_stable_node_ids(served: tuple[OpcUaServer, Triggers]) -> None:
    server, _ = served

    async def body(client: Client, idx: int) -> None:
        assert server.namespace_index == idx
        top = await children(client.nodes.objects)
        root = top["EdgeAgent"]
        assert root.nodeid == ua.NodeId("EdgeAgent", idx)
        below = await children(root)
        assert set(below) == {*CAMERAS, "ModelId"}
        assert await below["ModelId"].read_value() == "model-a"
        cam = below["line.3"]  # a dotted camera id keeps its own name and node ids
        assert cam.nodeid == ua.NodeId("EdgeAgent.line.3", idx)
        parts = await children(cam)
        assert set(parts) == {"State", "ResultReady", "LastResult", "Counters", "Trigger"}
        assert parts["Trigger"].nodeid == ua.NodeId("EdgeAgent.line.3.Trigger", idx)
        assert await parts["State"].read_value() == PREOPERATIONAL
        last = await children(parts["LastResult"])
        assert [n for n, _ in RESULT_FIELDS] == sorted(
            last, key=[n for n, _ in RESULT_FIELDS].index
        )
        assert set(last) == {n for n, _ in RESULT_FIELDS}
        for name, n in last.items():
            assert n.nodeid == ua.NodeId(f"EdgeAgent.line.3.LastResult.{name}", idx)
        assert set(await children(parts["Counters"])) == set(COUNTERS)
        # The PLC reads results, it cannot forge them.
        with pytest.raises(ua.UaStatusCodeError):
            await last["Verdict"].write_value(ua.Variant("OK", ua.VariantType.String))

    run(server, body)


def test_last_result_and_counters_after_publish(served: tuple[OpcUaServer, Triggers]) -> None:
    server, _ = served
    server.publish("read", verdict(7, "NG", regions=[{"x": 1}, {"x": 2}], score=12.25))

    async def body(client: Client, idx: int) -> None:
        def at(leaf: str) -> Node:
            return node(client, idx, f"EdgeAgent.read.{leaf}")

        assert await until(at("ResultReady").read_value, lambda v: v == 1) == 1
        values = {n: await at(f"LastResult.{n}").read_value() for n, _ in RESULT_FIELDS}
        assert values == {
            "Verdict": "NG",
            "Score": 12.25,
            "Threshold": 10.0,
            "PartId": "P7",
            "Timestamp": dt.datetime(2023, 11, 14, 22, 13, 20, 7000, tzinfo=dt.timezone.utc),
            "ModelId": "model-a",
            "RegionCount": 2,
            "FrameId": "run1-7",
            "Sequence": 7,
            "Error": "",
        }
        assert await at("Counters.Inspected").read_value() == 1
        assert await at("Counters.NG").read_value() == 1

        # An ERROR verdict: no score or threshold (NaN), its reason, counted as an error.
        server.publish("read", verdict(8, "ERROR", score=None, threshold=None, error="bad"))
        assert await until(at("ResultReady").read_value, lambda v: v == 2) == 2
        assert math.isnan(await at("LastResult.Score").read_value())
        assert math.isnan(await at("LastResult.Threshold").read_value())
        assert await at("LastResult.Error").read_value() == "bad"
        assert await at("Counters.Errors").read_value() == 1
        assert await at("Counters.Inspected").read_value() == 1
        # Another camera's results are its own.
        assert await node(client, idx, "EdgeAgent.events.ResultReady").read_value() == 0

    run(server, body)


def test_state_and_model_id(served: tuple[OpcUaServer, Triggers]) -> None:
    server, _ = served
    server.set_state("line.3", OPERATIONAL)
    server.set_model_id("model-b")
    with pytest.raises(ValueError, match="Preoperational"):
        server.set_state("line.3", "Running")

    async def body(client: Client, idx: int) -> None:
        state = node(client, idx, "EdgeAgent.line.3.State")
        assert await until(state.read_value, lambda v: v == OPERATIONAL) == OPERATIONAL
        model = node(client, idx, "EdgeAgent.ModelId")
        assert await until(model.read_value, lambda v: v == "model-b") == "model-b"
        server.set_state("line.3", HALTED)
        assert await until(state.read_value, lambda v: v == HALTED) == HALTED

    run(server, body)


def test_camera_state_mapping() -> None:
    base = {"connected": False, "finished": False, "failed": False, "last_error": None}
    assert camera_state(base) == PREOPERATIONAL
    assert camera_state({**base, "connected": True}) == OPERATIONAL
    assert camera_state({**base, "last_error": "cannot open"}) == ERROR  # retrying
    assert camera_state({**base, "connected": True, "last_error": "old"}) == OPERATIONAL
    assert camera_state({**base, "finished": True}) == HALTED
    assert camera_state({**base, "connected": True}, stopping=True) == HALTED
    assert camera_state({**base, "failed": True, "finished": True}) == ERROR


# -- events and the Trigger method -----------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.received: list[Any] = []

    def event_notification(self, event: Any) -> None:
        self.received.append(event)


def test_one_event_per_verdict(served: tuple[OpcUaServer, Triggers]) -> None:
    server, _ = served

    async def body(client: Client, idx: int) -> None:
        handler = Events()
        sub = await client.create_subscription(20, handler)
        etype = node(client, idx, f"EdgeAgent.{EVENT_TYPE}")
        await sub.subscribe_events(node(client, idx, "EdgeAgent.events"), etype)
        await asyncio.sleep(0.2)  # the monitored item exists before the first verdict
        server.publish("events", verdict(1, "OK"))
        server.publish("events", verdict(2, "NG", regions=[{}]))
        server.publish("events", verdict(3, "ERROR", score=None, error="unreadable"))
        await until(lambda: asyncio.sleep(0, len(handler.received)), lambda n: n >= 3)
        await asyncio.sleep(0.3)  # nothing more comes
        got = handler.received
        assert len(got) == 3
        assert [e.Verdict for e in got] == ["OK", "NG", "ERROR"]
        assert [e.Sequence for e in got] == [1, 2, 3]
        assert [e.PartId for e in got] == ["P1", "P2", "P3"]
        assert [e.RegionCount for e in got] == [0, 1, 0]
        assert got[1].Score == 3.5 and got[1].Threshold == 10.0
        assert math.isnan(got[2].Score) and got[2].Error == "unreadable"
        assert {e.Camera for e in got} == {"events"}
        assert {e.ModelId for e in got} == {"model-a"}
        assert got[0].Timestamp == dt.datetime.fromtimestamp(1_700_000_000.001, dt.timezone.utc)
        assert got[1].FrameId == "run1-2"
        assert got[1].Severity > got[0].Severity
        assert got[1].SourceNode == ua.NodeId("EdgeAgent.events", idx)
        await sub.delete()

    run(server, body)


def test_trigger_method_calls_on_trigger(served: tuple[OpcUaServer, Triggers]) -> None:
    server, triggers = served

    async def body(client: Client, idx: int) -> None:
        cam = node(client, idx, "EdgeAgent.trigger")
        method = ua.NodeId("EdgeAgent.trigger.Trigger", idx)
        assert await cam.call_method(method, "PART-42") is None  # Good, no outputs
        assert triggers.calls == [("trigger", "PART-42")]

        for bad in ("", "   ", "a\nb", "x" * 257):
            with pytest.raises(ua.uaerrors.BadInvalidArgument):
                await cam.call_method(method, bad)
        with pytest.raises(ua.UaStatusCodeError):
            await cam.call_method(method, ua.Variant(7, ua.VariantType.Int32))
        # Another camera's method through this camera's object is not this camera's trigger.
        other = ua.NodeId("EdgeAgent.read.Trigger", idx)
        with pytest.raises(ua.uaerrors.BadMethodInvalid):
            await cam.call_method(other, "PART-43")
        assert triggers.calls == [("trigger", "PART-42")]

        triggers.refuse.add("trigger")  # e.g. a camera that is not in trigger mode
        with pytest.raises(ua.uaerrors.BadInvalidState):
            await cam.call_method(method, "PART-44")
        triggers.refuse.clear()

    run(server, body)


# -- never blocking the agent ----------------------------------------------------------------


def test_publish_never_waits_for_a_busy_server_or_a_client_that_does_not_read(
    served: tuple[OpcUaServer, Triggers],
) -> None:
    server, _ = served
    n = MAX_PENDING_EVENTS + 500

    async def body(client: Client, idx: int) -> None:
        handler = Events()
        sub = await client.create_subscription(20, handler)
        cam = node(client, idx, "EdgeAgent.slow")
        await sub.subscribe_events(cam, node(client, idx, f"EdgeAgent.{EVENT_TYPE}"))
        await sub.subscribe_data_change(node(client, idx, "EdgeAgent.slow.LastResult.Score"))
        await asyncio.sleep(0.2)

        # The server's loop stalls for a second (a flood of requests, a slow disk, ...)
        # while this client's loop, blocked below, reads nothing of what it subscribed to.
        busy = threading.Event()

        def stall() -> None:
            busy.set()
            time.sleep(1.0)

        assert server._loop is not None
        server._loop.call_soon_threadsafe(stall)
        assert busy.wait(5)
        slowest = 0.0
        t0 = time.perf_counter()
        for seq in range(n):
            t = time.perf_counter()
            server.publish("slow", verdict(seq, "NG" if seq % 2 else "OK"))
            slowest = max(slowest, time.perf_counter() - t)
        total = time.perf_counter() - t0
        assert total < 0.5, f"{n} publishes took {total:.3f} s"
        assert slowest < 0.05, f"one publish took {slowest * 1000:.1f} ms"

        # Latest wins: the last result, exact counters; the newest events, the rest counted.
        ready = node(client, idx, "EdgeAgent.slow.ResultReady")
        assert await until(ready.read_value, lambda v: v == n) == n
        last = node(client, idx, "EdgeAgent.slow.LastResult.Sequence")
        assert await last.read_value() == n - 1
        counters = {c: node(client, idx, f"EdgeAgent.slow.Counters.{c}") for c in COUNTERS}
        assert await counters["Inspected"].read_value() == n
        assert await counters["NG"].read_value() == n // 2
        assert await counters["EventsDropped"].read_value() == n - MAX_PENDING_EVENTS
        assert server.stats["slow"] == {
            "Inspected": n,
            "NG": n // 2,
            "Errors": 0,
            "EventsDropped": n - MAX_PENDING_EVENTS,
            "ResultReady": n,
        }
        await until(lambda: asyncio.sleep(0, len(handler.received)), lambda k: k >= 1024)
        seqs = [e.Sequence for e in handler.received]
        assert seqs == list(range(n - MAX_PENDING_EVENTS, n))
        await sub.delete()

    run(server, body)


# -- users and security ----------------------------------------------------------------------


def test_password_is_checked_and_anonymous_refused(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret-pw\n")
    server = OpcUaServer(settings(tmp_path, username="plc", password_file="pw"), Triggers())
    server.start(["cam"], "model-a")
    url = server.settings.endpoint

    async def main() -> None:
        client = Client(url, timeout=5)
        client.set_user("plc")
        client.set_password("s3cret-pw")
        async with client:
            idx = await client.get_namespace_index(NS)
            assert await node(client, idx, "EdgeAgent.cam.State").read_value() == PREOPERATIONAL
        for user, password in (("plc", "wrong"), ("admin", "s3cret-pw"), ("plc", "")):
            client = Client(url, timeout=5)
            client.set_user(user)
            client.set_password(password)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await client.connect()
            client.disconnect_socket()
        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
            await Client(url, timeout=5).connect()  # anonymous

    try:
        asyncio.run(main())
    finally:
        server.stop()


def make_cert(tmp: Path, name: str, uri: str, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(uri),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.der", tmp / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_basic256sha256_with_a_certificate(tmp_path: Path) -> None:
    server_cert, server_key = make_cert(
        tmp_path, "server", "urn:edge-agent:test-server", ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_cert, client_key = make_cert(
        tmp_path, "client", "urn:edge-agent:test-client", ExtendedKeyUsageOID.CLIENT_AUTH
    )
    opts = settings(
        tmp_path,
        security="basic256sha256",
        certificate_file=server_cert.name,
        private_key_file=server_key.name,
        username="plc",
        password="pw-over-tls",
    )
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "model-a")
    url = opts.endpoint

    async def main() -> None:
        probe = Client(url, timeout=5)
        endpoints = await probe.connect_and_get_server_endpoints()
        assert {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints} == {
            (SecurityPolicyBasic256Sha256.URI, ua.MessageSecurityMode.SignAndEncrypt)
        }
        # The application URI is the certificate's, which clients check.
        assert {e.Server.ApplicationUri for e in endpoints} == {"urn:edge-agent:test-server"}

        client = Client(url, timeout=5)
        client.application_uri = "urn:edge-agent:test-client"
        client.set_user("plc")
        client.set_password("pw-over-tls")
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(client_cert),
            str(client_key),
            server_certificate=str(server_cert),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        async with client:
            idx = await client.get_namespace_index(NS)
            assert await node(client, idx, "EdgeAgent.cam.State").read_value() == PREOPERATIONAL

        plain = Client(url, timeout=5)  # no security: there is no such endpoint
        plain.set_user("plc")
        plain.set_password("pw-over-tls")
        with pytest.raises((ua.UaError, ConnectionError, OSError, asyncio.TimeoutError)):
            await plain.connect()
        plain.disconnect_socket()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_start_refuses_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "a", "urn:a", ExtendedKeyUsageOID.SERVER_AUTH)
    _, other_key = make_cert(tmp_path, "b", "urn:b", ExtendedKeyUsageOID.SERVER_AUTH)
    opts = settings(
        tmp_path,
        security="basic256sha256",
        certificate_file=cert.name,
        private_key_file=other_key.name,
        allow_anonymous=True,
    )
    with pytest.raises(UserError, match=r"^opcua.private_key_file: .* is not the key of"):
        OpcUaServer(opts, Triggers()).start(["cam"], "m")
    with pytest.raises(UserError, match=r"^opcua.private_key_file: .* is not the key of"):
        check_settings(opts)  # run --check says the same without serving
    check_settings(opts.model_copy(update={"private_key_file": tmp_path / "a.key.pem"}))
    opts = opts.model_copy(update={"certificate_file": tmp_path / "missing.der"})
    with pytest.raises(UserError, match=r"^opcua.certificate_file: cannot read"):
        OpcUaServer(opts, Triggers()).start(["cam"], "m")


def test_start_refuses_an_endpoint_in_use_and_colliding_camera_ids(tmp_path: Path) -> None:
    opts = settings(tmp_path, allow_anonymous=True)
    with pytest.raises(
        UserError, match=r"'a.LastResult' would have the node EdgeAgent.a.LastResult of camera"
    ):
        OpcUaServer(opts, Triggers()).start(["a", "a.LastResult"], "m")
    with pytest.raises(UserError, match="ModelId"):
        OpcUaServer(opts, Triggers()).start(["ModelId"], "m")
    port = int(opts.endpoint.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(UserError, match=r"^opcua.endpoint: cannot listen on"):
            OpcUaServer(opts, Triggers()).start(["cam"], "m")


# -- the config section ----------------------------------------------------------------------


def problem(raw: dict[str, Any], tmp: Path) -> tuple[tuple[Any, ...], str]:
    with pytest.raises(ValidationError) as info:
        OpcUaModel.model_validate(raw, context={"base": tmp})
    error = info.value.errors()[0]
    return (*error["loc"], *(error.get("ctx") or {}).get("at", ())), error["msg"]


def test_config_section(tmp_path: Path) -> None:
    off = OpcUaModel.model_validate({}, context={"base": tmp_path})
    assert not off.enabled and off.security == "none"
    assert off.endpoint == "opc.tcp://127.0.0.1:4840/edge-agent/"
    security = OpcUaModel.model_fields["security"].annotation
    assert get_origin(security) is Literal and get_args(security) == SECURITY_MODES

    on = {"enabled": True}
    assert problem(on, tmp_path) == (
        ("username",),
        "missing: set username and password, or allow_anonymous: true",
    )
    assert problem({**on, "security": "basic256sha256", "allow_anonymous": True}, tmp_path) == (
        ("certificate_file",),
        "required when security is basic256sha256",
    )
    assert problem({**on, "username": "plc", "password": "x", "allow_anonymous": True}, tmp_path)[
        0
    ] == ("allow_anonymous",)
    assert problem({**on, "username": "plc"}, tmp_path)[0] == ("password",)
    assert problem({"certificate_file": "c.pem"}, tmp_path) == (
        ("certificate_file",),
        "only used with security: basic256sha256",
    )
    assert problem({"endpoint": "tcp://host:4840"}, tmp_path)[0] == ("endpoint",)
    assert problem({"endpoint": "opc.tcp://host/"}, tmp_path)[0] == ("endpoint",)
    assert problem({"security": "basic128"}, tmp_path)[0] == ("security",)
    assert problem({"enabeld": True}, tmp_path)[0] == ("enabeld",)
    assert problem({"enabled": "yes"}, tmp_path)[0] == ("enabled",)
    ok = OpcUaModel.model_validate(
        {**on, "username": "plc", "password_file": "pw"}, context={"base": tmp_path}
    )
    assert ok.password_file == tmp_path / "pw"  # relative to the config's folder
    with pytest.raises(UserError, match=r"^opcua.password_file: cannot read"):
        ok.password_value()
    secret = OpcUaModel.model_validate(
        {**on, "username": "plc", "password": "hunter2"}, context={"base": tmp_path}
    )
    assert "hunter2" not in repr(secret) and secret.password_value() == "hunter2"


# -- inside the real agent -------------------------------------------------------------------


@pytest.mark.slow
def test_the_agent_serves_results_state_and_takes_triggers(
    tmp_path: Path, calibrated_bundle: Path
) -> None:
    """`edge-agent run` with `opcua.enabled`: a PLC reads the camera's state and last result,
    and Trigger(partId) through OPC UA inspects the next frame under that part id."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from edge_agent.model.bundle import load_bundle
    from tests.brokers import Broker
    from tests.conftest import require_mtd

    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((require_mtd() / "test" / "good").iterdir())[:3]:
        shutil.copy(path, frames / path.name)
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/edge-agent/"
    with Broker(tmp_path / "broker") as broker:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"bundle: {calibrated_bundle}\ndevice: cpu\nthreads: 2\n"
            "cameras:\n"
            f"  - {{id: free, source: {frames}, loop: true, fps_limit: 20}}\n"
            f"  - {{id: station, source: {frames}, loop: true, fps_limit: 20, mode: trigger}}\n"
            f"mqtt: {{port: {broker.port}, spool_dir: {tmp_path / 'spool'}, line: l1}}\n"
            "metrics: {port: null}\n"
            f"opcua: {{enabled: true, endpoint: '{endpoint}', namespace_uri: {NS},"
            " allow_anonymous: true}\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:

            async def main() -> None:
                deadline = time.monotonic() + 90
                while True:  # the server starts once the model is loaded
                    try:
                        client = Client(endpoint, timeout=5)
                        await client.connect()
                        break
                    except (OSError, asyncio.TimeoutError):
                        assert proc.poll() is None and time.monotonic() < deadline
                        await asyncio.sleep(0.5)
                try:
                    idx = await client.get_namespace_index(NS)

                    async def read(ident: str) -> Any:
                        return await node(client, idx, ident).read_value()

                    seq = await until(lambda: read("EdgeAgent.free.LastResult.Sequence"), bool)
                    assert seq > 0
                    # State follows from the agent's housekeeping pass, beside the results.
                    state = await until(
                        lambda: read("EdgeAgent.free.State"), lambda v: v == OPERATIONAL
                    )
                    assert state == OPERATIONAL
                    assert await read("EdgeAgent.free.LastResult.Verdict") in ("OK", "NG")
                    model_id = load_bundle(calibrated_bundle).model_id
                    assert await read("EdgeAgent.free.LastResult.ModelId") == model_id
                    # A trigger-mode camera answers only when asked, with the part id given.
                    station = node(client, idx, "EdgeAgent.station")
                    method = ua.NodeId("EdgeAgent.station.Trigger", idx)
                    await station.call_method(method, "PLC-7")
                    part = await until(
                        lambda: read("EdgeAgent.station.LastResult.PartId"), lambda v: v == "PLC-7"
                    )
                    assert part == "PLC-7"
                    # A free-running camera refuses triggers (BadInvalidState).
                    with pytest.raises(ua.uaerrors.BadInvalidState):
                        await node(client, idx, "EdgeAgent.free").call_method(
                            ua.NodeId("EdgeAgent.free.Trigger", idx), "PLC-8"
                        )
                finally:
                    await client.disconnect()

            asyncio.run(main())
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
