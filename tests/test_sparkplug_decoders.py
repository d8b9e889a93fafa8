"""Every Sparkplug B metric the node publishes, read by a decoder this project did not write.

The decoder is Eclipse Tahu's JavaScript codec (npm ``sparkplug-payload`` 1.0.3, installed in
tests/sparkplug_decoder/ from its package-lock.json), which much SCADA tooling embeds. It is
the one that disagrees with the 3.0 specification about where UInt32 travels (it reads
long_value, the specification says int_value), so a metric declared UInt32 decoded as null
there (issue 29). A real node on a real Mosquitto publishes births, data, the recipe state, a
part, a rebirth and its death; each NBIRTH, DBIRTH, NDATA, DDATA and NDEATH is decoded by Tahu
and every metric's name, alias, datatype and value is compared with what the test asked the
node to send. The other way round, ``Recipe/Select`` commands encoded by Tahu (encode.js) are
read as the host meant them.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.publish import contract
from edge_agent.publish import sparkplug as sp
from edge_agent.publish import sparkplug_b_pb2 as pb
from edge_agent.publish.sparkplug import DEVICE_METRICS, NODE_METRICS, SparkplugNode
from edge_agent.station.recipes import Select
from tests.brokers import Broker, Subscriber
from tests.conftest import unavailable
from tests.test_sparkplug import _settings

DECODER = Path(__file__).resolve().parent / "sparkplug_decoder"
GROUP, NODE = "g1", "node1"
BASE = f"spBv1.0/{GROUP}"
CAMERAS = ("a", "b")
SPECS = {m.name: m for m in NODE_METRICS + DEVICE_METRICS}
NODE_VALUES = {
    "Properties/Agent Version": "9.9.9",
    "Properties/Model ID": "m1",
    "Properties/Device": "cpu",
}
RECIPES = [
    contract.recipe_message(
        active="bottle-a", number=1, result="ok", reason="started", request_id=None, changed_at=1.0
    ),
    contract.recipe_message(
        active="bottle-b", number=32767, result="ok", reason=None, request_id="r1", changed_at=2.0
    ),
]
PART = contract.part_message(
    {
        "part_id": "P-7",
        "recipe": "bottle-b",
        "verdict": "ERROR",
        "inspections": [
            contract.inspection_message("top", "a", None, "no frame"),
            {"id": "cap", "camera": "b", "verdict": "NG", "score": 31.5, "threshold": 30.0},
        ],
        "missing": ["side", "neck"],
    },
    1_700_000_000.5,
)


def _tahu(script: str, request: str) -> Any:
    """Run tests/sparkplug_decoder/<script> on node with ``request`` as stdin; its JSON."""
    node = shutil.which("node")
    if node is None or not (DECODER / "node_modules" / "sparkplug-payload").is_dir():
        unavailable(
            "Tahu's Sparkplug decoder is not installed (scripts/setup.sh: "
            "apt-get install nodejs npm; npm ci --ignore-scripts --prefix tests/sparkplug_decoder)"
        )
    done = subprocess.run(
        [node, str(DECODER / script)],
        input=request,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def tahu_decode(payloads: list[bytes]) -> list[dict[str, Any]]:
    """The payloads as Tahu's ``decodePayload`` returns them (tests/sparkplug_decoder/decode.js
    says how 64-bit and undefined values are carried over JSON)."""
    decoded: list[dict[str, Any]] = _tahu(
        "decode.js", json.dumps([base64.b64encode(p).decode() for p in payloads])
    )
    return decoded


def tahu_encode(payloads: list[dict[str, Any]]) -> list[bytes]:
    """The payloads as Tahu's ``encodePayload`` writes them (tests/sparkplug_decoder/encode.js)."""
    return [base64.b64decode(p) for p in _tahu("encode.js", json.dumps(payloads))]


class Undefined:
    """A value Tahu left undefined (it read a field the payload does not carry)."""

    def __repr__(self) -> str:
        return "undefined"


def plain(value: Any, datatype: str | None = None) -> Any:
    """decode.js's JSON back to Python values: 64-bit Longs as exact ints; a Double as a
    float (JSON writes the JavaScript number 3.0 as 3)."""
    if isinstance(value, dict):
        if "long" in value:
            return int(value["long"])
        if value.get("undefined") is True:
            return Undefined()
    if datatype == "Double" and type(value) is int:
        return float(value)
    return value


