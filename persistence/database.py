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
# The server ends a transaction left idle this long (at least; twice the statement timeout if
# longer), and probes a silent client's socket after 10 s, every 5 s, 3 times.
IDLE_IN_TRANSACTION_MIN_S = 10.0
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTERVAL_S = 5
TCP_KEEPALIVE_COUNT = 3


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
                # A client that died (or lost its network) mid-transaction must not hold its locks
                # for the kernel's two-hour keepalive: a shard's claim row among them (fencing).
                "idle_in_transaction_session_timeout": str(
                    int(max(IDLE_IN_TRANSACTION_MIN_S, 2 * limits.statement_timeout_s) * 1000)
                ),
                "tcp_keepalives_idle": str(TCP_KEEPALIVE_IDLE_S),
                "tcp_keepalives_interval": str(TCP_KEEPALIVE_INTERVAL_S),
                "tcp_keepalives_count": str(TCP_KEEPALIVE_COUNT),
                "timezone": "UTC",
            },
        )
    assert pool is not None
    return pool
