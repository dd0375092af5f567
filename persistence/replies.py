"""`idempotency_keys`: the replies to keyed requests (written once, read back with the user, pruned)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import ReplyRecord
from actors.replies import REPLIES_PER_USER_MAX
from actors.times import to_datetime
from persistence.decode import instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


async def insert_replies(connection: Connection, *, replies: Sequence[ReplyRecord]) -> None:
    """A reply already written is kept as it is (a repeated write carries the same reply), unless
    it had expired when the new one was made (its key used again after 24 h)."""
    await connection.execute(
        """
        insert into idempotency_keys (user_id, key, request_hash, outcome, created_at, expires_at)
        select * from unnest(
            $1::text[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::timestamptz[]
        )
        on conflict (user_id, key) do update
            set request_hash = excluded.request_hash,
                outcome = excluded.outcome,
                created_at = excluded.created_at,
                expires_at = excluded.expires_at
            where idempotency_keys.expires_at <= excluded.created_at
        """,
        [r.user_id for r in replies],
        [r.key for r in replies],
        [r.request_hash for r in replies],
        [r.outcome for r in replies],
        [to_datetime(r.created_at_ms) for r in replies],
        [to_datetime(r.expires_at_ms) for r in replies],
    )


async def fetch_replies(
    connection: Connection, *, user_ids: Sequence[str], now_ms: int
) -> dict[str, list[ReplyRecord]]:
    """Each user's replies not expired at `now_ms`, the newest `REPLIES_PER_USER_MAX` of them (the
    ledger keeps no more), at version 0 (they are written already)."""
    rows = await connection.fetch(
        """
        select user_id, key, request_hash, outcome, created_at, expires_at
        from (
            select *, row_number() over (partition by user_id order by expires_at desc) as newest
            from idempotency_keys where user_id = any($1::text[]) and expires_at > $2
        ) kept
        where newest <= $3
        """,
        list(user_ids),
        to_datetime(now_ms),
        REPLIES_PER_USER_MAX,
    )
    found: dict[str, list[ReplyRecord]] = defaultdict(list)
    for row in rows:
        found[row["user_id"]].append(
            ReplyRecord(
                user_id=row["user_id"],
                key=row["key"],
                request_hash=row["request_hash"],
                outcome=row["outcome"],
                created_at_ms=instant_ms(row["created_at"], "idempotency_keys.created_at"),
                expires_at_ms=instant_ms(row["expires_at"], "idempotency_keys.expires_at"),
                version=0,
            )
        )
    return found


async def delete_expired(connection: Connection, *, now_ms: int) -> int:
    status = await connection.execute(
        "delete from idempotency_keys where expires_at <= $1", to_datetime(now_ms)
    )
    return int(status.split()[-1])
