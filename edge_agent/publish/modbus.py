"""Modbus TCP server for the PLC's handshake: Trigger, Busy, Result valid, Acknowledge, Error,
recipe select (docs/integrators/modbus.md has the register map, the timing diagram and a PLC
example). On pymodbus; the handshake itself is ours, a pure state machine (Handshake).

pymodbus runs in a thread of its own on its own event loop. The agent's side (`publish_part`,
`set_recipe`) only updates the Handshake under a lock (microseconds) and never waits for the
loop, a master or the network; there is nothing to pump, since every master read is answered
from the Handshake as it stands at that moment. A master's write that makes an edge calls the
agent (trigger or recipe handler) on a worker thread, so a slow handler never stalls the loop,
and is answered once the Handshake has taken the outcome: a master that reads STATUS right
after its TRIGGER write sees BUSY or ERROR, never the state before its edge.

Connections (_Guard): a client whose address is not in `allow` is closed at connect; at
MAX_CONNECTIONS open connections the one idle longest makes room for a newcomer, so sockets
left open by a scan or a crashed master never lock a PLC out. A frame whose MBAP header is
not Modbus (protocol id not 0, length outside 2..254) closes its connection; a PDU that does
not decode, or a function this server does not offer, is answered ILLEGAL FUNCTION; both are
counted in `stats` as malformed_frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pymodbus import __version__ as PYMODBUS_VERSION
from pymodbus.client import ModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import ModbusException, NoSuchIdException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.device import ModbusDeviceIdentification
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

from edge_agent import __version__
from edge_agent.decide.decision import ERROR as ERROR_VERDICT
from edge_agent.decide.decision import NG, OK
from edge_agent.errors import UserError
from edge_agent.publish.modbus_config import IpNetwork, ModbusModel, admitted
from edge_agent.station import recipes
from edge_agent.station.recipes import Select
from edge_agent.station.verdicts import BY_SEVERITY

log = logging.getLogger(__name__)

SOURCE = "modbus"  # the recipe handler's `source`: which protocol a selection came by
MAP_VERSION = 1
MAX_CONNECTIONS = 32  # a PLC, an HMI, a SCADA and an engineer's tool need a few
RESULT_MARGIN_S = 1.0  # BUSY waits the station's part timeout plus this for the verdict
MAX_ABANDONED = 64  # part ids whose handshake was given up, remembered until their verdict
NO_SCORE = 0xFFFF  # SCORE_PERMILLE of a part without a score (ERROR): past any limit
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
REPORT_EVERY_S = 60.0  # at most one log line a minute per kind of trouble
SELF_CHECK_TIMEOUT_S = 3.0
# What the server decodes; any other function is answered ILLEGAL FUNCTION. No diagnostics
# (08), event counters, file records or FIFO: nothing a handshake needs, and less to attack.
FUNCTION_CODES = (1, 2, 3, 4, 5, 6, 15, 16, 22, 23, 43)
MAX_MBAP_LENGTH = 254  # unit id + a PDU of at most 253 bytes (Modbus TCP, MBAP header)


class Control(enum.IntFlag):
    """Holding register 0 (CONTROL), written by the PLC; also coils 0..3."""

    TRIGGER = 1 << 0  # rising edge: inspect the next frame of the trigger cameras
    RESULT_ACK = 1 << 1  # rising edge: the PLC has read the result (RESULT_VALID -> 0)
    ERROR_RESET = 1 << 2  # rising edge: clear ERROR, give up a pending trigger -> READY
    RECIPE_SELECT = 1 << 3  # rising edge: switch to the recipe numbered RECIPE_REQUEST


class Status(enum.IntFlag):
    """Input register 0 (STATUS), written by the agent; also discrete inputs 0..15."""

    READY = 1 << 0  # a TRIGGER now is taken: not BUSY, no ERROR
    BUSY = 1 << 1  # a trigger is taken, its part's verdict not yet decided
    RESULT_VALID = 1 << 2  # the result registers hold the last triggered part's verdict
    PASS = 1 << 3  # with RESULT_VALID: the part is OK
    FAIL = 1 << 4  # with RESULT_VALID: the part is NG
    ERROR = 1 << 5  # ERROR_CODE says why; only ERROR_RESET clears it
    RECIPE_ACK = 1 << 6  # the recipe asked for by the last RECIPE_SELECT is active
    RECIPE_ERROR = 1 << 7  # ... was refused (ERROR_CODE says why)
    HEARTBEAT = 1 << 15  # toggles every heartbeat_ms


class ErrorCode(enum.IntEnum):
    """Input register 7 (ERROR_CODE): why ERROR (or else RECIPE_ERROR) is set; 0 when
    neither is. docs/integrators/modbus.md lists them for integrators."""

    NONE = 0
    TRIGGER_OVERRUN = 1  # TRIGGER rose while BUSY: that trigger is not inspected
    TRIGGER_REFUSED = 2  # the agent took no trigger (no trigger camera, stopping)
    NO_RESULT = 3  # no verdict within the part timeout + 1 s: the trigger is given up
    NO_FRAME = 4  # the part's verdict is ERROR: an inspection got no frame in time
    INSPECTION_ERROR = 5  # the part's verdict is ERROR: an inspection could not decide
    PART_ID_REUSED = 6  # PART_ID is that of a given-up trigger whose verdict is still due
    AGENT_FAULT = 7  # the agent failed to take the command (its log says why)
    RECIPE_INVALID = 16  # RECIPE_REQUEST is not 1..32767
    RECIPE_REFUSED = 17  # no recipe with that number, another still loading, cannot load


class Table(enum.Enum):
    COILS = "coils"
    DISCRETE_INPUTS = "discrete inputs"
    HOLDING = "holding registers"
    INPUT = "input registers"


# Holding registers (the PLC writes): CONTROL, RECIPE_REQUEST, PART_ID (uint32, high word first).
HR_CONTROL, HR_RECIPE_REQUEST, HR_PART_ID_HIGH, HR_PART_ID_LOW = range(4)
HOLDING_COUNT = 4
CONTROL_BITS = 4  # coils 0..3; CONTROL's other bits are reserved and must be 0
# Input registers (the agent writes).
(
    IR_STATUS,
    IR_RECIPE_ACTIVE,
    IR_RESULT_PART_ID_HIGH,
    IR_RESULT_PART_ID_LOW,
    IR_RESULT_COUNT,
    IR_SCORE_PERMILLE,
    IR_REGION_COUNT,
    IR_ERROR_CODE,
    IR_MAP_VERSION,
) = range(9)
INPUT_COUNT = 9
STATUS_BITS = 16  # discrete inputs 0..15
SIZES = {
    Table.COILS: CONTROL_BITS,
    Table.DISCRETE_INPUTS: STATUS_BITS,
    Table.HOLDING: HOLDING_COUNT,
    Table.INPUT: INPUT_COUNT,
}
# pymodbus hands the datastore the request's function code: which table it reads or writes.
FUNCTION_TABLES = {
    1: Table.COILS,
    5: Table.COILS,
    15: Table.COILS,
    2: Table.DISCRETE_INPUTS,
    3: Table.HOLDING,
    6: Table.HOLDING,
    16: Table.HOLDING,
    22: Table.HOLDING,
    23: Table.HOLDING,
    4: Table.INPUT,
}
# Handshake.stats' keys (ModbusServer.stats adds the connections').
HANDSHAKE_STATS = (
    "triggers",  # TRIGGER edges taken (handed to the agent)
    "overruns",  # TRIGGER edges while BUSY (ERROR TRIGGER_OVERRUN)
    "triggers_refused",  # the agent did not take it (ERROR TRIGGER_REFUSED / AGENT_FAULT)
    "triggers_in_error",  # TRIGGER edges while ERROR was set: not taken (ERROR stays)
    "part_id_reused",  # TRIGGER edges refused with PART_ID_REUSED
    "results",  # verdicts shown (RESULT_VALID 0 -> 1)
    "unacknowledged",  # results replaced by a new TRIGGER before RESULT_ACK
    "given_up",  # pending triggers given up (ERROR_RESET while BUSY, or NO_RESULT)
    "timeouts",  # of which: no verdict in time (ERROR NO_RESULT)
    "late_results",  # verdicts of given-up triggers (not shown)
    "other_results",  # verdicts of parts this handshake did not trigger (not shown)
    "recipe_selects",  # RECIPE_SELECT edges
    "recipe_errors",  # RECIPE_ERROR outcomes
)
CONNECTION_STATS = (
    "connections_open",
    "connections_refused",  # not in `allow`: closed at connect
    "connections_evicted",  # closed to make room at MAX_CONNECTIONS: the one idle longest
    "malformed_frames",  # not Modbus (connection closed) or not decodable (ILLEGAL FUNCTION)
    "exceptions",  # Modbus exception responses sent (illegal address, value, function, unit)
)

TriggerHandler = Callable[[str], "str | None"]
"""``handler(part_id)`` on a TRIGGER edge: None when taken, else the reason it is refused."""
RecipeHandler = Callable[[Select, str], "str | None"]
"""``handler(select, "modbus")``: None when accepted, else the reason it is refused."""


# -- pure functions -----------------------------------------------------------------------------


def score_permille(normalised: float | None) -> int:
    """SCORE_PERMILLE = round(normalised_score x 1000), clamped to 0..65535; a missing or
    non-finite score is NO_SCORE (65535), past any limit a PLC may compare it with."""
    if normalised is None or not math.isfinite(normalised):
        return NO_SCORE
    return min(max(round(normalised * 1000), 0), NO_SCORE)


def heartbeat(now: float, period_s: float) -> bool:
    """HEARTBEAT = floor(now / period) mod 2: it toggles every `period_s` of the monotonic
    clock `now`, at every read, with no timer to stall."""
    return bool(math.floor(now / period_s) % 2)


def split32(value: int) -> tuple[int, int]:
    """A uint32 as two registers, high word first."""
    return (value >> 16) & 0xFFFF, value & 0xFFFF


@dataclass(frozen=True)
class PartResult:
    """What the handshake shows of one part verdict (``contract.part_message``)."""

    part_id: str
    verdict: str  # OK, NG or ERROR; anything else is taken as ERROR
    score: int  # SCORE_PERMILLE
    regions: int  # REGION_COUNT
    missing: bool  # an inspection did not answer (ERROR NO_FRAME)


def part_result(message: Mapping[str, Any]) -> PartResult:
    """A part verdict as the registers show it. The worst inspection is the one with the most
    severe verdict (OK < NG < ERROR), the highest normalised score among those; SCORE_PERMILLE
    is its score (NO_SCORE when the part is ERROR) and REGION_COUNT its defect regions. A
    verdict string other than OK or NG is ERROR: only "OK" ever sets PASS."""
    verdict = str(message.get("verdict"))
    if verdict not in (OK, NG):
        verdict = ERROR_VERDICT
    missing = bool(message.get("missing"))
    inspections = [i for i in message.get("inspections") or () if isinstance(i, Mapping)]

    def rank(inspection: Mapping[str, Any]) -> tuple[int, float]:
        v = inspection.get("verdict")
        severity = BY_SEVERITY.index(v) if v in BY_SEVERITY else len(BY_SEVERITY)
        s = inspection.get("normalised_score")
        return severity, float(s) if isinstance(s, (int, float)) and math.isfinite(s) else -1.0

    worst = max(inspections, key=rank, default=None)
    score = NO_SCORE
    regions = 0
    if worst is not None:
        regions = len(worst.get("regions") or ())
        if verdict != ERROR_VERDICT:
            s = worst.get("normalised_score")
            score = score_permille(float(s) if isinstance(s, (int, float)) else None)
    return PartResult(str(message.get("part_id")), verdict, score, min(regions, 0xFFFF), missing)


# -- the handshake (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerCall:
    """Effect: hand `part_id` to the agent's trigger handler; report back with `token`."""

    token: int
    part_id: str


