"""MQTT publishing of verdicts, health and status (contract v1: README.md, "MQTT contract v1").

This module is the public face: ``MqttSettings`` (config section ``mqtt``), ``build_ssl_context``
and ``Publisher``, which opens one spool per camera and runs one ``Link`` per camera. Below it:

* ``contract.py``: topics, QoS and payloads (the wire format, nothing else).
* ``spool.py``: a bounded, crash-safe FIFO of records on disk.
* ``outbox.py``: the ordered store-and-forward FIFO of one camera, ``spool (on disk, oldest) ++
  memory``, with at most ``inflight_window`` unacknowledged, removed only on PUBACK, re-sent
  from the head after a reconnect (possible duplicates, order kept), and verdicts that went
  through the spool marked ``delayed``. Pure: no sockets, paho or threads.
* ``link.py``: one camera's MQTT connection (own client id, because MQTT allows one last will
  per connection and each camera's ``status`` must turn ``offline`` when the agent dies), its
  network thread, reconnect back-off, failure classification and the trigger subscription.

``publish_verdict`` never blocks: it hands the verdict to the link's inbox and wakes its thread.

Known gap: a verdict is on disk only once it reaches the spool. While connected with an empty
spool, verdicts wait in memory (the link's inbox and up to ``MEMORY_BACKLOG`` in the outbox) until
the broker acknowledges them, so a killed process (SIGKILL, OOM killer) loses those; a clean
``stop()`` keeps them in the spool.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import UserError
from edge_agent.publish import contract
from edge_agent.publish.contract import encode_json
from edge_agent.publish.link import STOP_GRACE_S, Link, OutcomeKind, TriggerHandler
from edge_agent.publish.outbox import MEMORY_BACKLOG
from edge_agent.publish.spool import Spool, SpoolRecord

__all__ = [
    "MAX_INFLIGHT_WINDOW",
    "MEMORY_BACKLOG",
    "MqttSettings",
    "Publisher",
    "TriggerHandler",
    "build_ssl_context",
]

log = logging.getLogger(__name__)

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
            _check_name(f"mqtt.{key}", getattr(self, key))
        for level in self.prefix.split("/"):  # a prefix may have levels: "plant/hall2"
            _check_name("mqtt.prefix level", level)
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


def _check_name(key: str, value: str) -> None:
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


_STAT_KEYS = (
    "published",
    "delayed_published",
    "spooled",
    "pending",
    "spool_dropped",
    "dropped",
    "reconnects",
    "triggers_rejected",
)


class Publisher:
    """Verdicts, health and status of several cameras over MQTT, with store and forward.

    See the README ("MQTT contract v1") for topics and payloads. Thread-safe: ``publish_*``
    may be called from any thread and never block on the network.
    """

    def __init__(self, settings: MqttSettings, cameras: Sequence[str]) -> None:
        settings.validate()
        cameras = list(cameras)
        if not cameras:
            raise UserError("no cameras configured for MQTT publishing")
        for camera in cameras:
            _check_name("camera id", camera)
        if len(set(cameras)) != len(cameras):
            raise UserError(f"camera ids must be unique, got {cameras}")
        self.settings = settings
        self.cameras = cameras
        self._tls_context = build_ssl_context(settings) if settings.tls else None
        self._links: dict[str, Link] = {}
        self._handler: TriggerHandler | None = None
        self._started = False
        self._stopped = False

    def start(self, connect_timeout_s: float = 5.0) -> None:
        """Open the spools, connect in the background and wait up to the timeout for the broker.

        Raises UserError if the broker refuses (bad credentials, not authorised, TLS failure).
        If it is merely unreachable, logs one warning and returns: verdicts are spooled and the
        links keep reconnecting with back-off.
        """
        if self._started:
            raise RuntimeError("Publisher.start() called twice")
        self._started = True
        s = self.settings
        n = len(self.cameras)
        spools: list[Spool] = []
        try:
            for camera in self.cameras:
                spools.append(
                    Spool(
                        Path(s.spool_dir) / camera,
                        max_messages=max(1, s.spool_max_messages // n),
                        max_bytes=max(4096, s.spool_max_bytes // n),
                    )
                )
        except BaseException:
            for spool in spools:
                spool.close()
            raise
        for camera, spool in zip(self.cameras, spools, strict=True):
            link = Link(s, camera, spool, self._tls_context)
            link.start_reports_first_failure = True
            if self._handler is not None:
                link.set_handler(self._handler)
            self._links[camera] = link
        for link in self._links.values():
            link.start()
        deadline = time.monotonic() + connect_timeout_s
        for link in self._links.values():
            link.first_event.wait(max(0.0, deadline - time.monotonic()))
        for link in self._links.values():
            link.start_reports_first_failure = False
        outcomes = [link.first_outcome for link in self._links.values()]
        refused = next(
            (o for o in outcomes if o is not None and o.kind is OutcomeKind.REFUSED), None
        )
        if refused is not None:
            self.stop(timeout_s=0.0)
            raise UserError(refused.describe())
        if all(o is not None and o.kind is OutcomeKind.CONNECTED for o in outcomes):
            return
        why = next(
            (
                o.describe()
                for o in outcomes
                if o is not None and o.kind is not OutcomeKind.CONNECTED
            ),
            f"MQTT broker {s.address} did not answer within {connect_timeout_s:g} s",
        )
        log.warning("%s; verdicts are spooled under %s and sent when it is back", why, s.spool_dir)

    def publish_verdict(self, camera: str, verdict: Mapping[str, Any]) -> None:
        """Queue a verdict (QoS 1, not retained) on ``<prefix>/<line>/<camera>/verdict``.

        Never blocks. ``delayed`` is set to false here and to true if the verdict waited in the
        spool. Raises KeyError for an unknown camera, TypeError for a value JSON cannot hold.
        """
        link = self._link(camera)
        payload = encode_json({**verdict, "delayed": False})
        link.submit(
            SpoolRecord(
                link.verdict_topic,
                payload,
                qos=contract.VERDICT_QOS,
                retain=False,
                created=time.time(),
            )
        )

    def publish_health(self, camera: str, health: Mapping[str, Any]) -> None:
        """Retained QoS 0 ``health``; only the latest is kept (re-sent after a reconnect)."""
        self._link(camera).set_health(encode_json(health))

    def set_trigger_handler(self, handler: TriggerHandler) -> None:
        """Call ``handler(camera, part_id)`` for each message on ``.../<camera>/trigger``.

        Runs on the camera's network thread: keep it short (hand over to a queue).
        """
        self._handler = handler
        for link in self._links.values():
            link.set_handler(handler)

    def stop(self, timeout_s: float = 10.0, keepalive: Callable[[], object] | None = None) -> int:
        """Flush what the broker acknowledges within ``timeout_s`` (connecting again meanwhile
        if the broker is down), keep the rest on disk, publish retained ``offline`` and
        disconnect cleanly. Returns how many verdicts were not delivered (kept in the spools for
        the next run). ``keepalive`` is called about once a second while it waits (systemd's
        watchdog). Idempotent: later calls return the first call's count."""
        if self._stopped:
            return self.undelivered
        self._stopped = True
        deadline = time.monotonic() + max(0.0, timeout_s)
        for link in self._links.values():
            waiting = link.undelivered
            if waiting and not link.connected and timeout_s > 0:
                log.info(
                    "MQTT %s: stopping with %d verdict(s) waiting and the broker away; "
                    "connecting again for up to %.0f s",
                    link.camera,
                    waiting,
                    timeout_s,
                )
            link.request_stop(deadline)
        for link in self._links.values():
            give_up = deadline + STOP_GRACE_S + 1.0
            while not link.join(min(1.0, max(0.1, give_up - time.monotonic()))):
                if time.monotonic() >= give_up:
                    log.error("MQTT %s: network thread did not stop in time", link.camera)
                    break
                if keepalive is not None:
                    keepalive()
        return self.undelivered

    @property
    def undelivered(self) -> int:
        """After stop(): the verdicts left in the spools, over all cameras."""
        return sum(link.undelivered for link in self._links.values())

    def spool_dirs(self) -> list[Path]:
        """Where each camera's undelivered verdicts wait."""
        return [link.spool.directory for link in self._links.values()]

    @property
    def started(self) -> bool:
        """start() succeeded: every camera has its link (and stop() was not called yet)."""
        return bool(self._links) and not self._stopped

    @property
    def stats(self) -> dict[str, Any]:
        """Totals over cameras, plus ``cameras``: the same per camera."""
        per = {camera: link.stats() for camera, link in self._links.items()}
        total: dict[str, Any] = {key: sum(p[key] for p in per.values()) for key in _STAT_KEYS}
        total["connected"] = bool(per) and all(p["connected"] for p in per.values())
        total["cameras"] = per
        return total

    def _link(self, camera: str) -> Link:
        link = self._links.get(camera)
        if link is None:
            if not self._started:
                raise RuntimeError("Publisher.start() has not been called")
            raise KeyError(f"unknown camera {camera!r} (configured: {self.cameras})")
        return link
