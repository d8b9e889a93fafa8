"""systemd's sd_notify protocol without a dependency: datagrams to $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op, so the
agent runs the same from a shell. The watchdog interval is half of $WATCHDOG_USEC, as
sd_watchdog_enabled(3) recommends; the pings must come from the loop whose liveness they
vouch for (the inference loop), so that a hung loop stops them and systemd restarts the unit.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """One process's channel to systemd. Thread-safe: each message is one sendto()."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._last_ping = 0.0
        self._failed = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send "KEY=value" fields as one message; False (logged once) if it could not go."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd on %s: %s", os.fsdecode(self.address), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        # A newline would start a new field; systemd shows one line anyway.
        return self.notify(f"STATUS={text.splitlines()[0] if text else ''}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets newer systemd order this against the READY=1 that follows.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """Ping now (unconditionally)."""
        self._last_ping = time.monotonic()
        return self.notify("WATCHDOG=1")

    def watchdog_due(self, now: float | None = None) -> bool:
        """Ping if half the watchdog period has passed since the last one; cheap to call often."""
        if self.watchdog_interval_s is None or self._sock is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_interval_s:
            return False
        return self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> bytes | None:
    """$NOTIFY_SOCKET -> a sockaddr_un path; '@name' is Linux's abstract namespace (NUL)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value.encode()
    log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract socket", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), None when no watchdog is asked for."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    # WATCHDOG_PID names the process meant to ping: a child that inherited the environment
    # must not ping on its parent's behalf.
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
