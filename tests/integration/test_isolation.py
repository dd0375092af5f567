"""Per-user isolation and mass assignment, walked over every user route in the OpenAPI document.

User A does everything the API offers, pointed at user B's resources where a
route takes an id (B's session, the same meter, the same Idempotency-Keys).
Nothing A gets may mention B, nothing of B's may change, and every request
body that tries to set what only the server decides is refused whole."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx

from tests.harness import auth, change_plan, eventually, new_user, signed

# A valid body for each user route that takes one.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/sessions"): {"topic": "walk", "difficulty": "beginner"},
    ("POST", "/v1/sessions/{session_id}/heartbeat"): {"seq": 1},
    ("POST", "/v1/sessions/{session_id}/end"): {},
    ("POST", "/v1/meters/{meter}/consume"): {"amount": 1},
    ("POST", "/v1/holds"): {"meter": "generations", "amount": 1, "ttl_s": 60},
    ("POST", "/v1/holds/{hold_id}/capture"): {"amount": 1},
    ("POST", "/v1/holds/{hold_id}/release"): {},
    ("POST", "/v1/holds/{hold_id}/extend"): {"ttl_s": 60},
}
# A route that takes one of these ids answers another user's exactly as an id that never existed.
OWNED_IDS = {"{session_id}": "session_not_found", "{hold_id}": "hold_not_found"}
INTERNAL_BODIES: dict[str, dict[str, Any]] = {
    "/internal/v1/users/{user_id}/plan": {
        "plan": "basic",
        "action": "upgrade",
        "occurred_at": "2026-11-01T00:00:00Z",
    },
    "/internal/v1/users/{user_id}/credits": {"minutes": 1, "reason": "grant", "reference": "walk"},
}
# What only the server decides, tried as extra body fields.
SMUGGLED = {
    "user_id": "someone-else",
    "plan": "pro",
    "minutes_used": 0,
    "minutes_limit": 100000,
    "purchased_minutes": 1000,
    "version": 1,
    "session_id": "00000000-0000-0000-0000-000000000000",
}


async def snapshot(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    """Everything the API shows of `user` (their own view)."""
    views = {}
    for path in (
        "/v1/usage",
        "/v1/sessions",
        "/v1/credits",
        "/v1/credits/history",
        "/v1/usage/history",
        "/v1/holds",
    ):
        answer = await http.get(path, headers=auth(user))
        assert answer.status_code == 200, answer.text
        views[path] = answer.json()
    return views


async def test_no_route_lets_one_user_read_or_change_another(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    victim, intruder = new_user(), new_user()
    assert (await change_plan(client, victim, "basic")).status_code == 200
    started = await client.post(
        "/v1/sessions", json={}, headers={**auth(victim), "Idempotency-Key": "k-walk"}
    )
    victims_session = started.json()["session_id"]
    assert (await client.post(f"/v1/sessions/{victims_session}/end", headers=auth(victim))).status_code == 200
    consumed = await client.post("/v1/meters/generations/consume", json={"amount": 1}, headers=auth(victim))
    assert consumed.status_code == 200
    held = await client.post("/v1/holds", json={"minutes": 1, "ttl_s": 600}, headers=auth(victim))
    victims_hold = held.json()["hold_id"]
    before = await snapshot(client, victim)
    victims_ids = {"{session_id}": victims_session, "{hold_id}": victims_hold}

    spec = (await client.get("/openapi.json")).json()
    walked = set()
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method in operations:
            method = method.upper()
            walked.add((method, path))
            url = path.format(session_id=victims_session, hold_id=victims_hold, meter="generations")
            # The victim's own key on the start: keys belong to their user, so this is a new request.
            key = "k-walk" if (method, path) == ("POST", "/v1/sessions") else f"k-{method}-{path}"
            headers = {**auth(intruder), "Idempotency-Key": key}
            if path.endswith("/stream"):
                async with client.stream("GET", url, headers=headers) as stream:
                    lines = stream.aiter_lines()
                    first = await anext(lines)
                    while not first.startswith("data:"):
                        first = await anext(lines)
                text, status = first, stream.status_code
                assert json.loads(first.removeprefix("data:"))["user_id"] == intruder
            else:
                body = BODIES.get((method, path))
                answer = await client.request(method, url, json=body, headers=headers)
                text, status = answer.text, answer.status_code
                for slot, code in OWNED_IDS.items():
                    if slot not in path:
                        continue
                    owned = victims_ids[slot]
                    assert status == 404 and answer.json()["code"] == code, (method, path, text)
                    # Exactly what an id that never existed gets: no oracle for others' ids.
                    unknown = str(uuid.uuid4()) if slot == "{session_id}" else f"hold_{uuid.uuid4().hex}"
                    other = await client.request(
                        method,
                        path.format(session_id=unknown, hold_id=unknown),
                        json=body,
                        headers=auth(intruder),
                    )
                    assert (other.status_code, other.text.replace(unknown, owned)) == (status, text)
                    text = text.replace(owned, "<the id the intruder sent>")
                # Mass assignment: anything the server decides, smuggled in, is refused whole.
                if body is not None:
                    for field, value in SMUGGLED.items():
                        smuggled = await client.request(
                            method, url, json={**body, field: value}, headers=auth(intruder)
                        )
                        assert smuggled.status_code in (404, 422), (method, path, field, smuggled.text)
                        if smuggled.status_code == 422:
                            assert smuggled.json()["code"] == "invalid_request"
            assert status < 500, (method, path, text)
            assert victim not in text and victims_session not in text and victims_hold not in text, (
                f"{method} {path} showed the victim"
            )
    assert walked == {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith("/v1/")
        for method in operations
    }

    # Internal routes: smuggled fields are refused too, and change nothing.
    for path, body in INTERNAL_BODIES.items():
        for field, value in SMUGGLED.items():
            if field in body:
                continue  # a field this route takes
            content, signature = signed({**body, field: value})
            answer = await client.post(path.format(user_id=victim), content=content, headers=signature)
            assert answer.status_code == 422 and answer.json()["code"] == "invalid_request", (path, field)

    after = await snapshot(client, victim)
    assert after == before, "nothing of the victim's changed"
    intruders_sessions = await database.fetchval(
        "select count(*) from usage_sessions where user_id = $1", intruder
    )

    async def written() -> bool:
        row = await database.fetchrow("select plan from usage_users where user_id = $1", victim)
        return row is not None and row["plan"] == "basic"

    await eventually(written)
    print(
        f"isolation walk: {len(walked)} user routes, {len(SMUGGLED)} smuggled fields on each body; "
        f"the intruder's own sessions: {intruders_sessions}; the victim's views unchanged"
    )
