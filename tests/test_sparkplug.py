"""Sparkplug B 3.0 (edge_agent/publish/sparkplug.py) against a real Mosquitto: every payload is
decoded with the bindings generated from the specification's sparkplug_b.proto."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent.config import load_config
from edge_agent.errors import UserError
from edge_agent.publish import contract
from edge_agent.publish import sparkplug as sp
from edge_agent.publish import sparkplug_b_pb2 as pb
from edge_agent.publish.publisher import MqttSettings
from edge_agent.publish.sparkplug import (
    DEVICE_METRICS,
    METRIC_NAMES,
    NODE_METRICS,
    PART_METRICS,
    RECIPE_METRICS,
    SparkplugNode,
    metric_value,
)
from edge_agent.station.recipes import MAX_COMMAND_BYTES, MAX_NUMBER, Select
from tests.brokers import Broker, Gate, Received, Subscriber, free_port
from tests.conftest import require_mtd

ROOT = Path(__file__).resolve().parents[1]
GROUP, NODE = "g1", "node1"
BASE = f"spBv1.0/{GROUP}"


# -- helpers -------------------------------------------------------------------------------


def _settings(tmp_path: Path, port: int, **kw: Any) -> sp.SparkplugSettings:
    mqtt_settings = MqttSettings(
        port=port,
        client_id="test-agent",
        spool_dir=tmp_path / "spool",
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
    )
    args: dict[str, Any] = {
        "group_id": GROUP,
        "edge_node_id": NODE,
        "primary_host_id": None,
        "host": None,
        "port": None,
        "client_id": None,
        "spool_dir": None,
        "spool_max_messages": 10_000,
        "spool_max_bytes": 16 * 1024 * 1024,
        "data_qos": 0,
    }
    return sp.resolve_settings(mqtt_settings, **{**args, **kw})


def _values(seq: int, verdict: str = "OK") -> dict[str, Any]:
    msg = {
        "verdict": verdict,
        "score": None if verdict == "ERROR" else 1.5 + seq,
        "normalised_score": None if verdict == "ERROR" else 0.5,
        "threshold": None if verdict == "ERROR" else 3.0,
        "regions": [{"x": 1}] if verdict == "NG" else [],
        "part_id": None,
        "sequence": seq,
        "frame_id": f"f-{seq}",
        "model_id": "m1",
        "latency_ms": 12.5,
    }
    return sp.device_values(msg, inspected=seq, ng=0, dropped=0, errors=0, connected=True)


def _stamp(seq: int) -> int:
    return 1_700_000_000_000 + seq


class Decoded:
    """One Sparkplug message, decoded."""

    def __init__(self, received: Received) -> None:
        self.topic = received.topic
        parts = received.topic.split("/")
        self.kind = parts[2]
        self.device = parts[4] if len(parts) > 4 else None
        self.payload = pb.Payload.FromString(received.payload)

    @property
    def seq(self) -> int:
        return self.payload.seq

    def by_name(self) -> dict[str, Any]:
        return {m.name: metric_value(m) for m in self.payload.metrics}

    def __repr__(self) -> str:
        return (
            f"{self.kind}({self.device}, seq={self.seq if self.payload.HasField('seq') else '-'})"
        )


def _decoded(sub: Subscriber) -> list[Decoded]:
    """What the node published (commands to it are a peer's, hostile ones included)."""
    ours = [m for m in sub.messages if m.topic.startswith(BASE)]
    return [Decoded(m) for m in ours if m.topic.split("/")[2] not in (sp.NCMD, sp.DCMD)]


def _kinds(sub: Subscriber, kind: str) -> list[Decoded]:
    return [d for d in _decoded(sub) if d.kind == kind]


def _wait_kind(sub: Subscriber, kind: str, n: int = 1, timeout_s: float = 10.0) -> list[Decoded]:
    ok = sub.wait_for(
        lambda msgs: sum(m.topic.split("/")[2:3] == [kind] for m in msgs) >= n, timeout_s
    )
    assert ok, f"fewer than {n} {kind}; got {_decoded(sub)}"
    return _kinds(sub, kind)


def _bdseq(d: Decoded) -> int:
    value = d.by_name()["bdSeq"]
    assert isinstance(value, int)
    return value


def _names_by_alias(births: list[Decoded]) -> dict[int, str]:
    return {m.alias: m.name for b in births for m in b.payload.metrics}


def _data(d: Decoded, aliases: dict[int, str]) -> dict[str, Any]:
    return {aliases[m.alias]: metric_value(m) for m in d.payload.metrics}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    with Subscriber(broker.port, "spBv1.0/#") as s:
        yield s


@pytest.fixture
def nodes() -> Iterator[list[SparkplugNode]]:
    started: list[SparkplugNode] = []
    yield started
    for node in started:
        node.stop(timeout_s=0.5)


def _node(
    nodes: list[SparkplugNode],
    settings: sp.SparkplugSettings,
    cameras: tuple[str, ...] = ("a",),
    wait_s: float = 5.0,
) -> SparkplugNode:
    node = SparkplugNode(settings, list(cameras), version="9.9.9")
    node.update_node(**{"Properties/Model ID": "m1", "Properties/Device": "cpu"})
    node.start(wait_s=wait_s)
    nodes.append(node)
    return node


def _wait(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- pure parts ----------------------------------------------------------------------------


def test_seq_and_bdseq_wrap_at_255() -> None:
    assert [sp.next_seq(s) for s in (0, 1, 254, 255)] == [1, 2, 255, 0]
    assert [sp.next_bdseq(s) for s in (0, 254, 255)] == [1, 255, 0]


def test_bdseq_file_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "x" / "bdseq"
    assert sp.read_bdseq(path) == 0
    sp.write_bdseq(path, 17)
    assert path.read_text() == "17\n" and sp.read_bdseq(path) == 17
    path.write_text("garbage")
    assert sp.read_bdseq(path) == 0
    assert not list(path.parent.glob(".bdseq.*"))  # atomic_write leaves no temporary file


# Bounded to a few seconds; no example database left behind in the shared tree.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _state(online: object, stamp: object) -> bytes:
    return json.dumps({"online": online, "timestamp": stamp}).encode()


HOSTILE_STATES = {
    "nested 100000 deep": b"[" * 100_000,  # issue 29: RecursionError, and a reconnect loop
    "nested within the size bound": b"[" * 1000,  # RecursionError from json itself
    "nested object": b'{"online": true, "timestamp": 1, "x": ' + b"[" * 990 + b"]" * 990 + b"}",
    "over the size bound": _state(True, 1)[:-1] + b', "pad": "' + b"x" * sp.MAX_STATE_BYTES + b'"}',
    "empty": b"",
    "Sparkplug 2.2 text": b"ONLINE",
    "not JSON": b"{online: true}",
    "invalid UTF-8": b'{"online": true, "timestamp": 1, "x": "\xff\xfe"}',
    "UTF-16": _state(True, 1).decode().encode("utf-16"),  # json.loads(bytes) would accept it
    "UTF-8 with a BOM": b"\xef\xbb\xbf" + _state(True, 1),
    "array": b"[true, 1]",
    "null": b"null",
    "string": b'"online"',
    "online a string": _state("true", 1),
    "online an integer": _state(1, 1),
    "online null": _state(None, 1),
    "online missing": b'{"timestamp": 1}',
    "timestamp missing": b'{"online": true}',
    "timestamp null": _state(True, None),
    "timestamp a bool": _state(True, True),
    "timestamp a float": _state(True, 1.5),
    "timestamp an integral float": b'{"online": true, "timestamp": 1e3}',
    "timestamp NaN": b'{"online": true, "timestamp": NaN}',
    "timestamp a string": _state(True, "1700000000000"),
    "timestamp negative": _state(True, -1),
    "timestamp beyond uint64": _state(True, 1 << 64),
}


@pytest.mark.parametrize("payload", HOSTILE_STATES.values(), ids=HOSTILE_STATES.keys())
def test_hostile_state_payloads_are_refused(payload: bytes) -> None:
    assert sp.parse_state(payload) is None


def test_state_payloads_of_a_3_0_host_are_taken() -> None:
    assert sp.parse_state(b'{"online": true, "timestamp": 5}') == (True, 5)
    assert sp.parse_state(b' {"timestamp": 0, "online": false}\n') == (False, 0)
    assert sp.parse_state(_state(True, sp.MAX_TIMESTAMP_MS)) == (True, sp.MAX_TIMESTAMP_MS)
    assert sp.parse_state(b'{"online": true, "timestamp": 7, "extra": [1]}') == (True, 7)
    padded = b'{"online": true, "timestamp": 9}'.ljust(sp.MAX_STATE_BYTES)
    assert sp.parse_state(padded) == (True, 9)


def _check_state(payload: bytes) -> None:
    parsed = sp.parse_state(payload)
    if parsed is not None:
        online, stamp = parsed
        assert type(online) is bool and type(stamp) is int
        assert 0 <= stamp <= sp.MAX_TIMESTAMP_MS


@FUZZ
@given(st.binary(max_size=sp.MAX_STATE_BYTES + 64))
def test_state_from_random_bytes(payload: bytes) -> None:
    _check_state(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@FUZZ
@given(json_values, json_values)
def test_state_from_json(online: object, stamp: object) -> None:
    payload = _state(online, stamp)
    valid = type(online) is bool and type(stamp) is int and 0 <= stamp <= sp.MAX_TIMESTAMP_MS
    assert sp.parse_state(payload) == ((online, stamp) if valid else None)


def _rebirth(**fields: Any) -> bytes:
    payload = pb.Payload(timestamp=1)
    payload.metrics.add(**fields)
    return payload.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, body: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2), written without the bindings: they
    would not build what a hostile peer can send."""
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _nested_templates(depth: int) -> bytes:
    """Payload{metrics: Metric{template_value: Template{metrics: Metric{...}}}}, depth deep."""
    template_value = pb.Payload.Metric.DESCRIPTOR.fields_by_name["template_value"].number
    template_metrics = pb.Payload.Template.DESCRIPTOR.fields_by_name["metrics"].number
    metric = b""
    for _ in range(depth):
        metric = _field(template_value, _field(template_metrics, metric))
    return _field(pb.Payload.DESCRIPTOR.fields_by_name["metrics"].number, metric)


REBIRTH_ALIAS = sp.node_alias(sp.REBIRTH)
REBIRTH_YES = _rebirth(name=sp.REBIRTH, datatype=pb.Boolean, boolean_value=True)
UNDECODABLE_COMMANDS = {
    "not protobuf": b"\xff\xff\xff not protobuf",
    "truncated": REBIRTH_YES[:-3],
    "nested 5000 deep": _nested_templates(5000),  # within the size bound
    "over the size bound": REBIRTH_YES
    + _rebirth(name="pad", datatype=pb.String, string_value="x" * sp.MAX_COMMAND_BYTES),
}
NOT_REBIRTH_COMMANDS = {
    "false": _rebirth(name=sp.REBIRTH, datatype=pb.Boolean, boolean_value=False),
    "a String": _rebirth(name=sp.REBIRTH, datatype=pb.String, string_value="true"),
    "an Int64": _rebirth(name=sp.REBIRTH, datatype=pb.Int64, long_value=1),
    "a boolean value typed String": _rebirth(
        name=sp.REBIRTH, datatype=pb.String, boolean_value=True
    ),
    "null": _rebirth(name=sp.REBIRTH, datatype=pb.Boolean, is_null=True, boolean_value=True),
    "another alias": _rebirth(alias=REBIRTH_ALIAS + 1, datatype=pb.Boolean, boolean_value=True),
    "another name, the rebirth alias": _rebirth(
        name="Other", alias=REBIRTH_ALIAS, datatype=pb.Boolean, boolean_value=True
    ),
    "invalid UTF-8 name": _field(2, _field(1, b"\xff\xfe") + b"\x70\x01"),  # boolean true
    "empty": b"",
}


@pytest.mark.parametrize("payload", UNDECODABLE_COMMANDS.values(), ids=UNDECODABLE_COMMANDS.keys())
def test_undecodable_commands_are_refused(payload: bytes) -> None:
    assert sp.decode_command(payload) is None
    assert not sp.is_rebirth_request(payload)


@pytest.mark.parametrize("payload", NOT_REBIRTH_COMMANDS.values(), ids=NOT_REBIRTH_COMMANDS.keys())
def test_commands_that_do_not_ask_for_a_rebirth(payload: bytes) -> None:
    assert sp.decode_command(payload) is not None
    assert not sp.is_rebirth_request(payload)


def test_rebirth_requests_by_name_or_alias_with_or_without_datatype() -> None:
    assert sp.is_rebirth_request(REBIRTH_YES)
    assert sp.is_rebirth_request(
        _rebirth(alias=REBIRTH_ALIAS, datatype=pb.Boolean, boolean_value=True)
    )
    assert sp.is_rebirth_request(_rebirth(name=sp.REBIRTH, boolean_value=True))  # datatype left out


@FUZZ
@given(st.binary(max_size=512))
def test_commands_from_random_bytes(payload: bytes) -> None:
    assert sp.is_rebirth_request(payload) in (True, False)


@FUZZ
@given(st.sampled_from([REBIRTH_YES, *NOT_REBIRTH_COMMANDS.values()]), st.data())
def test_commands_from_mutated_payloads(seed: bytes, data: st.DataObject) -> None:
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        if not mutated:
            break
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    assert sp.is_rebirth_request(bytes(mutated)) in (True, False)


def _select(*metrics: dict[str, Any]) -> bytes:
    payload = pb.Payload(timestamp=1)
    for fields in metrics:
        payload.metrics.add(**fields)
    return payload.SerializeToString()


SELECT_ALIAS = sp.node_alias(sp.RECIPE_SELECT)
BY = {"name": sp.RECIPE_SELECT}
SELECTS = {
    "a name": (_select({**BY, "datatype": pb.String, "string_value": "bottle-b"}), "bottle-b"),
    "a name by alias": (
        _select({"alias": SELECT_ALIAS, "datatype": pb.String, "string_value": "b.2"}),
        "b.2",
    ),
    "Int32": (_select({**BY, "datatype": pb.Int32, "int_value": 2}), 2),
    "UInt32 in int_value (3.0)": (_select({**BY, "datatype": pb.UInt32, "int_value": 3}), 3),
    "UInt32 in long_value (Tahu JS)": (
        _select({**BY, "datatype": pb.UInt32, "long_value": 4}),
        4,
    ),
    "Int64 by alias": (
        _select({"alias": SELECT_ALIAS, "datatype": pb.Int64, "long_value": 5}),
        5,
    ),
    "UInt64, the largest number": (
        _select({**BY, "datatype": pb.UInt64, "long_value": MAX_NUMBER}),
        MAX_NUMBER,
    ),
    "an integer, no datatype": (_select({**BY, "int_value": 1}), 1),
    "a name, no datatype": (_select({**BY, "string_value": "x"}), "x"),
}
HOSTILE_SELECTS = {
    "a Boolean": _select({**BY, "datatype": pb.Boolean, "boolean_value": True}),
    "a Double": _select({**BY, "datatype": pb.Double, "double_value": 2.0}),
    "a Float": _select({**BY, "datatype": pb.Float, "float_value": 2.0}),
    "an Int16": _select({**BY, "datatype": pb.Int16, "int_value": 2}),
    "Bytes": _select({**BY, "datatype": pb.Bytes, "bytes_value": b"2"}),
    "a datatype that does not exist": _select({**BY, "datatype": 999, "long_value": 2}),
    "a String in long_value": _select({**BY, "datatype": pb.String, "long_value": 2}),
    "an Int64 in string_value": _select({**BY, "datatype": pb.Int64, "string_value": "2"}),
    "an Int64 in int_value": _select({**BY, "datatype": pb.Int64, "int_value": 2}),
    "null": _select({**BY, "datatype": pb.String, "is_null": True, "string_value": "a"}),
    "no value": _select({**BY, "datatype": pb.String}),
    "an empty name": _select({**BY, "datatype": pb.String, "string_value": ""}),
    "a line break": _select({**BY, "datatype": pb.String, "string_value": "a\nb"}),
    "a bidi override": _select({**BY, "datatype": pb.String, "string_value": "a\u202eb"}),
    "a name too long": _select(
        {**BY, "datatype": pb.String, "string_value": "x" * (MAX_COMMAND_BYTES + 1)}
    ),
    "invalid UTF-8": _field(2, _field(1, sp.RECIPE_SELECT.encode()) + _field(15, b"\xff\xfe")),
    "zero": _select({**BY, "datatype": pb.Int64, "long_value": 0}),
    "Int32 -1": _select({**BY, "datatype": pb.Int32, "int_value": (1 << 32) - 1}),
    "Int64 -5": _select({**BY, "datatype": pb.Int64, "long_value": (1 << 64) - 5}),
    "UInt64 past the largest": _select({**BY, "datatype": pb.UInt64, "long_value": MAX_NUMBER + 1}),
    "UInt64 2**64-1": _select({**BY, "datatype": pb.UInt64, "long_value": (1 << 64) - 1}),
    "two selections": _select(
        {**BY, "datatype": pb.Int64, "long_value": 1}, {**BY, "datatype": pb.Int64, "long_value": 2}
    ),
}


def _wanted(value: str | int) -> Select:
    return Select(name=value) if isinstance(value, str) else Select(number=value)


@pytest.mark.parametrize(("payload", "value"), SELECTS.values(), ids=SELECTS.keys())
def test_recipe_select_by_number_or_name(payload: bytes, value: str | int) -> None:
    command = sp.decode_command(payload)
    assert command is not None
    assert sp.recipe_select(command) == _wanted(value)
    assert not sp.wants_rebirth(command)


@pytest.mark.parametrize("payload", HOSTILE_SELECTS.values(), ids=HOSTILE_SELECTS.keys())
def test_hostile_recipe_selects_are_refused_with_a_reason(payload: bytes) -> None:
    command = sp.decode_command(payload)
    assert command is not None
    reason = sp.recipe_select(command)
    assert isinstance(reason, str) and reason and "\n" not in reason and len(reason) < 200


def test_a_refused_number_is_named_as_the_host_wrote_it() -> None:
    # Int32 and Int64 are two's complement on the wire: -1 is -1 in the reason, not 2**32-1.
    for payload in (HOSTILE_SELECTS["Int32 -1"], HOSTILE_SELECTS["Int64 -5"]):
        command = sp.decode_command(payload)
        assert command is not None
        assert str(sp.recipe_select(command)).endswith(("got -1", "got -5"))


def test_commands_without_a_recipe_select() -> None:
    others = [REBIRTH_YES, *NOT_REBIRTH_COMMANDS.values()]
    others.append(_select({"name": "Recipe/Active", "datatype": pb.String, "string_value": "a"}))
    others.append(_select({"alias": SELECT_ALIAS + 1, "datatype": pb.Int64, "long_value": 1}))
    others.append(  # a name decides, not the alias beside it
        _select({"name": "Other", "alias": SELECT_ALIAS, "datatype": pb.Int64, "long_value": 1})
    )
    for payload in others:
        command = sp.decode_command(payload)
        assert command is not None and sp.recipe_select(command) is None


@FUZZ
@given(st.binary(max_size=512))
def test_recipe_select_from_random_bytes(payload: bytes) -> None:
    command = sp.decode_command(payload)
    if command is not None:
        assert isinstance(sp.recipe_select(command), Select | str | None)


@FUZZ
@given(st.sampled_from([v for v, _ in SELECTS.values()]), st.data())
def test_recipe_select_from_mutated_payloads(seed: bytes, data: st.DataObject) -> None:
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    command = sp.decode_command(bytes(mutated))
    if command is not None:
        found = sp.recipe_select(command)
        if isinstance(found, Select):
            assert (found.name is None) != (found.number is None)
            assert found.number is None or 1 <= found.number <= MAX_NUMBER
            assert found.name is None or found.name.isprintable()


def test_recipe_and_part_metrics() -> None:
    state = _recipe_state("bottle-b", 2, "refused", "no recipe named 'x'", changed_ms=5)
    assert sp.recipe_values(state) == {
        "Recipe/Active": "bottle-b",
        "Recipe/Number": 2,
        "Recipe/Result": "refused",
        "Recipe/Reason": "no recipe named 'x'",
    }
    assert tuple(sp.recipe_values(state)) == RECIPE_METRICS
    values = sp.part_values(_part("P-1", "ERROR", missing=["side", "top"]))
    assert tuple(values) == PART_METRICS
    assert values["Part/Missing"] == "side,top"
    inspections = _part("P-1", "ERROR")["inspections"]
    assert values["Part/Inspections"] == json.dumps(inspections, separators=(",", ":"))
    assert sp.part_values(_part("P-2", "OK"))["Part/Missing"] == ""


def test_every_metric_has_a_type_all_decoders_read_alike() -> None:
    # Integers travel in long_value only: the 32-bit types' int_value is where decoders split
    # (UInt32: Tahu JS reads long_value; tests/test_sparkplug_decoders.py decodes with it).
    declared = {m.datatype for m in NODE_METRICS + DEVICE_METRICS}
    assert declared <= set(sp.VALUE_FIELDS)
    assert {
        sp.VALUE_FIELDS[t] for t in declared if t not in (pb.Boolean, pb.String, pb.Double)
    } == {"long_value"}
    with pytest.raises(TypeError, match="UInt32"):  # a new metric cannot bring one back
        sp._set_value(pb.Payload.Metric(), pb.UInt32, 1)


def test_aliases_are_unique_over_node_and_devices() -> None:
    aliases = [sp.node_alias(m.name) for m in NODE_METRICS]
    aliases += [sp.device_alias(i, m.name) for i in range(3) for m in DEVICE_METRICS]
    assert len(aliases) == len(set(aliases))


def _drop_json_names(messages: Any) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_bindings_are_generated_from_the_committed_proto(tmp_path: Path) -> None:
    grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra)")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    folder = ROOT / "edge_agent" / "publish"
    out = tmp_path / "set.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{folder}",
            f"-I{include}",
            f"--descriptor_set_out={out}",
            "sparkplug_b.proto",
        ]
    )
    assert rc == 0
    generated = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    _drop_json_names(generated.message_type)  # the Python generator leaves them out
    assert committed == generated
    assert "Regenerate with" in (folder / "sparkplug_b_pb2.py").read_text()


def test_docs_list_exactly_the_metrics_of_the_code() -> None:
    text = (ROOT / "docs" / "integrators" / "sparkplug.md").read_text()
    section = re.search(r"^# Sparkplug B\n(.*)", text, re.S | re.M)
    assert section, "docs/integrators/sparkplug.md is not the 'Sparkplug B' page"
    listed = re.findall(r"^\| `([^`]+)` \| (\w+) \|", section.group(1), re.M)
    code = [(m.name, pb.DataType.Name(m.datatype)) for m in NODE_METRICS + DEVICE_METRICS]
    assert listed == code
    assert [name for name, _ in listed] == list(METRIC_NAMES)


# -- config --------------------------------------------------------------------------------


def _config(tmp_path: Path, sparkplug: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "bundle: bundle\ncameras:\n  - {id: cam1, source: images}\n"
        f"mqtt: {{host: broker.local, port: 1884, line: l3, client_id: ea, spool_dir: spool}}\n"
        f"{sparkplug}"
    )
    return path


def test_config_is_off_by_default_and_reuses_the_mqtt_section(tmp_path: Path) -> None:
    assert load_config(_config(tmp_path)).sparkplug is None
    c = load_config(_config(tmp_path, "sparkplug: {enabled: true}\n")).sparkplug
    assert c is not None
    assert (c.group_id, c.edge_node_id, c.primary_host_id) == ("l3", "ea", None)
    assert (c.mqtt.host, c.mqtt.port, c.mqtt.client_id) == ("broker.local", 1884, "ea-sparkplug")
    assert c.mqtt.spool_dir == tmp_path / "spool" / "_sparkplug"
    assert c.topic("DDATA", "cam1") == "spBv1.0/l3/DDATA/ea/cam1"
    c = load_config(
        _config(
            tmp_path,
            "sparkplug: {enabled: true, group_id: G, edge_node_id: N, primary_host_id: H,"
            " host: other, port: 1999, spool_dir: sp}\n",
        )
    ).sparkplug
    assert c is not None and c.state_topic == "spBv1.0/STATE/H"
    assert (c.mqtt.host, c.mqtt.port, c.mqtt.spool_dir) == ("other", 1999, tmp_path / "sp")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("sparkplug: {group_id: a+b}", "sparkplug.group_id: 'a+b' must be letters"),
        ("sparkplug: {edge_node_id: a/b}", "sparkplug.edge_node_id: 'a/b' must be letters"),
        ("sparkplug: {data_qos: 2}", "sparkplug.data_qos: must be at most 1, got 2"),
        ("sparkplug: {enable: true}", "sparkplug.enable: unknown key (did you mean 'enabled'?)"),
        (
            "sparkplug: {enabled: true, client_id: ea-cam1}",
            "sparkplug.client_id: 'ea-cam1' is camera cam1's MQTT client id",
        ),
    ],
)
def test_bad_sparkplug_config_is_one_line(tmp_path: Path, section: str, message: str) -> None:
    path = _config(tmp_path, section + "\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    assert "\n" not in str(info.value)


# -- against a broker ----------------------------------------------------------------------


def test_births_come_before_data_with_names_aliases_and_capture_time(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port), cameras=("a", "b"))
    for i, verdict in enumerate(("OK", "NG", "ERROR")):
        node.publish_verdict("a" if i != 1 else "b", _values(i, verdict), _stamp(i))
    _wait_kind(sub, "DDATA", 3)
    messages = _decoded(sub)
    assert [(d.kind, d.device, d.seq) for d in messages] == [
        ("NBIRTH", None, 0),
        ("DBIRTH", "a", 1),
        ("DBIRTH", "b", 2),
        ("DDATA", "a", 3),
        ("DDATA", "b", 4),
        ("DDATA", "a", 5),
    ]
    nbirth = messages[0].by_name()
    assert list(nbirth) == [m.name for m in NODE_METRICS]
    assert nbirth["Properties/Model ID"] == "m1" and nbirth["Properties/Agent Version"] == "9.9.9"
    assert nbirth[sp.REBIRTH] is False
    for birth in messages[1:3]:
        assert [m.name for m in birth.payload.metrics] == [m.name for m in DEVICE_METRICS]
        assert [m.datatype for m in birth.payload.metrics] == [m.datatype for m in DEVICE_METRICS]
        assert all(m.alias for m in birth.payload.metrics)
    aliases = _names_by_alias(messages[:3])
    data = [_data(d, aliases) for d in messages[3:]]
    assert [d["Inspection/Verdict"] for d in data] == ["OK", "NG", "ERROR"]
    assert [d["Inspection/NG"] for d in data] == [False, True, True]
    assert data[1]["Inspection/Region Count"] == 1 and data[1]["Inspection/Score"] == 2.5
    assert data[2]["Inspection/Score"] is None  # ERROR: explicit is_null
    for i, d in enumerate(messages[3:]):
        assert all(not m.name for m in d.payload.metrics)  # data by alias only
        assert {m.timestamp for m in d.payload.metrics} == {_stamp(i)}
        assert not any(m.is_historical for m in d.payload.metrics)
    # Device b's aliases are its own: the alias decides which camera a value belongs to.
    assert {m.alias for m in messages[4].payload.metrics} == {
        m.alias for m in messages[2].payload.metrics
    }


def test_ndeath_and_nbirth_carry_the_same_bdseq_which_persists_across_restarts(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    settings = _settings(tmp_path, broker.port)
    node = _node(nodes, settings)
    first = _bdseq(_wait_kind(sub, "NBIRTH")[0])
    node.stop(timeout_s=2.0)
    death = _wait_kind(sub, "NDEATH")[0]
    assert _bdseq(death) == first and not death.payload.HasField("seq")
    _node(nodes, settings)
    births = _wait_kind(sub, "NBIRTH", 2)
    assert _bdseq(births[1]) == sp.next_bdseq(first)
    assert sp.read_bdseq(Path(settings.mqtt.spool_dir) / sp.BDSEQ_FILE) == sp.next_bdseq(
        _bdseq(births[1])
    )


def test_seq_wraps_from_255_to_0_across_births_and_data(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port))
    for i in range(300):
        node.publish_verdict("a", _values(i), _stamp(i))
    _wait_kind(sub, "DDATA", 300, timeout_s=20)
    seqs = [d.seq for d in _decoded(sub)]
    assert seqs[:3] == [0, 1, 2]
    assert all(b == sp.next_seq(a) for a, b in itertools.pairwise(seqs)), seqs
    assert seqs[256] == 0 and seqs[255] == 255 and max(seqs) == 255


def test_ncmd_rebirth_repeats_the_births_with_the_same_bdseq(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port), cameras=("a", "b"))
    node.publish_verdict("a", _values(0, "NG"), _stamp(0))
    _wait_kind(sub, "DDATA")
    bdseq = _bdseq(_kinds(sub, "NBIRTH")[0])
    cmd = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="host")
    cmd.connect("127.0.0.1", broker.port)
    cmd.loop_start()
    try:
        no = pb.Payload(timestamp=sp.now_ms())
        no.metrics.add(name=sp.REBIRTH, datatype=pb.Boolean, boolean_value=False)
        cmd.publish(f"{BASE}/NCMD/{NODE}", no.SerializeToString(), qos=1).wait_for_publish(5)
        yes = pb.Payload(timestamp=sp.now_ms())
        yes.metrics.add(name=sp.REBIRTH, datatype=pb.Boolean, boolean_value=True)
        cmd.publish(f"{BASE}/NCMD/{NODE}", yes.SerializeToString(), qos=1).wait_for_publish(5)
        births = _wait_kind(sub, "NBIRTH", 2)
    finally:
        cmd.loop_stop()
        cmd.disconnect()
    time.sleep(0.3)
    assert len(_kinds(sub, "NBIRTH")) == 2  # the `false` one asked for nothing
    assert _bdseq(births[1]) == bdseq and births[1].seq == 0
    _wait_kind(sub, "DBIRTH", 4)
    node.publish_verdict("a", _values(1), _stamp(1))
    _wait_kind(sub, "DDATA", 2)
    tail = [(d.kind, d.device, d.seq) for d in _decoded(sub)][-4:]
    assert tail == [("NBIRTH", None, 0), ("DBIRTH", "a", 1), ("DBIRTH", "b", 2), ("DDATA", "a", 3)]
    # The rebirth's DBIRTH holds the device's latest values.
    latest = _kinds(sub, "DBIRTH")[2].by_name()
    assert latest["Inspection/Verdict"] == "NG" and latest["Inspection/Sequence"] == 0


def _publish(port: int, topic: str, *payloads: bytes, retain: bool = False) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="peer")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def _publish_state(port: int, host_id: str, online: bool, stamp: int) -> None:
    _publish(port, f"spBv1.0/STATE/{host_id}", _state(online, stamp), retain=True)


def test_waits_for_the_primary_host_and_dies_while_it_is_offline(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port, primary_host_id="scada"), wait_s=0)
    node.publish_verdict("a", _values(0), _stamp(0))
    _wait(lambda: node.stats["state"] == "waiting", what="the node to connect")
    time.sleep(0.5)
    assert _decoded(sub) == []  # connected, but no birth before the host is online
    _publish_state(broker.port, "scada", True, 100)
    first = _bdseq(_wait_kind(sub, "NBIRTH")[0])
    ddata = _wait_kind(sub, "DDATA")
    aliases = _names_by_alias(_kinds(sub, "DBIRTH"))
    # Held back while waiting for the host: sent after the births, marked historical.
    assert _data(ddata[0], aliases)["Inspection/Sequence"] == 0
    assert all(m.is_historical for m in ddata[0].payload.metrics)

    _publish_state(broker.port, "scada", False, 200)
    death = _wait_kind(sub, "NDEATH")[0]
    assert _bdseq(death) == first
    _wait(lambda: node.stats["state"] == "waiting", what="the node to reconnect and wait")
    for i in (1, 2, 3):
        node.publish_verdict("a", _values(i), _stamp(i))
    _publish_state(broker.port, "scada", True, 150)  # older than the offline: stale, ignored
    time.sleep(0.5)
    assert len(_kinds(sub, "NBIRTH")) == 1 and len(_kinds(sub, "DDATA")) == 1

    _publish_state(broker.port, "scada", True, 300)
    births = _wait_kind(sub, "NBIRTH", 2)
    assert _bdseq(births[1]) == sp.next_bdseq(first)
    ddata = _wait_kind(sub, "DDATA", 4)[1:]
    assert [_data(d, aliases)["Inspection/Sequence"] for d in ddata] == [1, 2, 3]
    assert all(m.is_historical for d in ddata for m in d.payload.metrics)


def test_a_hostile_retained_state_is_refused_and_the_node_stays_connected_until_born(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    # Issue 29: this retained STATE raised RecursionError out of paho's callback; every
    # reconnect read it again, so the node sent its will NDEATH over and over, never born.
    _publish(broker.port, "spBv1.0/STATE/scada", HOSTILE_STATES["nested 100000 deep"], retain=True)
    node = _node(nodes, _settings(tmp_path, broker.port, primary_host_id="scada"), wait_s=0)
    _wait(lambda: node.stats["connects"] >= 1, what="the node to connect")
    time.sleep(1.0)  # reconnects take 0.05..0.3 s here: a loop would show within this second
    assert _decoded(sub) == [] and node.stats["connects"] == 1
    assert node.stats["state"] == "waiting" and node.stats["states_refused"] == 1
    others = [
        HOSTILE_STATES[k] for k in ("over the size bound", "invalid UTF-8", "online a string")
    ]
    _publish(broker.port, "spBv1.0/STATE/scada", *others)
    _wait(lambda: node.stats["states_refused"] == 4, what="the other STATEs to be refused")

    _publish_state(broker.port, "scada", True, 100)  # replaces the retained hostile one
    _wait_kind(sub, "NBIRTH")
    time.sleep(0.5)
    assert [d.kind for d in _decoded(sub)] == ["NBIRTH", "DBIRTH"]  # born once, no NDEATH
    stats = node.stats
    assert (stats["state"], stats["connects"], stats["message_errors"]) == ("born", 1, 0)


def test_hostile_commands_are_refused_and_the_node_stays_born(
    tmp_path: Path,
    broker: Broker,
    sub: Subscriber,
    nodes: list[SparkplugNode],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port))
    _wait_kind(sub, "DBIRTH")
    ncmd = f"{BASE}/NCMD/{NODE}"
    _publish(broker.port, ncmd, *UNDECODABLE_COMMANDS.values(), *NOT_REBIRTH_COMMANDS.values())
    _wait(
        lambda: node.stats["commands_refused"] == len(UNDECODABLE_COMMANDS),
        what="the undecodable NCMDs to be refused",
    )

    # The last resort: a handler that raises (a bug of ours) costs the message, never the
    # connection.
    def broken(_command: object) -> bool:
        raise RuntimeError("a bug in the NCMD handler")

    monkeypatch.setattr(sp, "wants_rebirth", broken)
    _publish(broker.port, ncmd, REBIRTH_YES, REBIRTH_YES)
    _wait(lambda: node.stats["message_errors"] == 2, what="the failing NCMDs to be counted")
    monkeypatch.undo()

    node.publish_verdict("a", _values(0), _stamp(0))
    _wait_kind(sub, "DDATA")
    time.sleep(0.3)
    assert [d.kind for d in _decoded(sub)] == ["NBIRTH", "DBIRTH", "DDATA"]  # no rebirth
    assert node.stats["connects"] == 1 and node.stats["state"] == "born"


def test_broker_restart_sends_the_backlog_historical_in_order_after_rebirth(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    with Gate(broker.port) as gate:
        node = _node(nodes, _settings(tmp_path, gate.port))
        for i in range(5):
            node.publish_verdict("a", _values(i), _stamp(i))
        _wait_kind(sub, "DDATA", 5)
        gate.close()
        _wait(lambda: node.stats["state"] == "down", what="the node to see the outage")
        for i in range(5, 45):
            node.publish_verdict("a", _values(i), _stamp(i))
        broker.stop()
        sub.wait_disconnected()  # else wait_subscribed could see the old subscription
        broker.start()
        sub.wait_subscribed()
        gate.open()  # only once the subscriber listens again: it must see everything
        _wait_kind(sub, "NBIRTH", 2)
        _wait_kind(sub, "DDATA", 45, timeout_s=20)
    messages = _decoded(sub)
    aliases = _names_by_alias(messages[:2])
    second = [i for i, d in enumerate(messages) if d.kind == "NBIRTH"][1]
    # The session ends where the gate closes: the broker then sends the will NDEATH, which
    # carries no seq (it may or may not have arrived by now).
    ends = [i for i, d in enumerate(messages) if i > second and d.kind in ("NBIRTH", "NDEATH")]
    after = messages[second : ends[0] if ends else len(messages)]
    assert [d.kind for d in after[:2]] == ["NBIRTH", "DBIRTH"]
    assert [d.seq for d in after] == list(range(len(after)))
    backlog = after[2:]
    assert [_data(d, aliases)["Inspection/Sequence"] for d in backlog] == list(range(5, 45))
    assert all(m.is_historical for d in backlog for m in d.payload.metrics)
    assert [{m.timestamp for m in d.payload.metrics} for d in backlog] == [
        {_stamp(i)} for i in range(5, 45)
    ]
    live = [d for d in messages[:second] if d.kind == "DDATA"]
    assert not any(m.is_historical for d in live for m in d.payload.metrics)
    assert node.stats["dropped"] == 0


def _recipe_state(
    active: str, number: int, result: str, reason: str | None, *, changed_ms: int
) -> dict[str, Any]:
    return contract.recipe_message(
        active=active,
        number=number,
        result=result,
        reason=reason,
        request_id=None,
        changed_at=changed_ms / 1000,
    )


def _part(part_id: str, verdict: str, missing: list[str] | None = None) -> dict[str, Any]:
    inspection = {
        "id": "top",
        "camera": "a",
        "verdict": "NG",
        "score": 31.5,
        "normalised_score": 0.55,
        "threshold": 30.0,
        "regions": [{"bbox": [1, 2, 3, 4], "area": 12, "peak": 33.2}],
    }
    part = {
        "part_id": part_id,
        "recipe": "bottle-b",
        "verdict": verdict,
        "inspections": [inspection],
        "missing": missing or [],
    }
    return contract.part_message(part, decided_at=1_700_000_100 + len(part_id) / 1000)


def _node_data(d: Decoded) -> dict[str, Any]:
    names = {sp.node_alias(m.name): m.name for m in NODE_METRICS}
    assert all(not m.name for m in d.payload.metrics)  # data by alias only
    return {names[m.alias]: metric_value(m) for m in d.payload.metrics}


class Selections:
    """A recipe handler as the agent's: records each call; refuses names in `unknown`."""

    def __init__(self) -> None:
        self.calls: list[tuple[Select, str]] = []
        self.unknown = {"nope"}

    def __call__(self, select: Select, source: str) -> str | None:
        self.calls.append((select, source))
        return f"no recipe named {select.name!r}" if select.name in self.unknown else None


def test_recipe_state_rides_the_births_and_goes_out_as_ndata_when_it_changes(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = SparkplugNode(_settings(tmp_path, broker.port), ["a"], version="9.9.9")
    nodes.append(node)
    node.set_recipe(_recipe_state("bottle-a", 1, "ok", "started", changed_ms=_stamp(1)))
    node.start(wait_s=5.0)
    birth = _wait_kind(sub, "NBIRTH")[0]
    values = birth.by_name()
    assert {n: values[n] for n in RECIPE_METRICS} == {
        "Recipe/Active": "bottle-a",
        "Recipe/Number": 1,
        "Recipe/Result": "ok",
        "Recipe/Reason": "started",
    }
    assert values[sp.RECIPE_SELECT] is None  # written by hosts, never read
    assert all(values[n] is None for n in PART_METRICS)  # no part yet
    stamps = {m.name: m.timestamp for m in birth.payload.metrics}
    assert stamps["Recipe/Active"] == stamps["Recipe/Number"] == _stamp(1)  # when it changed

    node.set_recipe(_recipe_state("bottle-b", 2, "ok", None, changed_ms=_stamp(2)))
    ndata = _wait_kind(sub, "NDATA")[0]
    assert _node_data(ndata) == {
        "Recipe/Active": "bottle-b",
        "Recipe/Number": 2,
        "Recipe/Result": "ok",
        "Recipe/Reason": None,
    }
    assert {m.timestamp for m in ndata.payload.metrics[:2]} == {_stamp(2)}
    node.set_recipe(_recipe_state("bottle-b", 2, "refused", "no recipe named 'x'", changed_ms=2))
    refused = _node_data(_wait_kind(sub, "NDATA", 2)[1])
    assert (refused["Recipe/Result"], refused["Recipe/Reason"]) == (
        "refused",
        "no recipe named 'x'",
    )
    assert [d.seq for d in _decoded(sub)] == [0, 1, 2, 3]


def test_each_part_is_one_ndata_of_the_part_metrics(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port))
    node.publish_verdict("a", _values(0), _stamp(0))
    node.publish_part(_part("P-1", "NG"))
    node.publish_part(_part("P-22", "ERROR", missing=["side", "top"]))
    _wait_kind(sub, "NDATA", 2)
    messages = _decoded(sub)
    assert [d.kind for d in messages] == ["NBIRTH", "DBIRTH", "DDATA", "NDATA", "NDATA"]
    first, second = (_node_data(d) for d in messages[3:])
    assert first == {
        "Part/ID": "P-1",
        "Part/Recipe": "bottle-b",
        "Part/Verdict": "NG",
        "Part/Missing": "",
        "Part/Inspections": sp.compact_json(_part("P-1", "NG")["inspections"]),
    }
    assert json.loads(first["Part/Inspections"])[0]["regions"][0]["bbox"] == [1, 2, 3, 4]
    assert (second["Part/ID"], second["Part/Verdict"]) == ("P-22", "ERROR")
    assert second["Part/Missing"] == "side,top"
    for d, part in zip(messages[3:], ("P-1", "P-22"), strict=True):
        # Stamped with when the part was decided; live, not historical.
        assert {m.timestamp for m in d.payload.metrics} == {_part(part, "OK")["timestamp"]}
        assert not any(m.is_historical for m in d.payload.metrics)
    assert [d.seq for d in messages] == [0, 1, 2, 3, 4]


def test_parts_wait_in_the_spool_and_the_births_carry_the_latest_recipe_and_part(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = SparkplugNode(
        _settings(tmp_path, broker.port, primary_host_id="scada"), ["a"], version="9.9.9"
    )
    nodes.append(node)
    node.set_recipe(_recipe_state("bottle-a", 1, "ok", "started", changed_ms=1))
    node.start()
    _wait(lambda: node.stats["state"] == "waiting", what="the node to connect")
    node.publish_part(_part("P-1", "OK"))
    node.publish_part(_part("P-22", "NG"))
    node.set_recipe(_recipe_state("bottle-b", 2, "ok", None, changed_ms=2))
    time.sleep(0.3)
    assert _decoded(sub) == []  # not born: nothing goes out
    _publish_state(broker.port, "scada", True, 100)
    _wait_kind(sub, "NDATA", 2)
    time.sleep(0.3)
    messages = _decoded(sub)
    # The births hold the state; no recipe NDATA follows them.
    assert [d.kind for d in messages] == ["NBIRTH", "DBIRTH", "NDATA", "NDATA"]
    birth = messages[0].by_name()
    assert (birth["Recipe/Active"], birth["Recipe/Number"]) == ("bottle-b", 2)
    assert (birth["Part/ID"], birth["Part/Verdict"]) == ("P-22", "NG")
    parts = [_node_data(d) for d in messages[2:]]
    assert [p["Part/ID"] for p in parts] == ["P-1", "P-22"]  # in order, from the spool
    assert all(m.is_historical for d in messages[2:] for m in d.payload.metrics)


def test_ncmd_recipe_select_reaches_the_handler_and_hostile_ones_are_refused(
    tmp_path: Path,
    broker: Broker,
    sub: Subscriber,
    nodes: list[SparkplugNode],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port))
    _wait_kind(sub, "DBIRTH")
    ncmd = f"{BASE}/NCMD/{NODE}"
    # No handler (a node the agent did not give one): refused, counted.
    _publish(broker.port, ncmd, SELECTS["Int32"][0])
    _wait(lambda: node.stats["commands_refused"] == 1, what="a selection without a handler")

    handler = Selections()
    node.set_recipe_handler(handler)
    _publish(broker.port, ncmd, *(payload for payload, _ in SELECTS.values()))
    _wait(lambda: len(handler.calls) == len(SELECTS), what="the selections to reach the handler")
    assert handler.calls == [(_wanted(value), "sparkplug") for _, value in SELECTS.values()]

    handler.calls.clear()
    with caplog.at_level(logging.INFO, logger="edge_agent.publish.sparkplug"):
        nope = _select({**BY, "datatype": pb.String, "string_value": "nope"})
        _publish(broker.port, ncmd, nope)
        _wait(lambda: len(handler.calls) == 1, what="the unknown name to reach the handler")
        _wait(lambda: "no recipe named 'nope'" in caplog.text, what="the refusal to be logged")
    assert node.stats["commands_refused"] == 1  # the handler's refusal is the agent's to count

    _publish(broker.port, ncmd, *HOSTILE_SELECTS.values())
    _wait(
        lambda: node.stats["commands_refused"] == 1 + len(HOSTILE_SELECTS),
        what="the hostile selections to be refused",
    )
    # A rebirth and a selection in one command: both are done.
    both = _select(
        {"name": sp.REBIRTH, "datatype": pb.Boolean, "boolean_value": True},
        {**BY, "datatype": pb.Int64, "long_value": 7},
    )
    _publish(broker.port, ncmd, both)
    _wait_kind(sub, "NBIRTH", 2)
    assert handler.calls == [(Select(name="nope"), "sparkplug"), (Select(number=7), "sparkplug")]
    stats = node.stats
    assert (stats["state"], stats["connects"], stats["message_errors"]) == ("born", 1, 0)


def test_a_failing_recipe_handler_costs_the_command_not_the_connection(
    tmp_path: Path, broker: Broker, sub: Subscriber, nodes: list[SparkplugNode]
) -> None:
    node = _node(nodes, _settings(tmp_path, broker.port))

    def broken(_select: Select, _source: str) -> str | None:
        raise RuntimeError("a bug in the recipe handler")

    node.set_recipe_handler(broken)
    _wait_kind(sub, "DBIRTH")
    _publish(broker.port, f"{BASE}/NCMD/{NODE}", SELECTS["a name"][0], SELECTS["Int32"][0])
    _wait(lambda: node.stats["message_errors"] == 2, what="the failing selections to be counted")
    node.publish_part(_part("P-1", "OK"))
    _wait_kind(sub, "NDATA")
    assert [d.kind for d in _decoded(sub)] == ["NBIRTH", "DBIRTH", "NDATA"]
    assert node.stats["connects"] == 1 and node.stats["state"] == "born"


def test_a_dead_broker_never_slows_the_caller(tmp_path: Path, nodes: list[SparkplugNode]) -> None:
    node = _node(nodes, _settings(tmp_path, free_port()))  # nothing listens there
    values = _values(1)
    started = time.perf_counter()
    for i in range(2000):
        node.publish_verdict("a", values, _stamp(i))
    per_call = (time.perf_counter() - started) / 2000
    assert per_call < 0.001, per_call
    _wait(lambda: node.stats["spooled"] == 2000, what="the verdicts to reach the spool")
    node.stop(timeout_s=0.5)
    assert node.stats["spooled"] == 2000  # kept on disk for the next run


# -- the agent -----------------------------------------------------------------------------


def _agent_config(tmp_path: Path, bundle: Path, port: int, frames: Path, *, loop: bool) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"bundle: {bundle}\n"
        "device: cpu\nthreads: 2\n"
        "batching: {max_batch: 4, max_wait_ms: 10, queue_size: 4}\n"
        f"cameras:\n  - {{id: cam1, source: {frames}, loop: {str(loop).lower()}}}\n"
        f"mqtt: {{port: {port}, spool_dir: {tmp_path / 'spool'}, line: l1, client_id: ea,"
        " health_interval_s: 0.5}\n"
        "metrics: {port: null}\n"
        f"sparkplug: {{enabled: true, group_id: {GROUP}, edge_node_id: {NODE}}}\n"
    )
    return path


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    src = require_mtd() / "test"
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in sorted((src / "good").iterdir())[:4] + sorted((src / "crack").iterdir())[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "zz_broken.png").write_bytes(b"not an image")  # answered ERROR
    return folder


def _agent(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--exit-when-done"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_agent_sends_births_then_one_ddata_per_answered_frame(
    tmp_path: Path, calibrated_bundle: Path, frames: Path, broker: Broker, sub: Subscriber
) -> None:
    with Subscriber(broker.port, "edge-agent/l1/+/verdict") as v1:
        proc = _agent(_agent_config(tmp_path, calibrated_bundle, broker.port, frames, loop=False))
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        _wait_kind(sub, "NDEATH")
        v1.wait_for(lambda msgs: len(msgs) >= 7)
        assert len(v1.messages) == 7  # contract v1 unchanged beside it
    messages = _decoded(sub)
    kinds = [d.kind for d in messages]
    assert kinds[:2] == ["NBIRTH", "DBIRTH"] and kinds[-1] == "NDEATH"
    ddata = [d for d in messages if d.kind == "DDATA"]
    aliases = _names_by_alias(messages[:2])
    verdicts = [_data(d, aliases) for d in ddata if "Inspection/Verdict" in _data(d, aliases)]
    assert len(verdicts) == 7  # one per answered frame: OK, NG and ERROR
    assert {v["Inspection/Verdict"] for v in verdicts} >= {"OK", "ERROR"}
    assert verdicts[-1]["Counts/Inspected"] + verdicts[-1]["Counts/Errors"] == 7
    assert [v["Inspection/Sequence"] for v in verdicts] == list(range(7))
    nbirth = messages[0].by_name()
    assert "cpu" in nbirth["Properties/Device"] and nbirth["Properties/Model ID"]
    assert _bdseq(messages[-1]) == _bdseq(messages[0])
    # The agent's recipe state rides the first NBIRTH (a top-level bundle: recipe "default").
    assert {n: nbirth[n] for n in RECIPE_METRICS} == {
        "Recipe/Active": "default",
        "Recipe/Number": 1,
        "Recipe/Result": "ok",
        "Recipe/Reason": "started",
    }


@pytest.mark.slow
def test_sigkill_of_the_agent_publishes_the_will_ndeath(
    tmp_path: Path, calibrated_bundle: Path, frames: Path, broker: Broker, sub: Subscriber
) -> None:
    proc = _agent(_agent_config(tmp_path, calibrated_bundle, broker.port, frames, loop=True))
    try:
        if not sub.wait_for(lambda msgs: any("/DDATA/" in m.topic for m in msgs), 60):
            proc.kill()
            pytest.fail(f"no DDATA from the agent:\n{proc.communicate()[0][-3000:]}")
        assert not _kinds(sub, "NDEATH")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        death = _wait_kind(sub, "NDEATH", timeout_s=10)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert _bdseq(death) == _bdseq(_kinds(sub, "NBIRTH")[0])


# -- the demo ------------------------------------------------------------------------------


def test_demo_config_turns_sparkplug_on_and_its_lines_decode(tmp_path: Path) -> None:
    from edge_agent.tools import demo

    path = demo.write_config(tmp_path, tmp_path / "b", tmp_path / "v.avi", 1883, sparkplug=True)
    settings = load_config(path).sparkplug
    assert settings is not None and settings.group_id == demo.LINE
    assert (
        load_config(demo.write_config(tmp_path, tmp_path / "b", tmp_path / "v.avi", 1)).sparkplug
        is None
    )

    names: dict[int, str] = {}
    birth = sp.device_birth_payload(0, _values(3, "NG"), _stamp(3))
    birth.seq = 1
    line = demo.describe_sparkplug(f"{BASE}/DBIRTH/{NODE}/cam1", birth.SerializeToString(), names)
    assert line.startswith("spB DBIRTH cam1") and "seq   1" in line and "Verdict=NG" in line
    data = sp.ready_to_send(sp.device_data_payload(0, _values(4), _stamp(4)), 9, 0, historical=True)
    line = demo.describe_sparkplug(f"{BASE}/DDATA/{NODE}/cam1", data, names)
    assert "seq   9 historical" in line and "Verdict=OK" in line and "Score=5.50" in line
    assert "undecodable" in demo.describe_sparkplug(f"{BASE}/DDATA/{NODE}/cam1", b"\xff\xff", {})
