"""One round of a paho client's network loop on our own select(), shared by the contract v1
link (link.py) and the Sparkplug node (sparkplug.py).

Each runs paho without its loop thread so that one thread owns the socket, the outbox and the
back-off; a Wakeup (a socketpair) lets other threads cut a select() short when there is
something new to send.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from typing import Any


class Wakeup:
    """Cuts the network thread's select() short from any thread: one byte on a socketpair,
    sent once until the network thread has drained it."""

    def __init__(self) -> None:
        self.pending = False
        self.r, self._w = socket.socketpair()
        self.r.setblocking(False)
        self._w.setblocking(False)

    def set(self) -> None:
        if self.pending:
            return
        self.pending = True
        # A full buffer (BlockingIOError) means the thread is being woken anyway.
        with contextlib.suppress(OSError):
            self._w.send(b"\0")

    def drain(self) -> None:
        """Empty the socket (non-blocking); the next set() sends again."""
        try:
            while self.r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.pending = False

    def close(self) -> None:
        self.r.close()
        self._w.close()


def drop_socket(client: Any) -> None:
    """Close the client's socket after an unexpected state (paho then reports the loss)."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def pump(client: Any, wake: Wakeup, timeout: float) -> bool:
    """Read, write and keep alive once, waiting at most `timeout` for the socket or a wake-up.
    False when the client has no socket (the caller drops the connection)."""
    sock = client.socket()
    if sock is None:
        return False
    # TLS may hold decrypted bytes that select() cannot see.
    pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
    wlist = [sock] if client.want_write() else []
    readable, writable, _ = select.select([sock, wake.r], wlist, [], 0 if pending else timeout)
    if wake.r in readable:
        wake.drain()
    if sock in readable or pending:
        client.loop_read()
    if sock in writable and client.socket() is not None:
        client.loop_write()
    if client.socket() is not None:
        client.loop_misc()
    return True


def wait(wake: Wakeup, timeout: float) -> None:
    """Sleep up to `timeout` while disconnected, or until woken."""
    readable, _, _ = select.select([wake.r], [], [], max(timeout, 0.0))
    if readable:
        wake.drain()
