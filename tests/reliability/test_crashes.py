"""Crashes and outages under load lose nothing a client was told succeeded.

Real Ray, real Postgres, real HTTP. Each test records what clients were told in
a `GroundTruth` while it injects its fault, then checks `assert_nothing_lost`
and prints the figures it checked."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from persistence.embedded import EmbeddedPostgres, ensure_database
from tests.harness import RunningServer, ServerFactory, auth, eventually, new_user, signed
from tests.reliability.load import SessionLoad
from tests.reliability.truth import assert_nothing_lost

USERS = 16
# The kill tests are not about staleness: a shard restart on a loaded 2-core machine can outlast
# the harness's 4 s stale timeout, and then a session whose client never stopped heartbeating
# rightly ends `stale` at its last flushed heartbeat. Production's default is 600 s.
KILL_STALE_SESSION_S = 60.0


async def shard_pid(handle: Any) -> int | None:
    try:
        return int(await asyncio.wait_for(handle.pid.remote(), timeout=2))
    except Exception:  # dead or restarting
        return None


async def kill_shard(server: RunningServer, index: int, load: SessionLoad) -> float:
    """SIGKILL shard `index`'s process; return the seconds until Ray has it answering again."""
    handle = server.shard_handles()[index]
    pid = await shard_pid(handle)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    load.truth.faults.append(f"SIGKILL shard {index} (pid {pid}) under {len(load.users)} heartbeating users")

    async def restarted() -> bool:
        return (await shard_pid(handle)) not in (None, pid)

    await eventually(restarted, timeout_s=60)
    return round(time.monotonic() - killed_at, 2)


