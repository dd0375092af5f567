"""The gateway's ASGI middleware, driven as ASGI: a scope, a `receive` that hands over the request's
messages, and a `send` that records the answer. The app behind each is a recorder."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.metrics import Metrics
from gateway.middleware import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InFlight,
    ListenerMiddleware,
    RequestLogMiddleware,
)


class Recorder:
    """The app behind the middleware: answers 200 with the body it read; can be held open."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.hold: asyncio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        if self.hold is not None:
            await self.hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def http(path: str = "/v1/usage", *, headers: Sequence[tuple[bytes, bytes]] = (), port: int = 8080) -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": list(headers),
        "query_string": b"",
        "server": ("127.0.0.1", port),
    }


def messages(*chunks: bytes) -> Receive:
    """A `receive` handing `chunks` over as the body's messages; reading past the end is a bug."""
    pending = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]

    async def receive() -> Message:
        assert pending, "read past the end of the request"
        return pending.pop(0)

    return receive


def never() -> Receive:
    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError

    return receive


class Answer:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def problem(self) -> dict[str, Any]:
        assert self.headers[b"content-type"] == b"application/problem+json"
        return dict(json.loads(self.messages[1]["body"]))


async def test_a_declared_length_past_the_bound_is_413_before_the_body_is_read() -> None:
    app, answer = Recorder(), Answer()
    scope = http(headers=[(b"content-length", b"16385")])
    await BodyLimitMiddleware(app)(scope, never(), answer)
    assert (answer.status, answer.problem["code"]) == (413, "payload_too_large")
    assert app.bodies == []


async def test_a_streamed_body_past_the_bound_is_413_once_it_ends_without_waiting_for_more() -> None:
    """The whole oversized body in one message (chunked, no length): answered at once, no read
    past its end (which waited for the read timeout, found from outside)."""
    app, answer = Recorder(), Answer()
    await BodyLimitMiddleware(app)(http(), messages(b"x" * 0x4400), answer)
    assert (answer.status, answer.problem["code"]) == (413, "payload_too_large")


async def test_a_streamed_body_past_the_bound_is_drained_to_its_end_then_413() -> None:
    app, answer = Recorder(), Answer()
    await BodyLimitMiddleware(app)(http(), messages(b"x" * 10_000, b"x" * 10_000, b"x"), answer)
    assert answer.status == 413
    assert app.bodies == []


async def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    app, answer = Recorder(), Answer()
    await BodyLimitMiddleware(app, read_timeout_s=0.01)(http(), never(), answer)
    assert (answer.status, answer.problem["code"]) == (408, "request_timeout")
    assert answer.headers[b"connection"] == b"close"


@pytest.mark.parametrize("body", ['{"a": "\u00e9"}'.encode("utf-16"), b'{"a": "\xff"}', b'{"a":1}\x00'])
async def test_a_body_that_is_not_utf8_text_is_422(body: bytes) -> None:
    app, answer = Recorder(), Answer()
    await BodyLimitMiddleware(app)(http(), messages(body), answer)
    assert (answer.status, answer.problem["code"]) == (422, "invalid_request")
    assert app.bodies == []


async def test_a_body_within_the_bound_reaches_the_app_whole() -> None:
    app, answer = Recorder(), Answer()
    await BodyLimitMiddleware(app)(http(), messages(b'{"a":', b' "\xc3\xa9"}'), answer)
    assert answer.status == 200
    assert app.bodies == ['{"a": "\u00e9"}'.encode()]


async def test_past_the_bound_in_flight_a_request_is_503_at_once_and_internal_calls_have_their_own() -> None:
    app, metrics = Recorder(), Metrics()
    app.hold = asyncio.Event()
    limited = ConcurrencyLimitMiddleware(app, in_flight=InFlight(max_requests=1, metrics=metrics))
    first = asyncio.ensure_future(limited(http(), messages(b""), Answer()))
    await asyncio.sleep(0)
    refused = Answer()
    await limited(http(), messages(b""), refused)
    assert (refused.status, refused.problem["code"]) == (503, "unavailable")
    assert refused.headers[b"retry-after"] == b"1"
    for exempt in ("/internal/v1/status", "/healthz"):
        admitted = asyncio.ensure_future(limited(http(exempt), messages(b""), Answer()))
        await asyncio.sleep(0)
        assert not admitted.done(), f"{exempt} is held by the app, not refused"
        app.hold.set()
        await admitted
        app.hold.clear()
    app.hold.set()
    await first
    answer = Answer()
    await limited(http(), messages(b""), answer)
    assert answer.status == 200


@pytest.mark.parametrize(
    ("incoming", "kept"), [(b"req-1.a_B", True), (b"bad id", False), (b"x" * 129, False)]
)
async def test_a_request_id_is_kept_when_well_formed_and_answered(incoming: bytes, kept: bool) -> None:
    answer = Answer()
    scope = http(headers=[(b"x-request-id", incoming)])
    await RequestLogMiddleware(Recorder(), metrics=Metrics())(scope, messages(b""), answer)
    answered = answer.headers[b"x-request-id"]
    assert (answered == incoming) is kept
    assert scope["state"]["request_id"] == answered.decode()


async def test_a_problem_is_counted_by_its_code() -> None:
    metrics = Metrics()
    logged = RequestLogMiddleware(BodyLimitMiddleware(Recorder()), metrics=metrics)
    await logged(http(), messages(b"\xff"), Answer())
    assert metrics.registry.get_sample_value("ledger_http_errors_total", {"code": "invalid_request"}) == 1


@pytest.mark.parametrize(
    ("path", "port", "served"),
    [
        ("/internal/v1/status", 9090, True),
        ("/internal/v1/status", 8080, False),
        ("/v1/usage", 8080, True),
        ("/v1/usage", 9090, False),
        ("/healthz", 8080, True),
        ("/healthz", 9090, True),
    ],
)
async def test_each_listener_serves_only_its_own_routes(path: str, port: int, served: bool) -> None:
    answer = Answer()
    await ListenerMiddleware(Recorder(), internal_port=9090)(http(path, port=port), messages(b""), answer)
    assert answer.status == (200 if served else 404)
