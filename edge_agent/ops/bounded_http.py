"""An HTTP server that serves a fixed number of requests at once and refuses the rest, for the
agent's own endpoints (metrics, live view): an idle or hostile client must not take the
process's threads or file descriptors, which the cameras, the spool and MQTT need."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
