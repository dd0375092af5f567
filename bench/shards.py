"""Shard-level scenarios: what HTTP cannot reach in minutes (a million resident users, a flush of
100,000 dirty ones, a shard restart with 100,000 open sessions, one Ray actor per user).

The benchmark process is the Ray driver: it starts a local Ray, creates the real shard actors
(`actors.hosting`, the same class and options `usage-ledger serve` uses) on a real Postgres, and
calls them directly over the data plane (`gateway.channel`), as a gateway does. Users with open
sessions are written through the real domain and store (`UserLedger` snapshots saved by
`PostgresStore.save`, the flush's own path), so their rows are what a server would have written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray

from actors.hosting import get_or_create_shards, kill_shards
from actors.ledger import UserLedger
from actors.routing import shard_index
from actors.times import wall_clock_ms
from gateway.channel import ShardChannel
from gateway.metrics import Metrics
from gateway.runtime import load_plans, migrate_database, shard_configs
from gateway.settings import Settings
from persistence.store import PostgresStoreFactory

# Calls in flight per shard while filling shards over the data plane (below the shard's
# pending-call bound); a gateway's calls of one moment leave in one write, as here.
FILL_IN_FLIGHT = 1_000
SAVE_BATCH = 5_000

# Heartbeats are rate limited per plan; these users' plan is not (nor are their sessions stale
# during the run), so the figures are the shard's, not the limiter's.
PLANS_TOML = """
default_plan = "bench"
[plans.bench]
minutes = 100000
"""


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class ShardCluster:
    """A local Ray with the real shard actors on `database_url`."""

    def __init__(self, database_url: str, shards: int, workdir: Path) -> None:
        plans_file = workdir / "plans.toml"
        plans_file.write_text(PLANS_TOML)
        self.settings = Settings(
            database_url=database_url,
            shards=shards,
            plans_file=plans_file,
            ray_namespace=f"bench-{uuid.uuid4().hex[:8]}",
            sync_interval_s=3_600,  # flushes happen when the benchmark asks
            stale_session_s=3_600,
            log_level="warning",
        )
        self.database_url = database_url
        self.configs = shard_configs(self.settings, load_plans(self.settings))
        self.handles: list[Any] = []

    @property
    def policy(self) -> Any:
        return self.configs[0].policy

    def create(self) -> None:
        self.handles = get_or_create_shards(
            namespace=self.settings.ray_namespace,
            configs=self.configs,
            store_factory=PostgresStoreFactory(dsn=self.database_url),
            log_format="console",
            log_level="warning",
        )

    def of(self, user_id: str) -> Any:
        return self.handles[shard_index(user_id, len(self.handles))]

    def split(self, users: Sequence[str]) -> list[list[str]]:
        per_shard: list[list[str]] = [[] for _ in self.handles]
        for user in users:
            per_shard[shard_index(user, len(self.handles))].append(user)
        return per_shard

    async def ready(self) -> None:
        await self.ready_all(self.handles)

    @staticmethod
    async def ready_all(handles: Sequence[Any], timeout_s: float = 300) -> None:
        """Until every shard has started (`ready` gives up after a bounded wait: ask again)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                await asyncio.gather(*(handle.ready.remote() for handle in handles))
                return
            except ray.exceptions.RayError:
                if time.perf_counter() > deadline:
                    raise

    @staticmethod
    async def reactivated_all(handles: Sequence[Any], timeout_s: float = 300) -> None:
        """Until every shard has loaded all its users with open sessions (it serves meanwhile)."""
        await ShardCluster.ready_all(handles, timeout_s)
        deadline = time.perf_counter() + timeout_s
        while any(stats.reactivating for stats in await asyncio.gather(*(h.stats.remote() for h in handles))):
            if time.perf_counter() > deadline:
                raise TimeoutError("the shards did not finish re-activating")
            await asyncio.sleep(0.02)

    async def rss_bytes(self) -> int:
        pids = await asyncio.gather(*(handle.pid.remote() for handle in self.handles))
        return sum(_rss_bytes(pid) for pid in pids)

    async def call_each(
        self, method: str, users: Sequence[str], args: Callable[[str], tuple[Any, ...]] = lambda user: (user,)
    ) -> int:
        """`method(*args(user))` for every user, over the data plane as a gateway sends them (one
        connection per shard, up to `FILL_IN_FLIGHT` calls in flight on each); returns the ones
        that succeeded (a failure is reported, not raised)."""
        succeeded = 0
        failures: list[BaseException] = []
        metrics = Metrics()
        node_id = ray.get_runtime_context().get_node_id()

        async def shard_part(handle: Any, mine: list[str]) -> None:
            nonlocal succeeded
            channel = ShardChannel(handle.channel.remote, metrics, node_id=node_id)
            todo = iter(mine)

            async def caller() -> None:
                nonlocal succeeded
                for user in todo:
                    try:
                        await channel.call(method, args(user), {})
                        succeeded += 1
                    except Exception as exc:
                        failures.append(exc)

            try:
                await asyncio.gather(*(caller() for _ in range(FILL_IN_FLIGHT)))
            finally:
                channel.close()

        await asyncio.gather(
            *(shard_part(h, mine) for h, mine in zip(self.handles, self.split(users), strict=True))
        )
        if failures:
            print(f"    {len(failures)} {method} calls failed, the first: {failures[0]!r}", flush=True)
        return succeeded

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(h.stop.remote() for h in self.handles)), 120)
        kill_shards(self.handles)


