"""/metrics after a real session (real Ray, Postgres, HTTP): the series ops dashboards and alerts
are built on exist, are labelled as documented, and moved by what the session did."""

from __future__ import annotations

import asyncio
from typing import get_args

import httpx

from actors.ledger import AlarmKind
from tests.harness import STALE_SESSION_S, RunningServer, auth, eventually, new_user, samples, total


async def test_a_session_moves_correctly_labelled_series(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user = new_user()
    before = await samples(client)
    started = await client.post("/v1/sessions", json={"topic": "metrics"}, headers=auth(user))
    assert started.status_code == 201, started.text
    session_id = started.json()["session_id"]
    heartbeat = f"/v1/sessions/{session_id}/heartbeat"
    assert (await client.post(heartbeat, json={"seq": 1}, headers=auth(user))).status_code == 200
    during = await samples(client)
    assert total(during, "ledger_shard_active_sessions{") >= 1
    assert total(during, "ledger_shard_resident_users{") >= 1
    assert total(during, "ledger_shard_activations{") > total(before, "ledger_shard_activations{")
    assert (await client.post(f"/v1/sessions/{session_id}/end", headers=auth(user))).status_code == 200
    ended = await client.post(heartbeat, json={"seq": 2}, headers=auth(user))
    assert ended.status_code == 409

    after = await samples(client)

    def moved(name: str, by: float = 1) -> None:
        assert after.get(name, 0) - before.get(name, 0) >= by, name

    moved('ledger_http_requests_total{method="POST",route="/v1/sessions",status="201"}')
    moved(
        'ledger_http_requests_total{method="POST",route="/v1/sessions/{session_id}/heartbeat",status="200"}'
    )
    moved(
        'ledger_http_requests_total{method="POST",route="/v1/sessions/{session_id}/heartbeat",status="409"}'
    )
    moved('ledger_http_requests_total{method="POST",route="/v1/sessions/{session_id}/end",status="200"}')
    moved('ledger_http_request_duration_seconds_count{method="POST",route="/v1/sessions"}')
    moved('ledger_shard_call_duration_seconds_count{method="start_session",outcome="ok"}')
    moved('ledger_shard_call_duration_seconds_count{method="heartbeat",outcome="session_ended"}')
    moved('ledger_http_errors_total{code="session_ended"}')
    assert total(after, "ledger_shard_durable_writes{") - total(before, "ledger_shard_durable_writes{") >= 2
    # Shard figures are labelled by shard, one label set per shard.
    shards = server.settings.shards
    assert sum(name.startswith("ledger_shard_dirty_users{") for name in after) == shards
    # Every alarm kind, fired or not (0): a restarted shard's figures replace its old process's.
    kinds = len(get_args(AlarmKind))
    assert sum(name.startswith("ledger_shard_alarms_fired_by_kind{") for name in after) == kinds * shards
    assert sum(name.startswith("ledger_shard_holds_by_outcome{") for name in after) == 5 * shards

    async def flushed_everywhere() -> bool:  # a shard reports its flush figures once it has flushed
        found = await samples(client)
        flushes = [name for name in found if name.startswith("ledger_shard_last_flush_duration_seconds{")]
        return (
            sum(name.startswith("ledger_shard_flush_lag_seconds{") for name in found)
            == len(flushes)
            == shards
        )

    await eventually(flushed_everywhere, timeout_s=10)


def stale_alarms(found: dict[str, float]) -> float:
    return sum(
        value
        for name, value in found.items()
        if name.startswith("ledger_shard_alarms_fired_by_kind{") and 'kind="stale"' in name
    )


async def test_a_stale_session_shows_in_the_alarms_by_kind(client: httpx.AsyncClient) -> None:
    user = new_user()
    before = stale_alarms(await samples(client))
    started = await client.post("/v1/sessions", json={}, headers=auth(user))
    assert started.status_code == 201, started.text
    await asyncio.sleep(STALE_SESSION_S)

    async def fired() -> bool:
        return stale_alarms(await samples(client)) > before

    await eventually(fired, timeout_s=10)
