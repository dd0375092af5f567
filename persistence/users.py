"""`usage_users` and `usage_periods`: one row per known user, one per user and period.

Writes are batched (`unnest` arrays, one statement per table) and guarded by
`version`: a row is only replaced by a newer version of itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import PeriodRecord, UserRecord
from actors.times import from_datetime, to_datetime

if TYPE_CHECKING:
    from persistence.database import Connection


def _ms_or_none(value: object) -> int | None:
    return from_datetime(value) if value is not None else None  # type: ignore[arg-type]


async def upsert_users(connection: Connection, *, users: Sequence[UserRecord]) -> None:
    await connection.execute(
        """
        insert into usage_users as u (user_id, plan, plan_event_at, plan_event_id, version)
        select * from unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::bigint[])
        on conflict (user_id) do update
            set plan = excluded.plan,
                plan_event_at = excluded.plan_event_at,
                plan_event_id = excluded.plan_event_id,
                version = excluded.version,
                updated_at = now()
            where u.version < excluded.version
        """,
        [u.user_id for u in users],
        [u.plan for u in users],
        [to_datetime(u.plan_event_at_ms) if u.plan_event_at_ms is not None else None for u in users],
        [u.plan_event_id for u in users],
        [u.version for u in users],
    )


async def upsert_periods(connection: Connection, *, periods: Sequence[PeriodRecord]) -> None:
    await connection.execute(
        """
        insert into usage_periods as p
            (user_id, period_start, period_end, plan, used_ms, limit_ms, archived, version)
        select * from unnest(
            $1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[],
            $5::bigint[], $6::bigint[], $7::boolean[], $8::bigint[]
        )
        on conflict (user_id, period_start) do update
            set period_end = excluded.period_end,
                plan = excluded.plan,
                used_ms = excluded.used_ms,
                limit_ms = excluded.limit_ms,
                archived = excluded.archived,
                version = excluded.version,
                synced_at = now()
            where p.version < excluded.version
        """,
        [p.user_id for p in periods],
        [to_datetime(p.start_ms) for p in periods],
        [to_datetime(p.end_ms) for p in periods],
        [p.plan for p in periods],
        [p.used_ms for p in periods],
        [p.limit_ms for p in periods],
        [p.archived for p in periods],
        [p.version for p in periods],
    )


async def fetch_users(connection: Connection, *, user_ids: Sequence[str]) -> dict[str, UserRecord]:
    rows = await connection.fetch(
        """
        select user_id, plan, plan_event_at, plan_event_id, version
        from usage_users where user_id = any($1::text[])
        """,
        list(user_ids),
    )
    return {
        row["user_id"]: UserRecord(
            user_id=row["user_id"],
            plan=row["plan"],
            version=row["version"],
            plan_event_at_ms=_ms_or_none(row["plan_event_at"]),
            plan_event_id=row["plan_event_id"],
        )
        for row in rows
    }


async def fetch_recent_periods(
    connection: Connection, *, user_ids: Sequence[str], per_user: int = 2
) -> dict[str, list[PeriodRecord]]:
    """Each user's newest `per_user` periods, newest first."""
    rows = await connection.fetch(
        """
        select user_id, period_start, period_end, plan, used_ms, limit_ms, archived, version
        from (
            select p.*, row_number() over (partition by user_id order by period_start desc) as rank
            from usage_periods p where user_id = any($1::text[])
        ) ranked
        where rank <= $2
        order by user_id, period_start desc
        """,
        list(user_ids),
        per_user,
    )
    found: dict[str, list[PeriodRecord]] = defaultdict(list)
    for row in rows:
        found[row["user_id"]].append(
            PeriodRecord(
                user_id=row["user_id"],
                start_ms=from_datetime(row["period_start"]),
                end_ms=from_datetime(row["period_end"]),
                plan=row["plan"],
                used_ms=row["used_ms"],
                limit_ms=row["limit_ms"],
                archived=row["archived"],
                version=row["version"],
            )
        )
    return found