@dataclass(frozen=True)
class RecipeCall:
    """Effect: hand the selection to the agent's recipe handler; report back with `token`."""

    token: int
    select: Select


Effect = TriggerCall | RecipeCall
# Applied in this order when one write raises several edges (a PLC writing ERROR_RESET,
# RESULT_ACK and TRIGGER in one word means: clear, acknowledge, then inspect the next part).
EDGE_ORDER = (Control.ERROR_RESET, Control.RESULT_ACK, Control.TRIGGER, Control.RECIPE_SELECT)
RESULT_FLAGS = Status.RESULT_VALID | Status.PASS | Status.FAIL
NO_FLAGS = Status(0)


@dataclass
class Handshake:
    """The register map v1 and its handshake, with explicit inputs: the master's reads and
    writes (`read`, `write`), the agent's answers (`trigger_refused`, `recipe_refused`,
    `part`, `recipe`) and the monotonic clock (`now` on every call). No I/O, no thread, no
    clock of its own; the caller serialises the calls.

    Rules (docs/integrators/modbus.md, "Handshake"): a TRIGGER edge while READY sets BUSY and clears
    RESULT_VALID/PASS/FAIL and asks the agent (TriggerCall). The verdict of that part
    writes the result registers and PASS/FAIL, then RESULT_VALID=1 and BUSY=0, in one call:
    a read sees all of it or none. RESULT_ACK clears RESULT_VALID/PASS/FAIL. A TRIGGER edge
    while BUSY is ERROR TRIGGER_OVERRUN (the pending part still gets its result). ERROR_RESET
    clears ERROR and RECIPE_ERROR and gives up a pending trigger: READY. ERROR_CODE keeps the
    first error until then.
    """

    result_timeout_s: float
    heartbeat_s: float
    request_prefix: str = "modbus"  # recipe request ids: f"{prefix}-{token}"
    control: int = 0
    recipe_request: int = 0
    part_id: int = 0
    flags: Status = NO_FLAGS  # BUSY .. RECIPE_ERROR (READY and HEARTBEAT are derived)
    recipe_active: int = 0
    result_part_id: int = 0
    result_count: int = 0
    score: int = 0
    regions: int = 0
    error_code: ErrorCode = ErrorCode.NONE  # with ERROR
    recipe_error_code: ErrorCode = ErrorCode.NONE  # with RECIPE_ERROR
    waiting: str | None = None  # the part id BUSY waits for
    busy_since: float = 0.0
    trigger_token: int = 0
    recipe_token: int = 0
    recipe_pending: RecipeCall | None = None
    given_up: OrderedDict[str, None] = field(default_factory=OrderedDict)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HANDSHAKE_STATS, 0))

    # -- the master's side ----------------------------------------------------------------

    def read(self, table: Table, address: int, count: int, now: float) -> list[int] | ExcCodes:
        """Registers (or bits, as 0/1) `address`..`address+count-1` of `table`."""
        if count < 1:
            return ExcCodes.ILLEGAL_VALUE
        if address < 0 or address + count > SIZES[table]:
            return ExcCodes.ILLEGAL_ADDRESS
        self.tick(now)
        if table is Table.HOLDING:
            values = [self.control, self.recipe_request, *split32(self.part_id)]
        elif table is Table.COILS:
            values = [(self.control >> bit) & 1 for bit in range(CONTROL_BITS)]
        elif table is Table.INPUT:
            values = self.input_registers(now)
        else:
            status = self.status(now)
            values = [(status >> bit) & 1 for bit in range(STATUS_BITS)]
        return values[address : address + count]

    def write(
        self, table: Table, address: int, values: Sequence[int], now: float
    ) -> list[Effect] | ExcCodes:
        """A master's write; the effects are for the agent, in order. A write that touches
        a register or bit the map does not have, or sets a reserved CONTROL bit, is refused
        whole (nothing is applied). Data registers are applied before CONTROL, so PART_ID and
        TRIGGER in one write make one part."""
        if not values:
            return ExcCodes.ILLEGAL_VALUE
        if table not in (Table.HOLDING, Table.COILS):
            return ExcCodes.ILLEGAL_FUNCTION  # Modbus has no write for inputs
        if address < 0 or address + len(values) > SIZES[table]:
            return ExcCodes.ILLEGAL_ADDRESS
        if any(not 0 <= v <= 0xFFFF for v in values):
            return ExcCodes.ILLEGAL_VALUE
        registers = [self.control, self.recipe_request, *split32(self.part_id)]
        if table is Table.COILS:
            for bit, value in enumerate(values, start=address):
                registers[HR_CONTROL] &= ~(1 << bit)
                registers[HR_CONTROL] |= (1 if value else 0) << bit
        else:
            registers[address : address + len(values)] = values
        if registers[HR_CONTROL] >> CONTROL_BITS:
            return ExcCodes.ILLEGAL_VALUE  # a reserved bit: a PLC mapping error, say so
        self.tick(now)
        self.recipe_request = registers[HR_RECIPE_REQUEST]
        self.part_id = (registers[HR_PART_ID_HIGH] << 16) | registers[HR_PART_ID_LOW]
        return self._control(registers[HR_CONTROL], now)

    def _control(self, control: int, now: float) -> list[Effect]:
        rising = Control(control & ~self.control)
        self.control = control
        effects: list[Effect] = []
        for edge in EDGE_ORDER:
            if edge not in rising:
                continue
            if edge is Control.ERROR_RESET:
                self._reset()
            elif edge is Control.RESULT_ACK:
                self.flags &= ~RESULT_FLAGS
            elif edge is Control.TRIGGER:
                effects += self._trigger(now)
            else:
                effects += self._select()
        return effects

    def _reset(self) -> None:
        if self.waiting is not None:
            self._give_up()
        self.flags &= ~(Status.ERROR | Status.RECIPE_ERROR | Status.BUSY)
        self.error_code = self.recipe_error_code = ErrorCode.NONE

    def _trigger(self, now: float) -> list[Effect]:
        if Status.ERROR in self.flags:
            self.stats["triggers_in_error"] += 1
            return []
        if Status.BUSY in self.flags:
            self.stats["overruns"] += 1
            self._error(ErrorCode.TRIGGER_OVERRUN)
            return []
        part_id = str(self.part_id)
        if part_id in self.given_up:
            # Its verdict is still due and would be taken for this part's: never show a
            # verdict for a part that was not inspected.
            self.stats["part_id_reused"] += 1
            self._error(ErrorCode.PART_ID_REUSED)
            return []
        if Status.RESULT_VALID in self.flags:
            self.stats["unacknowledged"] += 1
        self.flags = (self.flags & ~RESULT_FLAGS) | Status.BUSY
        self.waiting = part_id
        self.busy_since = now
        self.trigger_token += 1
        self.stats["triggers"] += 1
        return [TriggerCall(self.trigger_token, part_id)]

    def _select(self) -> list[Effect]:
        self.stats["recipe_selects"] += 1
        self.flags &= ~(Status.RECIPE_ACK | Status.RECIPE_ERROR)
        self.recipe_error_code = ErrorCode.NONE
        self.recipe_pending = None
        number = self.recipe_request
        if not 1 <= number <= recipes.MAX_NUMBER:
            self._recipe_error(ErrorCode.RECIPE_INVALID)
            return []
        self.recipe_token += 1
        call = RecipeCall(
            self.recipe_token,
            Select(number=number, request_id=f"{self.request_prefix}-{self.recipe_token}"),
        )
        self.recipe_pending = call
        return [call]

    # -- the agent's side -----------------------------------------------------------------

    def trigger_refused(self, token: int, code: ErrorCode, now: float) -> None:
        """The agent did not take trigger `token`: no verdict will come. Ignored when that
        trigger is no longer pending (given up meanwhile)."""
        self.tick(now)
        if token != self.trigger_token or self.waiting is None:
            return
        self.stats["triggers_refused"] += 1
        self.waiting = None
        self.flags &= ~Status.BUSY
        self._error(code)

    def recipe_refused(self, token: int) -> None:
        """The agent refused selection `token` at once (its handler returned a reason)."""
        pending = self.recipe_pending
        if pending is not None and pending.token == token:
            self.recipe_pending = None
            self._recipe_error(ErrorCode.RECIPE_REFUSED)

    def recipe(self, number: int, result: str, request_id: str | None) -> None:
        """A recipe state (``contract.recipe_message``): RECIPE_ACTIVE; and for the pending
        selection (same request id), RECIPE_ACK when "ok" with the number asked for, else
        RECIPE_ERROR ("refused", or another number); "loading" waits."""
        self.recipe_active = number if 0 <= number <= 0xFFFF else 0
        pending = self.recipe_pending
        if pending is None or request_id != pending.select.request_id or result == "loading":
            return
        self.recipe_pending = None
        if result == "ok" and number == pending.select.number:
            self.flags |= Status.RECIPE_ACK
        else:
            self._recipe_error(ErrorCode.RECIPE_REFUSED)

    def part(self, result: PartResult, now: float) -> None:
        """A part verdict. That of the part BUSY waits for is shown: the result registers and
        PASS/FAIL, then RESULT_VALID=1 and BUSY=0 (with ERROR when the verdict is ERROR).
        That of a given-up trigger, or of a part another protocol triggered, is counted and
        not shown."""
        self.tick(now)
        if result.part_id != self.waiting:
            if result.part_id in self.given_up:
                del self.given_up[result.part_id]  # closed: the id may be used again
                self.stats["late_results"] += 1
            else:
                self.stats["other_results"] += 1
            return
        self.waiting = None
        self.result_part_id = int(result.part_id)
        self.result_count = (self.result_count + 1) & 0xFFFF
        self.score, self.regions = result.score, result.regions
        verdict = {OK: Status.PASS, NG: Status.FAIL}.get(result.verdict, NO_FLAGS)
        self.flags = (self.flags & ~(Status.BUSY | RESULT_FLAGS)) | Status.RESULT_VALID | verdict
        self.stats["results"] += 1
        if result.verdict == ERROR_VERDICT:
            self._error(ErrorCode.NO_FRAME if result.missing else ErrorCode.INSPECTION_ERROR)

    def tick(self, now: float) -> None:
        """The clock: a trigger still BUSY after result_timeout_s is given up (ERROR
        NO_RESULT). Every other input calls it first."""
        if self.waiting is not None and now - self.busy_since >= self.result_timeout_s:
            self.stats["timeouts"] += 1
            self._give_up()
            self.flags &= ~Status.BUSY
            self._error(ErrorCode.NO_RESULT)

    # -- what the master reads --------------------------------------------------------------

    def status(self, now: float) -> Status:
        status = self.flags
        if not status & (Status.BUSY | Status.ERROR):
            status |= Status.READY
        if heartbeat(now, self.heartbeat_s):
            status |= Status.HEARTBEAT
        return status

    def shown_error(self) -> ErrorCode:
        if Status.ERROR in self.flags:
            return self.error_code
        if Status.RECIPE_ERROR in self.flags:
            return self.recipe_error_code
        return ErrorCode.NONE

    def input_registers(self, now: float) -> list[int]:
        return [
            int(self.status(now)),
            self.recipe_active,
            *split32(self.result_part_id),
            self.result_count,
            self.score,
            self.regions,
            int(self.shown_error()),
            MAP_VERSION,
        ]

    # -- helpers --------------------------------------------------------------------------

    def _error(self, code: ErrorCode) -> None:
        if Status.ERROR not in self.flags:
            self.flags |= Status.ERROR
            self.error_code = code

    def _recipe_error(self, code: ErrorCode) -> None:
        self.stats["recipe_errors"] += 1
        self.flags |= Status.RECIPE_ERROR
        self.recipe_error_code = code

    def _give_up(self) -> None:
        assert self.waiting is not None
        self.stats["given_up"] += 1
        self.given_up[self.waiting] = None
        self.given_up.move_to_end(self.waiting)
        while len(self.given_up) > MAX_ABANDONED:
            self.given_up.popitem(last=False)
        self.waiting = None


