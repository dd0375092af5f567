"""Times at the edge: every time from outside (a signed body, a billing event, a token) lies between
2000-01-01 and 2200-01-01 UTC and carries its timezone, and a period starts before it ends;
anything else is refused and changes nothing. A time outside that which an older version stored
makes its user unavailable (503, with a logged reason), never its shard: the shard's other users
are served, and their sessions re-armed after a restart. (The defect found from outside: a plan
change dated the year 1 was accepted, and after a restart its user answered 500 forever while the
shard's re-activation failed every 5 s.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from actors.routing import shard_index
from tests.harness import (
    JWT_SECRET,
    RunningServer,
    auth,
    change_plan,
    eventually,
    new_user,
    signed,
)

OUT_OF_RANGE: list[str | int] = [
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+14:00",  # the year 0 in UTC
    "1999-12-31T23:59:59Z",
    "2200-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999Z",
    "2026-11-01T00:00:00",  # no timezone
    1765000000,  # a number: seconds? milliseconds? (RFC 3339 text only)
]


async def internal_usage(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    _, headers = signed("")
    answer = await http.get(f"/internal/v1/users/{user}/usage", headers=headers)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def assert_invalid(answer: httpx.Response) -> None:
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "invalid_request"


@pytest.mark.parametrize("moment", OUT_OF_RANGE)
async def test_a_plan_change_dated_outside_2000_to_2200_is_422_and_changes_nothing(
    client: httpx.AsyncClient, moment: str | int
) -> None:
    user = new_user()
    assert (await change_plan(client, user, "basic")).status_code == 200
    before = await internal_usage(client, user)
    now = datetime.now(UTC)
    month = (now - timedelta(days=1)).isoformat(), (now + timedelta(days=29)).isoformat()
    for fields in (
        {"occurred_at": moment},
        {"period_start": moment, "period_end": month[1]},
        {"period_start": month[0], "period_end": moment},
    ):
        assert_invalid(await change_plan(client, user, "pro", **fields))
    assert await internal_usage(client, user) == before


async def test_a_period_that_does_not_start_before_it_ends_is_422(client: httpx.AsyncClient) -> None:
    user = new_user()
    start = datetime.now(UTC).replace(microsecond=0)
    for end in (start, start - timedelta(days=30)):
        answer = await change_plan(
            client, user, "pro", period_start=start.isoformat(), period_end=end.isoformat()
        )
        assert_invalid(answer)
    assert (await internal_usage(client, user))["plan"] == "free"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 10**20},
        {"exp": 7_258_118_400},  # 2200-01-01: the first second out of range
        {"iat": 1},
        {"nbf": -(10**12)},
    ],
    ids=["exp 1e20", "exp 2200", "iat 1970", "nbf far past"],
)
async def test_a_token_with_times_outside_2000_to_2200_is_401(
    client: httpx.AsyncClient, claims: dict[str, int]
) -> None:
    now = int(datetime.now(UTC).timestamp())
    token = jwt.encode({"sub": new_user(), "exp": now + 600, **claims}, JWT_SECRET, algorithm="HS256")
    answer = await client.get("/v1/usage", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"].startswith("Bearer")


async def test_a_token_whose_subject_is_not_text_is_401_not_500(client: httpx.AsyncClient) -> None:
    """A lone surrogate in `sub` (JSON can say "\\ud800"; no UTF-8 holds it)."""
    now = int(datetime.now(UTC).timestamp())
    payload = json.dumps({"sub": "x\ud800", "exp": now + 600})
    token = jwt.api_jws.encode(payload.encode("utf-8", "surrogatepass"), JWT_SECRET, algorithm="HS256")
    answer = await client.get("/v1/usage", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401, answer.text


@pytest.mark.parametrize("raw", ["%FF%FE", "%ED%A0%80", "u%FF"])
async def test_a_user_id_in_a_path_that_is_not_utf8_is_422_and_changes_nothing(
    client: httpx.AsyncClient, raw: str
) -> None:
    """Bytes that are not UTF-8 decode to U+FFFD: two different paths would meet in one account."""
    body, headers = signed(json.dumps({"minutes": 3, "reason": "grant"}))
    assert_invalid(await client.post(f"/internal/v1/users/{raw}/credits", content=body, headers=headers))
    _, headers = signed("")
    assert_invalid(await client.get("/internal/v1/users/\ufffd\ufffd/usage", headers=headers))


async def test_a_user_whose_stored_times_are_out_of_range_is_503_and_the_shard_goes_on(
    server: RunningServer, client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    """Rows as an older version could write them: the plan event dated `-infinity`, an anchor in
    the year 1, and an open session. The user is refused with a reason; a user beside it on the
    same shard is served; after the shard is killed and restarted, its re-activation still loads
    and re-arms the other user's open session (it ends stale, billed to its last heartbeat)."""
    shards = server.settings.shards
    poisoned = new_user()
    neighbour = next(
        u
        for u in (new_user() for _ in range(1000))
        if shard_index(u, shards) == shard_index(poisoned, shards)
    )
    await database.execute(
        """
        insert into usage_users
            (user_id, plan, version, plan_event_at, plan_event_id, anchor_start, anchor_months)
        values ($1, 'basic', 7, '-infinity', 'old-delivery', '0001-01-01T00:00:00Z', 1)
        """,
        poisoned,
    )
    await database.execute(
        """
        insert into usage_sessions (id, user_id, started_at, last_heartbeat_at, used_ms, version)
        values (gen_random_uuid(), $1, now() - interval '1 minute', now() - interval '1 minute', 0, 7)
        """,
        poisoned,
    )
    refused = await client.get("/v1/usage", headers=auth(poisoned))
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "unavailable"
    assert "Retry-After" in refused.headers
    started = await client.post("/v1/sessions", json={}, headers=auth(neighbour))
    assert started.status_code == 201, started.text
    session_id = started.json()["session_id"]
    await asyncio.sleep(0.5)
    beat = await client.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=auth(neighbour))
    assert beat.status_code == 200
    await eventually(lambda: _written(database, session_id), timeout_s=5)

    handle = server.shard_handles()[shard_index(poisoned, shards)]
    pid = await handle.pid.remote()
    os.kill(pid, signal.SIGKILL)  # the restarted shard re-activates both users with open sessions

    async def ended_stale() -> bool:
        history = await client.get("/v1/sessions", headers=auth(neighbour))
        sessions = history.json().get("sessions", []) if history.status_code == 200 else []
        return bool(sessions) and sessions[0]["end_reason"] == "stale"

    await eventually(ended_stale, timeout_s=30, every_s=0.5)
    again = await client.get("/v1/usage", headers=auth(poisoned))
    assert again.status_code == 503 and again.json()["code"] == "unavailable", again.text
    assert (await client.get("/v1/usage", headers=auth(neighbour))).status_code == 200


async def _written(database: asyncpg.Connection, session_id: str) -> bool:
    row = await database.fetchrow(
        "select started_at, last_heartbeat_at from usage_sessions where id = $1::uuid", session_id
    )
    return row is not None and row["last_heartbeat_at"] > row["started_at"]
