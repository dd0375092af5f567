"""`python -m bench.handoff`: how fast a resize hands users from one shard to another.

    .venv/bin/python -m bench.handoff                  # 20,000 users with open sessions
    .venv/bin/python -m bench.handoff --users 50000

Two real `LedgerShard`s in this process (no Ray: a handoff's cost is the shards' and Postgres's)
over a real Postgres (`LEDGER_BENCH_DATABASE_URL`, else an embedded server of its own), in a shard
map of their own. Shard 1 gets `--users` users, each with an open session and a heartbeat written
behind; then all its slots go to shard 0 (a resize from 2 shards to 1) as a resize moves them
(`gateway.resize.plan`: steps of 32 slots, each `release` on the giver, then `refresh_slots` on
the receiver with the users that have alarms). Prints one JSON object: users handed over per
second, and each step's duration (the time the users of its slots wait, at most), median and worst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from dataclasses import replace
from typing import Any

from actors.routing import owner_name
from actors.shard import LedgerShard, ShardConfig
from actors.store import LedgerStore
from bench.server import bench_database
from gateway.resize import plan
from gateway.runtime import load_plans, migrate_database, shard_configs
from gateway.settings import Settings
from persistence.database import PoolLimits
from persistence.shardmap import PostgresShardMaps
from persistence.store import PostgresStoreFactory

STARTS_AT_ONCE = 500


async def run(database_url: str, users: int) -> dict[str, Any]:
    settings = Settings(database_url=database_url, shards=2, log_level="warning")
    await migrate_database(database_url, settings)
    factory = PostgresStoreFactory(dsn=database_url, limits=PoolLimits(min_size=1, max_size=4))
    namespace = f"bench-handoff-{uuid.uuid4().hex[:8]}"
    gateway_store = await factory()
    maps = PostgresShardMaps(gateway_store._pool)
    start_map = await maps.create_map(namespace, 2)
    configs = shard_configs(settings, load_plans(settings), 2)
    shards = [_shard(config, factory, namespace) for config in configs]
    for shard in shards:
        await shard.start()
    # Shrinking to one shard moves every slot of shard 1 to shard 0: shard 1 gets the users.
    giver, taker = shards[1], shards[0]
    mine = [user for user in (f"handoff-{n}" for n in range(users * 3)) if start_map.shard_of(user) == 1]
    mine = mine[:users]
    began = time.perf_counter()
    for begin in range(0, len(mine), STARTS_AT_ONCE):
        part = mine[begin : begin + STARTS_AT_ONCE]
        started = await asyncio.gather(*(giver.start_session(user) for user in part))
        await asyncio.gather(
            *(giver.heartbeat(user, s.session_id) for user, s in zip(part, started, strict=True))
        )
    setup_s = time.perf_counter() - began
    steps = plan(start_map, 1)
    durations, handed = [], 0
    began = time.perf_counter()
    for step in steps:
        step_began = time.perf_counter()
        handoff = await giver.release(step.slots, step.to_shard)
        await taker.refresh_slots(list(handoff.alarmed or ()))
        durations.append(time.perf_counter() - step_began)
        handed += handoff.users
    moving_s = time.perf_counter() - began
    await asyncio.sleep(0.5)  # the receiver loads the users with alarms in the background
    resident = (await taker.stats()).resident_users
    for shard in shards:
        await shard.stop()
    await gateway_store.close()
    return {
        "users": len(mine),
        "users_handed_off": handed,
        "resident_on_receiver": resident,
        "steps": len(steps),
        "setup_s": round(setup_s, 2),
        "handoff_s": round(moving_s, 3),
        "users_per_s": round(handed / moving_s),
        "step_median_ms": round(statistics.median(durations) * 1000, 1),
        "step_max_ms": round(max(durations) * 1000, 1),
    }


def _shard(config: ShardConfig, factory: PostgresStoreFactory, namespace: str) -> LedgerShard:
    async def store() -> LedgerStore:
        return await factory()

    return LedgerShard(replace(config, owner=owner_name(namespace, config.shard_index)), store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    args = parser.parse_args()
    with bench_database() as database_url:
        print(json.dumps(asyncio.run(run(database_url, args.users))), flush=True)


if __name__ == "__main__":
    main()
