"""MQTT publishing of verdicts, health and status (contract v1: docs/integrators/mqtt.md).

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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.errors import UserError
from edge_agent.publish import contract
from edge_agent.publish.contract import encode_json
from edge_agent.publish.link import (
    LINE,
    STOP_GRACE_S,
    CommandHandler,
    Link,
    OutcomeKind,
    TriggerHandler,
)
from edge_agent.publish.mqtt_settings import (
    MAX_INFLIGHT_WINDOW,
    MqttSettings,
    build_ssl_context,
    check_name,
)
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

    See docs/integrators/mqtt.md for topics and payloads. Thread-safe: ``publish_*``
    may be called from any thread and never block on the network.
    """

    def __init__(
        self, settings: MqttSettings, cameras: Sequence[str], *, line: bool = False
    ) -> None:
        """``line``: also open the line's own link (client id ``<client_id>-_line``, spool
        ``<spool_dir>/_line``, will on ``<prefix>/<line>/status``) for part verdicts and the
        recipe's state and commands (docs/integrators/station.md)."""
        settings.validate()
        cameras = list(cameras)
        if not cameras:
            raise UserError("no cameras configured for MQTT publishing")
        for camera in cameras:
            check_name("camera id", camera)
        if len(set(cameras)) != len(cameras):
            raise UserError(f"camera ids must be unique, got {cameras}")
        self.settings = settings
        self.cameras = cameras
        self._names = [*cameras, LINE] if line else cameras
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
        n = len(self._names)
        spools: list[Spool] = []
        try:
            for camera in self._names:
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
        for camera, spool in zip(self._names, spools, strict=True):
            link = Link(s, camera, spool, self._tls_context)
            link.start_reports_first_failure = True
            if self._handler is not None and camera != LINE:
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

    def publish_part(self, part: Mapping[str, Any]) -> None:
        """Queue a part verdict (QoS 1, not retained) on ``<prefix>/<line>/part``, in order
        with the line's other messages, through the spool like a verdict."""
        self._line_record(contract.PART, encode_json({**part, "delayed": False}), retain=False)

    def publish_recipe(self, state: Mapping[str, Any]) -> None:
        """Queue the recipe state (QoS 1, retained) on ``<prefix>/<line>/recipe``."""
        self._line_record(contract.RECIPE, encode_json(state), retain=True)

    def on_recipe_command(self, handler: CommandHandler) -> None:
        """Call ``handler(payload)`` for each message on ``<prefix>/<line>/recipe/set``, on the
        line link's network thread (keep it short). Needs ``line=True``."""
        s = self.settings
        self._link(LINE).on_command(
            contract.line_topic(s.prefix, s.line, *contract.RECIPE_SET), handler
        )

    def publish_shadow(self, report: Mapping[str, Any]) -> None:
        """Queue the shadow report (QoS 1, retained) on ``<prefix>/<line>/shadow``."""
        self._line_record(contract.SHADOW, encode_json(report), retain=True)

    def publish_lifecycle(self, outcome: Mapping[str, Any]) -> None:
        """Queue a lifecycle command's outcome (QoS 1) on ``<prefix>/<line>/lifecycle``."""
        self._line_record(contract.LIFECYCLE, encode_json(outcome), retain=False)

    def publish_audit(self, entry: Mapping[str, Any]) -> None:
        """Queue an audit entry (QoS 1, in chain order) on ``<prefix>/<line>/audit``."""
        self._line_record(contract.AUDIT, encode_json(entry), retain=False)

    def on_lifecycle_command(self, handler: CommandHandler) -> None:
        """Call ``handler(payload)`` for each message on ``<prefix>/<line>/lifecycle/set``,
        on the line link's network thread. Needs ``line=True``."""
        s = self.settings
        self._link(LINE).on_command(
            contract.line_topic(s.prefix, s.line, *contract.LIFECYCLE_SET), handler
        )

    def _line_record(self, leaf: str, payload: bytes, *, retain: bool) -> None:
        s = self.settings
        record = SpoolRecord(
            contract.line_topic(s.prefix, s.line, leaf),
            payload,
            qos=contract.VERDICT_QOS,
            retain=retain,
            created=time.time(),
        )
        self._link(LINE).submit(record)

    def publish_health(self, camera: str, health: Mapping[str, Any]) -> None:
        """Retained QoS 0 ``health``; only the latest is kept (re-sent after a reconnect)."""
        self._link(camera).set_health(encode_json(health))

    def set_trigger_handler(self, handler: TriggerHandler) -> None:
        """Call ``handler(camera, part_id)`` for each message on ``.../<camera>/trigger``.

        Runs on the camera's network thread: keep it short (hand over to a queue).
        """
        self._handler = handler
        for name, link in self._links.items():
            if name != LINE:
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
            raise KeyError(f"unknown camera {camera!r} (configured: {self._names})")
        return link
