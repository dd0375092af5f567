"""postgres-direct: the same hot endpoints with no actor, every request one Postgres statement.

What a competent engineer would write without the ledger (as the credit systems in
`../shared/seeds/003_*` and `004_*` do): a pooled asyncpg connection per request, prepared
statements, one statement per request. A credit check reads the user's row; a heartbeat is one
atomic statement that bills the session and the user's period together (`UPDATE ... RETURNING`
in a CTE); so is an end. It is served by the same gateway stack as the real server (uvicorn with
`server_config`, the same middleware, the same token check, the same response models), so the
difference measured is where the state lives.

    python -m bench.baseline --port 8090 --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

from gateway.auth import TokenVerifier, current_user
from gateway.errors import install_error_handlers, problem
from gateway.metrics import Metrics
from gateway.middleware import BodyLimitMiddleware, ConcurrencyLimitMiddleware, RequestLogMiddleware
from gateway.schemas import Usage

SCHEMA = """
create table if not exists baseline_usage (
    user_id       text primary key,
    plan          text not null,
    period_start  timestamptz not null,
    period_end    timestamptz not null,
    used_ms       bigint not null default 0,
    limit_ms      bigint not null,
    version       bigint not null default 0
);
create table if not exists baseline_sessions (
    id                 uuid primary key,
    user_id            text not null references baseline_usage (user_id),
    started_at         timestamptz not null,
    last_heartbeat_at  timestamptz not null,
    ended_at           timestamptz,
    used_ms            bigint not null default 0
);
"""
FREE_LIMIT_MS = 10 * 60_000

CHECK = (
    "select plan, period_start, period_end, used_ms, limit_ms, version from baseline_usage where user_id = $1"
)
# Bills the time since the last heartbeat to the session and to the user's period, atomically
# (the elapsed time is read before the update: RETURNING sees the new `last_heartbeat_at`).
_BILL = """
with due as (
    select id, (extract(epoch from (now() - last_heartbeat_at)) * 1000)::bigint as elapsed_ms
    from baseline_sessions
    where id = $1 and user_id = $2 and ended_at is null
    for update
), beat as (
    update baseline_sessions s
    set used_ms = s.used_ms + due.elapsed_ms, last_heartbeat_at = now(){ended}
    from due
    where s.id = due.id
    returning due.elapsed_ms, s.used_ms
)
update baseline_usage u
set used_ms = u.used_ms + beat.elapsed_ms, version = u.version + 1
from beat
where u.user_id = $2
returning beat.used_ms as session_ms, u.used_ms, u.limit_ms, u.version
"""
HEARTBEAT = _BILL.format(ended="")
END = _BILL.format(ended=", ended_at = now()")
START = """
with usage as (
    insert into baseline_usage (user_id, plan, period_start, period_end, limit_ms)
    values ($2, 'free', $3, $4, $5)
    on conflict (user_id) do update set version = baseline_usage.version + 1
    returning used_ms, limit_ms
)
insert into baseline_sessions (id, user_id, started_at, last_heartbeat_at)
select $1, $2, now(), now() from usage where usage.used_ms < usage.limit_ms
returning id
"""
ENSURE_USER = """
insert into baseline_usage (user_id, plan, period_start, period_end, limit_ms)
values ($1, 'free', $2, $3, $4)
on conflict (user_id) do nothing
"""


class Beat(BaseModel):
    session_id: str
    session_minutes: float
    minutes_remaining: float
    version: int


def _period() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def create_baseline_app(dsn: str, jwt_secret: str) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=8, statement_cache_size=64)
        async with pool.acquire() as connection:
            await connection.execute(SCHEMA)
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="postgres-direct baseline", lifespan=lifespan)
    app.state.token_verifier = TokenVerifier(secret=jwt_secret)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(ConcurrencyLimitMiddleware, max_requests=1024, metrics=metrics)
    app.add_middleware(RequestLogMiddleware, metrics=metrics)

    async def pool(request: Request) -> Any:
        return request.app.state.pool

    @app.get("/v1/usage", response_model=Usage)
    async def usage(user_id: str = Depends(current_user), db: Any = Depends(pool)) -> Any:
        async with db.acquire() as connection:
            row = await connection.fetchrow(CHECK, user_id)
            if row is None:
                start, end = _period()
                await connection.execute(ENSURE_USER, user_id, start, end, FREE_LIMIT_MS)
                row = await connection.fetchrow(CHECK, user_id)
        used, limit = row["used_ms"], row["limit_ms"]
        remaining = max(0, limit - used)
        return Usage(
            user_id=user_id,
            plan=row["plan"],
            period_start=row["period_start"],
            period_end=row["period_end"],
            minutes_limit=round(limit / 60_000, 2),
            minutes_used=round(used / 60_000, 2),
            minutes_remaining=round(remaining / 60_000, 2),
            purchased_minutes=0.0,
            percent_used=round(100 * used / limit, 2) if limit else 100.0,
            warning=None,
            active_session=None,
            version=row["version"],
        )

    @app.post("/v1/sessions", status_code=201)
    async def start(user_id: str = Depends(current_user), db: Any = Depends(pool)) -> Any:
        start_at, end_at = _period()
        async with db.acquire() as connection:
            session_id = await connection.fetchval(
                START, uuid.uuid4(), user_id, start_at, end_at, FREE_LIMIT_MS
            )
        if session_id is None:
            return problem(403, "no_credits", "nothing left this period")
        return {"session_id": str(session_id)}

    async def bill(statement: str, session_id: uuid.UUID, user_id: str, db: Any) -> Any:
        async with db.acquire() as connection:
            row = await connection.fetchrow(statement, session_id, user_id)
        if row is None:
            return problem(404, "session_not_found", "no such session")
        return Beat(
            session_id=str(session_id),
            session_minutes=round(row["session_ms"] / 60_000, 2),
            minutes_remaining=round(max(0, row["limit_ms"] - row["used_ms"]) / 60_000, 2),
            version=row["version"],
        )

    @app.post("/v1/sessions/{session_id}/heartbeat", response_model=Beat)
    async def heartbeat(
        session_id: uuid.UUID, user_id: str = Depends(current_user), db: Any = Depends(pool)
    ) -> Any:
        return await bill(HEARTBEAT, session_id, user_id, db)

    @app.post("/v1/sessions/{session_id}/end", response_model=Beat)
    async def end(
        session_id: uuid.UUID, user_id: str = Depends(current_user), db: Any = Depends(pool)
    ) -> Any:
        return await bill(END, session_id, user_id, db)

    return app


def main() -> None:
    import uvicorn

    from actors.logsetup import configure_logging
    from gateway.serving import server_config

    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--jwt-secret", required=True)
    args = parser.parse_args()
    configure_logging(log_format="console", level="warning")
    config = server_config(create_baseline_app(args.dsn, args.jwt_secret), host="127.0.0.1", port=args.port)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
