"""The hot path, as ASGI, over the typed shard client and a fake shard handle: the well-formed credit
check or heartbeat is answered here; anything it does not fully understand goes to the app."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from actors.errors import SessionNotFound
from actors.ledger import UserLedger
from gateway.auth import TokenVerifier, issue_token
from gateway.hotpath import HEARTBEAT_ROUTE, HotPathMiddleware
from gateway.metrics import Metrics
from gateway.middleware import InFlight
from gateway.schemas import HeartbeatResponse, Usage
from gateway.shards import ShardClient, ShardRouter
from tests.unit.actors.support import POLICY, T0
from tests.unit.gateway.fake_shard import FakeShard

SECRET = "hot-path-secret-0123456789abcdef0123456789"
SESSION = str(uuid.uuid4())


def ledger() -> UserLedger:
    user = UserLedger.new("u1", POLICY, T0)
    user.start_session(T0, SESSION)
    return user


def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if method == "usage":
        return ledger().usage(T0)
    if method == "heartbeat":
        if args[1] != SESSION:
            raise SessionNotFound("no such session", session_id=args[1])
        return ledger().heartbeat(T0 + 1000, SESSION, seq=kwargs["seq"])
    raise AssertionError(method)


class Fallthrough:
    """The FastAPI app behind the hot path (here: a recorder answering 299)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def hot_path() -> tuple[HotPathMiddleware, Fallthrough, FakeShard]:
    shard = FakeShard(answer)
    fastapi = FastAPI()
    router = ShardRouter([shard], call_timeout_s=2.0, metrics=Metrics())
    fastapi.state.runtime = SimpleNamespace(shards=ShardClient(router))
    fastapi.state.token_verifier = TokenVerifier(secret=SECRET)
    app = Fallthrough()
    metrics = Metrics()
    in_flight = InFlight(max_requests=8, metrics=metrics)
    return (
        HotPathMiddleware(app, fastapi=fastapi, in_flight=in_flight, metrics=metrics, read_timeout_s=1.0),
        app,
        shard,
    )


def token(user: str = "u1") -> bytes:
    return f"Bearer {issue_token(secret=SECRET, user_id=user, ttl_s=600)}".encode()


async def call(
    middleware: HotPathMiddleware,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    query: bytes = b"",
) -> tuple[int, bytes]:
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": list(headers),
        "query_string": query,
        "state": {"request_id": "r1"},
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


async def test_a_credit_check_is_answered_here_as_the_route_would() -> None:
    middleware, app, shard = hot_path()
    status, body = await call(middleware, "GET", "/v1/usage", headers=[(b"authorization", token())])
    assert status == 200
    assert json.loads(body) == json.loads(Usage.from_view(ledger().usage(T0)).model_dump_json())
    assert app.paths == []
    assert shard.ray_calls == [("batch", ["usage"])]


async def test_a_heartbeat_is_answered_here_with_its_seq() -> None:
    middleware, app, _ = hot_path()
    status, body = await call(
        middleware,
        "POST",
        f"/v1/sessions/{SESSION.upper()}/heartbeat",
        headers=[(b"authorization", token()), (b"content-type", b"application/json")],
        body=b'{"seq": 7}',
    )
    assert status == 200
    expected = HeartbeatResponse.from_view(ledger().heartbeat(T0 + 1000, SESSION, seq=7))
    assert json.loads(body) == json.loads(expected.model_dump_json())
    assert app.paths == []


async def test_a_shard_refusal_is_the_same_problem_the_app_would_answer() -> None:
    middleware, _, _ = hot_path()
    other = str(uuid.uuid4())
    status, body = await call(
        middleware, "POST", f"/v1/sessions/{other}/heartbeat", headers=[(b"authorization", token())]
    )
    assert status == 404
    assert json.loads(body)["code"] == "session_not_found"


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "query"),
    [
        ("GET", "/v1/usage", [], b"", b""),  # no token: the app says why
        ("GET", "/v1/usage", [(b"authorization", b"Bearer not-a-jwt")], b"", b""),
        ("GET", "/v1/usage", [(b"authorization", b"Basic dTpw")], b"", b""),
        ("GET", "/v1/usage", [(b"authorization", token())], b"", b"x=1"),  # a query string
        (
            "POST",
            f"/v1/sessions/{SESSION}/heartbeat",
            [(b"authorization", token()), (b"idempotency-key", b"k")],
            b"",
            b"",
        ),
        ("POST", "/v1/sessions/not-a-uuid/heartbeat", [(b"authorization", token())], b"", b""),
        (
            "POST",
            f"/v1/sessions/{SESSION}/heartbeat",
            [(b"authorization", token())],
            b'{"seq": 1}',
            b"",
        ),  # no type
        (
            "POST",
            f"/v1/sessions/{SESSION}/heartbeat",
            [(b"authorization", token()), (b"content-type", b"application/json")],
            b'{"seq": -1}',
            b"",
        ),
        ("GET", "/v1/credits", [(b"authorization", token())], b"", b""),  # not a hot route
    ],
)
async def test_what_the_hot_path_does_not_fully_understand_goes_to_the_app(
    method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, query: bytes
) -> None:
    middleware, app, shard = hot_path()
    status, _ = await call(middleware, method, path, headers=headers, body=body, query=query)
    assert (status, app.paths) == (299, [path])
    assert shard.ray_calls == []


