"""`usage_holds`: one row per hold, upserted in batches, guarded by `version`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from actors.records import HoldRecord
from actors.times import to_datetime
from persistence.decode import draws, draws_text, instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection

_COLUMNS = """
    hold_id, user_id, meter, amount, state, captured, released, reference,
    created_at, expires_at, resolved_at, draws, window_start, version
"""


def _record(row: asyncpg.Record) -> HoldRecord:
    return HoldRecord(
        hold_id=row["hold_id"],
        user_id=row["user_id"],
        meter=row["meter"],
        amount=row["amount"],
        state=row["state"],
        reference=row["reference"],
        created_at_ms=instant_ms(row["created_at"], "usage_holds.created_at"),
        expires_at_ms=instant_ms(row["expires_at"], "usage_holds.expires_at"),
        version=row["version"],
        captured=row["captured"],
        released=row["released"],
        resolved_at_ms=optional_instant_ms(row["resolved_at"], "usage_holds.resolved_at"),
        draws=draws(row["draws"], "usage_holds.draws"),
        window_start_ms=optional_instant_ms(row["window_start"], "usage_holds.window_start"),
    )


async def upsert_holds(connection: Connection, *, holds: Sequence[HoldRecord]) -> None:
    await connection.execute(
        f"""
        insert into usage_holds as h ({_COLUMNS})
        select * from unnest(
            $1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::bigint[],
            $8::text[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::jsonb[],
            $13::timestamptz[], $14::bigint[]
        )
        on conflict (hold_id) do update
            set state = excluded.state,
                captured = excluded.captured,
                released = excluded.released,
                expires_at = excluded.expires_at,
                resolved_at = excluded.resolved_at,
                window_start = excluded.window_start,
                version = excluded.version,
                updated_at = now()
            where h.version < excluded.version and h.user_id = excluded.user_id
        """,
        [h.hold_id for h in holds],
        [h.user_id for h in holds],
        [h.meter for h in holds],
        [h.amount for h in holds],
        [h.state for h in holds],
        [h.captured for h in holds],
        [h.released for h in holds],
        [h.reference for h in holds],
        [to_datetime(h.created_at_ms) for h in holds],
        [to_datetime(h.expires_at_ms) for h in holds],
        [to_datetime(h.resolved_at_ms) if h.resolved_at_ms is not None else None for h in holds],
        [draws_text(h.draws) for h in holds],
        [to_datetime(h.window_start_ms) if h.window_start_ms is not None else None for h in holds],
        [h.version for h in holds],
    )


async def fetch_open_holds(connection: Connection, *, user_ids: Sequence[str]) -> dict[str, list[HoldRecord]]:
    """Each user's unresolved holds, oldest first."""
    rows = await connection.fetch(
        f"""
        select {_COLUMNS} from usage_holds
        where user_id = any($1::text[]) and state = 'held'
        order by created_at, hold_id
        """,
        list(user_ids),
    )
    found: dict[str, list[HoldRecord]] = defaultdict(list)
    for row in rows:
        found[row["user_id"]].append(_record(row))
    return found


async def fetch_hold(connection: Connection, *, user_id: str, hold_id: str) -> HoldRecord | None:
    row = await connection.fetchrow(
        f"select {_COLUMNS} from usage_holds where hold_id = $1 and user_id = $2", hold_id, user_id
    )
    return _record(row) if row is not None else None
