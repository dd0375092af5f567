"""Resizing the shards while serving (`POST /internal/v1/shards`), over real Ray and Postgres.

Users heartbeat and hold throughout a 2 -> 4 -> 3 resize: every answer is a 200
(or a 503 the client retries), every session is billed once for the time it
ran, every hold is captured once, the store ends with each slot owned by one
shard, and the new count outlives a restart whatever `LEDGER_SHARDS` says.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
import httpx

from actors.routing import SLOTS
from tests.harness import RunningServer, ServerFactory, auth, new_user, signed

USERS = 12
BEAT_EVERY_S = 0.2


async def _map(http: httpx.AsyncClient) -> dict[str, Any]:
    content, headers = signed("")
    answer = await http.request("GET", "/internal/v1/shards", content=content, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def _resize(http: httpx.AsyncClient, count: int) -> dict[str, Any]:
    content, headers = signed({"count": count})
    answer = await http.post("/internal/v1/shards", content=content, headers=headers)
    assert answer.status_code == 202, answer.text
    assert answer.json()["moving"] is True
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        found = await _map(http)
        assert found["error"] is None, found
        if not found["moving"]:
            return found
    raise AssertionError(f"the resize to {count} did not finish within 120 s")


async def _retrying(call: Any, statuses: Counter[int]) -> httpx.Response:
    """A client's call: a 503 is retried (as the Python client does), and counted."""
    for _ in range(20):
        answer: httpx.Response = await call()
        statuses[answer.status_code] += 1
        if answer.status_code != 503:
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError("503 twenty times in a row")


async def test_a_resize_while_sessions_heartbeat_and_holds_are_open_moves_nobody_twice(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    namespace = f"test-resize-{uuid.uuid4().hex[:8]}"
    server = await start_server(namespace=namespace, shards=2)
    users = [new_user() for _ in range(USERS)]
    statuses: Counter[int] = Counter()
    async with server.client() as http:
        assert (await _map(http))["count"] == 2
        sessions: dict[str, str] = {}
        holds: dict[str, str] = {}
        for user in users:
            started = await http.post("/v1/sessions", json={}, headers=auth(user))
            assert started.status_code == 201, started.text
            sessions[user] = started.json()["session_id"]
            held = await http.post("/v1/holds", json={"minutes": 0.5, "ttl_s": 600}, headers=auth(user))
            assert held.status_code == 201, held.text
            holds[user] = held.json()["hold_id"]
        began = time.monotonic()
        beating = True

        async def beat(user: str) -> None:
            while beating:
                answer = await _retrying(
                    lambda: http.post(
                        f"/v1/sessions/{sessions[user]}/heartbeat", json={}, headers=auth(user)
                    ),
                    statuses,
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["state"] == "active", answer.text
                await asyncio.sleep(BEAT_EVERY_S)

        beaters = [asyncio.create_task(beat(user)) for user in users]
        grown = await _resize(http, 4)
        assert grown["count"] == 4 and [s["slots"] for s in grown["shards"]] == [SLOTS // 4] * 4
        assert sum(s["users_handed_off"] for s in grown["shards"]) >= USERS // 4, grown  # ~half moved
        shrunk = await _resize(http, 3)
        assert shrunk["count"] == 3 and sorted(s["slots"] for s in shrunk["shards"]) == [341, 341, 342]
        beating = False
        await asyncio.gather(*beaters)
        ran_s = time.monotonic() - began

        for user in users:
            ended = await _retrying(
                lambda user=user: http.post(
                    f"/v1/sessions/{sessions[user]}/end", json={}, headers=auth(user)
                ),
                statuses,
            )
            assert ended.status_code == 200, ended.text
            minutes = ended.json()["session_minutes"]
            # Billed once, for the time it ran (to the last heartbeat or the end), not twice.
            assert ran_s / 60 - 0.02 <= minutes <= ran_s / 60 + 0.1, (minutes, ran_s)
            captured = await _retrying(
                lambda user=user: http.post(f"/v1/holds/{holds[user]}/capture", json={}, headers=auth(user)),
                statuses,
            )
            assert captured.status_code == 200, captured.text
            assert captured.json()["state"] == "captured"
            again = await http.post(
                f"/v1/holds/{holds[user]}/capture", json={"amount": 0.1}, headers=auth(user)
            )
            assert again.status_code == 409, again.text  # resolved once: a different capture is refused

    answered = sum(statuses.values())
    assert statuses[503] <= 0.02 * answered, statuses
    assert set(statuses) <= {200, 503}, statuses

    # In the store: each slot has one owner, sessions ended once with what they were told.
    rows = await database.fetch(
        "select shard, slots from shard_activations where namespace = $1 and slots is not null", namespace
    )
    owned = [slot for row in rows for slot in row["slots"]]
    assert sorted(owned) == list(range(SLOTS))
    open_sessions = await database.fetchval(
        "select count(*) from usage_sessions where user_id = any($1) and ended_at is null", users
    )
    assert open_sessions == 0

    # The count is the cluster's now: a gateway started with LEDGER_SHARDS=2 serves 3 shards.
    await server.stop()
    again = await start_server(namespace=namespace, shards=2)
    async with again.client() as http:
        found = await _map(http)
        assert found["count"] == 3 and len(found["shards"]) == 3
        usage = await http.get("/v1/usage", headers=auth(users[0]))
        assert usage.status_code == 200


async def test_a_resize_is_refused_with_a_clear_error_when_the_count_is_impossible(
    server: RunningServer,
) -> None:
    async with server.client() as http:
        for count in (0, server.settings.shards_max + 1, SLOTS + 1, "four"):
            content, headers = signed({"count": count})
            answer = await http.post("/internal/v1/shards", content=content, headers=headers)
            assert answer.status_code == 422, answer.text
            assert answer.json()["code"] == "invalid_request"
        assert (await _map(http))["moving"] is False