async def _exchange(
    middleware: HotPathMiddleware,
    path: str,
    messages: list[Message],
    *,
    method: str = "POST",
    headers: Sequence[tuple[bytes, bytes]] = (),
    server: tuple[str, int] = ("127.0.0.1", 8080),
) -> list[Message]:
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": list(headers),
        "query_string": b"",
        "server": server,
    }
    incoming = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


class Recorder(Fallthrough):
    """The app behind the hot path, recording the body it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await super().__call__(scope, receive, send)


async def test_an_answer_carries_the_request_id_and_is_measured_as_the_apps() -> None:
    """(Measured and logged by `log_request`, the app's own: the log line's fields are the ones the
    metrics show; structlog's capture cannot see a logger cached by earlier tests.)"""
    middleware, _, _ = hot_path()
    sent = await _exchange(
        middleware,
        "/v1/usage",
        [],
        method="GET",
        headers=[(b"authorization", token()), (b"x-request-id", b"req-1")],
    )
    assert sent[0]["status"] == 200
    assert (b"x-request-id", b"req-1") in sent[0]["headers"]
    samples = middleware._metrics.render().decode()
    assert 'ledger_http_requests_total{method="GET",route="/v1/usage",status="200"} 1.0' in samples


async def test_a_refusal_is_measured_with_its_code() -> None:
    middleware, _, _ = hot_path()
    sent = await _exchange(
        middleware,
        f"/v1/sessions/{uuid.uuid4()}/heartbeat",
        [{"type": "http.request", "body": b"", "more_body": False}],
        headers=[(b"authorization", token())],
    )
    assert sent[0]["status"] == 404
    assert any(name == b"x-request-id" for name, _ in sent[0]["headers"])
    samples = middleware._metrics.render().decode()
    assert 'ledger_http_errors_total{code="session_not_found"} 1.0' in samples
    assert f'route="{HEARTBEAT_ROUTE}",status="404"}} 1.0' in samples


async def test_a_body_in_several_parts_goes_to_the_app_whole() -> None:
    middleware, _, shard = hot_path()
    app = Recorder()
    middleware.app = app
    parts: list[Message] = [
        {"type": "http.request", "body": b'{"se', "more_body": True},
        {"type": "http.request", "body": b'q": 3}', "more_body": False},
    ]
    headers = [(b"authorization", token()), (b"content-type", b"application/json")]
    sent = await _exchange(middleware, f"/v1/sessions/{SESSION}/heartbeat", parts, headers=headers)
    assert sent[0]["status"] == 299
    assert app.bodies == [b'{"seq": 3}']
    assert shard.ray_calls == []


async def test_at_the_bound_on_requests_in_flight_the_app_answers() -> None:
    middleware, app, shard = hot_path()
    while middleware._in_flight.take(internal=False):
        pass
    sent = await _exchange(middleware, "/v1/usage", [], method="GET", headers=[(b"authorization", token())])
    assert (sent[0]["status"], app.paths) == (299, ["/v1/usage"])
    assert shard.ray_calls == []


async def test_a_request_on_the_internal_listener_goes_to_the_app() -> None:
    middleware, app, _ = hot_path()
    middleware._internal_port = 9090
    sent = await _exchange(
        middleware, "/v1/usage", [], method="GET", headers=[(b"authorization", token())], server=("h", 9090)
    )
    assert (sent[0]["status"], app.paths) == (299, ["/v1/usage"])


async def test_a_body_the_parser_cannot_take_goes_to_the_app() -> None:
    """JSON nested deeper than the parser recurses raises RecursionError (not ValueError): still the
    app's to answer (422), never an exception out of the outermost layer."""
    middleware, app, shard = hot_path()
    body = b'{"seq":' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    headers = [(b"authorization", token()), (b"content-type", b"application/json")]
    message: Message = {"type": "http.request", "body": body, "more_body": False}
    sent = await _exchange(middleware, f"/v1/sessions/{SESSION}/heartbeat", [message], headers=headers)
    assert (sent[0]["status"], app.paths) == (299, [f"/v1/sessions/{SESSION}/heartbeat"])
    assert shard.ray_calls == []


async def test_a_heartbeat_body_that_does_not_arrive_is_408_and_its_slot_given_back() -> None:
    middleware, app, shard = hot_path()
    middleware._read_timeout_s = 0.05

    async def never() -> Message:
        await asyncio.sleep(3600)
        raise AssertionError

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": f"/v1/sessions/{SESSION}/heartbeat",
        "headers": [(b"authorization", token())],
        "query_string": b"",
        "server": ("127.0.0.1", 8080),
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, never, send)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["code"] == "request_timeout"
    assert (app.paths, shard.ray_calls) == ([], [])
    taken = 0
    while middleware._in_flight.take(internal=False):
        taken += 1
    assert taken == 8  # every slot free again
