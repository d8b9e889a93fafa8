"""The Modbus TCP handshake: the pure state machine under any interleaving (hypothesis), the
register map's rules, and the real server over loopback against pymodbus's own client and the
independent Debian `mbpoll` master: 1,000 trigger/result/ack cycles, bad input, the allow list,
idle connections, malformed frames, a master that vanishes mid-handshake, recipes, and the
commissioning self-check."""

from __future__ import annotations

import copy
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.client import ModbusTcpClient
from pymodbus.constants import ExcCodes

from edge_agent.errors import UserError
from edge_agent.publish import contract
from edge_agent.publish.modbus import (
    CONNECTION_STATS,
    HANDSHAKE_STATS,
    INPUT_COUNT,
    IR_ERROR_CODE,
    IR_MAP_VERSION,
    IR_RECIPE_ACTIVE,
    IR_REGION_COUNT,
    IR_RESULT_COUNT,
    IR_RESULT_PART_ID_HIGH,
    IR_RESULT_PART_ID_LOW,
    IR_SCORE_PERMILLE,
    IR_STATUS,
    MAP_VERSION,
    MAX_CONNECTIONS,
    NO_SCORE,
    RESULT_MARGIN_S,
    Control,
    ErrorCode,
    Handshake,
    ModbusServer,
    PartResult,
    RecipeCall,
    Status,
    Table,
    TriggerCall,
    heartbeat,
    mbap_malformed,
    part_result,
    score_permille,
    self_check,
)
from edge_agent.publish.modbus_config import LOOPBACK, ModbusModel, admitted
from edge_agent.station.recipes import Select
from tests.brokers import free_port
from tests.conftest import unavailable

UNIT = 1
PART_TIMEOUT_S = 2.0
MBPOLL = shutil.which("mbpoll") or "/usr/bin/mbpoll"
RESULT_REGISTERS = slice(IR_RESULT_PART_ID_HIGH, IR_ERROR_CODE)  # part id .. region count


def part_message(part_id: str, verdict: str, *, score: float = 0.3, regions: int = 0) -> dict:
    """A part verdict as the service publishes it (contract.part_message), one inspection."""
    inspection = contract.inspection_message("insp", "cam1", None)
    if verdict != "ERROR":
        inspection.update(
            verdict=verdict,
            score=score * 20,
            normalised_score=score,
            threshold=10.0,
            regions=[{"x": i, "y": 0, "width": 1, "height": 1, "area": 1} for i in range(regions)],
        )
    part = {
        "part_id": part_id,
        "recipe": "default",
        "verdict": verdict,
        "inspections": [inspection],
        "missing": [],
    }
    return contract.part_message(part, time.time())


def words(value: int) -> list[int]:
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


# -- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalised", "expected"),
    [(0.5, 500), (0.0004, 0), (1.0, 1000), (-0.2, 0), (70.0, NO_SCORE), (None, NO_SCORE)],
)
def test_score_permille(normalised: float | None, expected: int) -> None:
    assert score_permille(normalised) == expected
    assert score_permille(float("nan")) == NO_SCORE


def test_part_result_shows_the_worst_inspection() -> None:
    ok = contract.inspection_message("a", "cam1", None)
    ok.update(verdict="OK", normalised_score=0.45, regions=[])
    ng = contract.inspection_message("b", "cam1", None)
    ng.update(verdict="NG", normalised_score=0.61, regions=[{}, {}, {}])
    ok_high = contract.inspection_message("c", "cam1", None)
    ok_high.update(verdict="OK", normalised_score=0.49, regions=[])
    message = {"part_id": "7", "verdict": "NG", "inspections": [ok, ng, ok_high], "missing": []}
    assert part_result(message) == PartResult("7", "NG", 610, 3, False)
    # ERROR: no score a PLC could pass with (the regions of the worst inspection that
    # answered); a verdict nobody knows is ERROR, never OK.
    error = {**message, "verdict": "ERROR", "missing": ["d"]}
    assert part_result(error) == PartResult("7", "ERROR", NO_SCORE, 3, True)
    assert part_result({**message, "verdict": "ok"}).verdict == "ERROR"


def test_heartbeat_toggles_every_period() -> None:
    beats = [heartbeat(t / 10, 0.5) for t in range(0, 20)]
    assert beats == [False] * 5 + [True] * 5 + [False] * 5 + [True] * 5


def test_mbap_header_check() -> None:
    read = bytes.fromhex("0001 0000 0006 01 03 0000 0009")
    assert not mbap_malformed(read)
    assert not mbap_malformed(read[:5])  # incomplete: wait for more
    assert mbap_malformed(bytes.fromhex("0001 0005 0006 01 03 0000 0009"))  # protocol id 5
    assert mbap_malformed(bytes.fromhex("0001 0000 ffff 01"))  # 64 KB "frame"
    assert mbap_malformed(bytes.fromhex("0001 0000 0001 01"))  # no function code


