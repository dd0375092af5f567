"""Runtime: what a gateway process holds while it serves, started and stopped by the app's lifespan.

Start, in order: the plans file; Postgres (the configured DSN, or an embedded
server under the data dir); migrations; Ray (the configured cluster, or a
local one this process owns); the named shard actors (got or created); a
bounded wait until they are ready.

Stop: every shard writes its dirty ledgers. If this process started Ray, the
shards are drained and Ray is shut down; otherwise the shards keep running for
the other gateways. Then the pool closes and an embedded Postgres stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import ray
import structlog

from actors.errors import Unavailable
from actors.hosting import get_or_create_shards, get_shard, kill_shards, legacy_shards
from actors.ledger import LedgerPolicy
from actors.plans import PlanCatalog
from actors.routing import ShardMap
from actors.shard import LedgerShard, ShardConfig
from actors.times import MS_PER_MINUTE, MS_PER_SECOND
from gateway.events import EventDelivery
from gateway.metrics import Metrics
from gateway.resize import Resizer
from gateway.settings import CALL_MARGIN_S, RESOLVE_TIMEOUT_S, WRITE_SLACK_S, Settings, SettingsError
from gateway.shards import ShardClient, ShardRouter, ShardUnknown
from persistence.database import PoolLimits, create_pool
from persistence.embedded import DATABASE_NAME, EmbeddedPostgres, ensure_database
from persistence.migrate import MigrationProgress, migrate
from persistence.shardmap import PostgresShardMaps
from persistence.store import PostgresStoreFactory

log = structlog.get_logger("gateway.runtime")

# How long start-up waits for every shard to report ready before serving anyway
# (requests to a shard still starting get 503 and /readyz says so).
SHARDS_READY_WAIT_S = 60.0
# The gateway's own pool serves readiness checks and event delivery.
GATEWAY_POOL_MAX_SIZE = 3
# Bound on the final flush of each shard at shutdown.
SHUTDOWN_FLUSH_TIMEOUT_S = 30.0
# How long a shard call made at startup (ready) may take.
READY_CALL_TIMEOUT_S = 15.0

# The object store of a local Ray. It holds only what a Ray call carries that is too big to travel
# inline (over 100 KiB), and shard calls carry small objects. Ray's default, 30% of RAM, would let
# /dev/shm (which is RAM) grow to 7 GiB on a 24 GiB node; past this bound Ray spills objects to
# disk rather than failing. Ray's minimum is 75 MiB.
LOCAL_RAY_OBJECT_STORE_BYTES = 128 * 1024 * 1024
# With LEDGER_RAY_DASHBOARD=true the dashboard listens on loopback only (port 8265, or the next free).
LOCAL_RAY_DASHBOARD_HOST = "127.0.0.1"

# How often a gateway reads the shard map, to route to shards another gateway's resize added.
MAP_READ_EVERY_S = 5.0
# pg_advisory_lock key held while a resize runs: the bytes of "resizing".
RESIZE_LOCK_KEY = int.from_bytes(b"resizing", "big") & 0x7FFF_FFFF_FFFF_FFFF

RuntimeState = Literal["running", "stopping", "stopped"]


@dataclass(slots=True)
class Database:
    dsn: str
    embedded: EmbeddedPostgres | None

    def __repr__(self) -> str:
        return f"Database(embedded={self.embedded is not None})"


async def open_database(settings: Settings) -> Database:
    """The configured database, or an embedded server under the data dir (started, with its database)."""
    if settings.database_url is not None:
        return Database(dsn=settings.database_url.get_secret_value(), embedded=None)
    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    admin_dsn = await asyncio.to_thread(embedded.start)
    await ensure_database(admin_dsn, DATABASE_NAME)
    return Database(dsn=embedded.dsn(DATABASE_NAME), embedded=embedded)


async def migrate_database(
    dsn: str, settings: Settings, *, progress: MigrationProgress | None = None
) -> list[int]:
    limits = PoolLimits(
        min_size=0, max_size=1, statement_timeout_s=max(settings.db_statement_timeout_s, 60.0)
    )
    pool = await create_pool(dsn, limits, role="migrate")
    try:
        async with pool.acquire() as connection:
            return await migrate(connection, progress=progress)
    finally:
        await pool.close()


def load_plans(settings: Settings) -> PlanCatalog:
    return PlanCatalog.from_file(settings.plans_file) if settings.plans_file else PlanCatalog.builtin()


def shard_configs(settings: Settings, plans: PlanCatalog, count: int | None = None) -> list[ShardConfig]:
    """The configs of shards 0..count-1 (default: `LEDGER_SHARDS`)."""
    count = settings.shards if count is None else count
    policy = LedgerPolicy(
        plans=plans,
        stale_session_ms=round(settings.stale_session_s * MS_PER_SECOND),
        low_balance_ms=round(settings.low_balance_minutes * MS_PER_MINUTE),
        max_open_holds=settings.max_open_holds,
    )
    write_timeout_s = settings.db_statement_timeout_s + WRITE_SLACK_S
    wait_budget_s = settings.actor_call_timeout_s - write_timeout_s - RESOLVE_TIMEOUT_S - CALL_MARGIN_S
    configs = [
        ShardConfig(
            shard_index=index,
            shard_count=count,
            policy=policy,
            sync_interval_s=settings.sync_interval_s,
            max_pending_calls=settings.shard_max_pending_calls,
            start_wait_s=wait_budget_s,
            wait_budget_s=wait_budget_s,
            write_timeout_s=write_timeout_s,
            resolve_timeout_s=RESOLVE_TIMEOUT_S,
        )
        for index in range(count)
    ]
    assert configs[0].durable_call_max_s < settings.actor_call_timeout_s
    return configs


def _connect_ray(settings: Settings) -> bool:
    """Connect to Ray; True when this process started (and so owns) a local cluster. Blocking."""
    if ray.is_initialized():
        return False
    if settings.ray_address:
        with _signal_handlers_kept():
            ray.init(
                address=settings.ray_address,
                namespace=settings.ray_namespace,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        return False
    with _signal_handlers_kept():
        ray.init(**local_ray_options(settings))
    return True


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """`ray.init` installs a SIGTERM handler that exits at once (and, outside the main thread,
    warns that it cannot): the server's own handler, which drains the shards first, is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, kept)


