"""The voice-session path over real HTTP, real Ray shards and real Postgres."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import httpx
import pytest

from tests.harness import STALE_SESSION_S, RunningServer, auth, change_plan, eventually, new_user

PROBLEM_JSON = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body  # type: ignore[no-any-return]


async def test_new_user_gets_free_plan_defaults(client: httpx.AsyncClient) -> None:
    user = new_user()
    response = await client.get("/v1/usage", headers=auth(user))
    assert response.status_code == 200
    usage = response.json()
    assert usage["user_id"] == user
    assert (usage["plan"], usage["minutes_limit"], usage["minutes_used"]) == ("free", 10, 0)
    assert (usage["minutes_remaining"], usage["percent_used"], usage["warning"]) == (10, 0, None)
    assert usage["active_session"] is None
    assert usage["period_start"].endswith("-01T00:00:00Z")


async def test_start_heartbeat_end_bills_server_time(client: httpx.AsyncClient) -> None:
    user = new_user()
    started = await client.post(
        "/v1/sessions", json={"topic": "  travel  ", "difficulty": "advanced"}, headers=auth(user)
    )
    assert started.status_code == 201, started.text
    session = started.json()
    session_id = session["session_id"]
    assert session["minutes_remaining"] == 10
    await asyncio.sleep(1.3)
    beat = await client.post(f"/v1/sessions/{session_id}/heartbeat", json={"seq": 1}, headers=auth(user))
    assert beat.status_code == 200, beat.text
    assert beat.json()["state"] == "active"
    assert beat.json()["session_minutes"] >= 0.02
    current = (await client.get("/v1/sessions/current", headers=auth(user))).json()
    assert (current["session_id"], current["topic"], current["difficulty"]) == (
        session_id,
        "travel",
        "advanced",
    )
    ended = await client.post(f"/v1/sessions/{session_id}/end", json={}, headers=auth(user))
    assert ended.status_code == 200
    assert (ended.json()["state"], ended.json()["end_reason"]) == ("ended", "user_ended")
    again = await client.post(f"/v1/sessions/{session_id}/end", headers=auth(user))
    assert again.json() == ended.json()
    assert_problem(await client.get("/v1/sessions/current", headers=auth(user)), 404, "session_not_found")
    history = (await client.get("/v1/sessions", params={"limit": 5}, headers=auth(user))).json()["sessions"]
    assert [(s["session_id"], s["end_reason"]) for s in history] == [(session_id, "user_ended")]


async def test_second_start_while_active_is_session_active(client: httpx.AsyncClient) -> None:
    user = new_user()
    first = (await client.post("/v1/sessions", headers=auth(user))).json()
    body = assert_problem(await client.post("/v1/sessions", headers=auth(user)), 409, "session_active")
    assert body["session_id"] == first["session_id"]


async def test_concurrent_starts_open_exactly_one_session(client: httpx.AsyncClient) -> None:
    user = new_user()
    answers = await asyncio.gather(*(client.post("/v1/sessions", headers=auth(user)) for _ in range(10)))
    assert sorted(a.status_code for a in answers) == [201] + [409] * 9


async def test_another_users_session_is_not_found(client: httpx.AsyncClient) -> None:
    owner, intruder = new_user(), new_user()
    session_id = (await client.post("/v1/sessions", headers=auth(owner))).json()["session_id"]
    for path in (f"/v1/sessions/{session_id}/heartbeat", f"/v1/sessions/{session_id}/end"):
        assert_problem(await client.post(path, headers=auth(intruder)), 404, "session_not_found")
    still = (await client.get("/v1/sessions/current", headers=auth(owner))).json()
    assert still["session_id"] == session_id
    assert_problem(
        await client.post(f"/v1/sessions/{uuid.uuid4()}/heartbeat", headers=auth(owner)),
        404,
        "session_not_found",
    )
    assert_problem(
        await client.post("/v1/sessions/not-a-uuid/end", headers=auth(owner)), 404, "session_not_found"
    )


async def test_six_second_plan_ends_limit_reached_at_the_limit(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    assert (await change_plan(client, user, "tiny")).status_code == 200
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    last = None
    for _ in range(20):  # heartbeat every 0.5 s until the server says it is over
        await asyncio.sleep(0.5)
        response = await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
        last = response.json()
        if response.status_code != 200 or last["state"] == "ended":
            break
    assert last is not None and last["state"] == "ended" and last["end_reason"] == "limit_reached", last
    assert last["session_minutes"] == 0.1
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    assert (usage["minutes_used"], usage["minutes_remaining"], usage["warning"]) == (0.1, 0, "exhausted")
    assert_problem(await client.post("/v1/sessions", headers=auth(user)), 403, "no_credits")
    row = await database.fetchrow(
        "select used_ms, end_reason from usage_sessions where id = $1", uuid.UUID(session_id)
    )
    assert row is not None
    assert (row["used_ms"], row["end_reason"]) == (6_000, "limit_reached")


async def test_limit_alarm_ends_session_without_a_heartbeat_at_the_end(client: httpx.AsyncClient) -> None:
    """Heartbeats stop a second before the limit; the shard's alarm ends the session at the limit.
    The second since the last heartbeat is held, and billed once the client is heard from again
    (within the stale timeout of its last heartbeat)."""
    user = new_user()
    await change_plan(client, user, "tiny")
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    for _ in range(5):
        await asyncio.sleep(1.0)
        beat = await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
        assert beat.json()["state"] == "active"

    async def ended() -> bool:
        history = (await client.get("/v1/sessions", headers=auth(user))).json()["sessions"]
        return bool(history) and history[0]["end_reason"] == "limit_reached"

    await eventually(ended, timeout_s=12)
    history = (await client.get("/v1/sessions", headers=auth(user))).json()["sessions"]
    started = datetime.fromisoformat(history[0]["started_at"])
    finished = datetime.fromisoformat(history[0]["ended_at"])
    assert (finished - started).total_seconds() == 6.0
    assert history[0]["session_id"] == session_id and history[0]["minutes_used"] < 0.1
    late = await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
    assert late.status_code == 200, late.text
    assert (late.json()["state"], late.json()["end_reason"]) == ("ended", "limit_reached")
    assert late.json()["session_minutes"] == 0.1, "heard from after the limit: billed to the limit"
    history = (await client.get("/v1/sessions", headers=auth(user))).json()["sessions"]
    assert history[0]["minutes_used"] == 0.1


async def test_silent_session_ends_stale_billed_to_last_heartbeat(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    await asyncio.sleep(1.0)
    await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
    # ...and then silence, longer than LEDGER_STALE_SESSION_S.

    async def stale() -> bool:
        row = await database.fetchrow(
            "select end_reason from usage_sessions where id = $1", uuid.UUID(session_id)
        )
        return row is not None and row["end_reason"] == "stale"

    await eventually(stale, timeout_s=STALE_SESSION_S + 10)
    row = await database.fetchrow(
        "select started_at, last_heartbeat_at, ended_at, used_ms from usage_sessions where id = $1",
        uuid.UUID(session_id),
    )
    assert row is not None
    billed_ms = round((row["last_heartbeat_at"] - row["started_at"]).total_seconds() * 1000)
    assert row["ended_at"] == row["last_heartbeat_at"]
    assert row["used_ms"] == billed_ms >= 1000
    body = assert_problem(
        await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user)), 409, "session_ended"
    )
    assert body["end_reason"] == "stale"


async def test_bad_input_is_refused_and_changes_nothing(client: httpx.AsyncClient) -> None:
    user = new_user()
    before = (await client.get("/v1/usage", headers=auth(user))).json()
    for body in (
        {"topic": "x", "unknown": 1},
        {"topic": "   "},
        {"topic": "x" * 1001},
        {"difficulty": "expert"},
        {"topic": 5},
        {"topic": "nul\u0000inside"},
    ):
        assert_problem(
            await client.post("/v1/sessions", json=body, headers=auth(user)), 422, "invalid_request"
        )
    assert_problem(
        await client.post(
            "/v1/sessions", content=b"{not json", headers={**auth(user), "content-type": "application/json"}
        ),
        422,
        "invalid_request",
    )
    assert_problem(
        await client.get("/v1/sessions", params={"limit": 0}, headers=auth(user)), 422, "invalid_request"
    )
    assert_problem(
        await client.get("/v1/sessions", params={"limit": 101}, headers=auth(user)), 422, "invalid_request"
    )
    after = (await client.get("/v1/usage", headers=auth(user))).json()
    assert after == before


async def test_unknown_query_parameters_and_undecodable_bodies_are_422(client: httpx.AsyncClient) -> None:
    user = new_user()
    misspelt = await client.get("/v1/sessions", params={"limt": "5"}, headers=auth(user))
    assert_problem(misspelt, 422, "invalid_request")
    assert misspelt.json()["errors"] == [
        {"loc": ["query", "limt"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    ]
    assert (await client.get("/v1/sessions", params={"limit": "5"}, headers=auth(user))).status_code == 200
    not_utf8 = await client.post(
        "/v1/sessions",
        content=b'{"topic": "\xff\xfe"}',
        headers={**auth(user), "content-type": "application/json"},
    )
    assert_problem(not_utf8, 422, "invalid_request")
    assert (await client.get("/v1/usage", headers=auth(user))).json()["active_session"] is None


async def test_a_parameter_or_key_given_twice_is_422_and_changes_nothing(client: httpx.AsyncClient) -> None:
    """Which of two would the client mean? Neither is guessed (found from outside: the first was
    used silently)."""
    user = new_user()
    twice = await client.get("/v1/sessions?limit=1&limit=2", headers=auth(user))
    assert_problem(twice, 422, "invalid_request")
    assert twice.json()["errors"][0]["loc"] == ["query", "limit"]
    two_keys = httpx.Headers([*auth(user).items(), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")])
    assert_problem(await client.post("/v1/sessions", headers=two_keys), 422, "invalid_request")
    assert (await client.get("/v1/usage", headers=auth(user))).json()["active_session"] is None
    one_key = {**auth(user), "Idempotency-Key": "k1"}
    assert (await client.post("/v1/sessions", headers=one_key)).status_code == 201


async def test_bodies_that_are_not_utf8_json_are_422_and_change_nothing(client: httpx.AsyncClient) -> None:
    """JSON is UTF-8: a UTF-16 or UTF-32 body (which a lenient parser would guess and accept) is 422."""
    user = new_user()
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        answer = await client.post(
            "/v1/sessions",
            content='{"topic": "ordering coffee"}'.encode(encoding),
            headers={**auth(user), "content-type": "application/json"},
        )
        assert_problem(answer, 422, "invalid_request")
    assert (await client.get("/v1/usage", headers=auth(user))).json()["active_session"] is None


async def test_a_keyed_request_is_the_same_request_however_it_is_written(client: httpx.AsyncClient) -> None:
    """Numbers by value (`1` and `1.0`), JSON however spaced or ordered, a session id in any case:
    the retry gets the first answer again, with no second effect."""
    user = new_user()
    first = await client.post(
        "/v1/meters/generations/consume", json={"amount": 1}, headers={**auth(user), "Idempotency-Key": "m-1"}
    )
    assert first.status_code == 200, first.text
    for body in (b'{"amount": 1.0}', b'{ "amount" : 1e0 }', b'{"amount":10E-1}'):
        again = await client.post(
            "/v1/meters/generations/consume",
            content=body,
            headers={**auth(user), "Idempotency-Key": "m-1", "content-type": "application/json"},
        )
        assert (again.status_code, again.json()) == (200, first.json()), body
    credits = (await client.get("/v1/credits", headers=auth(user))).json()
    assert credits["meters"]["generations"]["used"] == 1, "one use, however often it was retried"
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    ended = await client.post(
        f"/v1/sessions/{session_id}/end", headers={**auth(user), "Idempotency-Key": "e-1"}
    )
    assert ended.status_code == 200, ended.text
    shouted = await client.post(
        f"/v1/sessions/{session_id.upper()}/end", headers={**auth(user), "Idempotency-Key": "e-1"}
    )
    assert (shouted.status_code, shouted.json()) == (200, ended.json())
    other = await client.post(
        "/v1/meters/generations/consume", json={"amount": 2}, headers={**auth(user), "Idempotency-Key": "m-1"}
    )
    assert_problem(other, 422, "idempotency_conflict")
    absurd = await client.post(  # a number no canonical form can hold: validation answers it
        "/v1/meters/generations/consume",
        content=b'{"amount": 1e1000000000000000000}',
        headers={**auth(user), "Idempotency-Key": "m-2", "content-type": "application/json"},
    )
    assert_problem(absurd, 422, "invalid_request")


async def test_options_and_openapi_say_what_each_path_answers(client: httpx.AsyncClient) -> None:
    """OPTIONS names every method of the path (GET and POST share /v1/sessions), and so does a
    405; the OpenAPI document names the 404 of billing webhooks whose secret is not set."""
    options = await client.options("/v1/sessions")
    assert options.status_code == 204
    assert options.headers["allow"] == "GET, OPTIONS, POST"
    wrong = await client.delete("/v1/sessions", headers=auth(new_user()))
    assert_problem(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "GET, OPTIONS, POST"
    spec = (await client.get("/openapi.json")).json()
    for provider in ("polar", "stripe"):
        assert "404" in spec["paths"][f"/webhooks/{provider}"]["post"]["responses"]


async def test_heartbeat_rejects_wrong_types(client: httpx.AsyncClient) -> None:
    user = new_user()
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    for body in ({"seq": "1"}, {"seq": -1}, {"seq": 1.5}, {"other": 1}):
        assert_problem(
            await client.post(f"/v1/sessions/{session_id}/heartbeat", json=body, headers=auth(user)),
            422,
            "invalid_request",
        )


async def test_body_over_16_kib_is_413(client: httpx.AsyncClient) -> None:
    user = new_user()
    response = await client.post("/v1/sessions", json={"topic": "x" * (17 * 1024)}, headers=auth(user))
    assert_problem(response, 413, "payload_too_large")
    assert (await client.get("/v1/usage", headers=auth(user))).json()["active_session"] is None


async def test_chunked_body_over_16_kib_is_413(client: httpx.AsyncClient) -> None:
    """No Content-Length: the bound is enforced while the body streams in."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"topic": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    user = new_user()
    response = await client.post(
        "/v1/sessions", content=chunks(), headers={**auth(user), "content-type": "application/json"}
    )
    assert_problem(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        auth("someone", ttl_s=-120),
    ],
    ids=["missing", "garbage", "basic", "expired"],
)
async def test_user_routes_need_a_valid_token(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.get("/v1/usage", headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_operations_endpoints(client: httpx.AsyncClient, server: RunningServer) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert len(ready.json()["shards"]) == server.settings.shards
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert 'ledger_http_requests_total{method="GET",route="/readyz",status="200"}' in metrics.text
    assert "ledger_shard_resident_users" in metrics.text
    assert (await client.get("/no/such/route")).headers["content-type"] == PROBLEM_JSON


async def test_the_docs_pages_and_their_files_are_served_by_the_server_itself(
    client: httpx.AsyncClient,
) -> None:
    """Offline, a page whose scripts come from a CDN is blank: every file a page names is ours."""
    for page, files in (
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
        ("/redoc", ("redoc.standalone.js",)),
    ):
        html = await client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        urls = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", html.text) + re.findall(
            r"""url: ["']([^"']+)["']""", html.text
        )
        assert not [url for url in urls if url.startswith(("http:", "https:", "//"))], urls
        for name in files:
            assert f"/docs/static/{name}" in urls, (name, urls)
            served = await client.get(f"/docs/static/{name}")
            assert served.status_code == 200 and len(served.content) > 10_000
