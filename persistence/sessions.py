"""`usage_sessions`: one row per voice/AI session, upserted in batches (`persistence.batch`), guarded
by `version`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import SessionRecord
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows
from persistence.decode import Columns, draws, draws_text, instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


def session_from_row(row: Columns) -> SessionRecord:
    """A `usage_sessions` row (at least the columns `SESSIONS` declares) as the ledger takes it."""
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


def _session_row(s: SessionRecord) -> Row:
    return (
        s.session_id,
        s.user_id,
        s.started_at_ms,
        s.last_heartbeat_at_ms,
        s.ended_at_ms,
        s.used_ms,
        s.topic,
        s.difficulty,
        s.end_reason,
        s.last_seq,
        s.version,
        draws_text(s.pending),
    )


SESSIONS = Rows(
    "sessions",
    (
        ("id", "uuid"),
        ("user_id", "text"),
        ("started_at", INSTANT),
        ("last_heartbeat_at", INSTANT),
        ("ended_at", INSTANT),
        ("used_ms", "bigint"),
        ("topic", "text"),
        ("difficulty", "text"),
        ("end_reason", "text"),
        ("last_seq", "bigint"),
        ("version", "bigint"),
        ("pending", "jsonb"),
    ),
    _session_row,
)

# What a read of whole rows selects (`session_from_row` reads them).
_COLUMNS = ", ".join(SESSIONS.names)

_UPSERT_SESSIONS = BatchStatement(
    SESSIONS,
    """
    insert into usage_sessions as s ({columns})
    select {columns} from {rows}
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
)


async def upsert_sessions(batch: Batch, *, sessions: Sequence[SessionRecord]) -> None:
    await batch.execute(_UPSERT_SESSIONS, sessions)


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
    return session_from_row(row) if row is not None else None


async def fetch_sessions(connection: Connection, *, user_id: str, limit: int) -> list[SessionRecord]:
    rows = await connection.fetch(
        f"""
        select {_COLUMNS} from usage_sessions
        where user_id = $1 order by started_at desc, id limit $2
        """,
        user_id,
        limit,
    )
    return [session_from_row(row) for row in rows]
