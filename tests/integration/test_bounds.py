"""What one gateway process accepts: bounded request heads, bodies that must arrive in time, and a
bound on requests in flight, each refused with problem+json before any work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from gateway.serving import MAX_HEADER_BYTES
from tests.harness import RunningServer, ServerFactory, auth, metric, new_user


async def _raw(
    server: RunningServer, request: bytes, *, timeout_s: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is on a new connection; the status, headers and body of the answer."""
    url = urlsplit(server.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(timeout_s):
            answer = await reader.read()  # the server closes the connection
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _get(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _assert_headers_too_large(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 431
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "headers_too_large"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/v1/usage", {"X-Big": "a" * (MAX_HEADER_BYTES + 1)}, id="one-big-header"),
        pytest.param("/v1/usage", {f"X-H{i}": "b" * 100 for i in range(200)}, id="many-headers"),
        pytest.param("/v1/usage?" + "q" * (MAX_HEADER_BYTES + 1), {}, id="long-url"),
    ],
)
async def test_a_head_over_the_bound_is_431(
    server: RunningServer, path: str, headers: dict[str, str]
) -> None:
    _assert_headers_too_large(*await _raw(server, _get(path, headers)))


async def test_a_head_that_never_ends_is_cut_off(server: RunningServer) -> None:
    endless = b"GET /v1/usage HTTP/1.1\r\nHost: test\r\nX-Endless: " + b"c" * (200 * 1024)
    _assert_headers_too_large(*await _raw(server, endless))


async def test_a_head_within_the_bound_is_served(server: RunningServer) -> None:
    user = new_user()
    headers = {**auth(user), "X-Padding": "d" * (MAX_HEADER_BYTES - 2048)}
    status, _, body = await _raw(server, _get("/v1/usage", headers))
    assert status == 200, body
    assert json.loads(body)["plan"] == "free"


@pytest_asyncio.fixture(scope="module")
async def small_server(start_server: ServerFactory) -> RunningServer:
    return await start_server(max_requests_in_flight=2)


@contextlib.asynccontextmanager
async def _trickling_post(server: RunningServer) -> AsyncIterator[None]:
    """A POST whose body never finishes arriving: it holds a request slot until closed (or 10 s)."""
    url = urlsplit(server.base_url)
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    try:
        yield
    finally:
        writer.close()


async def test_past_the_bound_on_requests_in_flight_the_answer_is_503_at_once(
    small_server: RunningServer,
) -> None:
    user = new_user()
    async with small_server.client() as http:

        async def in_flight() -> float:
            return await metric(http, "ledger_http_requests_in_flight")

        async with _trickling_post(small_server), _trickling_post(small_server):
            for _ in range(100):
                if await in_flight() == 2:
                    break
                await asyncio.sleep(0.02)
            refused = await http.get("/v1/usage", headers=auth(user))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["code"] == "unavailable"
            assert (await http.get("/healthz")).status_code == 200  # probes are never refused
        for _ in range(100):
            if await in_flight() == 0:
                break
            await asyncio.sleep(0.02)
        served = await http.get("/v1/usage", headers=auth(user))
        assert served.status_code == 200, served.text


QUICK_READ_TIMEOUT_S = 1.0


@pytest_asyncio.fixture(scope="module")
async def quick_server(start_server: ServerFactory) -> RunningServer:
    """A server whose clients must send each head and body within a second."""
    return await start_server(request_read_timeout_s=QUICK_READ_TIMEOUT_S)


async def test_a_body_that_does_not_arrive_in_time_is_408(quick_server: RunningServer) -> None:
    started = time.monotonic()
    status, headers, body = await _raw(
        quick_server,
        b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{",
    )
    assert (status, json.loads(body)["code"]) == (408, "request_timeout")
    assert headers["connection"] == "close"
    assert time.monotonic() - started >= QUICK_READ_TIMEOUT_S


async def test_a_head_that_does_not_arrive_in_time_is_408(quick_server: RunningServer) -> None:
    started = time.monotonic()
    status, _, body = await _raw(quick_server, b"GET /v1/usage HTTP/1.1\r\nHost: test\r\n")
    assert (status, json.loads(body)["code"]) == (408, "request_timeout")
    assert time.monotonic() - started >= QUICK_READ_TIMEOUT_S


async def test_a_connection_that_sends_nothing_is_closed(quick_server: RunningServer) -> None:
    url = urlsplit(quick_server.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        async with asyncio.timeout(QUICK_READ_TIMEOUT_S + 5):
            assert await reader.read() == b"", "closed, with nothing said"
    finally:
        writer.close()


async def test_an_oversized_body_trickling_in_is_cut_off_at_the_deadline(quick_server: RunningServer) -> None:
    """Past 16 KiB the rest is drained, but only until the same deadline: then 413, closed."""
    chunk = b"x" * (17 * 1024)
    head = b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    started = time.monotonic()
    status, _, body = await _raw(quick_server, head + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert (status, json.loads(body)["code"]) == (413, "payload_too_large")
    assert time.monotonic() - started < QUICK_READ_TIMEOUT_S + 5


async def test_trailers_count_against_the_head_bound(server: RunningServer) -> None:
    url = urlsplit(server.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(
            b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n"
            + f"Authorization: {auth(new_user())['Authorization']}\r\n\r\n".encode()
            + b"2\r\n{}\r\n0\r\nX-Trailer: "
            + b"t" * (MAX_HEADER_BYTES + 1)
            + b"\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    assert not answer.startswith(b"HTTP/1.1 2"), "the request is dropped, not served"


async def test_pipelined_requests_are_answered_before_an_oversized_head_is_refused(
    server: RunningServer,
) -> None:
    user = new_user()
    url = urlsplit(server.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        good = (
            "GET /v1/usage HTTP/1.1\r\nHost: test\r\n"
            + f"Authorization: {auth(user)['Authorization']}\r\n\r\n"
        )
        bad = "GET /v1/usage HTTP/1.1\r\nHost: test\r\nX-Big: " + "a" * (MAX_HEADER_BYTES + 1) + "\r\n\r\n"
        writer.write((good + good + bad).encode())
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 200, 431], answer[:500]


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /v1/usage HTTP/1.1\r\nHost: test\r\nX-Bad: a\x7fb\r\n\r\n", id="control-byte"),
        pytest.param(
            b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(
            b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nContent-Length: -1\r\n\r\n", id="negative"
        ),
        pytest.param(
            b"GET /v1/usage HTTP/1.1\r\nHost: test\r\nContent-Length: 1e20\r\n\r\n", id="not-a-number"
        ),
    ],
)
async def test_a_request_that_is_not_valid_http_is_400_problem_json(
    server: RunningServer, request_bytes: bytes
) -> None:
    """Found from outside: the parser's refusals were uvicorn's text/plain 400."""
    status, headers, body = await _raw(server, request_bytes)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "bad_request"
