"""OPC UA server for PLCs (asyncua): each camera's state, last result, counters, one event per
verdict and a Trigger method; the line's recipe (its state and a SelectRecipe method) and its
last part verdict, one event per part; beside MQTT contract v1 (docs/integrators/opcua.md
documents the address space and the connection rules for integrators).

asyncua runs in its own thread on its own event loop. The agent's side (`publish`,
`publish_part`, `set_state`, `set_model_id`, `set_recipe`) only stores values under a lock
and, at most once per batch of changes, wakes that loop: it never waits for the loop, a client
or the network. The loop then writes the newest values (latest wins when it fell behind) and
emits the pending events (up to MAX_PENDING_EVENTS per camera and for parts; older ones are
dropped and counted in EventsDropped).

Connections (_Guard): a socket must say Hello within `hello_timeout_s` or it is closed; at
MAX_SOCKETS open sockets the oldest one without an activated session makes room for the new
one, so a port scan or a flood of silent sockets cannot lock a PLC out; `max_sessions` caps
activated sessions (BadTooManySessions beyond it). With Basic256Sha256 a session needs a client
certificate from the `trusted_client_certificates` folder, and it must be the channel's own.

Roles (lifecycle/roles.py): each login is a viewer, operator or engineer (`opcua.users`, the
single legacy `username` an engineer, anonymous clients viewers). Every call of one of our
methods is checked against the caller's role before it runs (_Session.call); a refused call
gets BadUserAccessDenied with the reason and is recorded in the audit trail. The lifecycle
methods (EdgeAgent.Lifecycle: ShadowStart, ShadowStop, Promote, Rollback, Confirm) hand the
caller's name to the agent's lifecycle handler, as the live view does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import json
import logging
import math
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from asyncua import Node, Server, ua
from asyncua.common.utils import Buffer, NotEnoughData, ServiceError
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.event_generator import EventGenerator
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession, SessionState
from asyncua.server.user_managers import UserManager
from asyncua.ua.ua_binary import header_from_binary, uatcp_to_binary
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edge_agent.errors import UserError
from edge_agent.lifecycle import roles
from edge_agent.lifecycle.audit import AuditLog, AuditUnavailable
from edge_agent.publish.contract import part_id_or_none
from edge_agent.publish.opcua_config import (
    MAX_SOCKETS,
    PREOPERATIONAL,
    STATES,
    OpcUaModel,
    OpcUaUser,
)
from edge_agent.station import recipes
from edge_agent.station.recipes import Select

log = logging.getLogger(__name__)

ROOT = "EdgeAgent"  # the folder under Objects, and the first part of every string node id
EVENT_TYPE = "VerdictEventType"
PART_EVENT_TYPE = "PartEventType"
RECIPE = "Recipe"  # EdgeAgent.Recipe: the recipe state and SelectRecipe
SELECT_RECIPE = "SelectRecipe"
PART = "Part"  # EdgeAgent.Part: the last part verdict; emits PartEventType
LIFECYCLE = "Lifecycle"  # EdgeAgent.Lifecycle: the model-change methods
# method -> (the lifecycle action, its String inputs after Inspection; Note ends every list)
LIFECYCLE_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ShadowStart": ("shadow_start", ("Bundle",)),
    "ShadowStop": ("shadow_stop", ()),
    "Promote": ("promote", ()),
    "Rollback": ("rollback", ()),
    "Confirm": ("confirm", ("Entry",)),
}
LIFECYCLE_INPUTS = {  # each input's description; its name lower-cased is the handler's key
    "Inspection": "the inspection's id",
    "Bundle": "the candidate bundle's folder, on the agent's machine",
    "Entry": "the archive entry confirmed as a defect",
    "Note": "why (kept in the audit trail); may be empty",
}
SOURCE = "opcua"  # the recipe handler's `source`: which protocol a selection came by
MAX_PENDING_EVENTS = 1024  # per camera, while the server's loop is behind
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
REPORT_EVERY_S = 60.0  # at most one warning a minute about sockets closed without a session
CERTIFICATE_SUFFIXES = (".der", ".pem")  # the names asyncua's TrustStore loads from a folder
# Time, application URI and the trust list; not key usage: a certificate the operator put in
# the trust list is trusted, whatever its vendor set in keyUsage. No CRLs are configured.
TRUST_CHECKS = (
    CertificateValidatorOptions.TIME_RANGE
    | CertificateValidatorOptions.URI
    | CertificateValidatorOptions.TRUSTED
    | CertificateValidatorOptions.PEER_CLIENT
)
# OpcUaServer.connection_stats' keys.
CONNECTION_STATS = (
    "sockets_open",
    "sessions_open",
    "sockets_without_hello",  # closed: no Hello within hello_timeout_s (or another message first)
    "sockets_evicted",  # closed to make room at MAX_SOCKETS: no activated session
    "sockets_refused",  # answered BadTcpServerTooBusy: every open socket had a session
    "sessions_refused",  # answered BadTooManySessions: max_sessions reached
    "certificates_refused",  # the client certificate is not trusted, or not the channel's
)

VT = ua.VariantType
NULL_TIME = datetime(1601, 1, 1, tzinfo=timezone.utc)  # OPC UA's null DateTime
# LastResult's variables and the verdict event's fields, in one list: (name, variant type).
RESULT_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("Verdict", VT.String),
    ("Score", VT.Double),
    ("Threshold", VT.Double),
    ("PartId", VT.String),
    ("Timestamp", VT.DateTime),
    ("ModelId", VT.String),
    ("RegionCount", VT.UInt32),
    ("FrameId", VT.String),
    ("Sequence", VT.UInt64),
    ("Error", VT.String),
)
COUNTERS = ("Inspected", "NG", "Errors", "EventsDropped")
SEVERITY = {"OK": 100, "NG": 500, "ERROR": 700}  # of the verdict and part events (1..1000)
# EdgeAgent.Recipe's variables (recipe_values).
RECIPE_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("Active", VT.String),
    ("Number", VT.Int32),  # a PLC's INT/DINT; recipe numbers are 1..32767
    ("Result", VT.String),
    ("Reason", VT.String),
    ("ChangedAt", VT.DateTime),
)
# EdgeAgent.Part's variables and the part event's fields (part_values); Missing is an array.
PART_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("PartId", VT.String),
    ("Recipe", VT.String),
    ("Verdict", VT.String),
    ("Missing", VT.String),
    ("Inspections", VT.String),
    ("Timestamp", VT.DateTime),
)
PART_READY = "PartReady"  # UInt32, + 1 per part, written after the part's variables
EVENTS_DROPPED = "EventsDropped"

TriggerHandler = Callable[[str, str], "bool | None"]
RecipeHandler = Callable[[Select, str], "str | None"]
"""``handler(select, source)``: None when accepted, else the reason it is refused."""
LifecycleHandler = Callable[[str, "str | None", Mapping[str, Any], str, str], "str | None"]
"""``handler(action, inspection, args, who, source)``: None when accepted, else the reason it
is refused (the agent's lifecycle_command)."""


@dataclass(frozen=True)
class Login:
    role: str
    name: str  # the audit trail's `who`


ANONYMOUS = Login(roles.ANONYMOUS_ROLE, "anonymous")
# The login of the method call being served: _Session.call sets it around each call, and the
# lifecycle methods (coroutines, run in that same task) read it.
CALLER: contextvars.ContextVar[Login] = contextvars.ContextVar("opcua_caller", default=ANONYMOUS)


def node_id(*path: str) -> str:
    """The string identifier of a node: ``EdgeAgent.<camera>.LastResult.Score``."""
    return ".".join((ROOT, *path))


def result_values(msg: Mapping[str, Any]) -> tuple[Any, ...]:
    """RESULT_FIELDS' values from a v1 verdict dict. Null score/threshold (an ERROR verdict)
    become NaN and null strings "": a PLC variable has no null."""

    def number(value: Any) -> float:
        return math.nan if value is None else float(value)

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    ms = msg.get("timestamp")
    return (
        text(msg.get("verdict")),
        number(msg.get("score")),
        number(msg.get("threshold")),
        text(msg.get("part_id")),
        NULL_TIME if ms is None else datetime.fromtimestamp(ms / 1000.0, timezone.utc),
        text(msg.get("model_id")),
        len(msg.get("regions") or ()),
        text(msg.get("frame_id")),
        int(msg.get("sequence") or 0),
        text(msg.get("error")),
    )


EMPTY_RESULT = ("", math.nan, math.nan, "", NULL_TIME, "", 0, "", 0, "")
EMPTY_RECIPE = ("", 0, "", "", NULL_TIME)
EMPTY_PART: tuple[Any, ...] = ("", "", "", [], "[]", NULL_TIME)


def _utc(ms: Any) -> datetime:
    return NULL_TIME if ms is None else datetime.fromtimestamp(ms / 1000.0, timezone.utc)


def recipe_values(state: Mapping[str, Any]) -> tuple[Any, ...]:
    """RECIPE_FIELDS' values from a recipe state (``contract.recipe_message``); a null reason
    is "" (a PLC variable has no null)."""
    reason = state.get("reason")
    return (
        str(state["active"]),
        int(state["number"]),
        str(state["result"]),
        "" if reason is None else str(reason),
        _utc(state.get("changed_at")),
    )


def part_values(part: Mapping[str, Any]) -> tuple[Any, ...]:
    """PART_FIELDS' values from a part verdict (``contract.part_message``): the silent
    inspections' ids as an array, the inspections' results as compact JSON text."""
    return (
        str(part["part_id"]),
        str(part["recipe"]),
        str(part["verdict"]),
        [str(i) for i in part.get("missing") or ()],
        json.dumps(part.get("inspections") or [], separators=(",", ":"), default=_plain),
        _utc(part.get("timestamp")),
    )


def _plain(obj: Any) -> Any:
    # numpy values as plain numbers; anything else JSON has no form for as its text, so a
    # part's results are still served, never lost to a TypeError on the inference thread.
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def method_select(name: Any, number: Any) -> Select | str:
    """SelectRecipe's arguments -> a Select, else the reason it is refused. ``name`` (String,
    "" = not given) or ``number`` (an integer, 0 = not given), exactly one; a name is printable
    text of at most recipes.MAX_COMMAND_BYTES characters (what the MQTT command can carry), a
    number 1..recipes.MAX_NUMBER. A null argument counts as not given."""
    name = "" if name is None else name
    number = 0 if number is None else number
    if not isinstance(name, str):
        return "Recipe must be a String (the recipe's name, or empty)"
    if isinstance(number, bool) or not isinstance(number, int):
        return "Number must be an integer (the recipe's number, or 0)"
    if (name == "") == (number == 0):
        return "give exactly one of Recipe (a name) and Number (the other empty or 0)"
    if name:
        if len(name) > recipes.MAX_COMMAND_BYTES or not name.isprintable():
            return f"a recipe name is printable text of 1..{recipes.MAX_COMMAND_BYTES} characters"
        return Select(name=name)
    if not 1 <= number <= recipes.MAX_NUMBER:
        return f"a recipe number is 1..{recipes.MAX_NUMBER}, got {number}"
    return Select(number=number)


@dataclass
class _Camera:
    """What the agent handed over for one camera (under OpcUaServer._lock)."""

    result: tuple[Any, ...] = EMPTY_RESULT
    ready: int = 0  # ResultReady: results handed over
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    events: deque[tuple[Any, ...]] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_EVENTS))
    state: str = PREOPERATIONAL
    dirty: bool = True  # the first pump writes every camera


