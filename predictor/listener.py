"""The HTTP listener's own limits, for a server exposed without a proxy in front (the plain Kubernetes variant).

uvicorn's h11 protocol, with what uvicorn and h11 leave to a proxy:

- request line plus headers over ``--max_header_bytes``: 431 and the connection closed (h11's own limit applies only
  to a head still incomplete, and uvicorn answers its refusals 400);
- headers that take longer than ``--header_timeout_s`` from a connection's first byte (or from connecting, for a
  client that sends nothing), slowloris among them: 408, connection closed;
- a request body with ``--body_timeout_s`` between two of its parts: 408, connection closed, the request dropped.

uvicorn's own settings do the rest: ``--max_connections`` is its ``limit_concurrency`` (a request on a connection
past the cap is answered 503), ``--timeout-keep-alive`` (KServe's flag) closes idle kept-alive connections.

A refused connection is not closed at once: the refusal is written, the write side shut, and what the client
still sends is read and thrown away for up to ``LINGER_S`` or ``LINGER_BYTES`` (what HTTP servers call a lingering
close), so a client that is still sending reads the status instead of a connection reset.

A client that half-closes its socket after its request (``shutdown(SHUT_WR)``) is taken as gone, as uvicorn, nginx
and Go's server take it: TCP shows a half-close and a close alike (a FIN), and a server that waited to find out by
writing would keep generating for every client that went away. Its work stops at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# How long, and how many, of a refused connection's late bytes are read and dropped before it is closed.
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


@dataclass(frozen=True)
class ListenerLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


def _response(status: int, error_type: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in this server's error body, closing the connection."""
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header size limit that answers 431, a header deadline and a body idle
    timeout. One timer per connection: the header deadline while a request's head is awaited, the body timeout
    while its body is, none while the application works or the connection idles between requests (uvicorn's
    keep-alive timeout covers that)."""

    def __init__(self, *args: Any, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # h11 refuses a head over this size only while it is incomplete (and uvicorn answers 400); the count in
        # data_received also catches one that arrives whole, and answers 431.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._lingered = 0  # bytes dropped since the refusal
        self._head_bytes = 0  # of the request head being received
        self._head_tail = b""  # its last bytes, where an end of head split across reads begins

    # ---- asyncio's protocol interface --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._headers_too_slow)  # also a client that never sends

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering: the client's late bytes are read and dropped, up to a point
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        if self.conn.their_state is h11.IDLE:
            if self._timer is None:
                # The first bytes of the next request on a kept-alive connection: its head has a deadline too.
                self._arm(self.limits.header_timeout_s, self._headers_too_slow)
            if self._head_too_large(data):
                limit = self.limits.max_header_bytes
                self._refuse(431, "headers_too_large", f"the request headers exceed {limit} bytes (--max_header_bytes)")
                return
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm(self.limits.body_timeout_s, self._body_too_slow)  # from each part of the body anew
        elif state is not h11.IDLE:
            self._disarm()  # the request is in: the application's time is not the client's

    # ---- refusals ------------------------------------------------------------------------------------------

    def _head_too_large(self, data: bytes) -> bool:
        """Count ``data`` into the request head; True once the head is over the limit, ended or not."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        if end < 0:
            self._head_bytes += len(data)
            self._head_tail = window[-3:]
            return self._head_bytes > self.limits.max_header_bytes
        size = self._head_bytes + end + 4 - len(self._head_tail)
        self._head_bytes, self._head_tail = 0, b""  # the head ends here; the next one counts from zero
        return size > self.limits.max_header_bytes

    def _headers_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        timeout = self.limits.header_timeout_s
        self._refuse(408, "request_timeout", f"the request headers did not arrive within {timeout:g} s")

    def _body_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # the application is not reading yet: not the client's delay
            self._arm(self.limits.body_timeout_s, self._body_too_slow)
            return
        cycle = self.cycle
        timeout = self.limits.body_timeout_s
        if cycle is not None and cycle.response_started:  # too late for a status: just close
            self.transport.close()
        else:
            self._refuse(408, "request_timeout", f"the request body stalled for {timeout:g} s")
        if cycle is not None:  # the application reads a disconnect and drops the request
            cycle.disconnected = True
            cycle.message_event.set()

    def _refuse(self, status: int, error_type: str, message: str) -> None:
        """Answer ``status`` and close, lingering so a client still sending can read it."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info("closed the connection of %s: %s (%d)", client, message, status)
        self._refused = True
        self._disarm()
        self.transport.write(_response(status, error_type, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:  # TLS: no half-close
            self.transport.close()

    # ---- the timer -------------------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
