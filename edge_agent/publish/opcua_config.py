"""The `opcua` config section and the camera state mapping of the OPC UA server.

Kept apart from edge_agent.publish.opcua (the server) so that loading a config never imports
asyncua: the section is validated even when the server is off. Field rules are the config's
shared ones (edge_agent/config/fields.py: non-empty text, secrets never echoed, paths resolved
against the config's folder, errors naming the key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from edge_agent.config.fields import ConfigPath, Secret, Text
from edge_agent.config.fields import problem as _problem
from edge_agent.config.fields import text as _text
from edge_agent.errors import UserError
from edge_agent.lifecycle import roles

SECURITY_MODES = ("none", "basic256sha256")
DEFAULT_ENDPOINT = "opc.tcp://127.0.0.1:4840/edge-agent/"
DEFAULT_NAMESPACE_URI = "urn:edge-agent:inspection"
# Open sockets, sessions or not: bounds the agent's file descriptors (cameras, spool, archive
# share them). At the cap, the oldest socket without an activated session makes room, so
# sockets that never log in cannot lock clients out; max_sessions stays well below it.
MAX_SOCKETS = 256

# OPC 40100-1 (Machine Vision) top-level system states, as the State variable spells them.
PREOPERATIONAL = "Preoperational"
OPERATIONAL = "Operational"
HALTED = "Halted"
ERROR = "Error"
STATES = (PREOPERATIONAL, OPERATIONAL, HALTED, ERROR)


def _endpoint(value: str) -> str:
    url = urlparse(value)
    try:
        port = url.port
    except ValueError:  # a port that is not a number, or past 65535
        port = None
    if url.scheme != "opc.tcp" or not url.hostname or not port:
        raise _problem(f"{value!r} must be opc.tcp://HOST:PORT/PATH, e.g. {DEFAULT_ENDPOINT}")
    return value


def _password_hash(value: str) -> str:
    try:
        return roles.check_password_hash(value)
    except ValueError as exc:
        raise _problem(str(exc)) from None


def _role(value: str) -> str:
    # A rule rather than a Literal: the choices are roles.ROLES, documented with the users
    if value not in roles.ROLES:
        raise _problem(f"must be one of {', '.join(roles.ROLES)}, got {value!r}")
    return value


def _user_name(value: str) -> str:
    try:
        return roles.check_name(value)
    except ValueError as exc:
        raise _problem(str(exc)) from None


Endpoint = Annotated[str, AfterValidator(_text), AfterValidator(_endpoint)]
Security = Literal.__getitem__(SECURITY_MODES)  # the tuple stays the only list of choices
Role = Annotated[str, AfterValidator(_role)]
PasswordHash = Annotated[str, AfterValidator(_text), AfterValidator(_password_hash)]
UserName = Annotated[str, AfterValidator(_user_name)]


class OpcUaUser(BaseModel):
    """One `opcua.users` entry (`edge-agent opcua-user add` prints it): a login and its role."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: UserName
    role: Role
    password_hash: PasswordHash


class OpcUaModel(BaseModel):
    """The `opcua` section (config.example.yaml documents every key)."""

    # As config.py's sections: no unknown keys, no bool as int, no string as number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    enabled: bool = False
    endpoint: Endpoint = DEFAULT_ENDPOINT
    namespace_uri: Text = DEFAULT_NAMESPACE_URI
    security: Security = "none"
    certificate_file: ConfigPath | None = None
    private_key_file: ConfigPath | None = None
    # The single user of configs from before roles: an engineer (it could do everything).
    username: Text | None = None
    password: Secret | None = None
    password_file: ConfigPath | None = None
    # Logins with roles (lifecycle/roles.py), passwords stored as scrypt hashes.
    users: list[OpcUaUser] = Field(default_factory=list)
    # Anonymous clients are viewers: they read and subscribe, call no method that changes
    # anything (Trigger excepted: the PLC handshake).
    allow_anonymous: bool = False
    # Activated sessions at a time: a PLC, a SCADA and an engineer's client need a few.
    max_sessions: int = Field(32, ge=1, le=MAX_SOCKETS // 2)
    hello_timeout_s: float = Field(5.0, gt=0, le=60)
    trusted_client_certificates: ConfigPath | None = None

    @model_validator(mode="after")
    def _rules(self) -> OpcUaModel:
        secure = self.security == "basic256sha256"
        for key in ("certificate_file", "private_key_file", "trusted_client_certificates"):
            if getattr(self, key) is not None and not secure:
                raise _problem("only used with security: basic256sha256", key)
        if self.password is not None and self.password_file is not None:
            raise _problem("set either password or password_file, not both", "password_file")
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise _problem("missing (a password needs a username)", "username")
        if self.username is not None and not has_password:
            raise _problem("missing (set password or password_file)", "password")
        if self.username is not None and self.allow_anonymous:
            raise _problem("anonymous access is refused when a username is set", "allow_anonymous")
        if self.users and self.allow_anonymous:
            raise _problem("anonymous access is refused when users are set", "allow_anonymous")
        names = [u.name for u in self.users]
        for i, name in enumerate(names):
            if name in names[:i] or name == self.username:
                raise _problem(f"{name!r} is another login's name too", "users", i, "name")
        if not self.enabled:
            return self  # a section that is off needs nothing more
        for key in ("certificate_file", "private_key_file"):
            if getattr(self, key) is None and secure:
                raise _problem("required when security is basic256sha256", key)
        if self.trusted_client_certificates is None and secure:
            # No default trust-anything: an encrypted channel from an unknown client is still
            # an unknown client. Refused here, in one line, rather than every client at run time.
            raise _problem(
                "required when security is basic256sha256 (a folder of the client "
                "certificates to trust)",
                "trusted_client_certificates",
            )
        if self.username is None and not self.users and not self.allow_anonymous:
            # Secure by default: nobody gets in unless the config says who.
            raise _problem(
                "missing: set users (or username and password), or allow_anonymous: true",
                "username",
            )
        return self

    def password_value(self) -> str | None:
        """The password (from password_file when that is set); UserError if unreadable."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UserError(
                f"opcua.password_file: cannot read {self.password_file} ({reason})"
            ) from None
        if not text:
            raise UserError(f"opcua.password_file: {self.password_file} is empty")
        return text


def camera_state(stats: Mapping[str, Any], *, stopping: bool = False) -> str:
    """The OPC 40100 system state of a camera from its capture stats (CameraCapture.stats).

    Error: the capture thread died (`failed`), or the camera is not delivering and has a
    `last_error` (cannot open, stream lost, reconnecting). Halted: a finite source is done,
    or the agent is stopping. Operational: frames are flowing (the model is loaded before any
    capture starts). Preoperational: not delivered a frame yet and nothing has gone wrong.
    """
    if stats.get("failed"):
        return ERROR
    if stats.get("finished") or stopping:
        return HALTED
    if stats.get("connected"):
        return OPERATIONAL
    if stats.get("last_error"):
        return ERROR
    return PREOPERATIONAL