@dataclass(frozen=True)
class _Update:
    camera: str
    result: tuple[Any, ...]
    ready: int
    counts: dict[str, int]
    events: list[tuple[Any, ...]]
    state: str


@dataclass
class _Parts:
    """The part verdicts handed over (under OpcUaServer._lock)."""

    last: tuple[Any, ...] = EMPTY_PART
    ready: int = 0  # PartReady: parts handed over
    dropped: int = 0  # EventsDropped
    events: deque[tuple[Any, ...]] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_EVENTS))
    dirty: bool = False


@dataclass(frozen=True)
class _PartUpdate:
    last: tuple[Any, ...]
    ready: int
    dropped: int
    events: list[tuple[Any, ...]]


@dataclass(frozen=True)
class _Changes:
    """What the loop writes in one pass: None where nothing changed."""

    cameras: list[_Update]
    model_id: str | None
    recipe: tuple[Any, ...] | None
    parts: _PartUpdate | None


@dataclass
class _User(User):
    """asyncua's user, with our role (asyncua's own role stays User: it may read and call)."""

    access: str = roles.ANONYMOUS_ROLE


@functools.cache
def _dummy_hash() -> str:
    """Checked when no user has the given name, so that a wrong name costs what a wrong
    password does: the time of a refusal must not tell which names exist."""
    return roles.hash_password("not a password", salt=b"edge-agent-dummy")


class _Users(UserManager):
    """asyncua's user manager: the configured logins (the legacy user an engineer, each of
    `users` its role), or anyone, as a viewer, where anonymous is allowed (the server then
    offers only the anonymous token, so a username never gets this far)."""

    def __init__(
        self, username: str | None, password: str | None, users: Sequence[OpcUaUser] = ()
    ) -> None:
        self._username = username.encode() if username is not None else None
        self._password = (password or "").encode()
        self._users = tuple(users)

    @property
    def anonymous(self) -> bool:
        return self._username is None and not self._users

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if self.anonymous:
            return _User(role=UserRole.User, access=roles.ANONYMOUS_ROLE)
        if username is None or password is None:
            return None
        given = username.encode()
        # Names compared in constant time, all of them: the time must not reveal a name.
        legacy = self._username is not None and hmac.compare_digest(given, self._username)
        legacy = legacy and hmac.compare_digest(password.encode(), self._password)
        found = None
        for user in self._users:
            if hmac.compare_digest(given, user.name.encode()):
                found = user
        password_ok = False
        if self._users:  # scrypt (~50 ms) only where there are users to check
            stored = found.password_hash if found is not None else _dummy_hash()
            password_ok = roles.verify_password(password, stored)
        if password_ok and found is not None:
            return _User(role=UserRole.User, name=username, access=found.role)
        if legacy:
            return _User(role=UserRole.User, name=username, access=roles.LEGACY_ROLE)
        return None


def _login(user: User | None) -> Login:
    if isinstance(user, _User):
        return Login(user.access, user.name or ANONYMOUS.name)
    return ANONYMOUS  # not one of ours (an internal session): the least


@dataclass(frozen=True)
class _Credentials:
    certificate: bytes
    certificate_format: str
    private_key: bytes
    application_uri: str | None  # the certificate's URI SAN: clients check it equals ours
    trusted: Path  # the folder of trusted client certificates
    trusted_count: int


