"""The OPC UA server against a real asyncua client over loopback: address space, last result,
one event per verdict, the Trigger method, users, Basic256Sha256 with a trust list, a publish
that never waits for the server or its clients, and clients that still get in during a port
scan."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import math
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlparse

import pytest
from asyncua import Client, Node, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.ua_binary import uatcp_to_binary
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from edge_agent.errors import UserError
from edge_agent.lifecycle import roles
from edge_agent.publish import contract, opcua
from edge_agent.publish.opcua import (
    CONNECTION_STATS,
    COUNTERS,
    EVENT_TYPE,
    MAX_PENDING_EVENTS,
    PART_EVENT_TYPE,
    PART_FIELDS,
    RECIPE_FIELDS,
    RESULT_FIELDS,
    OpcUaServer,
    check_settings,
)
from edge_agent.publish.opcua_config import (
    ERROR,
    HALTED,
    MAX_SOCKETS,
    OPERATIONAL,
    PREOPERATIONAL,
    SECURITY_MODES,
    OpcUaModel,
    camera_state,
)
from edge_agent.station.recipes import MAX_COMMAND_BYTES, MAX_NUMBER, Select

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


# A login with the engineer role (opcua.users); scrypt's cost lowered for the tests' speed.
ENGINEER = ("plc", "plc-password")
ENGINEER_USER = {
    "name": ENGINEER[0],
    "role": "engineer",
    "password_hash": roles.hash_password(ENGINEER[1], n=2**10),
}


def run(
    server: OpcUaServer,
    body: Callable[[Client, int], Awaitable[None]],
    login: tuple[str, str] | None = None,
) -> None:
    async def main() -> None:
        # asyncua's client probes the server every watchdog_intervall with that as the probe's
        # timeout, and drops the connection when one is late: a test that stalls the server's
        # loop for a second (or a loaded CI box) would lose its client to the probe, which is
        # not what any test here checks.
        client = Client(server.settings.endpoint, timeout=5, watchdog_intervall=10.0)
        if login is not None:
            client.set_user(login[0])
            client.set_password(login[1])
        async with client:
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
        assert set(below) == {*CAMERAS, "ModelId", "Recipe", "Part", "Lifecycle"}
        recipe = await children(below["Recipe"])
        assert set(recipe) == {n for n, _ in RECIPE_FIELDS} | {"SelectRecipe"}
        assert recipe["SelectRecipe"].nodeid == ua.NodeId("EdgeAgent.Recipe.SelectRecipe", idx)
        part = await children(below["Part"])
        assert set(part) == {n for n, _ in PART_FIELDS} | {"PartReady", "EventsDropped"}
        assert part["Missing"].nodeid == ua.NodeId("EdgeAgent.Part.Missing", idx)
        assert await part["Missing"].read_value_rank() == ua.ValueRank.OneDimension
        assert await part["PartReady"].read_value() == 0
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


# -- the station: recipe state, SelectRecipe, part verdicts ----------------------------------


def recipe_state(
    active: str, number: int, result: str, reason: str | None, changed_at: float
) -> dict[str, Any]:
    return contract.recipe_message(
        active=active,
        number=number,
        result=result,
        reason=reason,
        request_id=None,
        changed_at=changed_at,
    )


def part(part_id: str, verdict: str, missing: list[str], decided_at: float) -> dict[str, Any]:
    inspections = [
        {"id": "cap", "camera": "cam", "verdict": verdict, "score": 31.5, "normalised_score": 0.6,
         "threshold": 30.0, "regions": [{"bbox": [1, 2, 3, 4], "area": 9, "peak": 33.0}]},
    ]  # fmt: skip
    message = {
        "part_id": part_id,
        "recipe": "bottle-b",
        "verdict": verdict,
        "inspections": inspections,
        "missing": missing,
    }
    return contract.part_message(message, decided_at)


class Selections:
    """A recipe handler as the agent's: records each call; refuses what the book lacks."""

    def __init__(self) -> None:
        self.calls: list[tuple[Select, str]] = []
        self.fail = False

    def __call__(self, select: Select, source: str) -> str | None:
        self.calls.append((select, source))
        if self.fail:
            raise RuntimeError("a bug in the recipe handler")
        if select.name not in (None, "bottle-a", "bottle-b") or select.number not in (None, 1, 2):
            return f"no recipe {select.describe()}"
        return None