def meant(name: str, value: Any) -> Any:
    """A value as the node was asked to send it, in the type its metric declares."""
    if value is None:
        return None
    datatype = SPECS[name].datatype
    if datatype == pb.Double:
        return float(value)
    if datatype in (pb.Int64, pb.UInt64):
        return int(value)
    return value


def alias_of(device: str | None, name: str) -> int:
    if device is None:
        return sp.node_alias(name)
    return sp.device_alias(CAMERAS.index(device), name)


def verdict(camera: str, seq: int, kind: str) -> dict[str, Any]:
    """Device values that exercise every type, with 64-bit numbers beyond 2**53."""
    msg = {
        "verdict": kind,
        "score": None if kind == "ERROR" else 1.25 + seq,
        "normalised_score": None if kind == "ERROR" else 0.1 * seq,
        "threshold": None if kind == "ERROR" else 3.0,
        "regions": [{"x": i} for i in range(3)] if kind == "NG" else [],
        "part_id": f"P-{seq}" if kind != "OK" else None,
        "sequence": (1 << 60) + seq,
        "frame_id": f"{camera}-{seq}",
        "model_id": "m1",
        "latency_ms": 12.5,
    }
    return sp.device_values(
        msg, inspected=(1 << 53) + seq, ng=seq, dropped=2 * seq, errors=seq, connected=True
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def _count(sub: Subscriber, kind: str) -> int:
    return sum(m.topic.split("/")[2] == kind for m in sub.messages)


def _wait_count(sub: Subscriber, kind: str, n: int) -> None:
    assert sub.wait_for(lambda _m: _count(sub, kind) >= n, 10.0), f"fewer than {n} {kind}"


def _rebirth(port: int) -> None:
    command = pb.Payload(timestamp=sp.now_ms())
    command.metrics.add(name=sp.REBIRTH, datatype=pb.Boolean, boolean_value=True)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="host")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(f"{BASE}/NCMD/{NODE}", command.SerializeToString(), qos=1)
        info.wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def _expected_metrics(
    kind: str, device: str | None, values: Mapping[str, Any]
) -> list[tuple[str, int, str, Any]]:
    """(name, alias, datatype name, value) of every metric a message should carry, in the
    order the node writes them (its metric tables' order)."""
    specs = NODE_METRICS if device is None else DEVICE_METRICS
    if kind in ("NBIRTH", "DBIRTH"):
        names = [m.name for m in specs]
    else:
        names = [m.name for m in specs if m.name in values]
    return [
        (n, alias_of(device, n), pb.DataType.Name(SPECS[n].datatype), meant(n, values.get(n)))
        for n in names
    ]


