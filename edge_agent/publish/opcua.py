"""OPC UA server for PLCs (asyncua): each camera's state, last result, counters, one event per
verdict and a Trigger method, beside MQTT contract v1 (docs/opcua.md documents the address
space for integrators).

asyncua runs in its own thread on its own event loop. The agent's side (`publish`,
`set_state`, `set_model_id`) only stores values under a lock and, at most once per batch of
changes, wakes that loop: it never waits for the loop, a client or the network. The loop then
writes the newest values (latest wins when it fell behind) and emits the pending events (up
to MAX_PENDING_EVENTS per camera; older ones are dropped and counted in EventsDropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.event_generator import EventGenerator
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edge_agent.errors import UserError
from edge_agent.publish.contract import MAX_PART_ID
from edge_agent.publish.opcua_config import PREOPERATIONAL, STATES, OpcUaModel

log = logging.getLogger(__name__)

ROOT = "EdgeAgent"  # the folder under Objects, and the first part of every string node id
EVENT_TYPE = "VerdictEventType"
MAX_PENDING_EVENTS = 1024  # per camera, while the server's loop is behind
MAX_SESSIONS = 32  # a PLC, a SCADA and an engineer's client need a few, not asyncua's 1000
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0

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
SEVERITY = {"OK": 100, "NG": 500, "ERROR": 700}  # of the verdict event (1..1000)

TriggerHandler = Callable[[str, str], "bool | None"]


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


class _Users(UserManager):
    """asyncua's user manager: the one configured user, or anyone where anonymous is allowed
    (the server then offers only the anonymous token, so a username never gets this far)."""

    def __init__(self, username: str | None, password: str | None) -> None:
        self._username = username.encode() if username is not None else None
        self._password = (password or "").encode()

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if self._username is None:
            return User(role=UserRole.User)
        if username is None or password is None:
            return None
        # Both compared, in constant time: a timing difference must not reveal the username.
        name_ok = hmac.compare_digest(username.encode(), self._username)
        password_ok = hmac.compare_digest(password.encode(), self._password)
        return User(role=UserRole.User, name=username) if name_ok and password_ok else None


@dataclass(frozen=True)
class _Credentials:
    certificate: bytes
    certificate_format: str
    private_key: bytes
    application_uri: str | None  # the certificate's URI SAN: clients check it equals ours


def _read_credentials(settings: OpcUaModel) -> _Credentials | None:
    """The server's certificate and key, checked here so that a wrong file is one line
    naming the key instead of a failed handshake on the PLC."""
    if settings.security != "basic256sha256":
        return None
    assert settings.certificate_file is not None and settings.private_key_file is not None
    cert_bytes = _read(settings.certificate_file, "opcua.certificate_file")
    key_bytes = _read(settings.private_key_file, "opcua.private_key_file")
    pem = cert_bytes.lstrip().startswith(b"-----BEGIN")
    try:
        cert = (
            x509.load_pem_x509_certificate(cert_bytes)
            if pem
            else x509.load_der_x509_certificate(cert_bytes)
        )
    except ValueError:
        raise UserError(
            f"opcua.certificate_file: {settings.certificate_file} is not a PEM or DER certificate"
        ) from None
    try:
        key = (
            serialization.load_pem_private_key(key_bytes, password=None)
            if key_bytes.lstrip().startswith(b"-----BEGIN")
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
    )


def check_settings(settings: OpcUaModel) -> None:
    """What `start` reads before serving (password file, certificate and key), for
    `run --check`: UserError, one line naming the key, when one is unusable."""
    settings.password_value()
    _read_credentials(settings)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{key}: cannot read {path} ({exc.strerror or exc})") from None


class OpcUaServer:
    """The OPC UA server of one agent. `on_trigger(camera, part_id)` is called, on a worker
    thread of asyncua's, when a client calls a camera's Trigger method; it may return False
    to refuse (BadInvalidState, e.g. a camera that is not in trigger mode)."""

    def __init__(self, settings: OpcUaModel, on_trigger: TriggerHandler) -> None:
        self.settings = settings
        self.on_trigger = on_trigger
        self._lock = threading.Lock()
        self._cameras: dict[str, _Camera] = {}
        self._model_id = ""
        self._model_dirty = True
        self._wake_pending = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.namespace_index: int | None = None

    # -- the agent's side: never waits ------------------------------------------------------

    def start(
        self, cameras: Sequence[str], model_id: str, *, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Build the address space and listen; UserError (one line) when that is impossible
        (unreadable certificate, endpoint in use, colliding camera ids)."""
        if self._thread is not None:
            raise RuntimeError("the OPC UA server is already started")
        _check_node_ids(cameras)
        quiet = logging.getLogger("asyncua")
        if quiet.level == logging.NOTSET:
            # asyncua logs every session, subscription and method call at INFO; the agent
            # logs events, not requests (set the "asyncua" logger's level to see them).
            quiet.setLevel(logging.WARNING)
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
            "OPC UA server on %s (security %s, %s), namespace %s = ns=%d",
            s.endpoint,
            s.security,
            f"user {s.username}" if s.username else "anonymous clients",
            s.namespace_uri,
            self.namespace_index,
        )
        if s.username and s.security == "none":
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

    def _take(self) -> tuple[list[_Update], str | None, bool]:
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
            return updates, model_id, self._stopping

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
                updates, model_id, stopping = self._take()
                if stopping:
                    break
                try:
                    await space.apply(updates, model_id)
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
        server = Server(user_manager=_Users(s.username, password))
        await server.init()
        server.iserver.max_connections = MAX_SESSIONS
        server.set_endpoint(s.endpoint)
        server.set_server_name("edge-agent")
        server.product_uri = "urn:edge-agent"
        app_uri = f"urn:edge-agent:{socket.gethostname()}"
        if credentials is not None:
            app_uri = credentials.application_uri or app_uri
            await server.load_certificate(credentials.certificate, credentials.certificate_format)
            await server.load_private_key(credentials.private_key, None, "pem")
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
            [ua.UserNameIdentityToken] if s.username else [ua.AnonymousIdentityToken]
        )
        idx = await server.register_namespace(s.namespace_uri)
        self.namespace_index = idx
        space = _AddressSpace(server, idx, self._trigger)
        with self._lock:
            model_id = self._model_id
        await space.build(cameras, model_id)
        return server, space

    def _trigger(self, camera: str, args: Sequence[ua.Variant]) -> ua.StatusCode:
        """Trigger(partId): runs on asyncua's worker thread (a sync method callback), so a
        slow handler does not stall the server's loop."""
        if not args:
            return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing)
        if len(args) > 1:
            return ua.StatusCode(ua.StatusCodes.BadTooManyArguments)
        value = args[0].Value if isinstance(args[0], ua.Variant) else args[0]
        part_id = value.strip() if isinstance(value, str) else None
        # contract.parse_part_id's rule: it is echoed into verdicts, sidecars and logs.
        if not part_id or len(part_id) > MAX_PART_ID or not part_id.isprintable():
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        try:
            accepted = self.on_trigger(camera, part_id)
        except Exception:
            log.exception("opcua: the trigger handler failed for camera %s", camera)
            return ua.StatusCode(ua.StatusCodes.BadInternalError)
        if accepted is False:
            return ua.StatusCode(ua.StatusCodes.BadInvalidState)
        return ua.StatusCode(ua.StatusCodes.Good)