STARTED = 1_700_000_000.25  # when the active recipe became active (s)


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpcUaServer, Selections]]:
    selections = Selections()
    # SelectRecipe is an engineer's (roles.ACTIONS["recipe"])
    server = OpcUaServer(
        settings(tmp_path_factory.mktemp("opcua"), users=[ENGINEER_USER]), Triggers()
    )
    server.set_recipe_handler(selections)
    server.set_recipe(recipe_state("bottle-a", 1, "ok", "started", STARTED))  # before start
    server.start(["cam"], "model-a")
    yield server, selections
    server.stop()


def test_recipe_state_is_there_from_the_start_and_follows_set_recipe(
    station: tuple[OpcUaServer, Selections],
) -> None:
    server, _ = station

    async def body(client: Client, idx: int) -> None:
        async def read() -> dict[str, Any]:
            return {n: await node(client, idx, f"EdgeAgent.Recipe.{n}").read_value()
                    for n, _ in RECIPE_FIELDS}  # fmt: skip

        assert await read() == {  # the first read: no waiting for the loop's first pass
            "Active": "bottle-a",
            "Number": 1,
            "Result": "ok",
            "Reason": "started",
            "ChangedAt": dt.datetime.fromtimestamp(STARTED, dt.timezone.utc),
        }
        number = node(client, idx, "EdgeAgent.Recipe.Number")
        assert await number.read_data_type_as_variant_type() == ua.VariantType.Int32
        server.set_recipe(recipe_state("bottle-a", 1, "refused", "no recipe 'x'", STARTED))
        refused = await until(read, lambda v: v["Result"] == "refused")
        assert (refused["Reason"], refused["Active"]) == ("no recipe 'x'", "bottle-a")
        server.set_recipe(recipe_state("bottle-b", 2, "ok", None, STARTED + 60))
        switched = await until(read, lambda v: v["Active"] == "bottle-b")
        assert switched == {
            "Active": "bottle-b",
            "Number": 2,
            "Result": "ok",
            "Reason": "",  # null: a PLC variable has none
            "ChangedAt": dt.datetime.fromtimestamp(STARTED + 60, dt.timezone.utc),
        }

    run(server, body, ENGINEER)


async def call_select(client: Client, idx: int, *args: Any) -> tuple[ua.StatusCode, list[Any]]:
    """SelectRecipe through the Call service itself: its status and outputs both (a Bad
    status makes Node.call_method raise and drop the outputs)."""
    request = ua.CallMethodRequest()
    request.ObjectId = ua.NodeId("EdgeAgent.Recipe", idx)
    request.MethodId = ua.NodeId("EdgeAgent.Recipe.SelectRecipe", idx)
    request.InputArguments = [a if isinstance(a, ua.Variant) else ua.Variant(a) for a in args]
    (result,) = await client.uaclient.call([request])
    return result.StatusCode, [v.Value for v in result.OutputArguments or []]


def int32(value: int) -> ua.Variant:
    return ua.Variant(value, ua.VariantType.Int32)


def test_select_recipe_hands_the_selection_to_the_agent(
    station: tuple[OpcUaServer, Selections],
) -> None:
    server, selections = station

    async def body(client: Client, idx: int) -> None:
        selections.calls.clear()
        obj = node(client, idx, "EdgeAgent.Recipe")
        method = ua.NodeId("EdgeAgent.Recipe.SelectRecipe", idx)
        assert await obj.call_method(method, "bottle-b", int32(0)) == ""  # Good, Reason ""
        assert await obj.call_method(method, "", int32(2)) == ""
        assert selections.calls == [(Select(name="bottle-b"), "opcua"), (Select(number=2), "opcua")]

        # The agent refuses: a Bad status, its reason as the output.
        status, out = await call_select(client, idx, "bottle-z", int32(0))
        assert status.value == ua.StatusCodes.BadInvalidArgument
        assert out == ["no recipe 'bottle-z'"]
        status, out = await call_select(client, idx, "", int32(9))
        assert (status.value, out) == (ua.StatusCodes.BadInvalidArgument, ["no recipe number 9"])
        with pytest.raises(ua.uaerrors.BadInvalidArgument):
            await obj.call_method(method, "bottle-z", int32(0))
        assert len(selections.calls) == 5
        status, out = await call_select(client, idx, "bottle-b", int32(0))
        assert status.is_good() and out == [""]

    run(server, body, ENGINEER)