async def test_a_shard_killed_under_load_loses_nothing(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    server = await start_server(
        namespace=f"kill-{uuid.uuid4().hex[:8]}", shards=2, stale_session_s=KILL_STALE_SESSION_S
    )
    async with server.client() as http:
        load = SessionLoad(http, [new_user() for _ in range(USERS)])
        await load.begin()
        await asyncio.sleep(2.0)
        back_after_s = await kill_shard(server, 0, load)
        await asyncio.sleep(2.0)  # heartbeats go on against the restarted shard
        await load.end()
        figures = await assert_nothing_lost(
            database, http, load.truth, sync_interval_s=server.settings.sync_interval_s
        )
    await server.stop()
    print(f"shard SIGKILL: back after {back_after_s} s; answers {dict(load.statuses)}; {figures}")


@pytest.mark.soak
async def test_soak_shards_killed_again_and_again(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    """`LEDGER_SOAK_S` (default 300) seconds of load with a random shard SIGKILLed every 10 s."""
    duration_s = float(os.environ.get("LEDGER_SOAK_S", "300"))
    rng = random.Random(duration_s)
    server = await start_server(
        namespace=f"soak-{uuid.uuid4().hex[:8]}", shards=4, stale_session_s=KILL_STALE_SESSION_S
    )
    async with server.client() as http:
        load = SessionLoad(http, [new_user() for _ in range(4 * USERS)])
        await load.begin()
        recoveries = []
        ends_at = time.monotonic() + duration_s
        while time.monotonic() < ends_at:
            await asyncio.sleep(10)
            recoveries.append(await kill_shard(server, rng.randrange(4), load))
        await load.end()
        figures = await assert_nothing_lost(
            database, http, load.truth, sync_interval_s=server.settings.sync_interval_s
        )
    await server.stop()
    figures["faults"] = len(figures["faults"])
    print(f"soak: {len(recoveries)} kills, back after max {max(recoveries, default=0)} s; {figures}")


async def test_postgres_down_for_ten_seconds_under_load(start_server: ServerFactory, tmp_path: Path) -> None:
    """Checks and heartbeats answer from memory; durable operations get 503 and change nothing;
    the write-behind catches up when Postgres is back."""
    postgres = EmbeddedPostgres(tmp_path / "pg" / "data")
    admin_dsn = await asyncio.to_thread(postgres.start)
    await ensure_database(admin_dsn, "outage")
    dsn = postgres.dsn("outage")
    server = await start_server(database_url=dsn, shards=2)
    try:
        async with server.client() as http:
            # Heartbeats must keep answering from memory: no 503 allowed.
            load = SessionLoad(http, [new_user() for _ in range(USERS)], fault_statuses=frozenset())
            await load.begin()
            await asyncio.sleep(1.5)
            await asyncio.to_thread(postgres.stop)
            down_at = time.monotonic()
            load.truth.faults.append(f"Postgres stopped for 10 s under {USERS} heartbeating users")
            refused = await durable_operations_are_refused(http, load.users[0])
            reads = 0
            while time.monotonic() - down_at < 10:
                for user in load.users:
                    usage = await http.get("/v1/usage", headers=auth(user))
                    assert usage.status_code == 200, usage.text
                    assert usage.json()["active_session"] is not None
                    reads += 1
                await asyncio.sleep(0.5)
            assert await asyncio.to_thread(postgres.start) == admin_dsn
            back_at = datetime.now(UTC)
            load.truth.faults.append(f"{reads} credit checks answered from memory during the outage")
            database = await asyncpg.connect(dsn)
            try:

                async def caught_up() -> bool:
                    written = await database.fetchval(
                        "select count(*) from usage_sessions"
                        " where user_id = any($1::text[]) and updated_at > $2",
                        load.users,
                        back_at,
                    )
                    return bool(written == len(load.users))

                await eventually(caught_up, timeout_s=60)
                caught_up_after_s = round(time.monotonic() - down_at, 2)
                await load.end()
                await nothing_changed_by_refused(database, refused)
                figures = await assert_nothing_lost(
                    database, http, load.truth, sync_interval_s=server.settings.sync_interval_s
                )
            finally:
                await database.close()
    finally:
        await server.stop()
        await asyncio.to_thread(postgres.stop)
    print(
        f"Postgres outage: written again {caught_up_after_s} s after it went down; "
        f"answers {dict(load.statuses)}; refused {sorted(refused)}; {figures}"
    )


async def durable_operations_are_refused(http: httpx.AsyncClient, user: str) -> dict[str, str]:
    """With Postgres down: a start, a plan change and a purchase are 503 `unavailable`."""
    newcomer = new_user()
    refused: dict[str, str] = {"newcomer": newcomer, "user": user}
    start = await http.post("/v1/sessions", json={}, headers=auth(newcomer))
    plan_body, plan_headers = signed(
        {"plan": "pro", "action": "upgrade", "occurred_at": datetime.now(UTC).isoformat()}
    )
    plan = await http.post(f"/internal/v1/users/{user}/plan", content=plan_body, headers=plan_headers)
    buy_body, buy_headers = signed({"minutes": 7, "reason": "purchase", "reference": "during-outage"})
    buy = await http.post(f"/internal/v1/users/{user}/credits", content=buy_body, headers=buy_headers)
    for name, answer in (("start", start), ("plan", plan), ("purchase", buy)):
        assert answer.status_code == 503, (name, answer.text)
        assert answer.json()["code"] == "unavailable" and "retry-after" in answer.headers
    refused["plan_delivery"] = plan_headers["webhook-id"]
    refused["purchase_delivery"] = buy_headers["webhook-id"]
    return refused


async def nothing_changed_by_refused(database: asyncpg.Connection, refused: dict[str, str]) -> None:
    assert (
        await database.fetchval("select count(*) from usage_sessions where user_id = $1", refused["newcomer"])
        == 0
    )
    assert (
        await database.fetchval("select plan from usage_users where user_id = $1", refused["user"]) == "free"
    )
    for table in ("plan_events", "credit_purchases"):
        found = await database.fetchval(
            f"select count(*) from {table} where delivery_id = any($1::text[])",
            [refused["plan_delivery"], refused["purchase_delivery"]],
        )
        assert found == 0, f"a refused delivery was recorded in {table}"
