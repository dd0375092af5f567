"""Write-behind: Postgres agrees with the API after a sync interval; warm checks cost no database call."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import ray

from actors.routing import shard_index
from tests.harness import SYNC_INTERVAL_S, RunningServer, auth, eventually, new_user


def shard_of(server: RunningServer, user_id: str) -> Any:
    handles = server.shard_handles()
    return handles[shard_index(user_id, len(handles))]


async def store_calls(server: RunningServer, user_id: str) -> dict[str, int]:
    stats = await shard_of(server, user_id).stats.remote()
    return dict(stats.store_calls)


async def test_credit_check_on_warm_user_makes_no_database_call(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = new_user()
    await client.post("/v1/sessions", headers=auth(user))  # loads and writes the user
    await client.get("/v1/usage", headers=auth(user))
    before = await store_calls(server, user)
    for _ in range(50):
        assert (await client.get("/v1/usage", headers=auth(user))).status_code == 200
    has_credits = await shard_of(server, user).has_credits.remote(user)
    assert has_credits is True
    after = await store_calls(server, user)
    # The flush loop may write other users meanwhile; a read makes no load, lookup or save of its own.
    assert after.get("load", 0) == before.get("load", 0)
    assert after.get("find_session", 0) == before.get("find_session", 0)
    assert after.get("list_sessions", 0) == before.get("list_sessions", 0)


async def test_postgres_agrees_with_the_api_after_one_sync_interval(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    for _ in range(3):
        await asyncio.sleep(0.6)
        await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    await asyncio.sleep(SYNC_INTERVAL_S * 2)

    period = await database.fetchrow(
        "select plan, minutes_used, minutes_limit, version, archived, period_start, period_end"
        " from usage_periods where user_id = $1",
        user,
    )
    session = await database.fetchrow(
        "select minutes_used, ended_at, last_heartbeat_at from usage_sessions where id = $1",
        uuid.UUID(session_id),
    )
    assert period is not None and session is not None
    assert period["plan"] == usage["plan"]
    assert period["minutes_used"] == Decimal(str(usage["minutes_used"]))
    assert period["minutes_limit"] == Decimal(str(usage["minutes_limit"]))
    assert period["version"] == usage["version"]
    assert period["archived"] is False
    assert period["period_start"] == datetime.fromisoformat(usage["period_start"])
    assert session["minutes_used"] == Decimal(str(usage["active_session"]["minutes_used"]))
    assert session["ended_at"] is None
    assert session["last_heartbeat_at"] == datetime.fromisoformat(
        usage["active_session"]["last_heartbeat_at"]
    )


async def test_restarted_shard_ends_a_silent_session_stale(
    client: httpx.AsyncClient, server: RunningServer, database: asyncpg.Connection
) -> None:
    """SIGKILL the shard hosting a session; Ray restarts it; it re-arms the alarm from Postgres."""
    user = new_user()
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    await asyncio.sleep(1.0)
    await client.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
    await asyncio.sleep(SYNC_INTERVAL_S * 2)  # the heartbeat is now in Postgres
    shard = shard_of(server, user)
    pid = await shard.pid.remote()
    ray.kill(shard, no_restart=False)  # the process dies at once, as with SIGKILL

    async def stale() -> bool:
        row = await database.fetchrow(
            "select end_reason from usage_sessions where id = $1", uuid.UUID(session_id)
        )
        return row is not None and row["end_reason"] == "stale"

    await eventually(stale, timeout_s=30)
    assert await shard.pid.remote() != pid, "Ray restarted the shard in a new process"
    row = await database.fetchrow(
        "select started_at, last_heartbeat_at, ended_at, used_ms from usage_sessions where id = $1",
        uuid.UUID(session_id),
    )
    assert row is not None
    assert row["ended_at"] == row["last_heartbeat_at"]
    assert row["used_ms"] == round((row["last_heartbeat_at"] - row["started_at"]).total_seconds() * 1000)
    history = (await client.get("/v1/sessions", headers=auth(user))).json()["sessions"]
    assert history[0]["end_reason"] == "stale"