BAD_SELECTIONS = {
    "both": ("bottle-a", int32(1)),
    "neither": ("", int32(0)),
    "a line break": ("bottle\nb", int32(0)),
    "a name too long": ("x" * (MAX_COMMAND_BYTES + 1), int32(0)),
    "a negative number": ("", int32(-1)),
    "past the largest number": ("", int32(MAX_NUMBER + 1)),
    "a number as the name": (int32(2), int32(0)),
    "a name as the number": ("", "2"),
    "a Boolean number": ("", ua.Variant(True, ua.VariantType.Boolean)),
    "a Double number": ("", ua.Variant(2.0, ua.VariantType.Double)),
}


def test_select_recipe_refuses_bad_arguments_with_a_reason(
    station: tuple[OpcUaServer, Selections],
) -> None:
    server, selections = station

    async def body(client: Client, idx: int) -> None:
        selections.calls.clear()
        for what, args in BAD_SELECTIONS.items():
            status, out = await call_select(client, idx, *args)
            assert status.value == ua.StatusCodes.BadInvalidArgument, what
            assert len(out) == 1 and out[0] and "\n" not in out[0], (what, out)
        status, out = await call_select(client, idx, "bottle-a")
        assert status.value == ua.StatusCodes.BadArgumentsMissing
        status, out = await call_select(client, idx, "bottle-a", int32(0), int32(0))
        assert status.value == ua.StatusCodes.BadTooManyArguments
        # Through another object than EdgeAgent.Recipe.
        with pytest.raises(ua.uaerrors.BadMethodInvalid):
            await node(client, idx, "EdgeAgent.cam").call_method(
                ua.NodeId("EdgeAgent.Recipe.SelectRecipe", idx), "bottle-a", int32(0)
            )
        assert selections.calls == []  # none of them reached the agent

        selections.fail = True  # a bug of ours: an internal error, the server goes on
        try:
            status, _ = await call_select(client, idx, "bottle-a", int32(0))
        finally:
            selections.fail = False
        assert status.value == ua.StatusCodes.BadInternalError
        status, _ = await call_select(client, idx, "bottle-a", int32(0))
        assert status.is_good()  # and the next call is served

    run(server, body, ENGINEER)


def test_select_recipe_is_refused_to_an_anonymous_viewer(
    served: tuple[OpcUaServer, Triggers],
) -> None:
    server, _ = served

    async def body(client: Client, idx: int) -> None:
        status, out = await call_select(client, idx, "bottle-a", int32(0))
        assert status.value == ua.StatusCodes.BadUserAccessDenied
        assert out == [roles.refusal("viewer", "recipe")]

    run(server, body)


