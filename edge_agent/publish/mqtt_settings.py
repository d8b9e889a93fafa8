"""The broker connection's settings (config section ``mqtt``) and the TLS context built from
them: a leaf that the publisher, each camera's link and the Sparkplug node all read."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import UserError
from edge_agent.publish import contract

MAX_INFLIGHT_WINDOW = 10_000
_FORBIDDEN_IN_NAMES = set("/+#\0")


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection, topic and spool settings (config section ``mqtt``)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "edge-agent"
    prefix: str = "edge-agent"
    line: str = "line1"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = False
    tls_insecure: bool = False
    keepalive_s: int = 30
    spool_dir: Path = Path("/var/lib/edge-agent/spool")
    spool_max_messages: int = 100_000
    spool_max_bytes: int = 256 * 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    inflight_window: int = 64

    def validate(self) -> None:
        """Raise UserError naming the first bad key."""
        if not self.host:
            raise UserError("mqtt.host is empty")
        if not 0 < self.port < 65536:
            raise UserError(f"mqtt.port must be 1..65535, got {self.port}")
        for key in ("client_id", "line"):
            check_name(f"mqtt.{key}", getattr(self, key))
        for level in self.prefix.split("/"):  # a prefix may have levels: "plant/hall2"
            check_name("mqtt.prefix level", level)
        if self.password is not None and self.username is None:
            raise UserError("mqtt.password is set but mqtt.username is not")
        if (self.ca_file or self.cert_file or self.key_file or self.tls_insecure) and not self.tls:
            raise UserError(
                "mqtt.ca_file/cert_file/key_file/tls_insecure need mqtt.tls: true "
                "(and usually mqtt.port: 8883)"
            )
        if self.key_file and not self.cert_file:
            raise UserError("mqtt.key_file is set but mqtt.cert_file is not")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise UserError(f"mqtt.{key}: {path} is not a file")
        if self.keepalive_s < 5:
            raise UserError(f"mqtt.keepalive_s must be at least 5, got {self.keepalive_s}")
        if self.spool_max_messages < 1 or self.spool_max_bytes < 4096:
            raise UserError("mqtt.spool_max_messages must be >= 1 and spool_max_bytes >= 4096")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise UserError("mqtt.reconnect_min_s must be > 0 and <= mqtt.reconnect_max_s")
        if not 1 <= self.inflight_window <= MAX_INFLIGHT_WINDOW:
            # MQTT message ids are 16 bits; status and health need ids of their own.
            raise UserError(f"mqtt.inflight_window must be 1..{MAX_INFLIGHT_WINDOW}")

    def topic(self, camera: str, leaf: str) -> str:
        return contract.topic(self.prefix, self.line, camera, leaf)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def check_name(key: str, value: str) -> None:
    if not value or _FORBIDDEN_IN_NAMES & set(value) or value in (".", ".."):
        raise UserError(f"{key} {value!r} must be non-empty, not '.'/'..', without / + # or NUL")


def build_ssl_context(settings: MqttSettings) -> ssl.SSLContext:
    """A verifying client context from the settings; UserError naming the bad file."""
    ca = str(settings.ca_file) if settings.ca_file else None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (ssl.SSLError, OSError) as err:
        raise UserError(
            f"mqtt.ca_file {settings.ca_file}: not a PEM CA certificate ({err})"
        ) from err
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file:
        try:
            # The callback stops OpenSSL from prompting on a terminal for an encrypted key.
            context.load_cert_chain(
                str(settings.cert_file),
                str(settings.key_file) if settings.key_file else None,
                password=lambda: b"",
            )
        except (ssl.SSLError, OSError) as err:
            raise UserError(
                f"mqtt.cert_file/key_file {settings.cert_file}: cannot load the client "
                f"certificate and key (wrong format, mismatch or encrypted key): {err}"
            ) from err
    if settings.tls_insecure:
        context.check_hostname = False  # the chain is still verified
    return context