# -- pymodbus: the datastore, the connections, the listener -------------------------------------
#
# Written against pymodbus 3.16.1. Its datastore interface (async_getValues/async_setValues/
# device_ids, as ModbusServerContext has them) is the hook for the registers: _Store serves
# them from the Handshake. Its connections (ServerRequestHandler) get _Guard's rules through
# ModbusTcpServer.callback_new_connection. pymodbus itself leaves a frame with a bad MBAP
# header in its buffer, silently, until 264 bytes have piled up; _Connection closes it.


class _Reporter:
    """At most one log line a minute per kind, however fast a master repeats a mistake."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            return
        self._next[kind] = now + REPORT_EVERY_S
        log.warning(message, *args)


@dataclass
class _Guard:
    """Who may connect, and how many at once (on the server's loop only). At the cap the
    newcomer takes the place of the oldest connection that has not sent a request yet (a
    scan, a flood of silent sockets), else of the one idle longest: a master that polls is
    the last to go."""

    networks: tuple[IpNetwork, ...]
    reporter: _Reporter
    max_connections: int = MAX_CONNECTIONS
    silent: OrderedDict[_Connection, None] = field(default_factory=OrderedDict)  # oldest first
    active: OrderedDict[_Connection, None] = field(default_factory=OrderedDict)  # idle longest 1st
    refused: int = 0
    evicted: int = 0
    malformed: int = 0
    exceptions: int = 0

    @property
    def open(self) -> int:
        return len(self.silent) + len(self.active)

    def admit(self, connection: _Connection, peer: str) -> bool:
        if not admitted(peer, self.networks):
            self.refused += 1
            self.reporter.warn("refused", "modbus: refused a client at %s (not in allow)", peer)
            return False
        if self.open >= self.max_connections:
            victim = next(iter(self.silent or self.active))
            self.evicted += 1
            self.reporter.warn(
                "evicted",
                "modbus: %d connections open; closed one from %s to make room (%s)",
                self.open,
                victim.peer,
                "no request yet" if victim in self.silent else "idle longest",
            )
            victim.close()
        self.silent[connection] = None
        return True

    def touch(self, connection: _Connection) -> None:
        """`connection` sent a request."""
        if connection in self.silent:
            del self.silent[connection]
            self.active[connection] = None
        elif connection in self.active:
            self.active.move_to_end(connection)

    def forget(self, connection: _Connection) -> None:
        self.silent.pop(connection, None)
        self.active.pop(connection, None)


def mbap_malformed(data: bytes) -> bool:
    """Whether a Modbus TCP frame starting `data` has a header no Modbus master sends: a
    protocol id other than 0, or a length outside 2..254 (unit id + function code at least,
    a 253-byte PDU at most). False while the header is incomplete."""
    if len(data) < 6:
        return False
    protocol = int.from_bytes(data[2:4], "big")
    length = int.from_bytes(data[4:6], "big")
    return protocol != 0 or not 2 <= length <= MAX_MBAP_LENGTH


class _Connection(ServerRequestHandler):
    """pymodbus's connection, under _Guard's rules."""

    def __init__(self, owner: _Listener) -> None:
        super().__init__(owner, None, None, None)
        self.guard = owner.guard
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        if not self.guard.admit(self, self.peer):
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def close(self, reconnect: bool = False) -> None:
        self.guard.forget(self)
        super().close(reconnect)

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        if mbap_malformed(data):
            # The stream has lost its framing; nothing after it can be trusted.
            self.guard.malformed += 1
            self.guard.reporter.warn(
                "malformed",
                "modbus: closed the connection of %s: not a Modbus TCP frame (%s)",
                self.peer,
                data[:8].hex(" "),
            )
            self.close()
            return len(data)
        size = 6 + int.from_bytes(data[4:6], "big") if len(data) >= 8 else len(data) + 1
        if len(data) >= size and data[7] not in FUNCTION_CODES:
            # pymodbus would answer function code 0x80; Modbus says the request's own code
            # with the exception bit, which is what a PLC matches an answer by.
            tid = int.from_bytes(data[0:2], "big")
            refusal = ExceptionResponse(data[7], ExcCodes.ILLEGAL_FUNCTION, data[6], tid)
            self.server_send(refusal, addr)
            return size
        used = super().callback_data(data, addr)
        if self.last_pdu is not None:
            self.guard.touch(self)
        return used

    def server_send(self, pdu: ModbusPDU | None, addr: tuple[Any, ...] | None) -> None:
        if isinstance(pdu, ExceptionResponse):
            self.guard.exceptions += 1
            if pdu.exception_code == ExcCodes.ILLEGAL_FUNCTION:
                self.guard.malformed += 1  # not decodable, or a function not offered
        super().server_send(pdu, addr)


class _Store(ModbusServerContext):
    """The datastore pymodbus's requests read and write: the Handshake, under the server's
    lock. Another unit id raises NoSuchIdException (pymodbus answers GATEWAY TARGET FAILED TO
    RESPOND); any other failure is logged here and answered DEVICE FAILURE, never raised into
    pymodbus, which would log a traceback per request."""

    def __init__(self, server: ModbusServer) -> None:
        # ModbusServerContext's own __init__ builds the deprecated simulator datastore; this
        # store is the whole datastore. `old_simulator` makes pymodbus call it as it stands.
        self.old_simulator = True
        self.simdevices = []
        self._server = server
        self._units = {server.settings.unit_id, 0xFF}  # 0xFF: "no unit" (Modbus TCP spec)

    def device_ids(self) -> list[int]:
        return [self._server.settings.unit_id]

    def _table(self, device_id: int, func_code: int) -> Table | None:
        if device_id not in self._units:
            raise NoSuchIdException(f"unit {device_id}")  # answered GATEWAY NO RESPONSE
        return FUNCTION_TABLES.get(func_code)

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        table = self._table(device_id, func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            values = self._server._read(table, address, count)
        except Exception:
            log.exception("modbus: cannot read %s %d..%d", table.value, address, address + count)
            return ExcCodes.DEVICE_FAILURE
        if isinstance(values, ExcCodes) or table not in (Table.COILS, Table.DISCRETE_INPUTS):
            return values
        return [bool(v) for v in values]

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        table = self._table(device_id, func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            return await self._server._write(table, address, [int(v) for v in values])
        except Exception:
            log.exception("modbus: cannot write %s %d", table.value, address)
            return ExcCodes.DEVICE_FAILURE


class _Listener(ModbusTcpServer):
    """pymodbus's TCP server on _Store, making _Connection connections (which answer only
    FUNCTION_CODES), and keeping the OSError of a failed listen (pymodbus logs and drops it)."""

    def __init__(self, store: _Store, guard: _Guard, address: tuple[str, int]) -> None:
        identity = ModbusDeviceIdentification(
            info_name={
                "VendorName": "edge-agent",
                "ProductCode": "edge-agent",
                "ProductName": "edge-agent visual inspection",
                "ModelName": f"register map v{MAP_VERSION}",
                "MajorMinorRevision": __version__,
            }
        )
        super().__init__(store, identity=identity, address=address)
        self.guard = guard
        self.listen_error: OSError | None = None
        create = self.call_create

        async def call_create() -> Any:
            try:
                return await create()
            except OSError as exc:
                self.listen_error = exc
                raise

        self.call_create = call_create

    def callback_new_connection(self) -> _Connection:
        return _Connection(self)


# -- the agent's side ---------------------------------------------------------------------------


class ModbusServer:
    """The Modbus TCP server of one agent. Every method may be called from any thread and
    returns at once: the handshake is updated under a lock, the network is the server
    thread's business."""

    def __init__(self, settings: ModbusModel, *, part_timeout_s: float) -> None:
        """`part_timeout_s`: the station's part timeout; a trigger whose verdict has not come
        RESULT_MARGIN_S after it is given up with ERROR NO_RESULT."""
        self.settings = settings
        self._lock = threading.Lock()
        self._handshake = Handshake(
            result_timeout_s=part_timeout_s + RESULT_MARGIN_S,
            heartbeat_s=settings.heartbeat_ms / 1000.0,
            request_prefix=f"modbus-{secrets.token_hex(3)}",  # unique across restarts
        )
        self._reporter = _Reporter()
        self._guard = _Guard(settings.networks(), self._reporter)
        self._trigger_handler: TriggerHandler | None = None
        self._recipe_handler: RecipeHandler | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: UserError | None = None
        # One worker: handler calls run in the order their edges came.
        self._executor: ThreadPoolExecutor | None = None

    def set_trigger_handler(self, handler: TriggerHandler) -> None:
        """Where TRIGGER edges go (before `start`): ``handler(part_id)``, on a worker thread;
        `part_id` is PART_ID as a decimal string. None: taken; a reason: ERROR
        TRIGGER_REFUSED."""
        self._trigger_handler = handler

    def set_recipe_handler(self, handler: RecipeHandler) -> None:
        """Where RECIPE_SELECT edges go (before `start`): ``handler(select, "modbus")``, on a
        worker thread. A reason: RECIPE_ERROR at once; None: RECIPE_ACK or RECIPE_ERROR when
        `set_recipe` brings this selection's outcome."""
        self._recipe_handler = handler

    def set_recipe(self, message: Mapping[str, Any]) -> None:
        """The recipe state (``contract.recipe_message``): RECIPE_ACTIVE, and the outcome of a
        pending RECIPE_SELECT. Set before `start`, the server starts with it."""
        number = message.get("number")
        number = number if isinstance(number, int) and not isinstance(number, bool) else 0
        result = str(message.get("result"))
        request_id = message.get("request_id")
        with self._lock:
            self._handshake.recipe(
                number, result, request_id if isinstance(request_id, str) else None
            )
            self._report_flags()

    def publish_part(self, message: Mapping[str, Any]) -> None:
        """One part verdict (``contract.part_message``): shown if it is the part the handshake
        waits for, else counted (Handshake.part)."""
        result = part_result(message)  # here: the lock is held for the update only
        with self._lock:
            self._handshake.part(result, time.monotonic())
            self._report_flags()

    @property
    def stats(self) -> dict[str, int]:
        """HANDSHAKE_STATS and CONNECTION_STATS, since start."""
        g = self._guard
        with self._lock:
            counts = dict(self._handshake.stats)
        values = (g.open, g.refused, g.evicted, g.malformed, g.exceptions)
        return {**counts, **dict(zip(CONNECTION_STATS, values, strict=True))}

    def snapshot(self) -> dict[str, int]:
        """The input registers as a master would read them now (for logs and tests)."""
        with self._lock:
            registers = self._handshake.input_registers(time.monotonic())
        names = (
            "status",
            "recipe_active",
            "result_part_id_high",
            "result_part_id_low",
            "result_count",
            "score_permille",
            "region_count",
            "error_code",
            "map_version",
        )
        return dict(zip(names, registers, strict=True))

    # -- start and stop ---------------------------------------------------------------------

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Listen on host:port; UserError (one line) when that is impossible."""
        if self._thread is not None:
            raise RuntimeError("the Modbus server is already started")
        quiet = logging.getLogger("pymodbus")
        if quiet.level == logging.NOTSET:
            # pymodbus logs every bad request at ERROR; the agent counts them in `stats` and
            # logs once a minute (set the "pymodbus" logger's level to see its own lines).
            quiet.setLevel(logging.CRITICAL)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modbus-agent")
        self._thread = threading.Thread(target=self._run, name="modbus", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            self.stop()
            raise UserError(f"modbus: the server did not start within {timeout_s:g} s")
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
            self._executor.shutdown(wait=False)
            raise error
        s = self.settings
        log.info(
            "Modbus TCP server on %s:%d (pymodbus %s), unit %d, register map v%d, clients from %s",
            s.host,
            s.port,
            PYMODBUS_VERSION,
            s.unit_id,
            MAP_VERSION,
            ", ".join(s.allow) if s.allow else "this machine only",
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Close the connections and stop listening (within `timeout_s`)."""
        thread = self._thread
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("modbus: the server thread did not stop within %.1f s", timeout_s)
        self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the server's thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException:  # a bug must not end the thread silently
            if not self._started.is_set():
                self._start_error = UserError("modbus: the server failed to start (see the log)")
                self._started.set()
            log.exception("modbus: the server thread failed")
        finally:
            self._loop = None
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        s = self.settings
        listener = _Listener(_Store(self), self._guard, (s.host, s.port))
        try:
            await listener.serve_forever(background=True)
        except RuntimeError:
            reason = listener.listen_error
            # asyncio words its bind errors at length; the errno's own text is the reason.
            why = "unknown error"
            if reason is not None:
                why = os.strerror(reason.errno) if reason.errno else str(reason)
            if s.port < 1024 and reason is not None and reason.errno == errno.EACCES:
                why += "; ports below 1024 need CAP_NET_BIND_SERVICE"
            self._start_error = UserError(
                f"modbus.port: cannot listen on {s.host}:{s.port} ({why})"
            )
            self._started.set()
            return
        self._stop = asyncio.Event()
        self._loop = loop
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await listener.shutdown()

    def _read(self, table: Table, address: int, count: int) -> list[int] | ExcCodes:
        with self._lock:
            values = self._handshake.read(table, address, count, time.monotonic())
            self._report_flags()
        return values

    async def _write(self, table: Table, address: int, values: list[int]) -> ExcCodes | None:
        with self._lock:
            effects = self._handshake.write(table, address, values, time.monotonic())
            self._report_flags()
        if isinstance(effects, ExcCodes):
            return effects
        loop = asyncio.get_running_loop()
        for effect in effects:
            # Answered after the agent took it: a master's next read sees the outcome.
            await loop.run_in_executor(self._executor, self._call, effect)
        return None

    def _call(self, effect: Effect) -> None:
        """On the worker thread: the agent's handler, its outcome into the handshake."""
        if isinstance(effect, TriggerCall):
            code = self._call_trigger(effect.part_id)
            if code is not None:
                with self._lock:
                    self._handshake.trigger_refused(effect.token, code, time.monotonic())
                    self._report_flags()
            return
        if not self._call_recipe(effect.select):
            with self._lock:
                self._handshake.recipe_refused(effect.token)
                self._report_flags()

    def _call_trigger(self, part_id: str) -> ErrorCode | None:
        handler = self._trigger_handler
        if handler is None:
            self._reporter.warn("trigger", "modbus: a TRIGGER, but this agent takes no triggers")
            return ErrorCode.TRIGGER_REFUSED
        try:
            reason = handler(part_id)
        except Exception:
            log.exception("modbus: the trigger handler failed for part %s", part_id)
            return ErrorCode.AGENT_FAULT
        if reason is not None:
            self._reporter.warn(
                "trigger", "modbus: trigger for part %s refused: %s", part_id, reason
            )
            return ErrorCode.TRIGGER_REFUSED
        return None

    def _call_recipe(self, select: Select) -> bool:
        handler = self._recipe_handler
        if handler is None:
            log.warning("modbus: a RECIPE_SELECT, but this agent takes no recipe selections")
            return False
        try:
            reason = handler(select, SOURCE)
        except Exception:
            log.exception("modbus: the recipe handler failed for %s", select.describe())
            return False
        if reason is not None:
            log.info("modbus: recipe %s refused: %s", select.describe(), reason)
            return False
        log.info("modbus: recipe %s selected", select.describe())
        return True

    def _report_flags(self) -> None:
        """Under the lock: one log line (a minute at most) per ERROR code set."""
        h = self._handshake
        code = h.shown_error()
        if code is not ErrorCode.NONE:
            self._reporter.warn(f"code-{code.value}", "modbus: %s (ERROR_CODE %d)", code.name, code)


