"""A whole server stopped and started again: nothing a client was told is lost."""

from __future__ import annotations

import asyncio
import uuid

import ray

from actors.hosting import kill_shards
from tests.harness import ServerFactory, auth, change_plan, new_user


async def test_usage_survives_a_server_restart(start_server: ServerFactory) -> None:
    namespace = f"restart-{uuid.uuid4().hex[:8]}"
    user = new_user()
    first = await start_server(namespace=namespace, shards=1, sync_interval_s=3600)
    async with first.client() as http:
        await change_plan(http, user, "basic")
        session_id = (await http.post("/v1/sessions", json={"topic": "restart"}, headers=auth(user))).json()[
            "session_id"
        ]
        await asyncio.sleep(1.2)
        beat = (await http.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))).json()
        before = (await http.get("/v1/usage", headers=auth(user))).json()
    # A sync interval of an hour: only the shutdown flush can have written the heartbeat.
    handles = first.shard_handles()
    await first.stop()
    await asyncio.to_thread(kill_shards, handles)
    await asyncio.sleep(0.5)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]

    second = await start_server(namespace=namespace, shards=1)
    async with second.client() as http:
        after = (await http.get("/v1/usage", headers=auth(user))).json()
        assert after["plan"] == "basic"
        assert after["minutes_used"] == before["minutes_used"] == beat["minutes_used"] > 0
        assert after["version"] > before["version"], "versions only grow, across restarts too"
        assert after["active_session"]["session_id"] == session_id
        ended = await http.post(f"/v1/sessions/{session_id}/end", headers=auth(user))
        assert ended.status_code == 200 and ended.json()["end_reason"] == "user_ended"
    await second.stop()
