"""postgres-direct: the same hot endpoints with no actor, every request one Postgres statement.

What a competent engineer would write without the ledger (as the credit systems in
`../shared/seeds/003_*` and `004_*` do): a pooled asyncpg connection per request, prepared
statements, one statement per request. A credit check reads the user's row; a heartbeat is one
atomic statement that bills the session and the user's period together (`UPDATE ... RETURNING`
in a CTE); so is an end. It is served by the same gateway stack as the real server (uvicorn with
`server_config`, the same middleware, the same token check, the same request and response
models), so the difference measured is where the state lives.

Holds (count meters only) are one transaction per request, each row locked before it is read:
a meter balance row per user and meter (`used`, `held`, its window) and a `baseline_holds` row
per hold. Reserve: `select ... for update` of the balance, check limit - used - held >= amount,
`update` held, `insert` the hold. Capture: `select ... for update` of the hold and then of the
balance, move the captured amount from held to used, `update` the hold. The meters and their
limits are the free plan's in the benchmark's plans (`bench/plans.toml`); every user here is on
it. Unlike the ledger, no credit-ledger entry is written for a capture (the baseline keeps no
ledger), and there is no bound on a user's open holds nor an expiry sweep (a hold past its
`expires_at` is expired when it is next captured).

    python -m bench.baseline --port 8090 --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

from actors.plans import MeterSpec, PlanCatalog
from gateway.auth import TokenVerifier, current_user
from gateway.errors import install_error_handlers, problem
from gateway.metrics import Metrics
from gateway.middleware import BodyLimitMiddleware, ConcurrencyLimitMiddleware, InFlight, RequestLogMiddleware
from gateway.schemas import CaptureHoldRequest, CreateHoldRequest, Hold, Usage

PLANS_FILE = Path(__file__).resolve().parent / "plans.toml"  # the benchmark's (bench/server.py)

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
create table if not exists baseline_meters (
    user_id       text not null references baseline_usage (user_id),
    meter         text not null,
    window_start  date not null,
    used          bigint not null default 0,
    held          bigint not null default 0,
    version       bigint not null default 0,
    primary key (user_id, meter)
);
create table if not exists baseline_holds (
    id           uuid primary key,
    user_id      text not null,
    meter        text not null,
    amount       bigint not null,
    state        text not null,
    captured     bigint not null default 0,
    released     bigint not null default 0,
    reference    text,
    created_at   timestamptz not null,
    expires_at   timestamptz not null,
    resolved_at  timestamptz
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


METER_FOR_UPDATE = """
select window_start, used, held, version from baseline_meters where user_id = $1 and meter = $2 for update
"""
NEW_METER = """
insert into baseline_meters (user_id, meter, window_start) values ($1, $2, $3)
on conflict (user_id, meter) do nothing
"""
# A new window starts `used` again from 0; what is held stays held.
HOLD_ON_METER = """
update baseline_meters
set window_start = $3, used = $4, held = held + $5, version = version + 1
where user_id = $1 and meter = $2
returning version
"""
_HOLD_COLUMNS = "id, meter, amount, state, captured, released, reference, created_at, expires_at, resolved_at"
INSERT_HOLD = f"""
insert into baseline_holds (id, user_id, meter, amount, state, reference, created_at, expires_at)
values ($1, $2, $3, $4, 'held', $5, now(), now() + make_interval(secs => $6))
returning {_HOLD_COLUMNS}
"""
HOLD_FOR_UPDATE = f"select {_HOLD_COLUMNS} from baseline_holds where id = $1 and user_id = $2 for update"
# Capturing `$3` of a hold of `$4` (or expiring it, `$3` = 0): the rest is no longer held.
CAPTURE_ON_METER = """
update baseline_meters
set window_start = $5, used = $6::bigint + $3::bigint, held = held - $4, version = version + 1
where user_id = $1 and meter = $2
returning version
"""
RESOLVE_HOLD = f"""
update baseline_holds
set state = $2, captured = $3, released = amount - $3, resolved_at = now()
where id = $1
returning {_HOLD_COLUMNS}
"""


def _plan_meters(plans_file: Path) -> Mapping[str, MeterSpec]:
    """The count meters of the plan every baseline user is on (the default plan, `free`)."""
    return PlanCatalog.from_file(plans_file).default.meters


def _window_start(spec: MeterSpec) -> date:
    today = datetime.now(UTC).date()
    return today if spec.window == "day" else today.replace(day=1)


def _hold(row: Any, version: int) -> Hold:
    return Hold(
        hold_id=str(row["id"]),
        meter=row["meter"],
        minutes=None,
        amount=row["amount"],
        state=row["state"],
        captured=row["captured"],
        released=row["released"],
        reference=row["reference"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        resolved_at=row["resolved_at"],
        version=version,
    )


def _hold_id(hold_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(hold_id)
    except ValueError:
        return None


class Beat(BaseModel):
    session_id: str
    session_minutes: float
    minutes_remaining: float
    version: int


def _period() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def create_baseline_app(dsn: str, jwt_secret: str, *, plans_file: Path = PLANS_FILE) -> FastAPI:
    metrics = Metrics()
    meters = _plan_meters(plans_file)

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
    app.add_middleware(ConcurrencyLimitMiddleware, in_flight=InFlight(max_requests=1024, metrics=metrics))
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

    @app.post("/v1/holds", status_code=201, response_model=Hold)
    async def create_hold(
        body: CreateHoldRequest, user_id: str = Depends(current_user), db: Any = Depends(pool)
    ) -> Any:
        if body.meter is None or body.amount is None:
            return problem(422, "invalid_request", "the baseline holds count meters only")
        spec = meters.get(body.meter)
        if spec is None:
            return problem(404, "meter_not_found", "no such meter", meter=body.meter)
        window_start = _window_start(spec)
        async with db.acquire() as connection, connection.transaction():
            meter = await connection.fetchrow(METER_FOR_UPDATE, user_id, body.meter)
            if meter is None:  # the user's first use of the meter
                start, end = _period()
                await connection.execute(ENSURE_USER, user_id, start, end, FREE_LIMIT_MS)
                await connection.execute(NEW_METER, user_id, body.meter, window_start)
                meter = await connection.fetchrow(METER_FOR_UPDATE, user_id, body.meter)
            used = meter["used"] if meter["window_start"] == window_start else 0
            available = None if spec.limit is None else spec.limit - used - meter["held"]
            if available is not None and body.amount > available:
                return problem(
                    403,
                    "no_credits",
                    "not that many are available",
                    meter=body.meter,
                    remaining=max(0, available),
                )
            version = await connection.fetchval(
                HOLD_ON_METER, user_id, body.meter, window_start, used, body.amount
            )
            row = await connection.fetchrow(
                INSERT_HOLD, uuid.uuid4(), user_id, body.meter, body.amount, body.reference, body.ttl_s
            )
        return _hold(row, version)

    @app.post("/v1/holds/{hold_id}/capture", response_model=Hold)
    async def capture_hold(
        hold_id: str,
        body: CaptureHoldRequest | None = None,
        user_id: str = Depends(current_user),
        db: Any = Depends(pool),
    ) -> Any:
        amount = body.amount if body is not None else None
        if amount is not None and not float(amount).is_integer():
            return problem(422, "invalid_request", "a meter hold captures whole units")
        key = _hold_id(hold_id)
        if key is None:
            return problem(404, "hold_not_found", "no such hold")
        async with db.acquire() as connection, connection.transaction():
            hold = await connection.fetchrow(HOLD_FOR_UPDATE, key, user_id)
            if hold is None:
                return problem(404, "hold_not_found", "no such hold")
            if hold["state"] != "held":
                if hold["state"] == "captured" and amount in (None, hold["captured"]):
                    version = await connection.fetchval(
                        "select version from baseline_meters where user_id = $1 and meter = $2",
                        user_id,
                        hold["meter"],
                    )
                    return _hold(hold, version)  # the same capture again: the same answer
                return problem(409, "hold_resolved", "the hold is resolved", state=hold["state"])
            take = hold["amount"] if amount is None else int(amount)
            if take > hold["amount"]:
                return problem(422, "invalid_request", f"the hold holds {hold['amount']}")
            meter = await connection.fetchrow(METER_FOR_UPDATE, user_id, hold["meter"])
            spec = meters.get(hold["meter"])  # (None: a meter the plans no longer define)
            window_start = meter["window_start"] if spec is None else _window_start(spec)
            used = meter["used"] if meter["window_start"] == window_start else 0
            expired = hold["expires_at"] <= datetime.now(UTC)
            billed = 0 if expired else take
            version = await connection.fetchval(
                CAPTURE_ON_METER, user_id, hold["meter"], billed, hold["amount"], window_start, used
            )
            row = await connection.fetchrow(RESOLVE_HOLD, key, "expired" if expired else "captured", billed)
        if expired:
            return problem(409, "hold_resolved", "the hold expired", state="expired")
        return _hold(row, version)

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
