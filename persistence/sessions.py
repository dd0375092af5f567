"""`usage_sessions`: one row per voice/AI session, upserted in batches, guarded by `version`."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from actors.records import SessionRecord
from actors.times import to_datetime
from persistence.decode import draws, draws_text, instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection

_COLUMNS = """
    id, user_id, started_at, last_heartbeat_at, ended_at, used_ms,
    topic, difficulty, end_reason, last_seq, version, pending
"""


def _record(row: asyncpg.Record) -> SessionRecord:
    return SessionRecord(
        session_id=str(row["id"]),
        user_id=row["user_id"],
        started_at_ms=instant_ms(row["started_at"], "usage_sessions.started_at"),
        last_heartbeat_at_ms=instant_ms(row["last_heartbeat_at"], "usage_sessions.last_heartbeat_at"),
        used_ms=row["used_ms"],
        topic=row["topic"],
        difficulty=row["difficulty"],
        version=row["version"],
        ended_at_ms=optional_instant_ms(row["ended_at"], "usage_sessions.ended_at"),
        end_reason=row["end_reason"],
        last_seq=row["last_seq"],
        pending=draws(row["pending"], "usage_sessions.pending"),
    )


def _as_uuid(session_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(session_id)
    except ValueError:
        return None


async def upsert_sessions(connection: Connection, *, sessions: Sequence[SessionRecord]) -> None:
    await connection.execute(
        f"""
        insert into usage_sessions as s ({_COLUMNS})
        select * from unnest(
            $1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[],
            $6::bigint[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::jsonb[]
        )
        on conflict (id) do update
            set last_heartbeat_at = excluded.last_heartbeat_at,
                ended_at = excluded.ended_at,
                used_ms = excluded.used_ms,
                end_reason = excluded.end_reason,
                last_seq = excluded.last_seq,
                version = excluded.version,
                pending = excluded.pending,
                updated_at = now()
            where s.version < excluded.version and s.user_id = excluded.user_id
        """,
        [s.session_id for s in sessions],
        [s.user_id for s in sessions],
        [to_datetime(s.started_at_ms) for s in sessions],
        [to_datetime(s.last_heartbeat_at_ms) for s in sessions],
        [to_datetime(s.ended_at_ms) if s.ended_at_ms is not None else None for s in sessions],
        [s.used_ms for s in sessions],
        [s.topic for s in sessions],
        [s.difficulty for s in sessions],
        [s.end_reason for s in sessions],
        [s.last_seq for s in sessions],
        [s.version for s in sessions],
        [draws_text(s.pending) for s in sessions],
    )


async def fetch_live_sessions(
    connection: Connection, *, user_ids: Sequence[str]
) -> tuple[dict[str, SessionRecord], dict[str, list[SessionRecord]]]:
    """Each user's open session, and their ended sessions whose tail is still held (`pending`)."""
    rows = await connection.fetch(
        f"""
        select {_COLUMNS} from usage_sessions
        where user_id = any($1::text[]) and ended_at is null
        union all
        select {_COLUMNS} from usage_sessions
        where user_id = any($1::text[]) and pending is not null
        """,
        list(user_ids),
    )
    open_sessions: dict[str, SessionRecord] = {}
    pending: dict[str, list[SessionRecord]] = defaultdict(list)
    for row in rows:
        record = _record(row)
        if record.is_open:
            open_sessions[record.user_id] = record
        elif record.is_pending:
            pending[record.user_id].append(record)
    return open_sessions, pending


async def fetch_open_session_users(connection: Connection) -> list[str]:
    """Users with an open session, a held tail or an unresolved hold: their alarms must run after
    a restart."""
    rows = await connection.fetch(
        """
        select user_id from usage_sessions where ended_at is null
        union
        select user_id from usage_sessions where pending is not null
        union
        select user_id from usage_holds where state = 'held'
        order by user_id
        """
    )
    return [row["user_id"] for row in rows]


async def fetch_session(connection: Connection, *, user_id: str, session_id: str) -> SessionRecord | None:
    key = _as_uuid(session_id)
    if key is None:
        return None
    row = await connection.fetchrow(
        f"select {_COLUMNS} from usage_sessions where id = $1 and user_id = $2", key, user_id
    )
    return _record(row) if row is not None else None


async def fetch_sessions(connection: Connection, *, user_id: str, limit: int) -> list[SessionRecord]:
    rows = await connection.fetch(
        f"""
        select {_COLUMNS} from usage_sessions
        where user_id = $1 order by started_at desc, id limit $2
        """,
        user_id,
        limit,
    )
    return [_record(row) for row in rows]