@contextlib.contextmanager
def shard_cluster(database_url: str, shards: int) -> Iterator[ShardCluster]:
    """A migrated database and a local Ray this process owns (shut down on exit)."""
    with tempfile.TemporaryDirectory(prefix="ledger-bench-shards-") as workdir:
        cluster = ShardCluster(database_url, shards, Path(workdir))
        asyncio.run(migrate_database(database_url, cluster.settings))
        ray.init(
            address="local",
            namespace=cluster.settings.ray_namespace,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        try:
            yield cluster
        finally:
            ray.shutdown()


async def _save_open_sessions(cluster: ShardCluster, users: Sequence[str]) -> tuple[dict[str, str], float]:
    """Write `users` with one open session each, through the domain and the store; returns each
    user's session id, and the users written per second."""
    store = await PostgresStoreFactory(dsn=cluster.database_url)()
    sessions: dict[str, str] = {}
    began = time.perf_counter()
    try:
        for begin in range(0, len(users), SAVE_BATCH):
            now = wall_clock_ms()
            snapshots = []
            for user in users[begin : begin + SAVE_BATCH]:
                ledger = UserLedger.new(user, cluster.policy, now)
                sessions[user] = str(uuid.uuid4())
                ledger.start_session(now, sessions[user], topic="bench", difficulty=None)
                snapshots.append(ledger.snapshot())
            await store.save(snapshots)
    finally:
        await store.close()
    return sessions, len(users) / (time.perf_counter() - began)


MEMORY_USERS_FULL = (10_000, 100_000, 1_000_000)
MEMORY_USERS_SHORT = (10_000, 100_000)


def scenario_memory(database_url: str, short: bool, shards: int) -> dict[str, Any]:
    """Resident memory per idle user: the shard processes' RSS grown by making N new users resident
    (one usage read each, over the data plane as a gateway sends them, then idle), divided by N."""
    rows = []
    for count in MEMORY_USERS_SHORT if short else MEMORY_USERS_FULL:
        with shard_cluster(database_url, shards) as cluster:

            async def fill(cluster: ShardCluster = cluster, count: int = count) -> dict[str, Any]:
                cluster.create()
                await cluster.ready()
                await asyncio.sleep(1)
                before = await cluster.rss_bytes()
                users = [f"idle-{uuid.uuid4().hex[:12]}" for _ in range(count)]
                began = time.perf_counter()
                resident = await cluster.call_each("usage_of", users)
                filled_s = time.perf_counter() - began
                await asyncio.sleep(1)
                after = await cluster.rss_bytes()
                await cluster.stop()
                return {
                    "users": count,
                    "resident": resident,
                    "activations_per_s": round(resident / filled_s),
                    "shard_rss_before_mb": round(before / 2**20, 1),
                    "shard_rss_after_mb": round(after / 2**20, 1),
                    "bytes_per_user": round((after - before) / max(1, resident)),
                }

            row = asyncio.run(fill())
        rows.append(row)
        print(
            f"  {count} users: {row['resident']} resident ({row['activations_per_s']}/s), shard RSS "
            f"{row['shard_rss_before_mb']} -> {row['shard_rss_after_mb']} MB, "
            f"{row['bytes_per_user']} bytes per user",
            flush=True,
        )
    return {"users": max(row["users"] for row in rows), "rows": rows}


RESTART_USERS_FULL = 100_000
RESTART_USERS_SHORT = 20_000


async def _crash_and_time_recovery(handle: Any, user: str, timeout_s: float = 120) -> tuple[float, float]:
    """SIGKILL the shard's process; then, once Ray has restarted it, seconds until it answered a
    usage read for `user`, and until it had every open session re-activated."""
    old_pid = await handle.pid.remote()
    began = time.perf_counter()
    os.kill(old_pid, signal.SIGKILL)
    while time.perf_counter() - began < timeout_s:
        try:
            if await asyncio.wait_for(handle.pid.remote(), 30) != old_pid:
                await asyncio.wait_for(handle.usage_of.remote(user), 30)
                answered = time.perf_counter() - began
                await ShardCluster.reactivated_all([handle])
                return answered, time.perf_counter() - began
        except (ray.exceptions.RayError, TimeoutError):
            pass
        await asyncio.sleep(0.01)
    raise TimeoutError("the shard did not serve again")


def scenario_restart(database_url: str, short: bool, shards: int) -> dict[str, Any]:
    """Start, flush and restart with N users who each have an open session: the shards start and
    re-activate them all (with their alarms); every user heartbeats (each ledger is now dirty) and
    one flush per shard writes them all; then one shard's process is killed (SIGKILL), Ray restarts
    it, and the time until it answers again is measured."""
    count = RESTART_USERS_SHORT if short else RESTART_USERS_FULL
    with shard_cluster(database_url, shards) as cluster:

        async def run() -> dict[str, Any]:
            users = [f"open-{uuid.uuid4().hex[:12]}" for _ in range(count)]
            sessions, saved_per_s = await _save_open_sessions(cluster, users)
            print(f"  {count} users with open sessions written ({saved_per_s:.0f}/s)", flush=True)
            began = time.perf_counter()
            cluster.create()
            await cluster.ready()
            serving_s = time.perf_counter() - began
            await ShardCluster.reactivated_all(cluster.handles)
            cold_start_s = time.perf_counter() - began
            stats = await asyncio.gather(*(h.stats.remote() for h in cluster.handles))
            reactivated = sum(s.resident_users for s in stats)
            print(
                f"  cold start: serving after {serving_s:.2f} s, "
                f"{reactivated} users re-activated after {cold_start_s:.2f} s",
                flush=True,
            )

            beats = await cluster.call_each("heartbeat", users, args=lambda user: (user, sessions[user]))
            stats = await asyncio.gather(*(h.stats.remote() for h in cluster.handles))
            dirty = sum(s.dirty_users for s in stats)
            began = time.perf_counter()
            written = sum(await asyncio.gather(*(h.flush.remote() for h in cluster.handles)))
            flush_s = time.perf_counter() - began
            print(
                f"  flush: {beats} heartbeats made {dirty} users dirty; {written} written in {flush_s:.2f} s "
                f"({written / flush_s:.0f} users/s)",
                flush=True,
            )

            victim = cluster.handles[0]
            mine = cluster.split(users)[0]
            answered_s, ready_s = await _crash_and_time_recovery(victim, mine[-1])
            stats0 = await victim.stats.remote()
            print(
                f"  restart: shard 0 ({len(mine)} open sessions) answered a user {answered_s:.2f} s after "
                f"the kill, and had all {stats0.resident_users} re-activated after {ready_s:.2f} s",
                flush=True,
            )
            await cluster.stop()
            return {
                "users": count,
                "rows": [
                    {
                        "users_with_open_sessions": count,
                        "shards": shards,
                        "cold_start_serving_s": round(serving_s, 2),
                        "cold_start_s": round(cold_start_s, 2),
                        "reactivated": reactivated,
                        "dirty_users_flushed": written,
                        "flush_s": round(flush_s, 2),
                        "flush_users_per_s": round(written / flush_s),
                        "killed_shard_users": len(mine),
                        "restart_first_answer_s": round(answered_s, 2),
                        "restart_all_reactivated_s": round(ready_s, 2),
                        "resident_after_restart": stats0.resident_users,
                    }
                ],
            }

        return asyncio.run(run())


@ray.remote(num_cpus=0)
class OneUserActor:
    """The literal alternative: one Ray actor per user, holding that user's ledger alone."""

    def __init__(self, user_id: str, policy: Any) -> None:
        self._ledger = UserLedger.new(user_id, policy, wall_clock_ms())

    def usage(self) -> int:
        return self._ledger.version

    def pid(self) -> int:
        return os.getpid()


ACTOR_USERS_FULL = 48
ACTOR_USERS_SHORT = 12
NODE_MEMORY_BYTES = 24 * 2**30


def scenario_actors(database_url: str, short: bool, shards: int) -> dict[str, Any]:
    """The literal alternative, one Ray actor per user: N actors created at once, the time until each
    answered (activations per second) and the resident memory each process adds; users per node
    extrapolated to this machine's 24 GiB."""
    count = ACTOR_USERS_SHORT if short else ACTOR_USERS_FULL
    with shard_cluster(database_url, shards) as cluster:

        async def run() -> dict[str, Any]:
            began = time.perf_counter()
            actors = [OneUserActor.remote(f"actor-{i}", cluster.policy) for i in range(count)]  # type: ignore[attr-defined]
            await asyncio.gather(*(actor.usage.remote() for actor in actors))
            elapsed = time.perf_counter() - began
            pids = await asyncio.gather(*(actor.pid.remote() for actor in actors))
            rss = sum(_rss_bytes(pid) for pid in pids)
            for actor in actors:
                ray.kill(actor)
            per_actor = rss / count
            row = {
                "actors": count,
                "created_in_s": round(elapsed, 2),
                "activations_per_s": round(count / elapsed, 1),
                "rss_per_actor_mb": round(per_actor / 2**20, 1),
                "users_per_24gib_node": int(NODE_MEMORY_BYTES / per_actor),
            }
            print(
                f"  {count} actors: up in {elapsed:.1f} s ({row['activations_per_s']}/s), "
                f"{row['rss_per_actor_mb']} MB each: {row['users_per_24gib_node']} users per 24 GiB node",
                flush=True,
            )
            return {"users": count, "rows": [row]}

        return asyncio.run(run())