def test_tahu_js_reads_every_metric_as_meant(tmp_path: Path, broker: Broker) -> None:
    started = time.monotonic()
    # What each message should carry, in the order the node is asked to send it.
    expected: list[tuple[str, str | None, dict[str, Any]]] = []
    latest: dict[str, dict[str, Any]] = {c: {} for c in CAMERAS}
    with Subscriber(broker.port, f"{BASE}/#") as sub:
        node = SparkplugNode(_settings(tmp_path, broker.port), list(CAMERAS), version="9.9.9")
        node.update_node(
            **{k: v for k, v in NODE_VALUES.items() if k != "Properties/Agent Version"}
        )
        node.set_recipe(RECIPES[0])  # before start, as the agent does: in the NBIRTH
        try:
            node.start(wait_s=5.0)
            _wait_count(sub, "DBIRTH", 2)
            bdseq = node.stats["bdseq"]
            births = {sp.BDSEQ: bdseq, sp.REBIRTH: False, **NODE_VALUES}
            births |= sp.recipe_values(RECIPES[0])
            expected += [("NBIRTH", None, births), ("DBIRTH", "a", {}), ("DBIRTH", "b", {})]

            for seq, (camera, kind) in enumerate(
                [("a", "OK"), ("b", "NG"), ("a", "ERROR"), ("b", "OK"), ("a", "NG")]
            ):
                values = verdict(camera, seq, kind)
                node.publish_verdict(camera, values, 1_700_000_000_000 + seq)
                latest[camera].update(values)
                expected.append(("DDATA", camera, values))
            _wait_count(sub, "DDATA", 5)

            node.update_camera("b", dropped=1 << 40, connected=False)  # state-only DDATA
            state = {"Counts/Dropped": 1 << 40, "Camera/Connected": False}
            latest["b"].update(state)
            expected.append(("DDATA", "b", state))
            _wait_count(sub, "DDATA", 6)

            node.update_node(**{"Properties/Model ID": "m2"})  # NDATA
            ndata = {**NODE_VALUES, "Properties/Model ID": "m2", "Status/Uptime": None}
            expected.append(("NDATA", None, ndata))
            _wait_count(sub, "NDATA", 1)

            node.set_recipe(RECIPES[1])  # recipe NDATA
            expected.append(("NDATA", None, sp.recipe_values(RECIPES[1])))
            _wait_count(sub, "NDATA", 2)
            node.publish_part(PART)  # part NDATA
            expected.append(("NDATA", None, sp.part_values(PART)))
            _wait_count(sub, "NDATA", 3)

            _rebirth(broker.port)  # births again, with the latest values
            births = {**births, "Properties/Model ID": "m2"}
            births |= sp.recipe_values(RECIPES[1]) | sp.part_values(PART)
            expected += [("NBIRTH", None, births), ("DBIRTH", "a", latest["a"])]
            expected.append(("DBIRTH", "b", latest["b"]))
            _wait_count(sub, "DBIRTH", 4)
        finally:
            node.stop(timeout_s=2.0)
        expected.append(("NDEATH", None, {sp.BDSEQ: bdseq}))
        _wait_count(sub, "NDEATH", 1)
        elapsed = time.monotonic() - started
        received = [m for m in sub.messages if m.topic.split("/")[2] != "NCMD"]

    decoded = tahu_decode([m.payload for m in received])
    got_topics = [tuple(m.topic.split("/")[2:]) for m in received]
    assert got_topics == [(k, NODE, d) if d else (k, NODE) for k, d, _ in expected]
    for (kind, device, values), message, tahu in zip(expected, received, decoded, strict=True):
        where = f"{kind} {device or ''} (seq {plain(tahu.get('seq'))})"
        metrics = tahu["metrics"]
        if kind == "NDEATH":
            named = [(m["name"], m["type"], plain(m["value"])) for m in metrics]
            assert named == [(sp.BDSEQ, "Int64", bdseq)], where
            continue
        assert plain(tahu["seq"]) == pb.Payload.FromString(message.payload).seq, where
        want = _expected_metrics(kind, device, values)
        births = kind.endswith("BIRTH")
        got = [
            (m.get("name"), plain(m["alias"]), m["type"], plain(m["value"], m["type"]))
            for m in metrics
        ]
        for (name, alias, datatype, value), (g_name, g_alias, g_type, g_value) in zip(
            want, got, strict=True
        ):
            assert (g_alias, g_type) == (alias, datatype), f"{where}: {name}"
            assert g_name == (name if births else None), f"{where}: {name}"
            if name == "Status/Uptime":  # the node measures it: only its range is known
                assert isinstance(g_value, float | int) and 0 <= g_value <= elapsed, where
            else:
                assert g_value == value and type(g_value) is type(value), (
                    f"{where}: {name} ({datatype}) decoded as {g_value!r}, sent {value!r}"
                )


def test_recipe_selections_tahu_js_writes_are_read_as_meant() -> None:
    """An NCMD ``Recipe/Select`` as a host on Tahu's JavaScript codec writes it: UInt32 lands in
    long_value there (not int_value, as 3.0 says), Int32 in int_value, negative ones as two's
    complement."""
    writes: list[tuple[str, Any, Select | None]] = [
        ("Int32", 2, Select(number=2)),
        ("UInt32", 3, Select(number=3)),
        ("Int64", 4, Select(number=4)),
        ("UInt64", 32767, Select(number=32767)),
        ("String", "bottle-b", Select(name="bottle-b")),
        ("Int32", -2, None),
        ("Int64", -2, None),
        ("UInt32", 0, None),
        ("Boolean", True, None),
        ("Double", 2.0, None),
        ("Float", 2.0, None),
        ("Int16", 2, None),
        ("String", "", None),
    ]
    payloads = [
        {"timestamp": 1, "metrics": [{"name": sp.RECIPE_SELECT, "type": kind, "value": value}]}
        for kind, value, _ in writes
    ]
    for (kind, value, wanted), encoded in zip(writes, tahu_encode(payloads), strict=True):
        command = sp.decode_command(encoded)
        assert command is not None, (kind, value)
        found = sp.recipe_select(command)
        if wanted is None:
            assert isinstance(found, str), (kind, value, found)
        else:
            assert found == wanted, (kind, value, found)
