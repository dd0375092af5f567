"""One user's requests, however they interleave, cannot wedge the shard they share with others;
and a session the balance ends is billed to its client's last sign of life. Through real HTTP,
Ray and Postgres (the shard simulation, tests/simulation, explores the interleavings; these are
the two defects found from outside, as they were found)."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from actors.routing import shard_index
from tests.harness import RunningServer, auth, change_plan, eventually, new_user, sse_frames

# Liveness bounds, not speed claims: a livelocked shard answers nothing for the gateway's whole
# call timeout (12 s) and burns a core; a healthy one answers in milliseconds and idles.
ANSWER_WITHIN_S = 5.0
BYSTANDER_WAIT_MAX_S = 2.0
IDLE_CPU_SHARE_MAX = 0.25


def same_shard_user(user: str, shards: int) -> str:
    """Another user whose ledger lives on `user`'s shard."""
    while True:
        other = new_user()
        if shard_index(other, shards) == shard_index(user, shards):
            return other


async def shard_cpu_seconds(server: RunningServer, user: str) -> float:
    """CPU time (user + system) the process of `user`'s shard has used so far."""
    handle = server.shard_handles()[shard_index(user, server.settings.shards)]
    pid = await handle.pid.remote()
    stat = Path(f"/proc/{pid}/stat").read_text()  # noqa: ASYNC240 (a tiny procfs read)
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_two_streams_and_a_session_start_for_one_user_do_not_wedge_its_shard(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    """The livelock found from outside: a durable operation holding the user, two plain calls for
    the same user arriving meanwhile (here: two tabs' live streams waking on its change, and
    reads). Every request answers, the bystander on the same shard is answered throughout, and
    the shard is idle afterwards."""
    victim = new_user()
    bystander = same_shard_user(victim, server.settings.shards)
    assert (await client.get("/v1/usage", headers=auth(bystander))).status_code == 200
    waits: list[float] = []
    done = asyncio.Event()

    async def bystand() -> None:
        while not done.is_set():
            began = time.monotonic()
            response = await client.get("/v1/usage", headers=auth(bystander))
            waits.append(time.monotonic() - began)
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.005)

    seen: list[list[int]] = [[], []]

    async def tab(index: int) -> None:
        async with client.stream("GET", "/v1/usage/stream", headers=auth(victim)) as response:
            assert response.status_code == 200
            async for frame in sse_frames(response.aiter_lines()):
                if frame["event"] == "usage":
                    seen[index].append(frame["data"]["version"])

    async def tabs_saw(version: int | None = None) -> bool:
        return all(versions and (version is None or versions[-1] == version) for versions in seen)

    tabs = [asyncio.create_task(tab(index)) for index in range(2)]
    watcher = asyncio.create_task(bystand())
    await eventually(tabs_saw, timeout_s=10, every_s=0.05)
    for _round in range(10):
        answers = await asyncio.wait_for(
            asyncio.gather(
                client.post("/v1/sessions", json={}, headers=auth(victim)),
                client.get("/v1/usage", headers=auth(victim)),
                client.get("/v1/usage", headers=auth(victim)),
                client.get("/v1/credits", headers=auth(victim)),
            ),
            timeout=ANSWER_WITHIN_S,
        )
        assert [answer.status_code for answer in answers] == [201, 200, 200, 200], [a.text for a in answers]
        session_id = answers[0].json()["session_id"]
        beats = await asyncio.wait_for(
            asyncio.gather(
                client.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=auth(victim)),
                client.post(f"/v1/sessions/{session_id}/end", json={}, headers=auth(victim)),
                client.get("/v1/sessions/current", headers=auth(victim)),
            ),
            timeout=ANSWER_WITHIN_S,
        )
        assert beats[1].status_code == 200 and beats[1].json()["state"] == "ended", beats[1].text
    latest = (await client.get("/v1/usage", headers=auth(victim))).json()["version"]
    await eventually(lambda: tabs_saw(latest), timeout_s=5)
    done.set()
    await watcher
    for task in tabs:
        task.cancel()
    await asyncio.gather(*tabs, return_exceptions=True)

    assert max(waits) < BYSTANDER_WAIT_MAX_S, f"the bystander waited {max(waits):.3f} s"
    before = await shard_cpu_seconds(server, victim)
    await asyncio.sleep(2.0)
    used = await shard_cpu_seconds(server, victim) - before
    assert used < IDLE_CPU_SHARE_MAX * 2.0, f"the shard used {used:.2f} s of CPU in 2 idle seconds"
    print(
        f"bystander: {len(waits)} reads, slowest {max(waits) * 1000:.1f} ms; idle shard CPU {used:.3f} s/2 s"
    )