# -- the config section -----------------------------------------------------------------------


def test_config_defaults_and_rules() -> None:
    m = ModbusModel()
    assert (m.enabled, m.host, m.port, m.unit_id, m.allow, m.heartbeat_ms) == (
        False,
        "127.0.0.1",
        5020,
        1,
        [],
        500,
    )
    assert m.trigger_cameras is None
    assert m.networks() == LOOPBACK
    cases = {
        "must be an IP address of this machine": {"host": "plc.local"},
        "did you mean 10.0.0.0/24": {"allow": ["10.0.0.5/24"]},
        "must be an address or a network": {"allow": ["10.0.0.300"]},
        "must not be empty": {"trigger_cameras": []},
        "lists a camera twice": {"trigger_cameras": ["a", "a"]},
        "an empty allow admits only loopback clients": {"enabled": True, "host": "0.0.0.0"},
    }
    for message, data in cases.items():
        with pytest.raises(ValidationError, match=re.escape(message)):
            ModbusModel.model_validate(data)
    with pytest.raises(ValidationError):
        ModbusModel.model_validate({"unit_id": 0})
    with pytest.raises(ValidationError):
        ModbusModel.model_validate({"port": "502"})  # strict: no string as a number
    lan = ModbusModel.model_validate(
        {"enabled": True, "host": "0.0.0.0", "allow": ["10.0.0.0/24", "10.1.2.3"]}
    )
    assert admitted("10.0.0.77", lan.networks())
    assert admitted("::ffff:10.1.2.3", lan.networks())  # IPv4 on a dual-stack socket
    assert not admitted("10.0.1.1", lan.networks())
    assert not admitted("127.0.0.1", lan.networks())  # an allow list replaces loopback
    assert admitted("::1", LOOPBACK) and admitted("127.0.0.2", LOOPBACK)
    assert not admitted("not-an-ip", LOOPBACK)


# -- the handshake, pure ----------------------------------------------------------------------


def machine() -> Handshake:
    return Handshake(result_timeout_s=3.0, heartbeat_s=0.5, request_prefix="t")


def status(h: Handshake, now: float = 0.0) -> Status:
    return Status(h.read(Table.INPUT, IR_STATUS, 1, now)[0]) & ~Status.HEARTBEAT  # type: ignore[index]


def trigger(h: Handshake, part_id: int, now: float = 0.0) -> Any:
    effects = h.write(Table.HOLDING, 0, [Control.TRIGGER, 0, *words(part_id)], now)
    h.write(Table.HOLDING, 0, [0], now)
    return effects


def test_handshake_cycle() -> None:
    h = machine()
    assert status(h) == Status.READY
    assert trigger(h, 70_001) == [TriggerCall(1, "70001")]
    assert status(h) == Status.BUSY
    h.part(part_result(part_message("70001", "NG", score=0.72, regions=2)), 0.5)
    assert status(h) == Status.READY | Status.RESULT_VALID | Status.FAIL
    registers = h.read(Table.INPUT, 0, INPUT_COUNT, 0.5)
    assert isinstance(registers, list)
    assert registers[RESULT_REGISTERS] == [*words(70_001), 1, 720, 2]
    assert registers[IR_MAP_VERSION] == MAP_VERSION
    h.write(Table.COILS, 1, [1], 0.6)  # RESULT_ACK, as a coil
    assert status(h) == Status.READY  # PASS/FAIL go with RESULT_VALID
    assert h.read(Table.HOLDING, 0, 4, 0.6) == [Control.RESULT_ACK, 0, *words(70_001)]


def test_handshake_overrun_is_an_error_never_a_dropped_trigger() -> None:
    h = machine()
    trigger(h, 1)
    assert trigger(h, 2) == []
    assert status(h) == Status.BUSY | Status.ERROR
    assert h.read(Table.INPUT, IR_ERROR_CODE, 1, 0) == [ErrorCode.TRIGGER_OVERRUN]
    h.part(part_result(part_message("1", "OK")), 0.1)  # the first part still gets its result
    assert status(h) == Status.ERROR | Status.RESULT_VALID | Status.PASS
    assert trigger(h, 3) == []  # not READY: ERROR first
    assert h.stats["triggers_in_error"] == 1
    h.write(Table.HOLDING, 0, [Control.ERROR_RESET], 0.2)
    assert status(h) == Status.READY | Status.RESULT_VALID | Status.PASS
    assert h.read(Table.INPUT, IR_ERROR_CODE, 1, 0.2) == [0]


