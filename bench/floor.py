"""The floor: what serving the benchmark's requests costs before any work is done.

A bare ASGI callable (no FastAPI, no Starlette, no routing table, no middleware) served
by uvicorn exactly as `usage-ledger serve` serves the gateway: `gateway.serving.server_config`
(uvloop, the same httptools protocol with its bounded heads, no access log, lifespan on, the
same connection bounds and keep-alive), one process, logging configured as a benchmark server
has it (console, warning). It reads each request's body and answers with a fixed JSON body of
about the size and shape of the ledger's answer to it; it checks no token, calls nothing and
keeps no state. What a scenario measures on it is uvicorn, the loopback and the load generator:
no server of ours can do better on this machine, so `ours / floor` is what our own work costs.

Answers, by method and path alone (every id in a path is accepted):

- `GET` anything: a usage object (200);
- `POST /v1/sessions`: a session started, with a `session_id` (201);
- `POST /v1/sessions/{id}/heartbeat` and `/end`: a heartbeat's and an end's answer (200);
- `POST /v1/holds`: a hold, with a `hold_id` (201); `POST /v1/holds/{id}/capture`: it captured (200);
- any other `POST`: 404, a small problem body.

The ids are fixed: a flow (`bench/loadgen.py`) takes them from the answers and sends them back,
which is all the scenarios need.

    python -m bench.floor --port 8091
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SESSION_ID = "0b8e6d1c-3f5a-4c2e-9d7b-6a1f0e2c4b8d"
HOLD_ID = "5c2d8a4e-1b7f-4e9a-8c3d-2f6b0a9e7d1c"
REQUEST_ID = "4f1c2b9e8d7a6c5b4a3f2e1d0c9b8a7f"  # the ledger answers an X-Request-ID on every request
_AT = "2026-12-07T10:15:30.123Z"


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# The ledger's answers, field for field (gateway/schemas.py), with plausible values.
USAGE = _json(
    {
        "user_id": "bench-0123456789ab",
        "plan": "free",
        "period_start": "2026-12-01T00:00:00Z",
        "period_end": "2027-01-01T00:00:00Z",
        "minutes_limit": 10.0,
        "minutes_used": 1.25,
        "minutes_remaining": 8.75,
        "purchased_minutes": 0.0,
        "percent_used": 12.5,
        "warning": None,
        "active_session": None,
        "version": 42,
        "minutes_held": 0.0,
    }
)
SESSION_STARTED = _json(
    {
        "session_id": SESSION_ID,
        "started_at": _AT,
        "minutes_remaining": 8.75,
        "ends_at": "2026-12-07T10:24:15.123Z",
        "version": 43,
    }
)
HEARTBEAT = _json(
    {
        "session_id": SESSION_ID,
        "state": "active",
        "end_reason": None,
        "session_minutes": 0.02,
        "minutes_used": 1.27,
        "minutes_remaining": 8.73,
        "warning": None,
        "ends_at": "2026-12-07T10:24:15.123Z",
        "version": 44,
    }
)
SESSION_ENDED = _json(
    {
        "session_id": SESSION_ID,
        "state": "ended",
        "end_reason": "user_ended",
        "session_minutes": 0.02,
        "minutes_used": 1.27,
        "minutes_remaining": 8.73,
        "version": 45,
    }
)


def _hold(*, state: str, captured: int, released: int, resolved_at: str | None) -> bytes:
    return _json(
        {
            "hold_id": HOLD_ID,
            "meter": "bench_tokens",
            "minutes": None,
            "amount": 1000,
            "state": state,
            "captured": captured,
            "released": released,
            "reference": None,
            "created_at": _AT,
            "expires_at": "2026-12-07T10:20:30.123Z",
            "resolved_at": resolved_at,
            "version": 46,
        }
    )


HOLD = _hold(state="held", captured=0, released=0, resolved_at=None)
HOLD_CAPTURED = _hold(state="captured", captured=640, released=360, resolved_at=_AT)
NOT_FOUND = _json({"type": "about:blank", "title": "Not Found", "status": 404, "code": "not_found"})


def _start(status: int, body: bytes) -> Message:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", REQUEST_ID.encode()),
    ]
    return {"type": "http.response.start", "status": status, "headers": headers}


# Each answer's two ASGI messages, made once (uvicorn only reads them).
_ANSWERS: dict[str, tuple[Message, Message]] = {
    name: (_start(status, body), {"type": "http.response.body", "body": body})
    for name, status, body in (
        ("usage", 200, USAGE),
        ("started", 201, SESSION_STARTED),
        ("heartbeat", 200, HEARTBEAT),
        ("ended", 200, SESSION_ENDED),
        ("hold", 201, HOLD),
        ("captured", 200, HOLD_CAPTURED),
        ("not_found", 404, NOT_FOUND),
    )
}


def answer_for(method: str, path: str) -> str:
    """Which answer a request gets (a key of `_ANSWERS`), by its method and path alone."""
    if method == "GET":
        return "usage"
    if path == "/v1/sessions":
        return "started"
    if path == "/v1/holds":
        return "hold"
    if path.startswith("/v1/sessions/"):
        if path.endswith("/heartbeat"):
            return "heartbeat"
        if path.endswith("/end"):
            return "ended"
    if path.startswith("/v1/holds/") and path.endswith("/capture"):
        return "captured"
    return "not_found"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The floor's ASGI application."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    # The body is read, as any server of ours reads it (the ledger parses it; the floor drops it).
    more_body = True
    while more_body:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more_body = message.get("more_body", False)
    start, body = _ANSWERS[answer_for(scope["method"], scope["path"])]
    await send(start)
    await send(body)


def main() -> None:
    import uvicorn

    from actors.logsetup import configure_logging
    from gateway.serving import server_config

    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # As `serve` under the benchmark: console lines, warnings and worse (LEDGER_LOG_LEVEL=warning).
    configure_logging(log_format="console", level="warning")
    uvicorn.Server(server_config(app, host="127.0.0.1", port=args.port)).run()


if __name__ == "__main__":
    main()