async def test_a_silent_client_is_billed_to_its_last_heartbeat_and_an_honest_one_to_the_limit(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    """The second defect found from outside: a client that went silent with less balance left than
    the stale timeout was billed to its limit. Both clients here beat every second for 5 s of the
    tiny plan's 6, then one goes silent and the other ends its session after the limit. The limit
    ends both at 6 s (the gate closes), the second since the last heartbeat is held, and only the
    client heard from after the end (within the stale timeout of its last heartbeat) pays it."""
    silent, honest = new_user(), new_user()
    started = {}
    # The honest client starts first, so its limit falls before the silent one's: once the silent
    # one's session has ended, so has the honest one's (started second, it could still be running
    # for the few milliseconds its start took, and its end would then be the client's own).
    for user in (honest, silent):
        assert (await change_plan(client, user, "tiny")).status_code == 200
        response = await client.post("/v1/sessions", json={}, headers=auth(user))
        assert response.status_code == 201, response.text
        started[user] = response.json()
    for _ in range(5):
        await asyncio.sleep(1.0)
        for user in (silent, honest):
            beat = await client.post(
                f"/v1/sessions/{started[user]['session_id']}/heartbeat", json={}, headers=auth(user)
            )
            assert beat.json()["state"] == "active", beat.text
    heard = {}
    for user in (silent, honest):  # the last heartbeat the server heard, as it says
        current = (await client.get("/v1/sessions/current", headers=auth(user))).json()
        heard[user] = datetime.fromisoformat(current["last_heartbeat_at"])

    async def limit_reached() -> bool:
        usage = (await client.get("/v1/usage", headers=auth(silent))).json()
        return usage["active_session"] is None

    await eventually(limit_reached, timeout_s=5, every_s=0.05)
    held = (await client.get("/v1/usage", headers=auth(silent))).json()
    assert held["minutes_remaining"] == 0 and held["warning"] == "exhausted"
    assert held["minutes_held"] > 0, held
    assert held["minutes_used"] + held["minutes_held"] == pytest.approx(0.1, abs=0.01)
    ended = await client.post(
        f"/v1/sessions/{started[honest]['session_id']}/end", json={}, headers=auth(honest)
    )
    assert ended.status_code == 200, ended.text
    assert ended.json()["end_reason"] == "limit_reached"
    assert ended.json()["session_minutes"] == 0.1, "the honest client pays exactly to the limit"

    async def released() -> bool:
        usage = (await client.get("/v1/usage", headers=auth(silent))).json()
        return bool(usage["minutes_held"] == 0)

    await eventually(released, timeout_s=10, every_s=0.1)
    history = (await client.get("/v1/sessions", headers=auth(silent))).json()["sessions"]
    assert history[0]["end_reason"] == "limit_reached"
    assert history[0]["minutes_used"] < 0.1, "the silent client pays to its last heartbeat"
    usage = (await client.get("/v1/usage", headers=auth(silent))).json()
    assert usage["minutes_remaining"] > 0 and usage["warning"] != "exhausted", "the held time came back"
    for user, expected in ((silent, "last heartbeat"), (honest, "limit")):
        row = await _resolved_row(database, started[user]["session_id"])  # a release is written behind
        assert row["ended_at"] - row["started_at"] == timedelta(seconds=6), "both ended at the limit"
        billed_to = row["started_at"] + timedelta(milliseconds=row["used_ms"])
        if expected == "last heartbeat":
            assert row["last_heartbeat_at"] == heard[user], "an alarm never overwrites the last heartbeat"
            assert billed_to == heard[user], "billed to its last sign of life"
        else:
            assert billed_to == row["ended_at"], "billed to the limit: it was heard from after it"


async def _resolved_row(database: asyncpg.Connection, session_id: str) -> asyncpg.Record:
    """The session's row once its held time is resolved in Postgres too."""
    deadline = time.monotonic() + 10
    while True:
        row = await database.fetchrow(
            "select started_at, last_heartbeat_at, ended_at, used_ms, pending from usage_sessions "
            "where id = $1::uuid",
            session_id,
        )
        if row is not None and row["pending"] is None:
            return row
        assert time.monotonic() < deadline, f"the held time of {session_id} was not resolved in Postgres"
        await asyncio.sleep(0.1)
