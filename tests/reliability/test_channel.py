"""The data plane when its shard dies: real Ray, real Postgres, real HTTP.

A shard SIGKILLed while a burst of calls is on its connection: each caller gets its answer or a
clean 503, a durable write that was acknowledged is in Postgres, and nothing is applied twice (a
hold create without a key is not retried once sent). Then the gateway reconnects to the restarted
activation (a new epoch) by itself, on the next call. (The refusals, a wrong secret, a stale epoch,
a frame too large: tests/unit/gateway/test_channel.py.)"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import uuid

import asyncpg

from tests.harness import ServerFactory, auth, new_user
from tests.reliability.test_crashes import KILL_STALE_SESSION_S, shard_pid

USERS = 12
CREATES_PER_USER = 8


async def test_a_shard_killed_mid_burst_answers_or_503s_each_call_and_applies_nothing_twice(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    server = await start_server(
        namespace=f"channel-{uuid.uuid4().hex[:8]}", shards=1, stale_session_s=KILL_STALE_SESSION_S
    )
    users = [new_user() for _ in range(USERS)]
    statuses: collections.Counter[int] = collections.Counter()
    acknowledged: list[str] = []  # references of the holds the clients were told were made
    async with server.client() as http:
        for user in users:
            assert (await http.get("/v1/usage", headers=auth(user))).status_code == 200
        channel = server.runtime.router.channels[0]
        first_epoch = channel.epoch
        assert first_epoch is not None, "the checks went over the data plane"
        handle = server.shard_handles()[0]
        pid = await shard_pid(handle)
        assert pid is not None

        async def create(user: str, reference: str) -> None:
            answer = await http.post(
                "/v1/holds", json={"minutes": 0.01, "reference": reference}, headers=auth(user)
            )
            statuses[answer.status_code] += 1
            assert answer.status_code in (201, 503), answer.text
            if answer.status_code == 201:
                assert answer.json()["reference"] == reference
                acknowledged.append(reference)
            else:
                assert answer.json()["code"] == "unavailable"

        async def check(user: str) -> None:
            answer = await http.get("/v1/usage", headers=auth(user))
            statuses[answer.status_code] += 1
            assert answer.status_code in (200, 503), answer.text

        async def kill_in_the_middle() -> None:
            await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)

        await asyncio.gather(
            *(
                call
                for user in users
                for n in range(CREATES_PER_USER)
                for call in (create(user, f"{user}-{n}"), check(user))
            ),
            kill_in_the_middle(),
        )
        assert sum(statuses.values()) == 2 * USERS * CREATES_PER_USER

        # The next call reconnects to the restarted activation (Ray restarted it; a new epoch).
        async def served(user: str) -> int:
            return (await http.get("/v1/usage", headers=auth(user))).status_code

        for user in users:
            assert await served(user) == 200
        assert channel.epoch is not None and channel.epoch > first_epoch
        assert channel.connects >= 2
        assert (await shard_pid(handle)) not in (None, pid)

        # Every acknowledged hold is stored; none is stored twice.
        rows = await database.fetch(
            "select reference from usage_holds where user_id = any($1::text[])", users
        )
        stored = collections.Counter(row["reference"] for row in rows)
        assert not [reference for reference, times in stored.items() if times > 1], "applied twice"
        assert set(acknowledged) <= set(stored), "an acknowledged hold was lost"
        # And what the restarted shard holds in memory agrees with what it was told.
        for user in users:
            listed = await http.get("/v1/holds", headers=auth(user))
            assert listed.status_code == 200
            held = {hold["reference"] for hold in listed.json()["holds"]}
            assert {r for r in acknowledged if r.startswith(f"{user}-")} <= held
        new_epoch = channel.epoch
    await server.stop()
    print(
        f"shard SIGKILL mid-burst: answers {dict(statuses)}; {len(acknowledged)} holds acknowledged, "
        f"{sum(stored.values())} stored; epoch {first_epoch} -> {new_epoch}"
    )


async def test_a_gateway_reconnects_by_itself_after_a_shard_restart(start_server: ServerFactory) -> None:
    server = await start_server(namespace=f"channel-{uuid.uuid4().hex[:8]}", shards=1)
    user = new_user()
    async with server.client() as http:
        started = await http.post("/v1/sessions", json={}, headers=auth(user))
        assert started.status_code == 201, started.text
        session_id = started.json()["session_id"]
        channel = server.runtime.router.channels[0]
        epoch = channel.epoch
        handle = server.shard_handles()[0]
        pid = await shard_pid(handle)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # A heartbeat may be repeated: it is retried until the restarted shard answers it.
        beat = await http.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=auth(user))
        assert beat.status_code == 200, beat.text
        assert beat.json()["state"] == "active"
        assert channel.epoch is not None and epoch is not None and channel.epoch > epoch
        stats = await handle.channel_stats.remote()
        assert stats["connections"] >= 1 and stats["calls"] >= 1
    await server.stop()


async def test_checks_travel_on_the_data_plane(start_server: ServerFactory) -> None:
    """Each check is one call the shard's channel answered (not a Ray call)."""
    server = await start_server(namespace=f"channel-{uuid.uuid4().hex[:8]}", shards=1)
    user = new_user()
    async with server.client() as http:
        handle = server.shard_handles()[0]
        assert (await http.get("/v1/usage", headers=auth(user))).status_code == 200
        before = (await handle.channel_stats.remote())["calls"]
        answers = await asyncio.gather(*(http.get("/v1/usage", headers=auth(user)) for _ in range(20)))
        assert [answer.status_code for answer in answers] == [200] * 20
        assert (await handle.channel_stats.remote())["calls"] - before == 20
    await server.stop()