def test_handshake_gives_up_and_never_shows_a_late_verdict() -> None:
    h = machine()
    trigger(h, 5)
    h.write(Table.HOLDING, 0, [Control.ERROR_RESET], 0.1)  # the master gives up part 5
    assert status(h) == Status.READY
    assert trigger(h, 5) == []  # its verdict is still due: reusing the id is refused
    assert h.read(Table.INPUT, IR_ERROR_CODE, 1, 0.1) == [ErrorCode.PART_ID_REUSED]
    h.write(Table.HOLDING, 0, [Control.ERROR_RESET], 0.1)
    h.write(Table.HOLDING, 0, [0], 0.1)
    assert trigger(h, 6) == [TriggerCall(2, "6")]
    h.part(part_result(part_message("5", "OK")), 0.2)  # part 5's verdict, late
    assert status(h) == Status.BUSY
    assert h.stats["late_results"] == 1
    h.part(part_result(part_message("6", "NG")), 0.3)
    assert status(h) == Status.READY | Status.RESULT_VALID | Status.FAIL
    assert trigger(h, 5) != []  # part 5 is closed now: its id may come again


def test_handshake_timeout_and_error_verdicts() -> None:
    h = machine()
    trigger(h, 9, now=10.0)
    assert status(h, 12.9) == Status.BUSY
    assert status(h, 13.0) == Status.ERROR
    assert h.read(Table.INPUT, IR_ERROR_CODE, 1, 13.0) == [ErrorCode.NO_RESULT]
    h.write(Table.HOLDING, 0, [Control.ERROR_RESET], 13.1)
    h.write(Table.HOLDING, 0, [0], 13.1)
    trigger(h, 10, now=14.0)
    missing = {**part_message("10", "ERROR"), "missing": ["insp"], "inspections": []}
    h.part(part_result(missing), 14.5)
    assert status(h, 14.5) == Status.RESULT_VALID | Status.ERROR  # neither PASS nor FAIL
    registers = h.read(Table.INPUT, 0, INPUT_COUNT, 14.5)
    assert isinstance(registers, list)
    assert registers[IR_SCORE_PERMILLE] == NO_SCORE
    assert registers[IR_ERROR_CODE] == ErrorCode.NO_FRAME


def test_handshake_refuses_what_the_map_does_not_have() -> None:
    h = machine()
    before = copy.deepcopy(h)
    assert h.write(Table.HOLDING, 4, [1], 0) == ExcCodes.ILLEGAL_ADDRESS  # an input address
    assert h.write(Table.HOLDING, 2, [1, 2, 3], 0) == ExcCodes.ILLEGAL_ADDRESS  # runs past 3
    assert h.write(Table.COILS, 4, [1], 0) == ExcCodes.ILLEGAL_ADDRESS
    assert h.write(Table.INPUT, 0, [1], 0) == ExcCodes.ILLEGAL_FUNCTION
    # A reserved CONTROL bit (a byte-swapped TRIGGER is 0x0100): the whole write is refused,
    # the part id in it too.
    assert h.write(Table.HOLDING, 0, [0x0100, 0, 0, 1], 0) == ExcCodes.ILLEGAL_VALUE
    assert h.read(Table.INPUT, 8, 2, 0) == ExcCodes.ILLEGAL_ADDRESS
    assert h.read(Table.DISCRETE_INPUTS, 0, 17, 0) == ExcCodes.ILLEGAL_ADDRESS
    assert h.read(Table.HOLDING, 0, 0, 0) == ExcCodes.ILLEGAL_VALUE
    assert h == before


def test_handshake_recipe_select() -> None:
    h = machine()
    assert h.write(Table.HOLDING, 0, [Control.RECIPE_SELECT, 2], 0) == [
        RecipeCall(1, Select(number=2, request_id="t-1"))
    ]
    h.recipe(1, "refused", "other-request")  # another protocol's command: not ours
    h.recipe(1, "loading", "t-1")
    assert status(h) == Status.READY
    h.recipe(2, "ok", "t-1")
    assert status(h) == Status.READY | Status.RECIPE_ACK
    assert h.read(Table.INPUT, IR_RECIPE_ACTIVE, 1, 0) == [2]
    h.write(Table.HOLDING, 0, [0, 0], 0)
    h.write(Table.HOLDING, 0, [Control.RECIPE_SELECT], 0)  # RECIPE_REQUEST 0
    assert status(h) == Status.READY | Status.RECIPE_ERROR  # RECIPE_ACK cleared by the edge
    assert h.read(Table.INPUT, IR_ERROR_CODE, 1, 0) == [ErrorCode.RECIPE_INVALID]
    h.write(Table.HOLDING, 0, [0, 9], 0)
    [call] = h.write(Table.HOLDING, 0, [Control.RECIPE_SELECT], 0)
    assert isinstance(call, RecipeCall)
    h.recipe_refused(call.token)
    assert h.read(Table.INPUT, IR_ERROR_CODE, 1, 0) == [ErrorCode.RECIPE_REFUSED]
    assert Status.READY in status(h)  # a refused recipe does not stop the handshake


