"""`usage_users` and `usage_periods`: one row per known user, one per user and period.

Writes are batched (one statement per table, `persistence.batch`) and guarded by `version`: a
row is only replaced by a newer version of itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import PeriodRecord, UserRecord
from actors.times import to_datetime
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows
from persistence.decode import Columns, instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


def _user_row(u: UserRecord) -> Row:
    return (
        u.user_id,
        u.plan,
        u.plan_event_at_ms,
        u.plan_event_id,
        u.version,
        u.purchased_ms,
        u.anchor_start_ms,
        u.anchor_months,
        u.anchor_duration_ms,
        u.next_entry_seq,
        u.alert_level,
    )


USERS = Rows(
    "users",
    (
        ("user_id", "text"),
        ("plan", "text"),
        ("plan_event_at", INSTANT),
        ("plan_event_id", "text"),
        ("version", "bigint"),
        ("purchased_ms", "bigint"),
        ("anchor_start", INSTANT),
        ("anchor_months", "integer"),
        ("anchor_duration_ms", "bigint"),
        ("next_entry_seq", "bigint"),
        ("alert_level", "smallint"),
    ),
    _user_row,
)

_UPSERT_USERS = BatchStatement(
    USERS,
    """
    insert into usage_users as u ({columns})
    select {columns} from {rows}
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
)


def _period_row(p: PeriodRecord) -> Row:
    return (
        p.user_id,
        p.start_ms,
        p.end_ms,
        p.plan,
        p.used_ms,
        p.limit_ms,
        p.archived,
        p.version,
        p.purchased_used_ms,
    )


PERIODS = Rows(
    "periods",
    (
        ("user_id", "text"),
        ("period_start", INSTANT),
        ("period_end", INSTANT),
        ("plan", "text"),
        ("used_ms", "bigint"),
        ("limit_ms", "bigint"),
        ("archived", "boolean"),
        ("version", "bigint"),
        ("purchased_used_ms", "bigint"),
    ),
    _period_row,
)

_UPSERT_PERIODS = BatchStatement(
    PERIODS,
    """
    insert into usage_periods as p ({columns})
    select {columns} from {rows}
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
)


async def upsert_users(batch: Batch, *, users: Sequence[UserRecord]) -> None:
    await batch.execute(_UPSERT_USERS, users)


async def upsert_periods(batch: Batch, *, periods: Sequence[PeriodRecord]) -> None:
    await batch.execute(_UPSERT_PERIODS, periods)


def user_from_row(row: Columns) -> UserRecord:
    """A `usage_users` row (at least the columns `USERS` writes) as the ledger takes it."""
    return UserRecord(
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


async def fetch_periods_at(
    connection: Connection, *, starts: Sequence[tuple[str, int]]
) -> dict[str, list[PeriodRecord]]:
    """The periods named by (user, period start), by user; a name without a period is skipped."""
    rows = await connection.fetch(
        """
        select p.user_id, p.period_start, p.period_end, p.plan, p.used_ms, p.limit_ms, p.archived,
               p.version, p.purchased_used_ms
        from usage_periods p
        join unnest($1::text[], $2::timestamptz[]) as h (user_id, period_start)
            on h.user_id = p.user_id and h.period_start = p.period_start
        """,
        [user for user, _ in starts],
        [to_datetime(start) for _, start in starts],
    )
    found: dict[str, list[PeriodRecord]] = defaultdict(list)
    for row in rows:
        found[row["user_id"]].append(period_from_row(row))
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
    return [period_from_row(row) for row in rows]


def period_from_row(row: Columns) -> PeriodRecord:
    """A `usage_periods` row (at least the columns `PERIODS` writes) as the ledger takes it."""
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