def local_ray_options(settings: Settings) -> dict[str, Any]:
    """`ray.init`'s arguments for a local Ray this process owns: one node that hosts the shards.

    What `ray.init` can leave out is left out. The rest of Ray always starts and cannot be turned
    off from `ray.init`: gcs_server, raylet, its two agents, the autoscaler monitor, the log
    monitor and dashboard.py (Ray's API server: without the dashboard it runs only the usage-stats
    module). `python -m bench.ray_footprint` measures it all.
    """
    return {
        "address": "local",
        "namespace": settings.ray_namespace,
        # Ray prestarts one worker process per CPU and keeps that many idle (~80 MB RSS each) for
        # tasks; the shards ask for no CPU and nothing else runs here. A shard takes an idle
        # worker when there is one, so this saves memory where the cores outnumber the shards.
        "num_cpus": 0,
        "object_store_memory": LOCAL_RAY_OBJECT_STORE_BYTES,
        "include_dashboard": settings.ray_dashboard,
        "dashboard_host": LOCAL_RAY_DASHBOARD_HOST,
        # Ray's default, said here: the shards' log lines reach this process's stdout.
        "log_to_driver": True,
        "logging_level": logging.WARNING,
    }


class Runtime:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        pool: asyncpg.Pool[asyncpg.Record],
        router: ShardRouter,
        owns_ray: bool,
        plans: PlanCatalog,
    ) -> None:
        self.settings = settings
        self.plans = plans
        self.database = database
        self.pool = pool
        self.router = router
        self.shards = ShardClient(router)  # what routes call
        self.owns_ray = owns_ray
        self.state: RuntimeState = "running"
        self.delivery: EventDelivery | None = None
        self.resizer: Resizer | None = None
        self.resizing: asyncio.Task[ShardMap] | None = None  # this process's resize, while it runs
        self.resize_error: str | None = None  # why this process's last resize stopped, if it failed
        self._map_follower: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the shard map

    async def _follow_map(self) -> None:
        """Read the map every `MAP_READ_EVERY_S`, so this gateway routes to shards another one
        added (a shard that says a user moved makes it read the map at once too)."""
        while True:
            await asyncio.sleep(MAP_READ_EVERY_S)
            try:
                await self.router.read_map()
            except Exception as exc:
                log.warning("shard_map_read_failed", error=repr(exc))

    def resize(self, count: int) -> None:
        """Begin resizing to `count` shards in the background (see `gateway.resize`);
        `ResizeUnderWay` if this process is already resizing to another count."""
        if self.resizing is not None and not self.resizing.done():
            raise ResizeUnderWay(self.router.map.target or count)
        assert self.resizer is not None
        self.resize_error = None
        self.resizing = asyncio.get_running_loop().create_task(self._resize(self.resizer, count))

    async def _resize(self, resizer: Resizer, count: int) -> ShardMap:
        async with self.pool.acquire() as connection:
            # One resize at a time in the cluster: a session lock, let go if this process dies.
            if not await connection.fetchval("select pg_try_advisory_lock($1)", RESIZE_LOCK_KEY):
                self.resize_error = "another gateway is resizing the shards"
                raise ResizeUnderWay(count)
            try:
                return await resizer.resize(count)
            except Exception as exc:
                self.resize_error = describe_error(exc)
                log.error("resize_failed", count=count, error=self.resize_error)
                raise
            finally:
                await connection.execute("select pg_advisory_unlock($1)", RESIZE_LOCK_KEY)

    async def _start_shards(self, count: int) -> None:
        handles = await asyncio.to_thread(_get_shards, self.settings, self.plans, self.database.dsn, count)
        for index, handle in enumerate(handles):
            self.router.add_shard(index, handle)
        for index in range(count):
            await self.router.call_shard(index, LedgerShard.ready)

    async def _retire_shards(self, indexes: list[int]) -> None:
        for index in indexes:
            # It owns no slot: its stop writes nothing; once gone, gateways routing to it read the map.
            with contextlib.suppress(Exception):
                await self.router.call_shard(index, LedgerShard.stop)
            self.router.drop_shard(index)
            try:
                handle = await asyncio.to_thread(get_shard, self.settings.ray_namespace, index)
            except ValueError:
                continue  # gone already
            await asyncio.to_thread(kill_shards, [handle])

    @classmethod
    async def start(cls, settings: Settings, *, metrics: Metrics) -> Runtime:
        plans = await asyncio.to_thread(load_plans, settings)
        if settings.ray_address and settings.database_url is None:
            log.warning("embedded_postgres_with_cluster", hint="shards on other nodes cannot reach it")
        database = await open_database(settings)
        try:
            applied = await migrate_database(settings.migration_dsn(database.dsn), settings)
            pool = await create_pool(
                database.dsn,
                PoolLimits(
                    min_size=1,
                    max_size=GATEWAY_POOL_MAX_SIZE,
                    statement_timeout_s=settings.db_statement_timeout_s,
                ),
                role="gateway",
            )
        except BaseException:
            if database.embedded is not None:
                await asyncio.to_thread(database.embedded.stop)
            raise
        maps = PostgresShardMaps(pool)
        try:
            # The shard count is the map's: `LEDGER_SHARDS` only sizes a brand-new one.
            shard_map = await maps.create_map(settings.ray_namespace, settings.shards)
            if shard_map.count != settings.shards or shard_map.moving:
                log.info(
                    "shard_count_from_map",
                    count=shard_map.count,
                    target=shard_map.target,
                    ledger_shards=settings.shards,
                    hint="the shard count is cluster state: `usage-ledger shards resize N` changes it",
                )
            # On the loop's (main) thread, not in a worker thread: see `_signal_handlers_kept`.
            # Nothing is served yet, so blocking the loop for Ray's start costs nothing.
            owns_ray = _connect_ray(settings)
            handles = await asyncio.to_thread(_get_shards, settings, plans, database.dsn, shard_map.shards)
        except BaseException:
            await pool.close()
            if database.embedded is not None:
                await asyncio.to_thread(database.embedded.stop)
            raise
        router = ShardRouter(
            handles,
            call_timeout_s=settings.actor_call_timeout_s,
            metrics=metrics,
            channels=settings.data_plane == "channel",
            node_id=ray.get_runtime_context().get_node_id(),
            shard_map=shard_map,
            load_map=functools.partial(_read_map, maps, settings.ray_namespace),
            connect=functools.partial(_connect_shard, settings.ray_namespace),
        )
        runtime = cls(
            settings=settings, database=database, pool=pool, router=router, owns_ray=owns_ray, plans=plans
        )
        runtime.resizer = Resizer(
            namespace=settings.ray_namespace,
            maps=maps,
            shards=runtime.shards,
            start_shards=runtime._start_shards,
            retire_shards=runtime._retire_shards,
        )
        await runtime._wait_for_shards()
        runtime._map_follower = asyncio.get_running_loop().create_task(runtime._follow_map())
        if settings.events_webhook_url is not None:
            assert settings.events_webhook_secret is not None, "Settings checks this"
            runtime.delivery = EventDelivery(
                pool=pool,
                url=settings.events_webhook_url,
                secret=settings.events_webhook_secret.get_secret_value(),
                retry_max_s=settings.events_retry_max_s,
                max_age_s=settings.events_max_age_s,
                metrics=metrics,
            )
            runtime.delivery.start()
        log.info(
            "runtime_started",
            shards=shard_map.count,
            migrations_applied=applied,
            embedded_postgres=database.embedded is not None,
            local_ray=owns_ray,
        )
        return runtime

    async def _wait_for_shards(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHARDS_READY_WAIT_S
        while True:
            results = await self.shards.ready()
            failures = [r for r in results if isinstance(r, BaseException)]
            if not failures:
                return
            if loop.time() >= deadline:
                log.warning("shards_not_ready", failing=len(failures), error=repr(failures[0]))
                return
            await asyncio.sleep(0.5)

    async def database_ok(self, *, timeout_s: float | None = None) -> bool:
        try:
            async with asyncio.timeout(
                self.settings.db_statement_timeout_s if timeout_s is None else timeout_s
            ):
                async with self.pool.acquire() as connection:
                    return bool(await connection.fetchval("select true"))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False

    async def stop(self) -> None:
        if self.state != "running":
            return
        self.state = "stopping"
        for task in (self._map_follower, self.resizing):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.delivery is not None:
            await self.delivery.stop()
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH_TIMEOUT_S):
                results: list[object] = list(
                    await (self.shards.stop() if self.owns_ray else self.shards.flush())
                )
            for index, result in enumerate(results):
                if isinstance(result, BaseException):
                    log.error("shard_final_flush_failed", shard=index, error=describe_error(result))
        except TimeoutError:
            log.error("shard_final_flush_timed_out", timeout_s=SHUTDOWN_FLUSH_TIMEOUT_S)
        self.router.close()
        if self.owns_ray:
            await asyncio.to_thread(ray.shutdown)
        await self.pool.close()
        if self.database.embedded is not None:
            await asyncio.to_thread(self.database.embedded.stop)
        self.state = "stopped"
        log.info("runtime_stopped")


