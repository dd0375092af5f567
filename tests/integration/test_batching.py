"""With `LEDGER_DATA_PLANE=ray`, hot calls from a gateway to a shard travel in Ray batches: each
answer still goes to its own caller, and errors stay with the call that raised them. (Batched calls
meeting a killed shard are retried: tests/reliability/test_crashes.py heartbeats through a SIGKILL.
The data plane, the default: tests/unit/gateway/test_channel.py, tests/reliability/test_channel.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

from tests.harness import RunningServer, ServerFactory, auth, change_plan, metric, new_user, samples, total


@pytest_asyncio.fixture(scope="module")
async def ray_plane(start_server: ServerFactory) -> RunningServer:
    return await start_server(data_plane="ray")


@pytest_asyncio.fixture
async def client(ray_plane: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with ray_plane.client() as http:
        yield http


async def _batches(http: httpx.AsyncClient) -> tuple[float, float]:
    """(batch calls, calls carried) so far, from ledger_shard_batch_size."""
    return (
        await metric(http, "ledger_shard_batch_size_count"),
        await metric(http, "ledger_shard_batch_size_sum"),
    )


async def test_concurrent_calls_share_batches_and_each_gets_its_own_answer(client: httpx.AsyncClient) -> None:
    users = [new_user() for _ in range(40)]
    plans = {user: ("pro" if i % 2 else "basic") for i, user in enumerate(users)}
    for user, plan in plans.items():
        assert (await change_plan(client, user, plan)).status_code == 200
    sessions = {}
    for user in users[:20]:
        started = await client.post("/v1/sessions", json={}, headers=auth(user))
        assert started.status_code == 201, started.text
        sessions[user] = started.json()["session_id"]
    before = await _batches(client)

    async def check(user: str) -> tuple[str, str]:
        usage = await client.get("/v1/usage", headers=auth(user))
        assert usage.status_code == 200, usage.text
        assert usage.json()["user_id"] == user
        return user, usage.json()["plan"]

    async def beat(user: str, session_id: str) -> int:
        return (
            await client.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=auth(user))
        ).status_code

    rounds = 5
    answers = await asyncio.gather(
        *(check(user) for _ in range(rounds) for user in users),
        *(beat(user, session_id) for user, session_id in sessions.items()),
        # A session id that is not the user's: 404 for this call alone, in the middle of batches.
        *(beat(users[30 + i], sessions[users[i]]) for i in range(5)),
    )
    checks = answers[: rounds * len(users)]
    assert all(plan == plans[user] for user, plan in checks), "every answer went to its own caller"
    beats = answers[rounds * len(users) :]
    assert beats == [200] * len(sessions) + [404] * 5
    calls_before, carried_before = before
    calls, carried = await _batches(client)
    batched = carried - carried_before
    assert batched >= rounds * len(users) + len(sessions) + 5
    assert calls - calls_before < batched, "some calls shared a batch"


async def _durable(http: httpx.AsyncClient) -> tuple[float, float]:
    """(durable writes, the transactions they took) so far, over every shard."""
    found = await samples(http)
    return total(found, "ledger_shard_durable_writes{"), total(found, "ledger_shard_durable_transactions{")


async def test_session_starts_and_ends_travel_in_batches_of_their_own(client: httpx.AsyncClient) -> None:
    """...and share transactions: the writes of one moment commit together (group commit)."""
    users = [new_user() for _ in range(30)]
    before = await _batches(client)
    writes_before, transactions_before = await _durable(client)

    async def start(user: str) -> tuple[int, str | None]:
        started = await client.post("/v1/sessions", json={}, headers=auth(user))
        return started.status_code, started.json().get("session_id")

    # Each user starts once, and the first five a second time at once: one of their two starts
    # gets 409 session_active, whatever batch it shared.
    answers = await asyncio.gather(*(start(user) for user in users), *(start(user) for user in users[:5]))
    sessions: dict[str, str] = {}
    for user, (status, session_id) in zip(users + users[:5], answers, strict=True):
        if status == 201:
            assert session_id is not None and user not in sessions
            sessions[user] = session_id
        else:
            assert status == 409
    assert set(sessions) == set(users) and len(set(sessions.values())) == len(users)

    async def end(user: str, session_id: str) -> tuple[int, str]:
        ended = await client.post(f"/v1/sessions/{session_id}/end", json={}, headers=auth(user))
        return ended.status_code, ended.json().get("session_id", "")

    ends = await asyncio.gather(
        *(end(user, session_id) for user, session_id in sessions.items()),
        # Another user's session: 404 for this call alone.
        end(users[0], sessions[users[1]]),
    )
    assert ends[:-1] == [(200, session_id) for session_id in sessions.values()]
    assert ends[-1][0] == 404
    for user in users[:3]:
        current = await client.get("/v1/sessions/current", headers=auth(user))
        assert current.status_code == 404, "the end was applied"
    calls_before, carried_before = before
    calls, carried = await _batches(client)
    assert carried - carried_before >= len(users) + 5 + len(users) + 1 + 3
    assert calls - calls_before < carried - carried_before, "some starts or ends shared a batch"
    writes, transactions = await _durable(client)
    assert writes - writes_before >= 2 * len(users), "a durable write per start and per end"
    assert transactions - transactions_before < writes - writes_before, "some writes shared a transaction"