# The handshake under any interleaving of master writes, verdicts, agent answers and time.
CONTROL_WORDS = st.integers(0, 0x1F)  # 0x10: a reserved bit
T, A, R, S = Control.TRIGGER, Control.RESULT_ACK, Control.ERROR_RESET, Control.RECIPE_SELECT
# What a PLC writes to CONTROL, alone: edges of each bit, and several in one word.
CONTROL_WRITES = st.tuples(
    st.just("holding"),
    st.just(0),
    st.lists(st.sampled_from([0, 0, T, A, R, S, A | T, R | T]), min_size=1, max_size=1),
)
OPS = st.one_of(
    CONTROL_WRITES,
    CONTROL_WRITES,
    CONTROL_WRITES,
    st.tuples(
        st.just("holding"),
        st.integers(0, 3),
        st.lists(st.one_of(CONTROL_WORDS, st.integers(0, 3)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("coils"), st.integers(0, 3), st.lists(st.integers(0, 1), max_size=4)),
    st.tuples(
        st.just("part"),
        st.sampled_from(["waited", "given up", "other"]),
        st.sampled_from(["OK", "NG", "ERROR"]),
    ),
    st.tuples(st.just("refuse trigger"), st.integers(-1, 0)),
    st.tuples(st.just("recipe"), st.sampled_from(["ok", "refused", "loading"]), st.booleans()),
    st.tuples(st.just("refuse recipe"), st.integers(-1, 0)),
    st.tuples(st.just("time"), st.sampled_from([0.01, 0.2, 1.0, 3.5])),  # 3 s: result timeout
)


def _view(h: Handshake, now: float) -> tuple[Status, list[int]]:
    registers = h.read(Table.INPUT, 0, INPUT_COUNT, now)
    assert isinstance(registers, list)
    return Status(registers[IR_STATUS]) & ~Status.HEARTBEAT, registers


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=20, max_size=80))
def test_handshake_invariants_under_any_interleaving(ops: list[tuple[Any, ...]]) -> None:
    h = machine()
    now = 0.0
    before, regs_before = _view(h, now)
    for op in ops:
        kind = op[0]
        control_before, waiting_before = h.control, h.waiting
        shown: PartResult | None = None
        effects: Any = []
        if kind in ("holding", "coils"):
            snapshot = copy.deepcopy(h)
            table = Table.HOLDING if kind == "holding" else Table.COILS
            effects = h.write(table, op[1], op[2], now)
            if isinstance(effects, ExcCodes):
                assert h == snapshot  # refused whole: nothing applied, nothing counted
                effects = []
        elif kind == "part":
            pool = {"waited": h.waiting, "given up": next(iter(h.given_up), None)}
            part_id = pool.get(op[1]) or "4000000000"
            shown = part_result(part_message(part_id, op[2]))
            h.part(shown, now)
        elif kind == "refuse trigger":
            h.trigger_refused(h.trigger_token + op[1], ErrorCode.TRIGGER_REFUSED, now)
        elif kind == "recipe":
            pending = h.recipe_pending
            request = pending.select.request_id if pending and op[2] else "elsewhere"
            number = pending.select.number if pending and pending.select.number else 1
            h.recipe(number or 1, op[1], request)
        elif kind == "refuse recipe":
            h.recipe_refused(h.recipe_token + op[1])
        else:
            now += op[1]
        after, regs = _view(h, now)
        rising = Control(h.control & ~control_before)

        assert not (Status.BUSY in after and Status.RESULT_VALID in after)
        assert not (Status.PASS in after and Status.FAIL in after)
        if after & (Status.PASS | Status.FAIL):
            assert Status.RESULT_VALID in after
        assert (Status.READY in after) == (not after & (Status.BUSY | Status.ERROR))
        assert (Status.BUSY in after) == (h.waiting is not None)
        assert (regs[IR_ERROR_CODE] != 0) == bool(after & (Status.ERROR | Status.RECIPE_ERROR))
        if Status.RESULT_VALID in before and Status.RESULT_VALID in after:
            # A master reading at any moment never sees a result change under RESULT_VALID.
            assert regs[RESULT_REGISTERS] == regs_before[RESULT_REGISTERS]
            assert after & (Status.PASS | Status.FAIL) == before & (Status.PASS | Status.FAIL)
        if Status.RESULT_VALID in after and Status.RESULT_VALID not in before:
            # Only the verdict of the part BUSY waited for sets it, in the same step.
            assert shown is not None and shown.part_id == waiting_before
            assert regs[IR_RESULT_COUNT] == (regs_before[IR_RESULT_COUNT] + 1) & 0xFFFF
            assert (regs[IR_RESULT_PART_ID_HIGH] << 16) | regs[IR_RESULT_PART_ID_LOW] == int(
                shown.part_id
            )
            assert (Status.PASS in after) == (shown.verdict == "OK")
            assert (Status.FAIL in after) == (shown.verdict == "NG")
        if Status.ERROR in before and Status.ERROR not in after:
            assert Control.ERROR_RESET in rising  # only ERROR_RESET clears ERROR
        if Control.ERROR_RESET in rising and Control.TRIGGER not in rising:
            assert Status.READY in after
        if Control.TRIGGER in rising:
            # Never dropped silently: taken (the agent is asked) or an ERROR.
            taken = [e for e in effects if isinstance(e, TriggerCall)]
            assert taken or Status.ERROR in after
            if taken:
                assert h.waiting == taken[0].part_id == str(h.part_id)
            if Status.BUSY in before and Control.ERROR_RESET not in rising:
                assert not taken and Status.ERROR in after
                if Status.ERROR not in before:
                    assert regs[IR_ERROR_CODE] == ErrorCode.TRIGGER_OVERRUN
        before, regs_before = after, regs


