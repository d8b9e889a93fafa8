"""An HTTP server that serves a fixed number of requests at once and refuses the rest, for the
agent's own endpoints (metrics, live view): an idle or hostile client must not take the
process's threads or file descriptors, which the cameras, the spool and MQTT need."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.errors import UserError

log = logging.getLogger(__name__)


class BoundedHTTPServer(ThreadingHTTPServer):
    """At most `max_connections` requests in flight, each on its own daemon thread; one more is
    closed at once, unanswered, and counted in `refused`. `label` names it in debug lines."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        label: str,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.request_queue_size = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        self.label = label
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up early (a scraper, a closed tab) is not worth a traceback.
        log.debug("%s: request from %s failed", self.label, client_address[0], exc_info=True)


class HTTPService:
    """A BoundedHTTPServer on a daemon thread, from start() until stop(): the life cycle the
    metrics endpoint and the live view share. Subclasses build the server and name the config
    key a failed bind is reported under."""

    key = "port"  # the config key in the one-line error when the address cannot be bound

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: BoundedHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> BoundedHTTPServer:
        raise NotImplementedError

    @property
    def address(self) -> tuple[str, int]:
        """The bound address: the real port when 0 (any free port) was asked for."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def refused(self) -> int:
        """Connections closed unanswered because the server's limit was being served."""
        return self._server.refused if self._server is not None else 0

    def start(self) -> None:
        try:
            self._server = self._make_server()
        except OSError as exc:  # port taken, no such address, ...
            reason = exc.strerror or str(exc)
            raise UserError(
                f"{self.key}: cannot listen on {self.host}:{self.port} ({reason})"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"{self._server.label}-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
