"""How a gateway process serves HTTP: uvicorn's configuration, and a bound on request heads.

uvicorn parses HTTP/1.1 with httptools, which has no limit on the size of a
request line or of headers (`h11_max_incomplete_event_size` applies only to
the slower h11 parser). `BoundedHeadersProtocol` adds one: past
`MAX_HEADER_BYTES` of request line and headers, the request is answered 431
`headers_too_large` (problem+json) and the connection closed, before the app
sees anything. A head that never ends is cut off the same way once the bytes
received for it pass the bound plus one read, so it cannot grow in memory.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import PROBLEM_CONTENT_TYPE, problem_bytes

MAX_HEADER_BYTES = 16 * 1024
# Bytes of one read; a head still incomplete after this much past the bound is refused.
_READ_SLACK_BYTES = 64 * 1024
# After a 431 the connection stays open this long, reading and dropping what the client still
# sends: closing a socket with unread data resets it, and the client could lose the answer.
_LINGER_S = 1.0

LIMIT_CONNECTIONS = 4_096  # uvicorn's own bound on open connections and tasks (then a bare 503)
BACKLOG = 2_048
KEEPALIVE_S = 5
GRACEFUL_SHUTDOWN_S = 20


class BoundedHeadersProtocol(HttpToolsProtocol):
    """httptools' protocol, with request line + headers bounded by `MAX_HEADER_BYTES` (then 431)."""

    max_header_bytes = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # counted exactly, as the parser hands over the URL and each header
        self._head_received = 0  # raw bytes received while a head was incomplete
        self._in_head = True
        self._head_too_large = False

    def data_received(self, data: bytes) -> None:
        if self._head_too_large:
            return  # answered 431; dropped until the connection closes
        if self._in_head:
            self._head_received += len(data)
            if self._head_received > self.max_header_bytes + _READ_SLACK_BYTES:
                self._refuse_head()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_received = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            # Stops the parser; httptools re-raises it as a parser error, answered below.
            raise HeadersTooLarge

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._head_too_large = True
        body = problem_bytes(
            431, "headers_too_large", f"request line and headers are limited to {self.max_header_bytes} bytes"
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + f"content-type: {PROBLEM_CONTENT_TYPE}\r\n".encode()
            + f"content-length: {len(body)}\r\n".encode()
            + b"connection: close\r\n\r\n"
            + body
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


class HeadersTooLarge(Exception):
    pass


def server_config(app: Any, *, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration every gateway process runs with (`serve`, and the tests' servers)."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": BoundedHeadersProtocol,
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
