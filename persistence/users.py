"""`usage_users` and `usage_periods`: one row per known user, one per user and period.

Writes are batched (`unnest` arrays, one statement per table) and guarded by
`version`: a row is only replaced by a newer version of itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from actors.records import PeriodRecord, UserRecord
from actors.times import to_datetime
from persistence.decode import instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


def _time_or_none(ms: int | None) -> object:
    return to_datetime(ms) if ms is not None else None


async def upsert_users(connection: Connection, *, users: Sequence[UserRecord]) -> None:
    await connection.execute(
        """
        insert into usage_users as u (
            user_id, plan, plan_event_at, plan_event_id, version,
            purchased_ms, anchor_start, anchor_months, anchor_duration_ms, next_entry_seq, alert_level
        )
        select * from unnest(
            $1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::bigint[],
            $6::bigint[], $7::timestamptz[], $8::integer[], $9::bigint[], $10::bigint[], $11::smallint[]
        )
        on conflict (user_id) do update
            set plan = excluded.plan,
                plan_event_at = excluded.plan_event_at,
                plan_event_id = excluded.plan_event_id,
                version = excluded.version,
                purchased_ms = excluded.purchased_ms,
                anchor_start = excluded.anchor_start,
                anchor_months = excluded.anchor_months,
                anchor_duration_ms = excluded.anchor_duration_ms,
                next_entry_seq = excluded.next_entry_seq,
                alert_level = excluded.alert_level,
                updated_at = now()
            where u.version < excluded.version
        """,
        [u.user_id for u in users],
        [u.plan for u in users],
        [_time_or_none(u.plan_event_at_ms) for u in users],
        [u.plan_event_id for u in users],
        [u.version for u in users],
        [u.purchased_ms for u in users],
        [_time_or_none(u.anchor_start_ms) for u in users],
        [u.anchor_months for u in users],
        [u.anchor_duration_ms for u in users],
        [u.next_entry_seq for u in users],
        [u.alert_level for u in users],
    )


async def upsert_periods(connection: Connection, *, periods: Sequence[PeriodRecord]) -> None:
    await connection.execute(
        """
        insert into usage_periods as p
            (user_id, period_start, period_end, plan, used_ms, limit_ms, archived, version, purchased_used_ms)
        select * from unnest(
            $1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[],
            $5::bigint[], $6::bigint[], $7::boolean[], $8::bigint[], $9::bigint[]
        )
        on conflict (user_id, period_start) do update
            set period_end = excluded.period_end,
                plan = excluded.plan,
                used_ms = excluded.used_ms,
                limit_ms = excluded.limit_ms,
                archived = excluded.archived,
                version = excluded.version,
                purchased_used_ms = excluded.purchased_used_ms,
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
        [p.purchased_used_ms for p in periods],
    )


async def fetch_users(connection: Connection, *, user_ids: Sequence[str]) -> dict[str, UserRecord]:
    rows = await connection.fetch(
        """
        select user_id, plan, plan_event_at, plan_event_id, version,
               purchased_ms, anchor_start, anchor_months, anchor_duration_ms, next_entry_seq, alert_level
        from usage_users where user_id = any($1::text[])
        """,
        list(user_ids),
    )
    return {
        row["user_id"]: UserRecord(
            user_id=row["user_id"],
            plan=row["plan"],
            version=row["version"],
            plan_event_at_ms=optional_instant_ms(row["plan_event_at"], "usage_users.plan_event_at"),
            plan_event_id=row["plan_event_id"],
            purchased_ms=row["purchased_ms"],
            anchor_start_ms=optional_instant_ms(row["anchor_start"], "usage_users.anchor_start"),
            anchor_months=row["anchor_months"],
            anchor_duration_ms=row["anchor_duration_ms"],
            next_entry_seq=row["next_entry_seq"],
            alert_level=row["alert_level"],
        )
        for row in rows
    }


async def fetch_recent_periods(
    connection: Connection, *, user_ids: Sequence[str], held: Sequence[tuple[str, int]] = ()
) -> dict[str, list[PeriodRecord]]:
    """Each user's current period, then the archived period holding the open session's last
    heartbeat (if there is such a session and period), then the archived periods named in `held`
    (user, period start): those the held tails of the user's sessions hold time in."""
    rows = await connection.fetch(
        """
        select p.user_id, p.period_start, p.period_end, p.plan, p.used_ms, p.limit_ms, p.archived,
               p.version, p.purchased_used_ms
        from usage_periods p
        left join usage_sessions s on s.user_id = p.user_id and s.ended_at is null
        left join unnest($2::text[], $3::timestamptz[]) as h (user_id, period_start)
            on h.user_id = p.user_id and h.period_start = p.period_start
        where p.user_id = any($1::text[])
          and (not p.archived
               or (s.id is not null
                   and p.period_start <= s.last_heartbeat_at and s.last_heartbeat_at < p.period_end)
               or h.user_id is not null)
        order by p.user_id, p.archived, p.period_start desc
        """,
        list(user_ids),
        [user for user, _ in held],
        [to_datetime(start) for _, start in held],
    )
    found: dict[str, list[PeriodRecord]] = defaultdict(list)
    for row in rows:
        found[row["user_id"]].append(_period(row))
    return found


async def fetch_periods(connection: Connection, *, user_id: str, limit: int) -> list[PeriodRecord]:
    """The user's newest `limit` periods, newest first (usage history)."""
    rows = await connection.fetch(
        """
        select user_id, period_start, period_end, plan, used_ms, limit_ms, archived, version,
               purchased_used_ms
        from usage_periods where user_id = $1 order by period_start desc limit $2
        """,
        user_id,
        limit,
    )
    return [_period(row) for row in rows]


def _period(row: asyncpg.Record) -> PeriodRecord:
    return PeriodRecord(
        user_id=row["user_id"],
        start_ms=instant_ms(row["period_start"], "usage_periods.period_start"),
        end_ms=instant_ms(row["period_end"], "usage_periods.period_end"),
        plan=row["plan"],
        used_ms=row["used_ms"],
        limit_ms=row["limit_ms"],
        archived=row["archived"],
        version=row["version"],
        purchased_used_ms=row["purchased_used_ms"],
    )