def _read_credentials(settings: OpcUaModel) -> _Credentials | None:
    """The server's certificate and key, checked here so that a wrong file is one line
    naming the key instead of a failed handshake on the PLC."""
    if settings.security != "basic256sha256":
        return None
    assert settings.certificate_file is not None and settings.private_key_file is not None
    assert settings.trusted_client_certificates is not None
    cert_bytes = _read(settings.certificate_file, "opcua.certificate_file")
    key_bytes = _read(settings.private_key_file, "opcua.private_key_file")
    pem = _is_pem(cert_bytes)
    cert = _certificate(cert_bytes, settings.certificate_file, "opcua.certificate_file")
    try:
        key = (
            serialization.load_pem_private_key(key_bytes, password=None)
            if _is_pem(key_bytes)
            else serialization.load_der_private_key(key_bytes, password=None)
        )
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise UserError(
            f"opcua.private_key_file: {settings.private_key_file} is not an unencrypted PEM or "
            "DER private key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UserError("opcua.private_key_file: Basic256Sha256 needs an RSA key")
    cert_key = cert.public_key()
    if (
        not isinstance(cert_key, rsa.RSAPublicKey)
        or cert_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise UserError(
            f"opcua.private_key_file: {settings.private_key_file} is not the key of "
            f"{settings.certificate_file}"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return _Credentials(
        certificate=cert_bytes,
        certificate_format="pem" if pem else "der",
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        application_uri=uris[0] if uris else None,
        trusted=settings.trusted_client_certificates,
        trusted_count=_read_trust_list(settings.trusted_client_certificates),
    )


def _read_trust_list(folder: Path) -> int:
    """How many certificates the trust folder holds, each checked here: a private key or a
    stray file in it is one line naming it, not a failed start inside asyncua's loader."""
    key = "opcua.trusted_client_certificates"
    try:
        paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except NotADirectoryError:
        raise UserError(f"{key}: {folder} is not a folder") from None
    except OSError as exc:
        raise UserError(f"{key}: cannot read {folder} ({exc.strerror or exc})") from None
    count = 0
    for path in paths:
        if path.is_dir():
            continue
        if path.suffix.lower() not in CERTIFICATE_SUFFIXES:
            raise UserError(
                f"{key}: {path} is not named *.der or *.pem (the folder holds only the "
                "certificates to trust)"
            )
        _certificate(_read(path, key), path, key)
        count += 1
    return count


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN")


def _certificate(data: bytes, path: Path, key: str) -> x509.Certificate:
    try:
        if _is_pem(data):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise UserError(f"{key}: {path} is not a PEM or DER certificate") from None


def check_settings(settings: OpcUaModel) -> None:
    """What `start` reads before serving (password file, certificate, key and trusted client
    certificates), for `run --check`: UserError, one line naming the key, when one is
    unusable."""
    settings.password_value()
    _read_credentials(settings)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{key}: cannot read {path} ({exc.strerror or exc})") from None


# -- connections and sessions ------------------------------------------------------------------
#
# Written against asyncua 2.1.0, whose own limits do not hold under a port scan: its socket cap
# (InternalServer.max_connections) counts sockets that never said Hello, closes refused ones
# without an OPC UA error, and frees them only after its 30 s activation window; its session
# cap (InternalSession.max_connections) is a class attribute shared by every server in the
# process and answers BadMaxConnectionsReached. The classes below replace both through the
# constructors asyncua offers (Server(iserver=...), InternalServer.create_session,
# BinaryServer._make_protocol); only Server.start has to be restated (_Server).


@dataclass
class _Guard:
    """The connection limits of one server and what they did. Changed on the server's loop
    only; OpcUaServer.connection_stats reads the integers from the agent's thread."""

    max_sockets: int
    max_sessions: int
    hello_timeout_s: float
    sockets: dict[_Connection, None] = field(default_factory=dict)  # open, oldest first
    sessions: int = 0  # activated, not closed
    without_hello: int = 0
    evicted: int = 0
    sockets_refused: int = 0
    sessions_refused: int = 0
    certificates_refused: int = 0
    _next_report: float = 0.0

    def make_room(self) -> bool:
        """At the socket cap: close the oldest socket that has not said Hello, else the
        oldest without an activated session (a client mid-handshake is younger than the
        sockets of a scan that came before it). False when every socket has a session."""
        victim = next((c for c in self.sockets if not c.greeted), None)
        if victim is None:
            victim = next((c for c in self.sockets if not c.has_session), None)
        if victim is None:
            return False
        self.evicted += 1
        victim.drop()
        self.report()
        return True

    def check_session_room(self) -> None:
        """ServiceError(BadTooManySessions) at max_sessions activated sessions."""
        if self.sessions >= self.max_sessions:
            self.sessions_refused += 1
            log.warning(
                "opcua: refused a session: %d sessions are open (opcua.max_sessions)",
                self.sessions,
            )
            raise ServiceError(ua.StatusCodes.BadTooManySessions)

    def report(self) -> None:
        """One warning a minute at most, however fast a scan opens sockets."""
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + REPORT_EVERY_S
        log.warning(
            "opcua: closed sockets that opened no session (a port scan?): %d without a Hello "
            "within %g s, %d to make room at %d open sockets, since start",
            self.without_hello,
            self.hello_timeout_s,
            self.evicted,
            self.max_sockets,
        )


def _first_message(data: bytes) -> bytes | None:
    """The OPC UA TCP message type of the first message in `data` once it is complete
    (Part 6, 7.1.2), None before."""
    try:
        header = header_from_binary(Buffer(data))
    except NotEnoughData:
        return None
    return header.MessageType if len(data) >= header.packet_size else None


class _Connection(OPCUAProtocol):
    """asyncua's connection, under _Guard's rules: Hello within hello_timeout_s, the socket
    cap, and an OPC UA Error (BadTcpServerTooBusy) for a socket it cannot take."""

    def __init__(self, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard
        self.greeted = False
        self._hello_timer: asyncio.TimerHandle | None = None
        self._refused: asyncio.Transport | None = None  # not served: answered, then closed

    @property
    def has_session(self) -> bool:
        session = self.processor.session if self.processor is not None else None
        return session is not None and session.is_activated()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if len(guard.sockets) >= guard.max_sockets and not guard.make_room():
            guard.sockets_refused += 1
            # The Error answers its Hello: a client that has not sent it yet would miss it.
            self._refused = cast(asyncio.Transport, transport)
        else:
            super().connection_made(transport)
            if self.transport is not None:
                guard.sockets[self] = None
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(guard.hello_timeout_s, self._no_hello)

    def data_received(self, data: bytes) -> None:
        if not self.greeted:
            kind = _first_message(self._buffer + data)
            if kind is not None and not self._greet(kind):
                return  # closed: nothing more to read
        if self._refused is not None:
            self._buffer += data  # until its Hello is complete (the timer bounds it)
            return
        super().data_received(data)

    def _greet(self, kind: bytes) -> bool:
        """The first message is complete: whether asyncua serves this connection."""
        self.greeted = True
        self._stop_timer()
        if kind != ua.MessageType.Hello:
            # Part 6: a connection starts with Hello; anything else is not a client.
            if self._refused is None:
                self.guard.without_hello += 1
                self.guard.report()
            self.drop()
            return False
        if self._refused is not None:
            error = ua.ErrorMessage(
                ua.StatusCode(ua.StatusCodes.BadTcpServerTooBusy),
                "every connection of this server carries a session",
            )
            self._refused.write(uatcp_to_binary(ua.MessageType.Error, error))
            self.drop()
            return False
        return True

    def _no_hello(self) -> None:
        self._hello_timer = None
        if self._refused is None:
            self.guard.without_hello += 1
            self.guard.report()
        self.drop()

    def drop(self) -> None:
        """Close, and stop counting it now (connection_lost comes a loop turn later)."""
        self.guard.sockets.pop(self, None)
        self._stop_timer()
        transport = self.transport or self._refused
        if transport is not None:
            transport.close()

    def connection_lost(self, ex: BaseException | None) -> None:
        self._stop_timer()
        self.guard.sockets.pop(self, None)
        super().connection_lost(ex)

    def _stop_timer(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None


class _Listener(BinaryServer):
    """asyncua's listener, making _Connection protocols."""

    def __init__(
        self, iserver: InternalServer, host: Any, port: Any, limits: Any, guard: _Guard
    ) -> None:
        super().__init__(iserver, host, port, limits)
        self.guard = guard

    def _make_protocol(self) -> _Connection:
        return _Connection(
            self.guard,
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )


class _Sessions(InternalServer):
    """asyncua's internal server, whose client sessions are _Session (the cap, the trust
    list). `trusted`: a client certificate from the trust list is required."""

    def __init__(
        self,
        user_manager: UserManager,
        guard: _Guard,
        *,
        trusted: bool,
        audit: AuditLog | None = None,
    ) -> None:
        super().__init__(user_manager=user_manager)
        self.guard = guard
        self.trusted = trusted
        self.audit = audit
        # our methods' node ids -> the action (roles.ACTIONS) a caller's role must allow
        self.method_actions: dict[ua.NodeId, tuple[str, str]] = {}

    def refuse(self, action: str, method: str, login: Login, client: str | None) -> str:
        """A call the caller's role may not make: logged, audited, its reason returned."""
        reason = roles.refusal(login.role, action)
        log.warning("opcua: %s refused for %s: %s", method, login.name, reason)
        if self.audit is not None:
            try:
                self.audit.record(
                    roles.audit_action(action),
                    who=login.name,
                    source=SOURCE,
                    where=client,
                    what={"role": login.role, "method": method},
                    reason=reason,
                    result="refused",
                )
            except (AuditUnavailable, ValueError) as exc:  # refused all the same
                log.error("opcua: could not audit a refused %s: %s", method, exc)
        return reason
        # _Connection's cap decides; asyncua's would also count sockets being closed.
        self.max_connections = sys.maxsize

    def create_session(
        self, name: str, user: User | None = None, external: bool = False
    ) -> InternalSession:
        user = user if user is not None else User(role=UserRole.Anonymous)
        if not external:
            return super().create_session(name, user, external)
        self.guard.check_session_room()  # early: CreateSession's own status for a full server
        return _Session(self, self.aspace, self.subscription_service, name, user, external=True)


class _Session(InternalSession):
    """A client's session: counted against max_sessions once activated; with a trust list,
    activated only on the channel of the certificate checked at CreateSession."""

    iserver: _Sessions

    def __init__(self, iserver: _Sessions, *args: Any, **kwargs: Any) -> None:
        super().__init__(iserver, *args, **kwargs)
        self._certificate: bytes | None = None
        self._client: str | None = None  # the client's application URI: the audit's where

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        """Each call of one of our methods only if the caller's role allows its action; the
        caller's login is known to the method while it runs (CALLER)."""
        login = _login(self.user)
        results: list[ua.CallMethodResult] = []
        for request in params:
            guarded = self.iserver.method_actions.get(request.MethodId)
            if guarded is not None and not roles.allows(login.role, guarded[0]):
                reason = self.iserver.refuse(guarded[0], guarded[1], login, self._client)
                results.append(_answer(ua.StatusCodes.BadUserAccessDenied, reason))
                continue
            token = CALLER.set(login)
            try:
                results.extend(await super().call([request]))
            finally:
                CALLER.reset(token)
        return results

    async def create_session(
        self, params: ua.CreateSessionParameters, sockname: tuple[str, int] | None = None
    ) -> ua.CreateSessionResult:
        if self.iserver.trusted and not params.ClientCertificate:
            # asyncua runs the certificate validator only on a certificate that was sent.
            self._refuse_certificate("sent no certificate")
        result = await super().create_session(params, sockname)  # the trust list's check
        self._certificate = params.ClientCertificate
        description = params.ClientDescription
        self._client = (description.ApplicationUri if description else None) or None
        return result

    def activate_session(
        self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None
    ) -> ua.ActivateSessionResult:
        if self.iserver.trusted and (not peer_certificate or peer_certificate != self._certificate):
            # The session's signature is checked with the channel's certificate, so that is
            # the one that must have been trusted, not one copied into CreateSession.
            self._refuse_certificate("signs with another certificate than the trusted one")
        first = self.state is SessionState.Created
        if first:
            self.iserver.guard.check_session_room()
        result = super().activate_session(params, peer_certificate)
        if first:
            self.iserver.guard.sessions += 1
        return result

    async def close_session(self, delete_subs: bool = True) -> None:
        if self.state is SessionState.Activated:
            self.iserver.guard.sessions -= 1
        await super().close_session(delete_subs)

    def _refuse_certificate(self, why: str) -> None:
        self.iserver.guard.certificates_refused += 1
        log.warning("opcua: refused a session: the client %s", why)
        raise ServiceError(ua.StatusCodes.BadSecurityChecksFailed)


class _TrustList(CertificateValidator):
    """asyncua's certificate checks against the trust folder, each refusal counted and logged
    in one line (asyncua's TrustStore logs a traceback, silenced in OpcUaServer.start)."""

    def __init__(self, store: TrustStore, guard: _Guard) -> None:
        super().__init__(TRUST_CHECKS, store)
        self.guard = guard

    async def validate(
        self, cert: x509.Certificate, app_description: ua.ApplicationDescription
    ) -> None:
        try:
            await super().validate(cert, app_description)
        except ServiceError as exc:
            self.guard.certificates_refused += 1
            log.warning(
                "opcua: refused the certificate of client %s (%s): %s",
                app_description.ApplicationUri,
                cert.subject.rfc4514_string(),
                ua.StatusCode(exc.code).name,
            )
            raise


class _Server(Server):
    """asyncua's Server on _Sessions and _Listener."""

    def __init__(self, iserver: _Sessions) -> None:
        super().__init__(iserver=iserver)
        self.guard = iserver.guard

    async def start(self) -> None:
        # asyncua 2.1.0's Server.start, but for the listener's class: it builds its
        # BinaryServer by name, with no way to pass another.
        if self.iserver.certificate is not None:
            uacrypto.check_certificate(  # logs what a client may object to
                self.iserver.certificate, self._application_uri, socket.gethostname()
            )
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            self.bserver = _Listener(self.iserver, host, port, self.limits, self.guard)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except BaseException:
            await self.iserver.stop()
            raise


class OpcUaServer:
    """The OPC UA server of one agent. `on_trigger(camera, part_id)` is called, on a worker
    thread of asyncua's, when a client calls a camera's Trigger method; it may return False
    to refuse (BadInvalidState, e.g. a camera that is not in trigger mode). The recipe handler
    (`set_recipe_handler`) is called there too, for SelectRecipe."""

    def __init__(
        self,
        settings: OpcUaModel,
        on_trigger: TriggerHandler,
        *,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.on_trigger = on_trigger
        self._audit = audit
        self._lifecycle_handler: LifecycleHandler | None = None
        self._lock = threading.Lock()
        self._cameras: dict[str, _Camera] = {}
        self._model_id = ""
        self._model_dirty = True
        self._recipe: tuple[Any, ...] = EMPTY_RECIPE
        self._recipe_dirty = False  # the build writes the first value
        self._recipe_handler: RecipeHandler | None = None
        self._parts = _Parts()
        self._wake_pending = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.namespace_index: int | None = None
        self._guard = _Guard(MAX_SOCKETS, settings.max_sessions, settings.hello_timeout_s)

    # -- the agent's side: never waits ------------------------------------------------------

    def start(
        self, cameras: Sequence[str], model_id: str, *, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Build the address space and listen; UserError (one line) when that is impossible
        (unreadable certificate, endpoint in use, colliding camera ids)."""
        if self._thread is not None:
            raise RuntimeError("the OPC UA server is already started")
        _check_node_ids(cameras)
        # asyncua logs every session, subscription and method call at INFO; the agent logs
        # events, not requests (set the "asyncua" logger's level to see them). Its TrustStore
        # logs a traceback per untrusted certificate; _TrustList logs one line instead.
        for name, level in (("asyncua", logging.WARNING), ("asyncuagds", logging.CRITICAL)):
            quiet = logging.getLogger(name)
            if quiet.level == logging.NOTSET:
                quiet.setLevel(level)
        password = self.settings.password_value()
        credentials = _read_credentials(self.settings)
        with self._lock:
            self._cameras = {camera: _Camera() for camera in cameras}
            self._model_id = model_id
        self._thread = threading.Thread(
            target=self._run,
            args=(list(cameras), password, credentials),
            name="opcua",
            daemon=True,
        )
        self._thread.start()
        if not self._started.wait(timeout_s):
            self.stop()
            raise UserError(f"opcua: the server did not start within {timeout_s:g} s")
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
            if isinstance(error, UserError):
                raise error
            raise UserError(f"opcua: cannot start the server ({type(error).__name__}: {error})")
        s = self.settings
        log.info(
            "OPC UA server on %s (security %s, %s), namespace %s = ns=%d, up to %d sessions",
            s.endpoint,
            s.security,
            _logins(s),
            s.namespace_uri,
            self.namespace_index,
            s.max_sessions,
        )
        if credentials is not None and credentials.trusted_count == 0:
            log.warning(
                "opcua.trusted_client_certificates: %s holds no certificate: every client is "
                "refused",
                credentials.trusted,
            )
        if (s.username or s.users) and s.security == "none":
            log.warning("opcua: the password travels unencrypted; use security: basic256sha256")

    def publish(self, camera: str, msg: Mapping[str, Any]) -> None:
        """Hand over one verdict (contract v1 dict): LastResult, counters, ResultReady and
        one event. Returns at once, whatever the server and its clients are doing."""
        values = result_values(msg)  # here: the loop never reads the caller's dict
        with self._lock:
            cam = self._cameras.get(camera)
            if cam is None:
                return
            cam.result = values
            cam.ready = (cam.ready + 1) & 0xFFFFFFFF  # UInt32: a PLC waits for a change
            verdict = values[0]
            if verdict == "ERROR":
                cam.counts["Errors"] += 1
            else:
                cam.counts["Inspected"] += 1
                if verdict == "NG":
                    cam.counts["NG"] += 1
            if len(cam.events) == MAX_PENDING_EVENTS:
                cam.counts["EventsDropped"] += 1  # the deque drops the oldest
            cam.events.append(values)
            cam.dirty = True
            wake = self._mark_pending()
        if wake:
            self._wake()

    def set_recipe_handler(self, handler: RecipeHandler) -> None:
        """Where SelectRecipe goes (before `start`): ``handler(select, "opcua")``, called on a
        worker thread of asyncua's."""
        self._recipe_handler = handler

    def set_lifecycle_handler(self, handler: LifecycleHandler) -> None:
        """Where the EdgeAgent.Lifecycle methods go (before `start`): ``handler(action,
        inspection, args, who, "opcua")``, called on a worker thread of asyncua's, only for a
        caller whose role allows the action."""
        self._lifecycle_handler = handler

    def set_recipe(self, state: Mapping[str, Any]) -> None:
        """The recipe state (``contract.recipe_message``) into EdgeAgent.Recipe; set before
        `start`, the server starts with it. Returns at once."""
        values = recipe_values(state)
        with self._lock:
            self._recipe = values
            self._recipe_dirty = True
            wake = self._mark_pending()
        if wake:
            self._wake()

    def publish_part(self, part: Mapping[str, Any]) -> None:
        """Hand over one part verdict (``contract.part_message``): EdgeAgent.Part, PartReady
        and one PartEventType event. Returns at once."""
        values = part_values(part)
        with self._lock:
            parts = self._parts
            parts.last = values
            parts.ready = (parts.ready + 1) & 0xFFFFFFFF  # UInt32, as ResultReady
            if len(parts.events) == MAX_PENDING_EVENTS:
                parts.dropped += 1  # the deque drops the oldest
            parts.events.append(values)
            parts.dirty = True
            wake = self._mark_pending()
        if wake:
            self._wake()

    def set_state(self, camera: str, state: str) -> None:
        """The camera's system state, one of STATES (opcua_config.camera_state maps capture
        stats to it); cheap to call every tick, only a change reaches the server."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        with self._lock:
            cam = self._cameras.get(camera)
            if cam is None or cam.state == state:
                return
            cam.state = state
            cam.dirty = True
            wake = self._mark_pending()
        if wake:
            self._wake()

    def set_model_id(self, model_id: str) -> None:
        """After a reload: EdgeAgent.ModelId (each result carries its own ModelId too)."""
        with self._lock:
            if model_id == self._model_id:
                return
            self._model_id = model_id
            self._model_dirty = True
            wake = self._mark_pending()
        if wake:
            self._wake()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Close the sessions and stop listening (within `timeout_s`)."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
        self._wake()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("opcua: the server thread did not stop within %.1f s", timeout_s)
        self._thread = None

    @property
    def connection_stats(self) -> dict[str, int]:
        """CONNECTION_STATS: open sockets and sessions, and what was closed or refused since
        start."""
        g = self._guard
        values = (
            len(g.sockets),
            g.sessions,
            g.without_hello,
            g.evicted,
            g.sockets_refused,
            g.sessions_refused,
            g.certificates_refused,
        )
        return dict(zip(CONNECTION_STATS, values, strict=True))

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per camera: the counters and ResultReady, as handed over."""
        with self._lock:
            return {
                camera: {**cam.counts, "ResultReady": cam.ready}
                for camera, cam in self._cameras.items()
            }

    def _mark_pending(self) -> bool:
        """Under the lock: whether this change must wake the loop (one wake-up per batch)."""
        wake = not self._wake_pending
        self._wake_pending = True
        return wake

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return  # not serving yet: the first pump writes what is stored
        # A byte into the loop's self-pipe; it never waits for the loop. RuntimeError: the
        # loop has just closed (stopping).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wakeup.set)

    def _take(self) -> tuple[_Changes, bool]:
        with self._lock:
            self._wake_pending = False
            updates = []
            for camera, cam in self._cameras.items():
                if not cam.dirty:
                    continue
                updates.append(
                    _Update(
                        camera, cam.result, cam.ready, dict(cam.counts), list(cam.events), cam.state
                    )
                )
                cam.events.clear()
                cam.dirty = False
            model_id = self._model_id if self._model_dirty else None
            self._model_dirty = False
            recipe = self._recipe if self._recipe_dirty else None
            self._recipe_dirty = False
            p = self._parts
            parts = _PartUpdate(p.last, p.ready, p.dropped, list(p.events)) if p.dirty else None
            p.events.clear()
            p.dirty = False
            return _Changes(updates, model_id, recipe, parts), self._stopping

    # -- the server's thread ----------------------------------------------------------------

    def _run(
        self, cameras: list[str], password: str | None, credentials: _Credentials | None
    ) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, cameras, password, credentials))
        except BaseException as exc:  # a bug must not end the thread silently
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("opcua: the server thread failed")
        finally:
            self._loop = None
            loop.close()

    async def _main(
        self,
        loop: asyncio.AbstractEventLoop,
        cameras: list[str],
        password: str | None,
        credentials: _Credentials | None,
    ) -> None:
        try:
            server, space = await self._build(cameras, password, credentials)
            await server.start()
        except OSError as exc:
            url = self.settings.endpoint
            self._start_error = UserError(
                f"opcua.endpoint: cannot listen on {url} ({exc.strerror or exc})"
            )
            self._started.set()
            return
        self._wakeup = asyncio.Event()
        self._loop = loop
        self._started.set()
        try:
            while True:
                changes, stopping = self._take()
                if stopping:
                    break
                try:
                    await space.apply(changes)
                except Exception:
                    log.exception("opcua: cannot update the address space")
                await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            await server.stop()

    async def _build(
        self, cameras: list[str], password: str | None, credentials: _Credentials | None
    ) -> tuple[Server, _AddressSpace]:
        s = self.settings
        users = _Users(s.username, password, s.users)
        iserver = _Sessions(users, self._guard, trusted=credentials is not None, audit=self._audit)
        server = _Server(iserver)
        await server.init()
        server.set_endpoint(s.endpoint)
        server.set_server_name("edge-agent")
        server.product_uri = "urn:edge-agent"
        app_uri = f"urn:edge-agent:{socket.gethostname()}"
        if credentials is not None:
            app_uri = credentials.application_uri or app_uri
            await server.load_certificate(credentials.certificate, credentials.certificate_format)
            await server.load_private_key(credentials.private_key, None, "pem")
            store = TrustStore([credentials.trusted], [])
            await store.load()
            server.set_certificate_validator(_TrustList(store, self._guard))
            # Signed and encrypted only: no endpoint a client could fall back to in clear.
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            if credentials.application_uri is None:
                log.warning(
                    "opcua.certificate_file: no URI in its subjectAltName; clients may refuse it "
                    "(the server's application URI is %s)",
                    app_uri,
                )
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        await server.set_application_uri(app_uri)
        server.set_identity_tokens(
            [ua.AnonymousIdentityToken] if users.anonymous else [ua.UserNameIdentityToken]
        )
        idx = await server.register_namespace(s.namespace_uri)
        self.namespace_index = idx
        space = _AddressSpace(
            server, idx, self._trigger, self._select_recipe, self._lifecycle, iserver
        )
        with self._lock:
            model_id, recipe = self._model_id, self._recipe
            self._recipe_dirty = False  # built with it: there from the first client on
        await space.build(cameras, model_id, recipe)
        return server, space

    def _trigger(self, camera: str, args: Sequence[ua.Variant]) -> ua.StatusCode:
        """Trigger(partId): runs on asyncua's worker thread (a sync method callback), so a
        slow handler does not stall the server's loop."""
        if not args:
            return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing)
        if len(args) > 1:
            return ua.StatusCode(ua.StatusCodes.BadTooManyArguments)
        value = args[0].Value if isinstance(args[0], ua.Variant) else args[0]
        part_id = part_id_or_none(value) if isinstance(value, str) else None
        if part_id is None:  # echoed into verdicts, sidecars and logs: the one rule
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        try:
            accepted = self.on_trigger(camera, part_id)
        except Exception:
            log.exception("opcua: the trigger handler failed for camera %s", camera)
            return ua.StatusCode(ua.StatusCodes.BadInternalError)
        if accepted is False:
            return ua.StatusCode(ua.StatusCodes.BadInvalidState)
        return ua.StatusCode(ua.StatusCodes.Good)

    def _select_recipe(self, args: Sequence[ua.Variant]) -> ua.CallMethodResult:
        """SelectRecipe(Recipe, Number) -> Reason, on asyncua's worker thread: Good and ""
        when the agent takes the selection (it switches at the next frame boundary and
        EdgeAgent.Recipe then shows it), else a Bad status with the reason as the output."""
        if len(args) < 2:
            return _answer(ua.StatusCodes.BadArgumentsMissing, "give Recipe and Number")
        if len(args) > 2:
            return _answer(ua.StatusCodes.BadTooManyArguments, "give Recipe and Number only")
        name, number = (a.Value if isinstance(a, ua.Variant) else a for a in args)
        select = method_select(name, number)
        if isinstance(select, str):
            log.warning("opcua: refused a SelectRecipe call: %s", select)
            return _answer(ua.StatusCodes.BadInvalidArgument, select)
        handler = self._recipe_handler
        if handler is None:
            return _answer(ua.StatusCodes.BadInvalidState, "this agent takes no recipe selections")
        try:
            reason = handler(select, SOURCE)
        except Exception:
            log.exception("opcua: the recipe handler failed for %s", select.describe())
            return _answer(ua.StatusCodes.BadInternalError, "the agent failed to take it")
        if reason is not None:  # the agent publishes the refusal as the recipe state too
            log.info("opcua: recipe %s refused (SelectRecipe): %s", select.describe(), reason)
            return _answer(ua.StatusCodes.BadInvalidArgument, reason)
        log.info("opcua: recipe %s selected (SelectRecipe)", select.describe())
        return _answer(ua.StatusCodes.Good, "")

    def _lifecycle(
        self, action: str, method: str, args: Sequence[ua.Variant], login: Login
    ) -> ua.CallMethodResult:
        """A Lifecycle method, on a worker thread, for a caller whose role allows it: its
        String inputs to the agent's handler (None: accepted, Good and "")."""
        names = ("Inspection", *LIFECYCLE_METHODS[method][1], "Note")
        if len(args) < len(names):
            return _answer(ua.StatusCodes.BadArgumentsMissing, f"give {', '.join(names)}")
        if len(args) > len(names):
            return _answer(ua.StatusCodes.BadTooManyArguments, f"give {', '.join(names)} only")
        values = [a.Value if isinstance(a, ua.Variant) else a for a in args]
        given: dict[str, Any] = {}
        for name, value in zip(names, values, strict=True):
            if value is not None and not isinstance(value, str):
                return _answer(ua.StatusCodes.BadInvalidArgument, f"{name} must be a String")
            if value:  # "" and null: not given
                given["reason" if name == "Note" else name.lower()] = value
        inspection = given.pop("inspection", None)
        handler = self._lifecycle_handler
        if handler is None:
            return _answer(ua.StatusCodes.BadInvalidState, "this agent takes no model changes")
        try:
            reason = handler(action, inspection, given, login.name, SOURCE)
        except Exception:
            log.exception("opcua: the lifecycle handler failed for %s", method)
            return _answer(ua.StatusCodes.BadInternalError, "the agent failed to take it")
        if reason is not None:
            log.info("opcua: %s refused for %s: %s", method, login.name, reason)
            return _answer(ua.StatusCodes.BadInvalidState, reason)
        log.info("opcua: %s by %s taken", method, login.name)
        return _answer(ua.StatusCodes.Good, "")


def _logins(s: OpcUaModel) -> str:
    if s.username is None and not s.users:
        return "anonymous clients, as viewers"
    names = [f"{s.username} (engineer)"] if s.username else []
    names += [f"{u.name} ({u.role})" for u in s.users]
    return "users " + ", ".join(names)


def _answer(code: int, reason: str) -> ua.CallMethodResult:
    """A method's result: its status and the Reason output ("" when Good)."""
    return ua.CallMethodResult(
        StatusCode=ua.StatusCode(code), OutputArguments=[ua.Variant(reason, VT.String)]
    )


def _check_node_ids(cameras: Sequence[str]) -> None:
    """Camera ids may contain '.', the node ids' separator: refuse ids whose nodes would
    collide (camera 'a' has 'EdgeAgent.a.LastResult.Score'; camera 'a.LastResult' would
    have 'EdgeAgent.a.LastResult.Score' too), or hit a shared node (a camera 'ModelId')."""
    if len(set(cameras)) != len(cameras):
        raise UserError("opcua: camera ids must be unique")
    shared = [node_id(EVENT_TYPE), node_id("ModelId"), node_id(PART_EVENT_TYPE)]
    shared += [node_id(EVENT_TYPE, name) for name in ("Camera", *(n for n, _ in RESULT_FIELDS))]
    shared += [node_id(PART_EVENT_TYPE, name) for name, _ in PART_FIELDS]
    shared += [node_id(RECIPE), node_id(RECIPE, SELECT_RECIPE)]
    shared += [node_id(RECIPE, name) for name, _ in RECIPE_FIELDS]
    shared += [node_id(PART), node_id(PART, PART_READY), node_id(PART, EVENTS_DROPPED)]
    shared += [node_id(PART, name) for name, _ in PART_FIELDS]
    shared += [node_id(LIFECYCLE), *(node_id(LIFECYCLE, m) for m in LIFECYCLE_METHODS)]
    seen = dict.fromkeys(shared, "")
    for camera in cameras:
        for nid in _camera_node_ids(camera):
            other = seen.setdefault(nid, camera)
            if other != camera:
                owner = f"camera {other!r}" if other else "the server"
                raise UserError(
                    f"opcua: camera {camera!r} would have the node {nid} of {owner}; rename it"
                )


def _camera_node_ids(camera: str) -> list[str]:
    ids = [node_id(camera, *leaf) for leaf in ((), ("State",), ("ResultReady",), ("Trigger",))]
    ids += [node_id(camera, "LastResult"), node_id(camera, "Counters")]
    ids += [node_id(camera, "LastResult", name) for name, _ in RESULT_FIELDS]
    ids += [node_id(camera, "Counters", name) for name in COUNTERS]
    return ids


class _AddressSpace:
    """The nodes and event generators (the server's loop only)."""

    def __init__(
        self,
        server: Server,
        idx: int,
        trigger: Callable[[str, Sequence[ua.Variant]], ua.StatusCode],
        select: Callable[[Sequence[ua.Variant]], ua.CallMethodResult],
        lifecycle: Callable[[str, str, Sequence[ua.Variant], Login], ua.CallMethodResult],
        sessions: _Sessions,
    ) -> None:
        self.server = server
        self.idx = idx
        self.trigger = trigger
        self.select = select
        self.lifecycle = lifecycle
        self.sessions = sessions
        self.events: dict[str, EventGenerator] = {}
        self.part_events: EventGenerator | None = None
        self.model_node: ua.NodeId | None = None
        # What each variable last got: a value that did not change is not written again
        # (threshold, model id, most counters stay put from verdict to verdict), which halves
        # the loop's work per verdict; subscribers see no difference (data changes only).
        self._written: dict[ua.NodeId, tuple[Any, ua.VariantType]] = {}

    def nid(self, *path: str) -> ua.NodeId:
        return ua.NodeId(node_id(*path), self.idx)

    def qname(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.idx)

    async def build(self, cameras: list[str], model_id: str, recipe: tuple[Any, ...]) -> None:
        server = self.server
        root = await server.nodes.objects.add_folder(self.nid(), self.qname(ROOT))
        model = await root.add_variable(
            self.nid("ModelId"), self.qname("ModelId"), model_id, VT.String
        )
        self.model_node = model.nodeid
        await self._build_recipe(root, recipe)
        await self._build_part(root)
        await self._build_lifecycle(root)
        base_event = server.get_node(ua.ObjectIds.BaseEventType)
        etype = await base_event.add_object_type(self.nid(EVENT_TYPE), self.qname(EVENT_TYPE))
        for name, vt in (("Camera", VT.String), *RESULT_FIELDS):
            await etype.add_property(
                self.nid(EVENT_TYPE, name), self.qname(name), ua.get_default_value(vt), vt
            )
        part_id = ua.Argument(
            Name="partId",
            DataType=ua.NodeId(ua.ObjectIds.String),
            ValueRank=-1,
            Description=ua.LocalizedText("the part id echoed in the verdict (PartId)"),
        )
        for camera in cameras:
            obj = await root.add_object(self.nid(camera), self.qname(camera))
            await obj.add_variable(
                self.nid(camera, "State"), self.qname("State"), PREOPERATIONAL, VT.String
            )
            await obj.add_variable(
                self.nid(camera, "ResultReady"), self.qname("ResultReady"), 0, VT.UInt32
            )
            last = await obj.add_object(self.nid(camera, "LastResult"), self.qname("LastResult"))
            for (name, vt), value in zip(RESULT_FIELDS, EMPTY_RESULT, strict=True):
                await last.add_variable(
                    self.nid(camera, "LastResult", name), self.qname(name), value, vt
                )
            counters = await obj.add_object(self.nid(camera, "Counters"), self.qname("Counters"))
            for name in COUNTERS:
                await counters.add_variable(
                    self.nid(camera, "Counters", name), self.qname(name), 0, VT.UInt64
                )
            await obj.add_method(
                self.nid(camera, "Trigger"),
                self.qname("Trigger"),
                self._method(camera, obj.nodeid),
                [part_id],
                [],
            )
            self.guard(self.nid(camera, "Trigger"), "trigger", "Trigger")
            self.events[camera] = await server.get_event_generator(etype, obj)

    async def _build_recipe(self, root: Node, values: tuple[Any, ...]) -> None:
        """EdgeAgent.Recipe: the state (built with its current value) and SelectRecipe."""
        obj = await root.add_object(self.nid(RECIPE), self.qname(RECIPE))
        for (name, vt), value in zip(RECIPE_FIELDS, values, strict=True):
            await obj.add_variable(self.nid(RECIPE, name), self.qname(name), value, vt)
        inputs = [
            ua.Argument(
                Name="Recipe",
                DataType=ua.NodeId(ua.ObjectIds.String),
                ValueRank=-1,
                Description=ua.LocalizedText("the recipe's name; empty to select by Number"),
            ),
            ua.Argument(
                Name="Number",
                DataType=ua.NodeId(ua.ObjectIds.Int32),
                ValueRank=-1,
                Description=ua.LocalizedText("the recipe's number; 0 to select by Recipe"),
            ),
        ]
        reason = ua.Argument(
            Name="Reason",
            DataType=ua.NodeId(ua.ObjectIds.String),
            ValueRank=-1,
            Description=ua.LocalizedText("why it was refused; empty when accepted"),
        )
        object_id = obj.nodeid

        def call(parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            if parent != object_id:  # Part 4: a method is called on the object it belongs to
                return _answer(ua.StatusCodes.BadMethodInvalid, f"call it on {node_id(RECIPE)}")
            return self.select(args)

        await obj.add_method(
            self.nid(RECIPE, SELECT_RECIPE), self.qname(SELECT_RECIPE), call, inputs, [reason]
        )
        self.guard(self.nid(RECIPE, SELECT_RECIPE), "recipe", SELECT_RECIPE)

    def guard(self, method: ua.NodeId, action: str, name: str) -> None:
        """Only a caller whose role allows `action` gets to call `method` (_Session.call)."""
        assert action in roles.ACTIONS, action
        self.sessions.method_actions[method] = (action, name)

    async def _build_lifecycle(self, root: Node) -> None:
        """EdgeAgent.Lifecycle and its methods, each String inputs -> Reason."""
        obj = await root.add_object(self.nid(LIFECYCLE), self.qname(LIFECYCLE))
        reason = ua.Argument(
            Name="Reason",
            DataType=ua.NodeId(ua.ObjectIds.String),
            ValueRank=-1,
            Description=ua.LocalizedText("why it was refused; empty when accepted"),
        )
        object_id = obj.nodeid
        for method, (action, extra) in LIFECYCLE_METHODS.items():
            inputs = [
                ua.Argument(
                    Name=name,
                    DataType=ua.NodeId(ua.ObjectIds.String),
                    ValueRank=-1,
                    Description=ua.LocalizedText(LIFECYCLE_INPUTS[name]),
                )
                for name in ("Inspection", *extra, "Note")
            ]
            nid = self.nid(LIFECYCLE, method)
            await obj.add_method(
                nid, self.qname(method), self._lifecycle_call(action, method, object_id),
                inputs, [reason],
            )  # fmt: skip
            self.guard(nid, action, method)

    def _lifecycle_call(self, action: str, method: str, object_id: ua.NodeId) -> Callable[..., Any]:
        async def call(parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            # A coroutine, so that it runs in the task that set CALLER; the handler itself
            # runs on a worker thread, as the other methods' do.
            if parent != object_id:  # Part 4: a method is called on the object it belongs to
                return _answer(ua.StatusCodes.BadMethodInvalid, f"call it on {node_id(LIFECYCLE)}")
            login = CALLER.get()
            work = functools.partial(self.lifecycle, action, method, args, login)
            return await asyncio.get_running_loop().run_in_executor(None, work)

        return call

    async def _build_part(self, root: Node) -> None:
        """EdgeAgent.Part (the last part, PartReady, EventsDropped) and PartEventType."""
        obj = await root.add_object(self.nid(PART), self.qname(PART))
        for (name, vt), value in zip(PART_FIELDS, EMPTY_PART, strict=True):
            var = await obj.add_variable(self.nid(PART, name), self.qname(name), value, vt)
            if isinstance(value, list):  # a one-dimensional array of any length
                await var.write_value_rank(ua.ValueRank.OneDimension)
                await var.write_array_dimensions([0])
        await obj.add_variable(self.nid(PART, PART_READY), self.qname(PART_READY), 0, VT.UInt32)
        await obj.add_variable(
            self.nid(PART, EVENTS_DROPPED), self.qname(EVENTS_DROPPED), 0, VT.UInt64
        )
        base_event = self.server.get_node(ua.ObjectIds.BaseEventType)
        etype = await base_event.add_object_type(
            self.nid(PART_EVENT_TYPE), self.qname(PART_EVENT_TYPE)
        )
        for (name, vt), value in zip(PART_FIELDS, EMPTY_PART, strict=True):
            prop = await etype.add_property(
                self.nid(PART_EVENT_TYPE, name), self.qname(name), value, vt
            )
            if isinstance(value, list):
                await prop.write_value_rank(ua.ValueRank.OneDimension)
                await prop.write_array_dimensions([0])
        self.part_events = await self.server.get_event_generator(etype, obj)

    def _method(self, camera: str, object_id: ua.NodeId) -> Callable[..., ua.StatusCode]:
        def call(parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
            if parent != object_id:  # Part 4: a method is called on the object it belongs to
                return ua.StatusCode(ua.StatusCodes.BadMethodInvalid)
            return self.trigger(camera, args)

        return call

    async def write(self, nid: ua.NodeId, value: Any, vt: ua.VariantType) -> None:
        if self._written.get(nid) == (value, vt):  # NaN never equals: always written
            return
        await self.server.write_attribute_value(nid, ua.DataValue(ua.Variant(value, vt)))
        self._written[nid] = (value, vt)

    async def apply(self, changes: _Changes) -> None:
        if changes.model_id is not None and self.model_node is not None:
            await self.write(self.model_node, changes.model_id, VT.String)
        if changes.recipe is not None:
            for (name, vt), value in zip(RECIPE_FIELDS, changes.recipe, strict=True):
                await self.write(self.nid(RECIPE, name), value, vt)
        if changes.parts is not None:
            await self._apply_parts(changes.parts)
        for u in changes.cameras:
            cam = u.camera
            await self.write(self.nid(cam, "State"), u.state, VT.String)
            for (name, vt), value in zip(RESULT_FIELDS, u.result, strict=True):
                await self.write(self.nid(cam, "LastResult", name), value, vt)
            for name in COUNTERS:
                await self.write(self.nid(cam, "Counters", name), u.counts[name], VT.UInt64)
            # Last: a PLC that sees ResultReady change reads a complete LastResult.
            await self.write(self.nid(cam, "ResultReady"), u.ready, VT.UInt32)
            generator = self.events[cam]
            for values in u.events:
                await self._emit(generator, cam, values)

    async def _apply_parts(self, parts: _PartUpdate) -> None:
        for (name, vt), value in zip(PART_FIELDS, parts.last, strict=True):
            await self.write(self.nid(PART, name), value, vt)
        await self.write(self.nid(PART, EVENTS_DROPPED), parts.dropped, VT.UInt64)
        # Last: a PLC that sees PartReady change reads a complete part.
        await self.write(self.nid(PART, PART_READY), parts.ready, VT.UInt32)
        generator = self.part_events
        if generator is None:
            return
        for values in parts.events:
            event = generator.event
            for (name, _), value in zip(PART_FIELDS, values, strict=True):
                setattr(event, name, value)
            part_id, recipe, verdict = values[:3]
            event.Severity = SEVERITY.get(verdict, 700)
            await generator.trigger(message=f"part {part_id}: {verdict} (recipe {recipe})")

    async def _emit(self, generator: EventGenerator, camera: str, values: tuple[Any, ...]) -> None:
        event = generator.event
        event.Camera = camera
        for (name, _), value in zip(RESULT_FIELDS, values, strict=True):
            setattr(event, name, value)
        verdict, score = values[0], values[1]
        event.Severity = SEVERITY.get(verdict, 700)
        shown = "" if math.isnan(score) else f" (score {score:.4g})"
        await generator.trigger(message=f"{camera}: {verdict}{shown}")