def describe_error(error: BaseException) -> str:
    """An error for a log line: a failed Ray task as what it raised (Ray's own text of it carries
    a coloured traceback), anything else as its type and first line."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return repr(error.cause)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


async def _read_map(maps: PostgresShardMaps, namespace: str) -> ShardMap:
    found = await maps.read_map(namespace)
    if found is None:
        raise Unavailable("the shard map is gone from the database")
    return found


async def _connect_shard(namespace: str, index: int) -> Any:
    try:
        return await asyncio.to_thread(get_shard, namespace, index)
    except ValueError:
        raise ShardUnknown(f"shard {index} is not running (yet)") from None


class ResizeUnderWay(Exception):
    def __init__(self, target: int) -> None:
        super().__init__(f"a resize to {target} shards is under way")
        self.target = target


def _get_shards(settings: Settings, plans: PlanCatalog, dsn: str, count: int) -> list[Any]:
    legacy = legacy_shards(settings.ray_namespace)
    if legacy:
        raise SettingsError(
            f"shards of an older version ({', '.join(sorted(legacy))}) are running in Ray namespace "
            f"{settings.ray_namespace!r}; stop them first, or a user could have two writers"
        )
    factory = PostgresStoreFactory(
        dsn=dsn,
        limits=PoolLimits(
            min_size=1,
            max_size=settings.db_pool_max_size,
            statement_timeout_s=settings.db_statement_timeout_s,
        ),
    )
    return get_or_create_shards(
        namespace=settings.ray_namespace,
        configs=shard_configs(settings, plans, count),
        store_factory=factory,
        log_format=settings.resolved_log_format,
        log_level=settings.log_level,
    )