def test_last_part_and_one_event_per_part(station: tuple[OpcUaServer, Selections]) -> None:
    server, _ = station

    async def body(client: Client, idx: int) -> None:
        handler = Events()
        sub = await client.create_subscription(20, handler)
        etype = node(client, idx, f"EdgeAgent.{PART_EVENT_TYPE}")
        await sub.subscribe_events(node(client, idx, "EdgeAgent.Part"), etype)
        await asyncio.sleep(0.2)  # the monitored item exists before the first part
        first = part("P-1", "NG", [], 1_700_000_100.5)
        second = part("P-2", "ERROR", ["side", "top"], 1_700_000_101.25)
        server.publish_part(first)
        server.publish_part(second)
        ready = node(client, idx, "EdgeAgent.Part.PartReady")
        assert await until(ready.read_value, lambda v: v == 2) == 2
        values = {n: await node(client, idx, f"EdgeAgent.Part.{n}").read_value()
                  for n, _ in PART_FIELDS}  # fmt: skip
        assert values == {
            "PartId": "P-2",
            "Recipe": "bottle-b",
            "Verdict": "ERROR",
            "Missing": ["side", "top"],
            "Inspections": json.dumps(second["inspections"], separators=(",", ":")),
            "Timestamp": dt.datetime.fromtimestamp(1_700_000_101.25, dt.timezone.utc),
        }
        assert json.loads(values["Inspections"])[0]["regions"][0]["bbox"] == [1, 2, 3, 4]
        assert await node(client, idx, "EdgeAgent.Part.EventsDropped").read_value() == 0

        await until(lambda: asyncio.sleep(0, len(handler.received)), lambda n: n >= 2)
        await asyncio.sleep(0.3)  # nothing more comes
        got = handler.received
        assert [e.PartId for e in got] == ["P-1", "P-2"]
        assert [e.Verdict for e in got] == ["NG", "ERROR"]
        assert [e.Missing for e in got] == [[], ["side", "top"]]
        assert {e.Recipe for e in got} == {"bottle-b"}
        assert got[0].Inspections == json.dumps(first["inspections"], separators=(",", ":"))
        assert got[1].Timestamp == values["Timestamp"]
        assert got[1].Severity > got[0].Severity
        assert got[0].SourceNode == ua.NodeId("EdgeAgent.Part", idx)
        assert got[1].Message.Text == "part P-2: ERROR (recipe bottle-b)"
        await sub.delete()

    run(server, body, ENGINEER)


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

        # The server's loop stalls (a flood of requests, a slow disk, ...) until this test lets
        # it go, while this client's loop, blocked below, reads nothing of what it subscribed
        # to. Every publish must return while the loop is still held: one that waited for the
        # loop would hang here until the stall's own 30 s bound, after which `held` is unset.
        release, held = threading.Event(), threading.Event()

        def stall() -> None:
            held.set()
            if not release.wait(30):
                held.clear()

        assert server._loop is not None
        server._loop.call_soon_threadsafe(stall)
        assert held.wait(5)
        try:
            for seq in range(n):
                server.publish("slow", verdict(seq, "NG" if seq % 2 else "OK"))
            assert held.is_set(), "a publish waited for the stalled server loop"
        finally:
            release.set()

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


class Certs:
    """A server certificate, a trusted and an untrusted client certificate, and the trust
    folder (certificates only: keys live elsewhere)."""

    def __init__(self, tmp: Path) -> None:
        keys = tmp / "keys"
        keys.mkdir()
        self.trusted_dir = tmp / "trusted"
        self.trusted_dir.mkdir()
        self.server = make_cert(
            keys, "server", "urn:edge-agent:test-server", ExtendedKeyUsageOID.SERVER_AUTH
        )
        self.client = make_cert(keys, "client", CLIENT_URI, ExtendedKeyUsageOID.CLIENT_AUTH)
        self.stranger = make_cert(keys, "stranger", CLIENT_URI, ExtendedKeyUsageOID.CLIENT_AUTH)
        shutil.copy(self.client[0], self.trusted_dir / "plc.der")

    def settings(self, tmp: Path, **values: Any) -> OpcUaModel:
        return settings(
            tmp,
            security="basic256sha256",
            certificate_file=str(self.server[0]),
            private_key_file=str(self.server[1]),
            trusted_client_certificates=str(self.trusted_dir),
            **values,
        )


CLIENT_URI = "urn:edge-agent:test-client"


async def secure_client(
    client: Client, certs: Certs, cert: tuple[Path, Path], user: str, password: str
) -> Client:
    client.application_uri = CLIENT_URI
    client.set_user(user)
    client.set_password(password)
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(cert[0]),
        str(cert[1]),
        server_certificate=str(certs.server[0]),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    return client


class PresentingClient(Client):
    """Opens its channel with its own certificate, but names another in CreateSession: what a
    client that has a trusted certificate's public half, not its key, could send."""

    def __init__(self, url: str, presented: bytes) -> None:
        super().__init__(url, timeout=5)
        self.presented = presented

    async def create_session(self) -> ua.CreateSessionResult:
        send = self.uaclient.create_session

        async def presenting(params: ua.CreateSessionParameters) -> Any:
            params.ClientCertificate = self.presented
            return await send(params)

        self.uaclient.create_session = presenting  # type: ignore[method-assign]
        return await super().create_session()


