"""How a gateway process serves HTTP: uvicorn's configuration, and bounds on what a connection sends.

uvicorn parses HTTP/1.1 with httptools, which has no limit on the size of a
request line or of headers (`h11_max_incomplete_event_size` applies only to
the slower h11 parser), and no limit on the time a client takes to send them.
`BoundedHeadersProtocol` adds both, before the app sees anything:

- request line + headers (+ chunked trailers) over `MAX_HEADER_BYTES`: 431
  `headers_too_large` (problem+json), and the connection is closed;
- a head not complete within the read timeout (a client that sends nothing,
  or trickles its head): 408 `request_timeout`, closed;
- a head still incomplete `READ_SLACK_BYTES` past its bound (one endless
  header, which httptools buffers until it ends): 431 as well;
- a message whose raw bytes pass `MAX_MESSAGE_BYTES` before it completes (an
  endless trailer): closed.

Bodies are bounded by the app's `BodyLimitMiddleware` (16 KiB, same timeout).

It also joins a response's writes (`JoinedWrites`): uvicorn writes a
response's head and its body separately, each a send of its own; what it
writes in one turn of the event loop now leaves in one send. Profiled under
load, the second send was a sixth of the gateway's CPU per credit check.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import PROBLEM_CONTENT_TYPE, problem_bytes
from gateway.middleware import DRAIN_BYTES_MAX, MAX_BODY_BYTES, REQUEST_READ_TIMEOUT_S

MAX_HEADER_BYTES = 16 * 1024
# One read's worth of bytes: a head still incomplete this far past its bound is refused (httptools
# buffers a header until it ends, so an endless one is caught by the raw count, not by on_header).
READ_SLACK_BYTES = 64 * 1024
# Raw bytes one message may take on the wire before it completes: head, the body the app reads,
# what it drains after a 413, and a read of slack. Past it the connection is closed.
MAX_MESSAGE_BYTES = MAX_HEADER_BYTES + MAX_BODY_BYTES + DRAIN_BYTES_MAX + READ_SLACK_BYTES
# After a refusal the connection stays open this long, reading and dropping what the client still
# sends: closing a socket with unread data resets it, and the client could lose the answer.
LINGER_S = 1.0

LIMIT_CONNECTIONS = 4_096  # uvicorn's own bound on open connections and tasks (then a bare 503)
BACKLOG = 2_048
KEEPALIVE_S = 5
GRACEFUL_SHUTDOWN_S = 20


class JoinedWrites:
    """A transport whose writes made in one turn of the event loop leave in one `write` of the real
    one, at the end of the turn; closing (or writing EOF) sends what is pending first."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class HeadersTooLarge(Exception):
    """Raised from a parser callback to stop httptools; answered by `send_400_response`."""


class BoundedHeadersProtocol(HttpToolsProtocol):
    """httptools' protocol with the head bounded in size and time, and each message in raw bytes."""

    max_header_bytes = MAX_HEADER_BYTES
    max_message_bytes = MAX_MESSAGE_BYTES
    read_timeout_s = REQUEST_READ_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # request line, headers and trailers, as the parser hands them over
        self._message_bytes = 0  # raw bytes received since the message began
        self._read_bytes = 0  # the size of the read being parsed
        self._in_head = True
        self._between_messages = True  # no byte of the next request yet
        self._refused = False
        self._deferred: tuple[int, str, str] | None = None  # a refusal waiting for earlier responses
        self._head_timer: asyncio.TimerHandle | None = None

    # -- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        joined = JoinedWrites(transport, self.loop)
        super().connection_made(joined)  # type: ignore[arg-type]
        self._start_head_timer()  # a client that connects and sends nothing is not kept forever

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered; dropped until the connection closes
        self._read_bytes = len(data)
        self._message_bytes += len(data)
        if self._message_bytes > self.max_message_bytes:
            self._abort()
            return
        super().data_received(data)
        # Checked once the read is parsed: one read may hold the end of the head and a large body
        # after it (a 200 KB webhook arrives in one or two reads), which is no oversized head.
        head_overdue = self._message_bytes > self.max_header_bytes + READ_SLACK_BYTES
        answered = self._refused or self.transport.is_closing()  # e.g. uvicorn's own 400
        if head_overdue and self._in_head and not self._between_messages and not answered:
            self._refuse(431, "headers_too_large", self._too_large_detail())

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            return
        if self._head_bytes > self.max_header_bytes:
            if self._in_head:
                self._refuse(431, "headers_too_large", self._too_large_detail())
            else:
                self._abort()  # trailers: the request is already with the app
        else:
            # What the parser refused (a control byte in a header, a length with chunking, a
            # negative length, ...): problem+json like every other error, not uvicorn's text.
            self._refuse(400, "bad_request", "the request is not valid HTTP/1.1; nothing was done")

    # -- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        # The read that began the message counts whole (exact, unless it also ended a pipelined one).
        self._message_bytes = self._read_bytes
        self._in_head = True
        self._between_messages = False
        self._start_head_timer()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_bytes = 0
        self._in_head = True
        self._between_messages = True  # idle from here is uvicorn's keep-alive timeout's

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    # -- refusing

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            raise HeadersTooLarge  # httptools re-raises it as a parser error: send_400_response

    def _too_large_detail(self) -> str:
        return f"request line and headers are limited to {self.max_header_bytes} bytes"

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._between_messages:
            self._abort()  # connected and sent nothing: closed quietly, as an idle keep-alive is
        else:
            detail = f"the request head did not arrive within {self.read_timeout_s:g} s"
            self._refuse(408, "request_timeout", detail)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None and self._responses_done() and not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self._write_refusal(*self._deferred)

    def _responses_done(self) -> bool:
        return not self.pipeline and (self.cycle is None or self.cycle.response_complete)

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer `status` and close, once the responses to earlier pipelined requests are out."""
        self._refused = True
        self._cancel_head_timer()
        if self._responses_done():
            self._write_refusal(status, code, detail)
        else:
            self._deferred = (status, code, detail)

    def _write_refusal(self, status: int, code: str, detail: str) -> None:
        """The problem+json answer, then close, lingering so that the client reads it."""
        self._deferred = None
        body = problem_bytes(status, code, detail)
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[
            status
        ]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n" % (status, reason)
            + f"content-type: {PROBLEM_CONTENT_TYPE}\r\n".encode()
            + f"content-length: {len(body)}\r\n".encode()
            + b"connection: close\r\n\r\n"
            + body
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _abort(self) -> None:
        self._refused = True
        self._cancel_head_timer()
        self.transport.close()


def server_config(
    app: Any, *, host: str, port: int, read_timeout_s: float = REQUEST_READ_TIMEOUT_S, **overrides: Any
) -> uvicorn.Config:
    """The uvicorn configuration every gateway process runs with (`serve`, and the tests' servers)."""
    protocol = type(
        BoundedHeadersProtocol.__name__, (BoundedHeadersProtocol,), {"read_timeout_s": read_timeout_s}
    )
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": protocol,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "limit_concurrency": LIMIT_CONNECTIONS,
        "backlog": BACKLOG,
        "timeout_keep_alive": KEEPALIVE_S,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


__all__ = ["MAX_HEADER_BYTES", "BoundedHeadersProtocol", "server_config"]
