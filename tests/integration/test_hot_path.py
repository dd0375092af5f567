"""The hot path (`gateway.hotpath`) answers credit checks and heartbeats as the FastAPI app does.

Real Ray, real Postgres, real HTTP. A heartbeat with an `Idempotency-Key` goes through FastAPI,
one without takes the hot path, so the two can be compared on the same session; the usage object
is compared with FastAPI's own rendering of the same shard answer."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi.routing import APIRoute, serialize_response
from starlette.responses import JSONResponse

from gateway.routes import usage
from gateway.schemas import Usage
from tests.harness import RunningServer, auth, metric, new_user

HEARTBEAT_ROUTE = "/v1/sessions/{session_id}/heartbeat"
# Fields that move between two heartbeats of the same session.
MOVING = {"session_minutes", "minutes_used", "minutes_remaining", "version", "ends_at"}


async def start(client: httpx.AsyncClient, user: str) -> str:
    started = await client.post("/v1/sessions", json={"topic": "hot path"}, headers=auth(user))
    assert started.status_code == 201, started.text
    return str(started.json()["session_id"])


def without_moving(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key not in MOVING}


async def test_a_credit_check_answers_what_fastapi_renders_for_the_same_ledger(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user = new_user()
    session_id = await start(client, user)
    ended = await client.post(f"/v1/sessions/{session_id}/end", headers=auth(user))
    assert ended.status_code == 200, ended.text
    hot = await client.get("/v1/usage", headers=auth(user))
    assert hot.status_code == 200, hot.text
    assert hot.headers["content-type"] == "application/json"
    assert int(hot.headers["content-length"]) == len(hot.content)

    # FastAPI's own rendering of the same answer from the same (idle, unchanged) ledger.
    route = next(r for r in usage.router.routes if isinstance(r, APIRoute) and r.path == "/v1/usage")
    view = await server.runtime.shards.usage(user)
    content = await serialize_response(field=route.response_field, response_content=Usage.from_view(view))
    assert hot.json() == json.loads(JSONResponse(content).body)
    assert hot.json()["user_id"] == user and hot.json()["active_session"] is None


async def test_a_heartbeat_answers_as_the_app_does_with_the_same_status_body_and_labels(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    session_id = await start(client, user)
    path = f"/v1/sessions/{session_id}/heartbeat"
    labels = f'method="POST",route="{HEARTBEAT_ROUTE}",status="200"'
    counted = f"ledger_http_requests_total{{{labels}}}"
    before = await metric(client, counted, default=0.0)

    through_app = await client.post(path, json={"seq": 1}, headers={**auth(user), "Idempotency-Key": "hb-1"})
    hot = await client.post(path, json={"seq": 2}, headers=auth(user))
    bare = await client.post(path, headers=auth(user))  # no body at all: a heartbeat without seq
    for answer in (through_app, hot, bare):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["x-request-id"]
    assert without_moving(hot.json()) == without_moving(through_app.json())
    assert hot.json().keys() == through_app.json().keys() == bare.json().keys()
    assert hot.json()["version"] > through_app.json()["version"]
    # Labelled by the route it stands in for, as FastAPI's answer is.
    assert await metric(client, counted) == before + 3

    await client.post(f"/v1/sessions/{session_id}/end", headers=auth(user))
    ended_hot = await client.post(path, json={"seq": 3}, headers=auth(user))
    ended_app = await client.post(path, json={"seq": 3}, headers={**auth(user), "Idempotency-Key": "hb-3"})
    assert ended_hot.status_code == ended_app.status_code == 409
    assert (
        ended_hot.headers["content-type"] == ended_app.headers["content-type"] == "application/problem+json"
    )
    assert ended_hot.json() == ended_app.json()
    assert ended_hot.json()["code"] == "session_ended"


async def test_what_the_hot_path_does_not_understand_is_answered_by_the_app(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    session_id = await start(client, user)
    path = f"/v1/sessions/{session_id}/heartbeat"
    as_json = {"content-type": "application/json"}
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", path, {"json": {"seq": -1}}, 422, "invalid_request"),
        ("POST", path, {"json": {"seq": 1, "extra": True}}, 422, "invalid_request"),
        (
            "POST",
            path,
            {"content": b"[1]", "headers": as_json},
            422,
            "invalid_request",
        ),
        (
            "POST",
            path,
            {"content": b"{not json", "headers": as_json},
            422,
            "invalid_request",
        ),
        ("POST", "/v1/sessions/not-a-uuid/heartbeat", {}, 404, "session_not_found"),
        ("GET", "/v1/usage?limt=5", {}, 422, "invalid_request"),
    ]
    for method, url, options, status, code in cases:
        headers = {**auth(user), **options.pop("headers", {})}
        answer = await client.request(method, url, headers=headers, **options)
        assert answer.status_code == status, (url, options, answer.text)
        assert answer.json()["code"] == code
    for token in ("", "Bearer", "Basic abc", "Bearer not.a.token"):
        answer = await client.get("/v1/usage", headers={"Authorization": token})
        assert answer.status_code == 401, (token, answer.text)
        assert answer.json()["code"] == "unauthorized"
    # None of it touched the session.
    assert (await client.get("/v1/sessions/current", headers=auth(user))).json()["session_id"] == session_id
