"""`idempotency_keys`: the replies to keyed requests (written once, read back with the user, pruned)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import ReplyRecord
from actors.times import to_datetime
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows
from persistence.decode import Columns, instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


def _reply_row(r: ReplyRecord) -> Row:
    return (r.user_id, r.key, r.request_hash, r.outcome, r.created_at_ms, r.expires_at_ms)


REPLIES = Rows(
    "replies",
    (
        ("user_id", "text"),
        ("key", "text"),
        ("request_hash", "text"),
        ("outcome", "jsonb"),
        ("created_at", INSTANT),
        ("expires_at", INSTANT),
    ),
    _reply_row,
)

_INSERT_REPLIES = BatchStatement(
    REPLIES,
    """
    insert into idempotency_keys ({columns})
    select {columns} from {rows}
    on conflict (user_id, key) do update
        set request_hash = excluded.request_hash,
            outcome = excluded.outcome,
            created_at = excluded.created_at,
            expires_at = excluded.expires_at
        where idempotency_keys.expires_at <= excluded.created_at
    """,
)


async def insert_replies(batch: Batch, *, replies: Sequence[ReplyRecord]) -> None:
    """A reply already written is kept as it is (a repeated write carries the same reply), unless
    it had expired when the new one was made (its key used again after 24 h)."""
    await batch.execute(_INSERT_REPLIES, replies)


def reply_from_row(row: Columns) -> ReplyRecord:
    """An `idempotency_keys` row as the ledger takes it, at version 0 (it is written already)."""
    return ReplyRecord(
        user_id=row["user_id"],
        key=row["key"],
        request_hash=row["request_hash"],
        outcome=row["outcome"],
        created_at_ms=instant_ms(row["created_at"], "idempotency_keys.created_at"),
        expires_at_ms=instant_ms(row["expires_at"], "idempotency_keys.expires_at"),
        version=0,
    )


async def delete_expired(connection: Connection, *, now_ms: int) -> int:
    status = await connection.execute(
        "delete from idempotency_keys where expires_at <= $1", to_datetime(now_ms)
    )
    return int(status.split()[-1])