def _check_node_ids(cameras: Sequence[str]) -> None:
    """Camera ids may contain '.', the node ids' separator: refuse ids whose nodes would
    collide (camera 'a' has 'EdgeAgent.a.LastResult.Score'; camera 'a.LastResult' would
    have 'EdgeAgent.a.LastResult.Score' too), or hit a shared node (a camera 'ModelId')."""
    if len(set(cameras)) != len(cameras):
        raise UserError("opcua: camera ids must be unique")
    shared = [node_id(EVENT_TYPE), node_id("ModelId")]
    shared += [node_id(EVENT_TYPE, name) for name in ("Camera", *(n for n, _ in RESULT_FIELDS))]
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
    ) -> None:
        self.server = server
        self.idx = idx
        self.trigger = trigger
        self.events: dict[str, EventGenerator] = {}
        self.model_node: ua.NodeId | None = None
        # What each variable last got: a value that did not change is not written again
        # (threshold, model id, most counters stay put from verdict to verdict), which halves
        # the loop's work per verdict; subscribers see no difference (data changes only).
        self._written: dict[ua.NodeId, tuple[Any, ua.VariantType]] = {}

    def nid(self, *path: str) -> ua.NodeId:
        return ua.NodeId(node_id(*path), self.idx)

    def qname(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.idx)

    async def build(self, cameras: list[str], model_id: str) -> None:
        server = self.server
        root = await server.nodes.objects.add_folder(self.nid(), self.qname(ROOT))
        model = await root.add_variable(
            self.nid("ModelId"), self.qname("ModelId"), model_id, VT.String
        )
        self.model_node = model.nodeid
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
            self.events[camera] = await server.get_event_generator(etype, obj)

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

    async def apply(self, updates: list[_Update], model_id: str | None) -> None:
        if model_id is not None and self.model_node is not None:
            await self.write(self.model_node, model_id, VT.String)
        for u in updates:
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

    async def _emit(self, generator: EventGenerator, camera: str, values: tuple[Any, ...]) -> None:
        event = generator.event
        event.Camera = camera
        for (name, _), value in zip(RESULT_FIELDS, values, strict=True):
            setattr(event, name, value)
        verdict, score = values[0], values[1]
        event.Severity = SEVERITY.get(verdict, 700)
        shown = "" if math.isnan(score) else f" (score {score:.4g})"
        await generator.trigger(message=f"{camera}: {verdict}{shown}")
