"""One round of a paho client's network loop on our own select(), shared by the contract v1
link (link.py) and the Sparkplug node (sparkplug.py).

Each runs paho without its loop thread so that one thread owns the socket, the outbox and the
back-off; a socketpair (`wake_r`) lets other threads cut a select() short when there is
something new to send.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Callable
from typing import Any


def pump(client: Any, wake_r: socket.socket, timeout: float, on_wake: Callable[[], None]) -> bool:
    """Read, write and keep alive once, waiting at most `timeout` for the socket or a wake-up.
    False when the client has no socket (the caller drops the connection)."""
    sock = client.socket()
    if sock is None:
        return False
    # TLS may hold decrypted bytes that select() cannot see.
    pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
    wlist = [sock] if client.want_write() else []
    readable, writable, _ = select.select([sock, wake_r], wlist, [], 0 if pending else timeout)
    if wake_r in readable:
        on_wake()
    if sock in readable or pending:
        client.loop_read()
    if sock in writable and client.socket() is not None:
        client.loop_write()
    if client.socket() is not None:
        client.loop_misc()
    return True


def wait(wake_r: socket.socket, timeout: float, on_wake: Callable[[], None]) -> None:
    """Sleep up to `timeout` while disconnected, or until woken."""
    readable, _, _ = select.select([wake_r], [], [], max(timeout, 0.0))
    if readable:
        on_wake()


def drain(wake_r: socket.socket) -> None:
    """Empty the wake-up socket (non-blocking)."""
    try:
        while wake_r.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass
