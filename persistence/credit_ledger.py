"""`credit_ledger` (append-only entries), its `credit_balances` view, and `credit_purchases`.

Entries are keyed by `(user_id, seq)` and inserted with `on conflict do
nothing`: a write repeated after a lost reply, or a late flush, adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.credits import CreditKey
from actors.records import CreditEntry, CreditPurchaseRecord
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows
from persistence.decode import instant_ms, optional_instant_ms
from persistence.errors import PersistenceError

if TYPE_CHECKING:
    from persistence.database import Connection

_ENTRY_COLUMNS = "user_id, seq, occurred_at, bucket, window_start, delta, balance_after, reason, reference"


def _entry_row(e: CreditEntry) -> Row:
    return (
        e.user_id,
        e.seq,
        e.occurred_at_ms,
        e.bucket,
        e.window_start_ms,
        e.delta,
        e.balance_after,
        e.reason,
        e.reference,
    )


ENTRIES = Rows(
    "entries",
    (
        ("user_id", "text"),
        ("seq", "bigint"),
        ("occurred_at", INSTANT),
        ("bucket", "text"),
        ("window_start", INSTANT),
        ("delta", "bigint"),
        ("balance_after", "bigint"),
        ("reason", "text"),
        ("reference", "text"),
    ),
    _entry_row,
)

# Inserts the new entries and answers the keys of the others: those already stored before this
# statement (a key it inserted is new, however often the batch holds it).
_INSERT_ENTRIES = BatchStatement(
    ENTRIES,
    """
    with inserted as (
        insert into credit_ledger ({columns})
        select {columns} from {rows}
        on conflict (user_id, seq) do nothing
        returning user_id, seq
    )
    select t.user_id, t.seq from {rows}
    where not exists (select from inserted i where i.user_id = t.user_id and i.seq = t.seq)
    """,
)


async def insert_entries(batch: Batch, *, entries: Sequence[CreditEntry]) -> None:
    """Insert the entries; one already there must be the same entry (a repeated write), else error."""
    stored_before = await batch.fetch(_INSERT_ENTRIES, entries)
    if not stored_before:
        return
    keys = {(row["user_id"], row["seq"]) for row in stored_before}
    repeated = [e for e in entries if (e.user_id, e.seq) in keys]
    rows = await batch.connection.fetch(
        """
        select l.user_id, l.seq, l.bucket, l.window_start, l.delta, l.balance_after, l.reason
        from credit_ledger l join unnest($1::text[], $2::bigint[]) as k(user_id, seq)
          on l.user_id = k.user_id and l.seq = k.seq
        """,
        [e.user_id for e in repeated],
        [e.seq for e in repeated],
    )
    stored = {(row["user_id"], row["seq"]): row for row in rows}
    for entry in repeated:
        row = stored[(entry.user_id, entry.seq)]
        window = optional_instant_ms(row["window_start"], "credit_ledger.window_start")
        kept = (row["bucket"], window, row["delta"], row["balance_after"], row["reason"])
        if kept != (entry.bucket, entry.window_start_ms, entry.delta, entry.balance_after, entry.reason):
            raise PersistenceError(
                "save", f"credit entry {entry.user_id}#{entry.seq} exists with other content: {kept}"
            )


async def fetch_entries(connection: Connection, *, user_id: str, limit: int) -> list[CreditEntry]:
    """The user's newest `limit` entries, newest first."""
    rows = await connection.fetch(
        f"select {_ENTRY_COLUMNS} from credit_ledger where user_id = $1 order by seq desc limit $2",
        user_id,
        limit,
    )
    return [
        CreditEntry(
            user_id=row["user_id"],
            seq=row["seq"],
            occurred_at_ms=instant_ms(row["occurred_at"], "credit_ledger.occurred_at"),
            bucket=row["bucket"],
            window_start_ms=optional_instant_ms(row["window_start"], "credit_ledger.window_start"),
            delta=row["delta"],
            balance_after=row["balance_after"],
            reason=row["reason"],
            reference=row["reference"],
            version=0,
        )
        for row in rows
    ]


async def fetch_balances(connection: Connection, *, user_id: str) -> dict[CreditKey, tuple[int, int]]:
    """Per bucket and window: the sum of the deltas and the last recorded running sum."""
    rows = await connection.fetch(
        "select bucket, window_start, balance, last_balance_after from credit_balances where user_id = $1",
        user_id,
    )
    return {
        (row["bucket"], optional_instant_ms(row["window_start"], "credit_ledger.window_start")): (
            int(row["balance"]),
            int(row["last_balance_after"]),
        )
        for row in rows
    }


async def insert_purchase(connection: Connection, *, purchase: CreditPurchaseRecord) -> bool:
    """Record the purchase; False when its delivery id is already recorded."""
    status = await connection.execute(
        """
        insert into credit_purchases (delivery_id, user_id, minutes_ms, reason, reference, response)
        values ($1, $2, $3, $4, $5, $6::jsonb)
        on conflict (delivery_id) do nothing
        """,
        purchase.delivery_id,
        purchase.user_id,
        purchase.minutes_ms,
        purchase.reason,
        purchase.reference,
        json.dumps(purchase.response),
    )
    return bool(status == "INSERT 0 1")


async def fetch_purchase(connection: Connection, *, delivery_id: str) -> CreditPurchaseRecord | None:
    row = await connection.fetchrow(
        """
        select delivery_id, user_id, minutes_ms, reason, reference, response::text as response
        from credit_purchases where delivery_id = $1
        """,
        delivery_id,
    )
    if row is None:
        return None
    return CreditPurchaseRecord(
        delivery_id=row["delivery_id"],
        user_id=row["user_id"],
        minutes_ms=row["minutes_ms"],
        reason=row["reason"],
        reference=row["reference"],
        response=json.loads(row["response"]),
    )