def test_basic256sha256_with_a_trust_list(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    opts = certs.settings(tmp_path, username="plc", password="pw-over-tls")
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "model-a")
    url = opts.endpoint

    async def refused(client: Client, status: type[Exception]) -> None:
        with pytest.raises(status):
            await client.connect()
        client.disconnect_socket()

    async def main() -> None:
        probe = Client(url, timeout=5)
        endpoints = await probe.connect_and_get_server_endpoints()
        assert {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints} == {
            (SecurityPolicyBasic256Sha256.URI, ua.MessageSecurityMode.SignAndEncrypt)
        }
        # The application URI is the certificate's, which clients check.
        assert {e.Server.ApplicationUri for e in endpoints} == {"urn:edge-agent:test-server"}

        # The trusted certificate, and the right password: in.
        client = await secure_client(
            Client(url, timeout=5), certs, certs.client, "plc", "pw-over-tls"
        )
        async with client:
            idx = await client.get_namespace_index(NS)
            assert await node(client, idx, "EdgeAgent.cam.State").read_value() == PREOPERATIONAL

        # The right password from a certificate nobody trusted: refused with a status.
        stranger = Client(url, timeout=5)
        await secure_client(stranger, certs, certs.stranger, "plc", "pw-over-tls")
        await refused(stranger, ua.uaerrors.BadCertificateUntrusted)
        # The trusted certificate named in CreateSession, the channel signed with another.
        copier = PresentingClient(url, certs.client[0].read_bytes())
        await secure_client(copier, certs, certs.stranger, "plc", "pw-over-tls")
        await refused(copier, ua.uaerrors.BadSecurityChecksFailed)

        # No security: there is no such endpoint, and asyncua would still create a session
        # on an unencrypted channel; without a certificate the server refuses it first.
        plain = Client(url, timeout=5)
        plain.set_user("plc")
        plain.set_password("pw-over-tls")
        await refused(plain, ua.uaerrors.BadSecurityChecksFailed)

    try:
        asyncio.run(main())
        stats = server.connection_stats
        assert stats["certificates_refused"] == 3
        assert stats["sessions_open"] == 0  # the trusted client logged out
    finally:
        server.stop()