# -- commissioning ------------------------------------------------------------------------------


def self_check(
    host: str, port: int, unit_id: int, *, timeout_s: float = SELF_CHECK_TIMEOUT_S
) -> str:
    """`edge-agent modbus-test`: read the register map like a PLC (nothing is written, nothing
    triggered: safe on a running line) and check MAP_VERSION and that HEARTBEAT toggles.
    Returns one line describing the state; UserError (one line) when a check fails."""
    client = ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)
    where = f"modbus {host}:{port} unit {unit_id}"
    try:
        if not client.connect():
            raise UserError(
                f"{where}: cannot connect (agent not running, modbus.enabled off, "
                "or this address not in modbus.allow)"
            )
        first = _read_inputs(client, unit_id, where)
        if first[IR_MAP_VERSION] != MAP_VERSION:
            raise UserError(
                f"{where}: register map v{first[IR_MAP_VERSION]}, this tool knows v{MAP_VERSION}"
            )
        beat = first[IR_STATUS] & Status.HEARTBEAT
        deadline = time.monotonic() + timeout_s
        registers = first
        while registers[IR_STATUS] & Status.HEARTBEAT == beat:
            if time.monotonic() > deadline:
                raise UserError(f"{where}: HEARTBEAT did not toggle within {timeout_s:g} s")
            time.sleep(0.05)
            registers = _read_inputs(client, unit_id, where)
    finally:
        client.close()
    status = Status(registers[IR_STATUS] & ~Status.HEARTBEAT)
    flags = "|".join(f.name or "" for f in Status if f in status) or "none"
    line = (
        f"{where}: OK, map v{MAP_VERSION}, heartbeat toggling, STATUS {flags}, recipe "
        f"{registers[IR_RECIPE_ACTIVE]}, {registers[IR_RESULT_COUNT]} results"
    )
    code = registers[IR_ERROR_CODE]
    if code:
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else "unknown"
        line += f", ERROR_CODE {code} {name}"
    return line


def _read_inputs(client: ModbusTcpClient, unit_id: int, where: str) -> list[int]:
    try:
        response = client.read_input_registers(0, count=INPUT_COUNT, device_id=unit_id)
    except ModbusException as exc:
        raise UserError(f"{where}: no answer ({exc})") from None
    if response.isError():
        raise UserError(f"{where}: the server answered {response} (wrong unit id?)")
    return list(response.registers)
