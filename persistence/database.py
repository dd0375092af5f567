"""Connection pools with explicit limits.

Every pool states its sizes, a client-side timeout per call and a server-side
`statement_timeout`, so a stuck query fails instead of holding a shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from persistence.errors import translate_errors

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # What the table modules accept: a connection, or one borrowed from a pool.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

APPLICATION_NAME = "usage-ledger"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolLimits:
    min_size: int = 1
    max_size: int = 4
    connect_timeout_s: float = 5.0
    statement_timeout_s: float = 5.0
    idle_connection_lifetime_s: float = 300.0

    def __post_init__(self) -> None:
        assert 0 <= self.min_size <= self.max_size, "need 0 <= min_size <= max_size"
        assert self.connect_timeout_s > 0 and self.statement_timeout_s > 0, "timeouts must be positive"


async def create_pool(dsn: str, limits: PoolLimits, *, role: str = "app") -> asyncpg.Pool[asyncpg.Record]:
    """Open a pool; raises `DatabaseUnavailable` when Postgres cannot be reached."""
    with translate_errors("connect"):
        pool = await asyncpg.create_pool(
            dsn,
            min_size=limits.min_size,
            max_size=limits.max_size,
            timeout=limits.connect_timeout_s,
            # The client gives the server a little longer than its own limit, so the
            # server's cancellation (a clean error) normally wins.
            command_timeout=limits.statement_timeout_s + 1.0,
            max_inactive_connection_lifetime=limits.idle_connection_lifetime_s,
            server_settings={
                "application_name": f"{APPLICATION_NAME}:{role}",
                "statement_timeout": str(int(limits.statement_timeout_s * 1000)),
                "timezone": "UTC",
            },
        )
    assert pool is not None
    return pool
