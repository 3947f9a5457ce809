"""What keeps `dgm-scale serve` serving under load and abuse (see Limits for the numbers):

- a bounded queue in front of the model: at most `queue` sample requests are inside the server
  at once (one generates, the others wait for the model); one more is answered 503 with
  Retry-After at once instead of piling up threads and images;
- a bounded number of connection threads: beyond `connections` open connections, a new one is
  answered 503 with Retry-After by the accepting thread, which never blocks on a client;
- a per-connection timeout: a read or write that waits `timeout` seconds on the client (a socket
  opened and left silent, a response nobody reads) ends the connection and frees its thread.

The request-size limits (no body, URL length) are checked by the handler (server.py)."""
from __future__ import annotations

import logging
import math
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from dgm_scale.core.errors import ConfigError
from dgm_scale.serve.sources import BadRequest

log = logging.getLogger(__name__)

RETRY_AFTER = 1        # seconds a refused client is told to wait (the Retry-After header)


@dataclass(frozen=True)
class Limits:
    """`dgm-scale serve --queue --connections --timeout` (the defaults are the options')."""

    queue: int = 8            # sample requests inside the server at once; more get 503
    connections: int = 32     # connection threads; more connections get 503
    timeout: float = 10.0     # seconds a connection may leave a read or write waiting

    def __post_init__(self):
        for flag, value in (("queue", self.queue), ("connections", self.connections)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"--{flag} {value}: must be a whole number >= 1")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"--timeout {self.timeout}: must be a number of seconds > 0")


class Busy(BadRequest):
    """503 with Retry-After: the server is full; the message says which limit."""

    def __init__(self, message: str):
        super().__init__(f"busy: {message}; retry in {RETRY_AFTER} s", status=503,
                         headers={"Retry-After": str(RETRY_AFTER)})


class SampleQueue:
    """At most `size` sample requests admitted at once; they take the model one at a time (one
    model, many request threads). Beyond `size`, `turn()` raises Busy without waiting."""

    def __init__(self, size: int):
        self.size = size
        self.admitted = threading.BoundedSemaphore(size)
        self.model = threading.Lock()

    @contextmanager
    def turn(self) -> Iterator[None]:
        if not self.admitted.acquire(blocking=False):
            raise Busy(f"{self.size} sample requests are already queued (serve --queue {self.size})")
        try:
            with self.model:
                yield
        finally:
            self.admitted.release()


def _busy_response(connections: int) -> bytes:
    body = str(Busy(f"all {connections} connections are in use (serve --connections {connections})"))
    body = (body + "\n").encode()
    head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `limits.connections` connection threads; the handler
    class carries the per-connection timeout (`timeout`, set by make_server)."""

    daemon_threads = True      # a stuck client does not hold the process at exit
    request_queue_size = 64    # the listen backlog: connections the kernel holds before accept

    def __init__(self, address, handler, limits: Limits):
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.connections)
        self.busy_response = _busy_response(limits.connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """The 503 from the accepting thread, which must not wait on the client: one non-blocking
        send (the answer fits an empty send buffer), then close."""
        try:
            request.setblocking(False)
            request.send(self.busy_response)
        except OSError:
            pass  # the client is gone already
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A client that went away or timed out mid-response is routine; anything else is logged
        with its traceback (server side only: responses never carry one)."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("serve: connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("serve: connection from %s failed", client_address[0])


__all__ = ["RETRY_AFTER", "BoundedHTTPServer", "Busy", "Limits", "SampleQueue"]