# -- the real server --------------------------------------------------------------------------


class Station:
    """Plays the agent's service: takes triggers on the adapter's worker thread and decides
    each part a moment later on its own thread (as the inference loop does), publishing the
    part verdict, the one MQTT carries, to the adapter; now and then a part that another
    protocol triggered too."""

    def __init__(self, server: ModbusServer, verdict: Callable[[str], str] | None = None) -> None:
        self.server = server
        self.verdict = verdict or (lambda part_id: "NG" if int(part_id) % 3 == 0 else "OK")
        self.triggered: list[str] = []
        self.published: dict[str, str] = {}  # part id -> the verdict published for it
        self.hold = False  # True: take triggers, decide nothing (a stalled line)
        self.others = 0
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def trigger(self, part_id: str) -> str | None:
        self.triggered.append(part_id)
        if not self.hold:
            self._queue.put(part_id)
        return None

    def _run(self) -> None:
        while (part_id := self._queue.get()) is not None:
            time.sleep(0.0002)
            if len(self.published) % 50 == 7:  # a part triggered over MQTT, same fan-out
                self.others += 1
                self.server.publish_part(part_message(f"mqtt-{self.others}", "NG"))
            verdict = self.verdict(part_id)
            self.published[part_id] = verdict
            self.server.publish_part(part_message(part_id, verdict, regions=int(part_id) % 4))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[ModbusServer]:
    s = ModbusServer(
        ModbusModel(enabled=True, port=free_port(), heartbeat_ms=100),
        part_timeout_s=PART_TIMEOUT_S,
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture
def station(server: ModbusServer) -> Iterator[Station]:
    st = Station(server)
    server.set_trigger_handler(st.trigger)
    yield st
    st.close()


@pytest.fixture
def client(server: ModbusServer) -> Iterator[ModbusTcpClient]:
    c = ModbusTcpClient("127.0.0.1", port=server.settings.port, timeout=2, retries=0)
    assert c.connect()
    yield c
    c.close()


def inputs(c: ModbusTcpClient) -> list[int]:
    response = c.read_input_registers(0, count=INPUT_COUNT, device_id=UNIT)
    assert not response.isError(), response
    return list(response.registers)


def wait_for(c: ModbusTcpClient, flag: Status, timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while not (registers := inputs(c))[IR_STATUS] & flag:
        assert time.monotonic() < deadline, f"no {flag.name}: {registers}"
    return registers


def cycle(c: ModbusTcpClient, part_id: int) -> list[int]:
    """One PLC handshake: PART_ID and TRIGGER in one write, wait for RESULT_VALID, read the
    result, RESULT_ACK (with ERROR_RESET after an ERROR verdict) and TRIGGER released."""
    assert not c.write_registers(0, [Control.TRIGGER, 0, *words(part_id)], device_id=UNIT).isError()
    registers = wait_for(c, Status.RESULT_VALID)
    assert not registers[IR_STATUS] & Status.BUSY
    ack = Control.RESULT_ACK | (Control.ERROR_RESET if registers[IR_STATUS] & Status.ERROR else 0)
    assert not c.write_register(0, ack, device_id=UNIT).isError()
    return registers


def verdict_shown(status: int) -> str:
    if status & Status.PASS:
        return "OK"
    return "NG" if status & Status.FAIL else "ERROR"


def test_a_thousand_cycles_with_the_pymodbus_client(
    server: ModbusServer, station: Station, client: ModbusTcpClient
) -> None:
    ids = [(i % 5) * 0x10000 + i for i in range(1, 1001)]  # both words of the uint32 in use
    seen: dict[str, str] = {}
    count = inputs(client)[IR_RESULT_COUNT]
    started = time.perf_counter()
    for part_id in ids:
        registers = cycle(client, part_id)
        shown = (registers[IR_RESULT_PART_ID_HIGH] << 16) | registers[IR_RESULT_PART_ID_LOW]
        assert shown == part_id  # echoed
        assert str(shown) not in seen  # never shown twice
        seen[str(shown)] = verdict_shown(registers[IR_STATUS])
        count = (count + 1) & 0xFFFF
        assert registers[IR_RESULT_COUNT] == count
        assert registers[IR_REGION_COUNT] == part_id % 4
        assert registers[IR_SCORE_PERMILLE] == 300
    elapsed = time.perf_counter() - started
    assert station.triggered == [str(i) for i in ids]  # none lost, none duplicated
    assert seen == station.published  # PASS/FAIL is the MQTT verdict of the same part id
    stats = server.stats
    assert stats["triggers"] == stats["results"] == len(ids)
    assert stats["other_results"] == station.others > 0
    assert stats["overruns"] == stats["given_up"] == stats["exceptions"] == 0
    print(f"{len(ids)} handshakes in {elapsed:.2f} s")  # a figure for -s, never asserted


def test_a_write_is_answered_after_the_agent_took_it(
    server: ModbusServer, station: Station, client: ModbusTcpClient
) -> None:
    station.hold = True
    client.write_registers(0, [Control.TRIGGER, 0, 0, 11], device_id=UNIT)
    # No polling: the write's answer came after the edge was taken.
    assert inputs(client)[IR_STATUS] & (Status.BUSY | Status.READY) == Status.BUSY
    client.write_register(0, Control.TRIGGER, device_id=UNIT)  # still high: no new edge
    client.write_register(0, 0, device_id=UNIT)
    client.write_register(0, Control.TRIGGER, device_id=UNIT)  # a new edge while BUSY
    registers = inputs(client)
    assert registers[IR_STATUS] & Status.ERROR
    assert registers[IR_ERROR_CODE] == ErrorCode.TRIGGER_OVERRUN
    assert station.triggered == ["11"]

    def refuse(part_id: str) -> str:
        time.sleep(0.2)  # a slow agent: the write's answer still waits for it
        return "no trigger camera in recipe b"

    server.set_trigger_handler(refuse)
    client.write_register(0, Control.ERROR_RESET, device_id=UNIT)
    client.write_registers(0, [Control.TRIGGER, 0, 0, 12], device_id=UNIT)
    registers = inputs(client)
    assert registers[IR_STATUS] & (Status.ERROR | Status.BUSY) == Status.ERROR
    assert registers[IR_ERROR_CODE] == ErrorCode.TRIGGER_REFUSED


def test_coils_and_discrete_inputs_are_the_same_bits(
    server: ModbusServer, station: Station, client: ModbusTcpClient
) -> None:
    client.write_registers(2, words(424_243), device_id=UNIT)
    assert not client.write_coil(0, True, device_id=UNIT).isError()  # TRIGGER
    registers = wait_for(client, Status.RESULT_VALID)
    bits = client.read_discrete_inputs(0, count=16, device_id=UNIT).bits
    assert bits[:8] == [bool(registers[IR_STATUS] >> i & 1) for i in range(8)]
    assert bits[2] and bits[3]  # RESULT_VALID, PASS (424243 % 3 != 0)
    assert client.read_coils(0, count=4, device_id=UNIT).bits[:4] == [True, False, False, False]
    assert client.read_holding_registers(0, count=1, device_id=UNIT).registers == [1]
    client.write_coils(0, [False, True], device_id=UNIT)  # TRIGGER off, RESULT_ACK on
    assert not inputs(client)[IR_STATUS] & Status.RESULT_VALID


def test_bad_requests_get_a_modbus_exception_not_a_crash(
    server: ModbusServer, client: ModbusTcpClient
) -> None:
    def code(response: Any) -> int | None:
        return response.exception_code if response.isError() else None

    assert code(client.write_register(4, 1, device_id=UNIT)) == ExcCodes.ILLEGAL_ADDRESS
    assert code(client.write_registers(2, [0, 1, 2], device_id=UNIT)) == ExcCodes.ILLEGAL_ADDRESS
    assert code(client.read_input_registers(9, count=1, device_id=UNIT)) == ExcCodes.ILLEGAL_ADDRESS
    assert code(client.read_holding_registers(0, count=5, device_id=UNIT)) == (
        ExcCodes.ILLEGAL_ADDRESS
    )
    assert code(client.write_coil(4, True, device_id=UNIT)) == ExcCodes.ILLEGAL_ADDRESS
    assert code(client.read_discrete_inputs(16, count=1, device_id=UNIT)) == (
        ExcCodes.ILLEGAL_ADDRESS
    )
    assert code(client.write_register(0, 0x0100, device_id=UNIT)) == ExcCodes.ILLEGAL_VALUE
    assert code(client.read_input_registers(0, count=1, device_id=7)) == (
        ExcCodes.GATEWAY_NO_RESPONSE  # another unit id
    )
    assert code(client.diag_read_diagnostic_register(device_id=UNIT)) == ExcCodes.ILLEGAL_FUNCTION
    assert inputs(client)[IR_MAP_VERSION] == MAP_VERSION  # and it still serves
    assert server.stats["exceptions"] == 9
    assert client.read_input_registers(0, count=1, device_id=0xFF).registers  # "no unit"


def raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(3)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(256) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def wait_stats(server: ModbusServer, key: str, value: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.stats[key] != value:
        assert time.monotonic() < deadline, f"{key}: {server.stats[key]}, expected {value}"
        time.sleep(0.01)


def test_malformed_frames_are_dropped_and_counted(
    server: ModbusServer, client: ModbusTcpClient
) -> None:
    port = server.settings.port
    for frame in (
        "0001 0005 0006 01 04 0000 0009",  # protocol id 5: not Modbus
        "0001 0000 ffff 01 04 0000",  # a length no frame has
    ):
        with raw(port) as sock:
            sock.sendall(bytes.fromhex(frame))
            assert closed_by_server(sock)  # framing lost: closed, not left to pile up
    with raw(port) as sock:
        sock.sendall(bytes.fromhex("0007 0000 0003 01 03 00"))  # read holding, PDU cut short
        answer = sock.recv(256)  # an exception (pymodbus: function code 0x80), not a crash
        assert answer[:7] == bytes.fromhex("0007 0000 0003 01") and answer[7:] in (
            bytes.fromhex("80 01"),
            bytes.fromhex("83 01"),
        )
        sock.sendall(bytes.fromhex("0009 0000 0002 01 08"))  # diagnostics: not offered
        assert sock.recv(256) == bytes.fromhex("0009 0000 0003 01 88 01")  # ILLEGAL FUNCTION
        sock.sendall(bytes.fromhex("0008 0000 0006 01 04 0008 0001"))  # then a good one
        assert sock.recv(256)[7:9] == bytes.fromhex("04 02")
    wait_stats(server, "malformed_frames", 4)
    assert inputs(client)[IR_MAP_VERSION] == MAP_VERSION


def test_a_client_outside_allow_is_refused_at_connect() -> None:
    settings_ = ModbusModel(enabled=True, port=free_port(), allow=["127.0.0.1/32"])
    s = ModbusServer(settings_, part_timeout_s=PART_TIMEOUT_S)
    s.start()
    try:
        try:
            outside = raw(settings_.port, source="127.0.0.2")
        except OSError:
            pytest.skip("cannot bind 127.0.0.2 here")
        with outside:
            outside.sendall(bytes.fromhex("0001 0000 0006 01 04 0000 0001"))
            assert closed_by_server(outside)
        inside = ModbusTcpClient("127.0.0.1", port=settings_.port, timeout=2, retries=0)
        assert inside.connect()
        assert inputs(inside)[IR_MAP_VERSION] == MAP_VERSION
        inside.close()
        assert s.stats["connections_refused"] == 1
    finally:
        s.stop()


def test_idle_connections_do_not_starve_a_master(
    server: ModbusServer, station: Station, client: ModbusTcpClient
) -> None:
    cycle(client, 1)
    idle = [raw(server.settings.port) for _ in range(100)]
    try:
        wait_stats(server, "connections_evicted", 100 + 1 - MAX_CONNECTIONS)
        assert server.stats["connections_open"] == MAX_CONNECTIONS
        for part_id in range(2, 52):  # the master, on its first connection, is still served
            cycle(client, part_id)
        closed = sum(closed_by_server(s) for s in idle[: 100 + 1 - MAX_CONNECTIONS])
        assert closed == 100 + 1 - MAX_CONNECTIONS  # the oldest silent sockets made room
        late = ModbusTcpClient("127.0.0.1", port=server.settings.port, timeout=2, retries=0)
        assert late.connect() and inputs(late)[IR_MAP_VERSION] == MAP_VERSION  # a newcomer too
        late.close()
    finally:
        for sock in idle:
            sock.close()


def test_a_master_that_vanishes_mid_handshake(server: ModbusServer, station: Station) -> None:
    port = server.settings.port
    station.hold = True
    first = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert first.connect()
    first.write_registers(0, [Control.TRIGGER, 0, 0, 500], device_id=UNIT)
    first.close()  # the PLC is restarted mid-handshake
    second = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert second.connect()
    assert inputs(second)[IR_STATUS] & (Status.BUSY | Status.READY) == Status.BUSY
    second.write_register(0, Control.ERROR_RESET, device_id=UNIT)
    assert inputs(second)[IR_STATUS] & Status.READY
    server.publish_part(part_message("500", "OK"))  # part 500's verdict, late: not shown
    assert not inputs(second)[IR_STATUS] & Status.RESULT_VALID
    station.hold = False
    second.write_register(0, 0, device_id=UNIT)
    registers = cycle(second, 501)
    assert registers[IR_RESULT_PART_ID_LOW] == 501
    assert server.stats["late_results"] == 1
    second.close()


def test_recipe_select_over_modbus(server: ModbusServer, client: ModbusTcpClient) -> None:
    selections: list[tuple[Select, str]] = []

    def select(sel: Select, source: str) -> str | None:
        selections.append((sel, source))
        if sel.number != 2:
            return f"no recipe with number {sel.number}"

        def switched() -> None:  # the service switches at the next frame boundary
            time.sleep(0.05)
            server.set_recipe(
                contract.recipe_message(
                    active="bottle-b",
                    number=2,
                    result="ok",
                    reason=None,
                    request_id=sel.request_id,
                    changed_at=time.time(),
                )
            )

        threading.Thread(target=switched).start()
        return None

    server.set_recipe_handler(select)
    client.write_registers(0, [Control.RECIPE_SELECT, 2], device_id=UNIT)
    registers = wait_for(client, Status.RECIPE_ACK)
    assert registers[IR_RECIPE_ACTIVE] == 2
    assert selections[0][0].number == 2 and selections[0][1] == "modbus"
    client.write_registers(0, [0, 9], device_id=UNIT)
    client.write_register(0, Control.RECIPE_SELECT, device_id=UNIT)
    registers = inputs(client)  # refused at once: no waiting
    assert registers[IR_STATUS] & (Status.RECIPE_ACK | Status.RECIPE_ERROR) == Status.RECIPE_ERROR
    assert registers[IR_ERROR_CODE] == ErrorCode.RECIPE_REFUSED
    assert registers[IR_STATUS] & Status.READY


def test_self_check(server: ModbusServer) -> None:
    line = self_check("127.0.0.1", server.settings.port, UNIT)
    assert line.startswith(f"modbus 127.0.0.1:{server.settings.port} unit 1: OK, map v1")
    assert "heartbeat toggling" in line and "READY" in line
    with pytest.raises(UserError, match="wrong unit id"):
        self_check("127.0.0.1", server.settings.port, 9)
    with pytest.raises(UserError, match="cannot connect"):
        self_check("127.0.0.1", free_port(), UNIT, timeout_s=0.5)


def test_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = ModbusServer(ModbusModel(enabled=True, port=port), part_timeout_s=PART_TIMEOUT_S)
        with pytest.raises(
            UserError, match=rf"^modbus.port: cannot listen on 127.0.0.1:{port} \(Address already"
        ):
            s.start()


def test_result_timeout_follows_the_part_timeout() -> None:
    s = ModbusServer(ModbusModel(), part_timeout_s=7.5)
    assert s._handshake.result_timeout_s == 7.5 + RESULT_MARGIN_S
    assert set(s.stats) == {*HANDSHAKE_STATS, *CONNECTION_STATS}


# -- the independent master: Debian's mbpoll (libmodbus) ---------------------------------------


def mbpoll(port: int, table: str, address: int, *values: int, count: int = 1) -> list[int]:
    """One mbpoll call (PDU addressing, one poll); the values read, [] after a write."""
    args = [MBPOLL, "-m", "tcp", "-p", str(port), "-a", str(UNIT), "-0", "-1", "-o", "2"]
    args += ["-t", table, "-r", str(address)]
    if not values:
        args += ["-c", str(count)]
    args += ["127.0.0.1", *(str(v) for v in values)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    if run.returncode != 0:
        raise AssertionError(f"mbpoll {' '.join(args[1:])}: {run.stdout[-200:]}{run.stderr}")
    if values:
        assert f"Written {len(values)} references" in run.stdout
        return []
    return [int(v) for v in re.findall(r"^\[\d+\]:\s+(\d+)", run.stdout, re.MULTILINE)]


def require_mbpoll() -> None:
    if not shutil.which(MBPOLL):
        unavailable(f"{MBPOLL} not installed (scripts/setup.sh installs the mbpoll package)")


def test_cycles_with_mbpoll(server: ModbusServer, station: Station) -> None:
    require_mbpoll()
    port = server.settings.port
    assert mbpoll(port, "3", IR_MAP_VERSION) == [MAP_VERSION]
    for part_id in range(70_000, 70_040):
        mbpoll(port, "4", 0, Control.TRIGGER, 0, *words(part_id))
        deadline = time.monotonic() + 5
        while not (registers := mbpoll(port, "3", 0, count=INPUT_COUNT))[0] & Status.RESULT_VALID:
            assert time.monotonic() < deadline
        assert (registers[IR_RESULT_PART_ID_HIGH] << 16) | registers[
            IR_RESULT_PART_ID_LOW
        ] == part_id
        assert verdict_shown(registers[IR_STATUS]) == station.published[str(part_id)]
        assert mbpoll(port, "1", 0, count=8)[:5] == [registers[0] >> i & 1 for i in range(5)]
        mbpoll(port, "4", 0, Control.RESULT_ACK)
    assert station.triggered == [str(i) for i in range(70_000, 70_040)]
    with pytest.raises(AssertionError, match="Illegal data address"):
        mbpoll(port, "4", 5, 1)  # an input register's address is not writable
