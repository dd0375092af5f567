"""Users' whole stored ledgers, for a batch of user ids, in one statement (activation).

The statement is a `union all` with one branch per kind of row (the user, their periods,
sessions, holds, meters, replies, the last applied plan event), each an index lookup by user.
A branch returns `(kind, user_id, record, ord)`: the row's columns as an anonymous record, in
the order its table's `Rows` declares them (so each table module's `*_from_row` reads it by
name), and its place among its kind's rows where that is kept (`ord`). Every column is of a type
asyncpg knows without asking: arrays of rows, or of anything but text, would make it run its
type introspection (about 15 ms) on each connection's first activation.

The archived periods a held tail or a minute hold holds time in are named inside their `jsonb`
draws, decoded in Python; the rare one not among the periods already read (a month ended while
time was held) is fetched by a second query. Otherwise a batch costs one round trip.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from actors.records import SessionRecord, StoredLedger
from actors.replies import REPLIES_PER_USER_MAX
from actors.times import to_datetime
from persistence.decode import instant_ms
from persistence.holds import HOLDS, hold_from_row
from persistence.meters import METERS, meter_from_row
from persistence.replies import REPLIES, reply_from_row
from persistence.sessions import SESSIONS, session_from_row
from persistence.users import PERIODS, USERS, fetch_periods_at, period_from_row, user_from_row

if TYPE_CHECKING:
    from persistence.database import Connection

_APPLIED = ("occurred_at", "delivery_id")


def _record(alias: str, columns: Sequence[str]) -> str:
    return f"row({', '.join(f'{alias}.{name}' for name in columns)})"


# Periods: the current one (not archived), and the archived one holding the open session's last
# heartbeat (its unbilled time starts there), in that order. Sessions: the open one, and those
# ended with a held tail (one both open and pending comes twice; it is the open one). Replies:
# those not expired at $2, the newest `REPLIES_PER_USER_MAX` ($3; the ledger keeps no more). The
# applied plan event: the newest, as (occurred_at, delivery id), the order key a renewal that
# changed nothing moved without writing the user (see `UserLedger.change_plan`).
_FETCH_LEDGERS = f"""
select 'user' as kind, u.user_id, {_record("u", USERS.names)} as record, 0::bigint as ord
from usage_users u where u.user_id = any($1::text[])
union all
select 'period', p.user_id, {_record("p", PERIODS.names)},
       row_number() over (order by p.user_id, p.archived, p.period_start desc)
from usage_periods p
where p.user_id = any($1::text[])
  and (not p.archived
       or exists (select from usage_sessions s
                  where s.user_id = p.user_id and s.ended_at is null
                    and p.period_start <= s.last_heartbeat_at and s.last_heartbeat_at < p.period_end))
union all
select 'session', s.user_id, {_record("s", SESSIONS.names)}, 0
from usage_sessions s where s.user_id = any($1::text[]) and s.ended_at is null
union all
select 'session', s.user_id, {_record("s", SESSIONS.names)}, 0
from usage_sessions s where s.user_id = any($1::text[]) and s.pending is not null
union all
select 'hold', h.user_id, {_record("h", HOLDS.names)},
       row_number() over (order by h.created_at, h.hold_id)
from usage_holds h where h.user_id = any($1::text[]) and h.state = 'held'
union all
select 'meter', m.user_id, {_record("m", METERS.names)}, 0
from usage_meters m where m.user_id = any($1::text[])
union all
select 'reply', k.user_id, {_record("k", REPLIES.names)}, 0
from (
    select *, row_number() over (partition by user_id order by expires_at desc) as newest
    from idempotency_keys where user_id = any($1::text[]) and expires_at > $2
) k
where k.newest <= $3
union all
(
    select distinct on (e.user_id) 'applied', e.user_id, {_record("e", _APPLIED)}, 0
    from plan_events e where e.user_id = any($1::text[]) and e.applied
    order by e.user_id, e.occurred_at desc, e.delivery_id collate "C" desc
)
order by ord
"""


async def fetch_ledgers(
    connection: Connection, *, user_ids: Sequence[str], now_ms: int
) -> dict[str, StoredLedger]:
    """The stored ledger of each known user in `user_ids` (unknown ones are left out). Raises
    `UnreadableRow` if any row of the batch holds a value the ledger cannot take."""
    rows = await connection.fetch(_FETCH_LEDGERS, list(user_ids), to_datetime(now_ms), REPLIES_PER_USER_MAX)
    found: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    names = {
        "user": USERS.names,
        "period": PERIODS.names,
        "session": SESSIONS.names,
        "hold": HOLDS.names,
        "meter": METERS.names,
        "reply": REPLIES.names,
        "applied": _APPLIED,
    }
    for row in rows:  # by `ord`: periods and holds in their order
        kind = row["kind"]
        found[row["user_id"]][kind].append(dict(zip(names[kind], row["record"], strict=True)))
    ledgers: dict[str, StoredLedger] = {}
    missing: list[tuple[str, int]] = []  # archived periods held time is in, not read yet
    for user_id, kinds in found.items():
        if not kinds["user"]:
            continue  # rows of a user whose own row is not there (none, with the foreign keys)
        periods = [period_from_row(period) for period in kinds["period"]]
        open_session: SessionRecord | None = None
        pending: list[SessionRecord] = []
        for session in kinds["session"]:
            record = session_from_row(session)
            if record.is_open:
                open_session = record
            elif record.is_pending:
                pending.append(record)
        holds = tuple(hold_from_row(hold) for hold in kinds["hold"])
        read = {period.start_ms for period in periods}
        held = {start for record in pending for start, *_ in record.pending}
        held |= {start for hold in holds for start, *_ in hold.draws}
        missing += sorted((user_id, start) for start in held - read)
        applied = [
            (instant_ms(event["occurred_at"], "plan_events.occurred_at"), event["delivery_id"])
            for event in kinds["applied"]
        ]
        ledgers[user_id] = StoredLedger(
            user=user_from_row(kinds["user"][0]),
            periods=tuple(periods),
            open_session=open_session,
            meters=tuple(meter_from_row(meter) for meter in kinds["meter"]),
            replies=tuple(reply_from_row(reply) for reply in kinds["reply"]),
            pending_sessions=tuple(pending),
            last_applied_plan_event=applied[0] if applied else None,
            holds=holds,
        )
    if missing:
        for user_id, more in (await fetch_periods_at(connection, starts=missing)).items():
            ledger = ledgers[user_id]
            periods = sorted((*ledger.periods, *more), key=lambda p: (p.archived, -p.start_ms))
            ledgers[user_id] = replace(ledger, periods=tuple(periods))
    return ledgers