def test_the_trust_list_is_checked_at_start(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    opts = certs.settings(tmp_path, allow_anonymous=True)
    check_settings(opts)
    shutil.copy(certs.client[1], certs.trusted_dir / "plc.key.pem")  # a key copied in too
    with pytest.raises(
        UserError,
        match=r"^opcua.trusted_client_certificates: .*plc.key.pem is not a PEM or DER certificate$",
    ):
        check_settings(opts)
    with pytest.raises(UserError, match=r"^opcua.trusted_client_certificates: .*plc.key.pem"):
        OpcUaServer(opts, Triggers()).start(["cam"], "m")
    (certs.trusted_dir / "plc.key.pem").unlink()
    shutil.copy(certs.client[0], certs.trusted_dir / "plc.crt")
    with pytest.raises(UserError, match=r"plc.crt is not named \*.der or \*.pem"):
        check_settings(opts)
    not_a_folder = opts.model_copy(update={"trusted_client_certificates": certs.client[0]})
    with pytest.raises(UserError, match=r"^opcua.trusted_client_certificates: .* is not a folder$"):
        check_settings(not_a_folder)
    missing = opts.model_copy(update={"trusted_client_certificates": tmp_path / "missing"})
    with pytest.raises(UserError, match=r"^opcua.trusted_client_certificates: cannot read"):
        check_settings(missing)


def test_start_refuses_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "a", "urn:a", ExtendedKeyUsageOID.SERVER_AUTH)
    _, other_key = make_cert(tmp_path, "b", "urn:b", ExtendedKeyUsageOID.SERVER_AUTH)
    (tmp_path / "trusted").mkdir()
    opts = settings(
        tmp_path,
        security="basic256sha256",
        certificate_file=cert.name,
        private_key_file=other_key.name,
        trusted_client_certificates="trusted",
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
    for camera in ("Recipe", "Part", "Recipe.SelectRecipe", "PartEventType"):
        with pytest.raises(UserError, match=f"camera '{camera}' would have the node"):
            OpcUaServer(opts, Triggers()).start([camera], "m")
    port = int(opts.endpoint.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(UserError, match=r"^opcua.endpoint: cannot listen on"):
            OpcUaServer(opts, Triggers()).start(["cam"], "m")


# -- port scans, idle sockets and the session cap --------------------------------------------

# The bound: a PLC's connect timeout. Before the fix a client was refused for ~30 s
# while 40 silent sockets were open (asyncua's socket cap of 32 counted them).
CONNECT_WITHIN_S = 2.0


def idle_sockets(endpoint: str, n: int) -> list[socket.socket]:
    """`n` TCP connections that send nothing, as a port scanner leaves them."""
    port = urlparse(endpoint).port
    assert port is not None
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def read_state(client: Client) -> Any:
    idx = await client.get_namespace_index(NS)
    return await node(client, idx, "EdgeAgent.cam.State").read_value()


async def connect_and_read(endpoint: str) -> Client:
    """A real client in, one node read; the caller disconnects it."""
    client = Client(endpoint, timeout=5)
    await client.connect()
    assert await read_state(client) == PREOPERATIONAL
    return client


@pytest.mark.parametrize("silent", [40, 100])
def test_a_client_gets_in_while_a_port_scan_holds_sockets_open(tmp_path: Path, silent: int) -> None:
    # A Hello timeout far longer than the test: the scan's sockets stay open throughout.
    opts = settings(tmp_path, allow_anonymous=True, hello_timeout_s=60.0)
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "m")
    scan = idle_sockets(opts.endpoint, silent)

    async def main() -> None:
        client = await asyncio.wait_for(connect_and_read(opts.endpoint), CONNECT_WITHIN_S)
        stats = server.connection_stats
        await client.disconnect()
        assert stats["sockets_open"] == silent + 1  # the scan was still there, all of it
        assert stats["sessions_open"] == 1
        assert stats["sockets_without_hello"] == stats["sockets_evicted"] == 0

    try:
        asyncio.run(main())
    finally:
        for sock in scan:
            sock.close()
        server.stop()


def test_sockets_without_a_hello_are_closed_after_the_timeout_and_counted(
    tmp_path: Path,
) -> None:
    opts = settings(tmp_path, allow_anonymous=True, hello_timeout_s=0.5)
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "m")
    silent = idle_sockets(opts.endpoint, 4)
    trickle, other = idle_sockets(opts.endpoint, 2)
    hello = uatcp_to_binary(ua.MessageType.Hello, ua.Hello(EndpointUrl=opts.endpoint))
    trickle.sendall(hello[:10])  # a Hello that never completes
    other.sendall(uatcp_to_binary(ua.MessageType.Acknowledge, ua.Acknowledge()))  # not a Hello

    async def main() -> None:
        client = await connect_and_read(opts.endpoint)
        try:
            for sock in [*silent, trickle, other]:
                assert await asyncio.to_thread(closed_by_server, sock)
            # A client that said Hello is not an idle socket, however long it stays.
            assert await read_state(client) == PREOPERATIONAL
        finally:
            await client.disconnect()

    try:
        asyncio.run(main())
        assert server.connection_stats["sockets_without_hello"] == 6
    finally:
        for sock in [*silent, trickle, other]:
            sock.close()
        server.stop()


def test_a_flood_past_the_socket_cap_closes_the_oldest_sockets_without_a_session(
    tmp_path: Path,
) -> None:
    opts = settings(tmp_path, allow_anonymous=True, hello_timeout_s=60.0)
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "m")
    flood: list[socket.socket] = []

    async def main() -> None:
        plc = await connect_and_read(opts.endpoint)
        try:
            flood.extend(await asyncio.to_thread(idle_sockets, opts.endpoint, MAX_SOCKETS + 20))
            # The logged-in client keeps its connection; a new one still gets in.
            assert await read_state(plc) == PREOPERATIONAL
            late = await asyncio.wait_for(connect_and_read(opts.endpoint), CONNECT_WITHIN_S)
            await late.disconnect()
        finally:
            await plc.disconnect()

    try:
        asyncio.run(main())
        # The cap holds the plc's socket and 255 of the flood: the other 21 of the flood and
        # the late client each closed the oldest silent socket.
        assert server.connection_stats["sockets_evicted"] == 22
        assert all(closed_by_server(sock) for sock in flood[:22])
        flood[22].settimeout(0.2)
        with pytest.raises(TimeoutError):  # still open: the oldest went first
            flood[22].recv(1)
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def test_sessions_past_max_sessions_are_refused_with_bad_too_many_sessions(
    tmp_path: Path,
) -> None:
    opts = settings(tmp_path, allow_anonymous=True, max_sessions=2)
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "m")

    async def main() -> None:
        first = await connect_and_read(opts.endpoint)
        second = await connect_and_read(opts.endpoint)
        third = Client(opts.endpoint, timeout=5)
        with pytest.raises(ua.uaerrors.BadTooManySessions):
            await third.connect()
        third.disconnect_socket()
        assert server.connection_stats["sessions_open"] == 2
        await first.disconnect()  # a session closed frees its place
        third = await connect_and_read(opts.endpoint)
        await third.disconnect()
        await second.disconnect()

    try:
        asyncio.run(main())
        stats = server.connection_stats
        assert stats["sessions_refused"] == 1 and stats["sessions_open"] == 0
    finally:
        server.stop()


