"""The metrics endpoint under hostile clients: bounded connections, timeouts, no tracebacks."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from edge_agent.ops import metrics
from edge_agent.ops.metrics import AgentMetrics, MetricsServer


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    monkeypatch.setattr(metrics, "CONNECTION_TIMEOUT_S", 1.0)
    s = MetricsServer(AgentMetrics().registry, "127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def _scrape(server: MetricsServer) -> str:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_clients_cannot_take_every_descriptor(server: MetricsServer) -> None:
    host, port = server.address
    before = _open_fds()
    idle = [socket.create_connection((host, port)) for _ in range(100)]
    try:
        time.sleep(0.3)
        # Ours: the 100 client sockets; the server holds at most MAX_CONNECTIONS of its own.
        assert _open_fds() - before <= 100 + metrics.MAX_CONNECTIONS + 2
        assert server.refused > 0  # past the cap: closed unanswered (the rest wait in the backlog)
        # The idle ones that got a slot are dropped after the timeout, then scrapes work.
        time.sleep(metrics.CONNECTION_TIMEOUT_S + 0.5)
        assert "edge_agent_reloads_total" in _scrape(server)
    finally:
        for s in idle:
            s.close()


def test_slow_client_is_dropped_and_early_hangups_print_nothing(
    server: MetricsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    host, port = server.address
    slow = socket.create_connection((host, port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes its request
    slow.settimeout(5)
    started = time.monotonic()
    assert slow.recv(1024) == b""  # the server hung up on it
    assert time.monotonic() - started < metrics.CONNECTION_TIMEOUT_S + 2
    slow.close()
    for _ in range(20):  # ask, then hang up before the answer
        s = socket.create_connection((host, port))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    assert "edge_agent_reloads_total" in _scrape(server)
    assert "Traceback" not in capfd.readouterr().err