def test_a_socket_past_a_cap_of_sessions_gets_bad_tcp_server_too_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every socket carries a session only when sessions fill the socket cap: a cap of 2 here.
    monkeypatch.setattr(opcua, "MAX_SOCKETS", 2)
    opts = settings(tmp_path, allow_anonymous=True)
    server = OpcUaServer(opts, Triggers())
    server.start(["cam"], "m")

    async def main() -> None:
        clients = [await connect_and_read(opts.endpoint) for _ in range(2)]
        refused = Client(opts.endpoint, timeout=5)
        with pytest.raises(ua.uaerrors.BadTcpServerTooBusy):
            await refused.connect()
        refused.disconnect_socket()
        for client in clients:
            await client.disconnect()

    try:
        asyncio.run(main())
        assert server.connection_stats["sockets_refused"] == 1
        assert set(server.connection_stats) == set(CONNECTION_STATS)
    finally:
        server.stop()


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
        "missing: set users (or username and password), or allow_anonymous: true",
    )
    assert problem({**on, "security": "basic256sha256", "allow_anonymous": True}, tmp_path) == (
        ("certificate_file",),
        "required when security is basic256sha256",
    )
    secure = {
        **on,
        "security": "basic256sha256",
        "certificate_file": "c.der",
        "private_key_file": "k.pem",
        "allow_anonymous": True,
    }
    assert problem(secure, tmp_path) == (
        ("trusted_client_certificates",),
        "required when security is basic256sha256 (a folder of the client certificates to trust)",
    )
    trusting = OpcUaModel.model_validate(
        {**secure, "trusted_client_certificates": "trusted"}, context={"base": tmp_path}
    )
    assert trusting.trusted_client_certificates == tmp_path / "trusted"
    assert problem({"trusted_client_certificates": "trusted"}, tmp_path) == (
        ("trusted_client_certificates",),
        "only used with security: basic256sha256",
    )
    assert off.max_sessions == 32 and off.hello_timeout_s == 5.0
    assert problem({"max_sessions": 0}, tmp_path)[0] == ("max_sessions",)
    assert problem({"max_sessions": MAX_SOCKETS}, tmp_path)[0] == ("max_sessions",)
    assert problem({"hello_timeout_s": 0}, tmp_path)[0] == ("hello_timeout_s",)
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
            f" users: [{json.dumps(ENGINEER_USER)}]}}\n"
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
                        client.set_user(ENGINEER[0])  # SelectRecipe is an engineer's
                        client.set_password(ENGINEER[1])
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
                    # The part it makes (one inspection: the station camera's) is served too.
                    part = await until(
                        lambda: read("EdgeAgent.Part.PartId"), lambda v: v == "PLC-7"
                    )
                    assert part == "PLC-7"
                    assert await read("EdgeAgent.Part.Recipe") == "default"
                    assert await read("EdgeAgent.Part.Verdict") in ("OK", "NG")
                    # The recipe: its state from the start, and SelectRecipe to the agent.
                    assert await read("EdgeAgent.Recipe.Active") == "default"
                    assert await read("EdgeAgent.Recipe.Number") == 1
                    status, out = await call_select(client, idx, "default", int32(0))
                    assert status.is_good() and out == [""]
                    status, out = await call_select(client, idx, "nope", int32(0))
                    assert status.value == ua.StatusCodes.BadInvalidArgument
                    assert out == ["no recipe named 'nope'"]
                    result = await until(
                        lambda: read("EdgeAgent.Recipe.Result"), lambda v: v == "refused"
                    )
                    assert result == "refused"
                    assert await read("EdgeAgent.Recipe.Reason") == "no recipe named 'nope'"
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
