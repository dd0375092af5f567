"""PostgresStore: the `LedgerStore` a shard uses in production.

Each `save` is one transaction with one batched statement per table, so a
flush of thousands of users costs a handful of round trips, and a durable
single-user write (session start, plan change) is atomic with its plan event.
A flush's rows travel by binary COPY, a single user's as arrays, one round trip
per table (`persistence.batch`). A `load` is one statement per batch of users
(`persistence.ledgers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from actors.credits import CreditKey
from actors.records import (
    CreditEntry,
    CreditPurchaseRecord,
    Delivery,
    HoldRecord,
    LedgerSnapshot,
    PeriodRecord,
    PlanEventRecord,
    SessionRecord,
    StoredLedger,
)
from actors.routing import namespace_of, slot_of
from actors.store import (
    Fence,
    Ownership,
    StoreFenced,
    StoreMoved,
    UnreadableLedger,
    WriteOutcome,
    WriteReceipt,
)
from persistence import (
    credit_ledger,
    events,
    holds,
    ledgers,
    meters,
    plan_events,
    replies,
    sessions,
    shardmap,
    users,
)
from persistence.batch import Batch
from persistence.database import PoolLimits, create_pool
from persistence.decode import UnreadableRow
from persistence.errors import TRANSIENT_ERRORS, CommitOutcomeUnknown, PersistenceError, translate_errors

# How often `write_outcome` asks again about a transaction still in progress.
OUTCOME_POLL_S = 0.02


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, acquire_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    def _connection(self) -> Any:
        """A pooled connection, waiting at most `acquire_timeout_s` for one."""
        return self._pool.acquire(timeout=self._acquire_timeout_s)

    async def load(
        self, user_ids: Sequence[str], *, now_ms: int
    ) -> dict[str, StoredLedger | UnreadableLedger]:
        """Users in one statement (`ledgers.fetch_ledgers`); if a row cannot be read, user by user,
        so only the users whose rows hold it are `UnreadableLedger`."""
        try:
            return dict(await self._load(user_ids, now_ms=now_ms))
        except UnreadableRow as exc:
            if len(user_ids) == 1:
                return {user_ids[0]: UnreadableLedger(user_ids[0], exc.reason)}
        found: dict[str, StoredLedger | UnreadableLedger] = {}
        for user_id in user_ids:
            found.update(await self.load([user_id], now_ms=now_ms))
        return found

    async def _load(self, user_ids: Sequence[str], *, now_ms: int) -> dict[str, StoredLedger]:
        with translate_errors("load"):
            async with self._connection() as connection:
                return await ledgers.fetch_ledgers(connection, user_ids=user_ids, now_ms=now_ms)

    async def claim(self, owner: str) -> Fence:
        with translate_errors("claim"):
            async with self._connection() as connection:
                # A shard new to its namespace's map owns no slot until one is moved to it.
                epoch = await connection.fetchval(
                    """
                    insert into shard_activations as a (owner, epoch, host, pid, namespace, slots)
                    values ($1, 1, $2, $3, $4,
                            case when exists (select from shard_map where namespace = $4)
                                 then '{}'::integer[] end)
                    on conflict (owner) do update
                        set epoch = a.epoch + 1, host = excluded.host, pid = excluded.pid, claimed_at = now()
                    returning epoch
                    """,
                    owner,
                    socket.gethostname(),
                    os.getpid(),
                    namespace_of(owner),
                )
        return Fence(owner, epoch)

    async def ownership(self, fence: Fence) -> Ownership:
        with translate_errors("ownership"):
            async with self._connection() as connection:
                return await shardmap.ownership(connection, fence)

    async def move_slots(self, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
        with translate_errors("move_slots"):
            async with self._connection() as connection:
                return await shardmap.move_slots(connection, fence, slots, to_shard)

    async def open_session_users(self) -> list[str]:
        with translate_errors("open_session_users"):
            async with self._connection() as connection:
                return await sessions.fetch_open_session_users(connection)

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        if not snapshots and delivery is None:
            return
        all_periods = [period for snapshot in snapshots for period in snapshot.periods]
        all_sessions = [session for snapshot in snapshots for session in snapshot.sessions]
        all_meters = [meter for snapshot in snapshots for meter in snapshot.meters]
        all_entries = [entry for snapshot in snapshots for entry in snapshot.entries]
        all_replies = [reply for snapshot in snapshots for reply in snapshot.replies]
        all_events = [event for snapshot in snapshots for event in snapshot.events]
        all_holds = [hold for snapshot in snapshots for hold in snapshot.holds]
        with translate_errors("save"):
            async with self._connection() as connection:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    # One round trip: the fence (a share lock on the claim row: a newer claim waits
                    # for this transaction, and once it has committed no write of the older epoch gets
                    # past here) and this transaction's id (for `write_outcome`), as they apply.
                    epoch, owns, transaction_id = await _begin_write(
                        connection, fence, [s.user.user_id for s in snapshots], with_id=receipt is not None
                    )
                    if fence is not None and epoch != fence.epoch:
                        raise StoreFenced(f"{fence.owner} is at epoch {epoch}; this write has {fence.epoch}")
                    if not owns:
                        raise StoreMoved("this shard no longer owns the slot of a user written")
                    if receipt is not None:
                        receipt.transaction_id = transaction_id
                    batch = Batch(connection)
                    if snapshots:
                        await users.upsert_users(batch, users=[snapshot.user for snapshot in snapshots])
                    if all_periods:
                        await users.upsert_periods(batch, periods=all_periods)
                    if all_sessions:
                        await sessions.upsert_sessions(batch, sessions=all_sessions)
                    if all_meters:
                        await meters.upsert_meters(batch, meters=all_meters)
                    if all_holds:
                        await holds.upsert_holds(batch, holds=all_holds)
                    if all_entries:
                        await credit_ledger.insert_entries(batch, entries=all_entries)
                    if all_replies:
                        await replies.insert_replies(batch, replies=all_replies)
                    if all_events:
                        await events.insert_events(batch, events=all_events)
                    if delivery is not None and not await _record_delivery(connection, delivery):
                        raise PersistenceError(
                            "save", f"delivery {delivery.delivery_id!r} is already recorded"
                        )
                except BaseException:
                    # Before COMMIT nothing is written (a broken connection rolls back by itself).
                    with contextlib.suppress(Exception):
                        await transaction.rollback()
                    raise
                try:
                    await transaction.commit()
                except TRANSIENT_ERRORS as exc:
                    detail = f"COMMIT got no answer: {type(exc).__name__}: {exc}"
                    raise CommitOutcomeUnknown("save", detail) from exc

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        with translate_errors("find_session"):
            async with self._connection() as connection:
                return await sessions.fetch_session(connection, user_id=user_id, session_id=session_id)

    async def find_hold(self, user_id: str, hold_id: str) -> HoldRecord | None:
        with translate_errors("find_hold"):
            async with self._connection() as connection:
                return await holds.fetch_hold(connection, user_id=user_id, hold_id=hold_id)

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        with translate_errors("list_sessions"):
            async with self._connection() as connection:
                return await sessions.fetch_sessions(connection, user_id=user_id, limit=limit)

    async def prune_replies(self, now_ms: int) -> int:
        with translate_errors("prune_replies"):
            async with self._connection() as connection:
                return await replies.delete_expired(connection, now_ms=now_ms)

    async def write_outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        """Ask Postgres what became of the transaction, waiting while it is still in progress."""
        if receipt.transaction_id is None:
            return "aborted"  # it never began
        with translate_errors("write_outcome"):
            async with self._connection() as connection:
                while True:
                    status = await connection.fetchval(
                        "select pg_xact_status($1::text::xid8)", str(receipt.transaction_id)
                    )
                    if status == "committed":
                        return "committed"
                    if status == "aborted":
                        return "aborted"
                    if status is None:
                        return "unknown"  # too old for the commit log
                    await asyncio.sleep(OUTCOME_POLL_S)

    async def list_periods(self, user_id: str, limit: int) -> list[PeriodRecord]:
        with translate_errors("list_periods"):
            async with self._connection() as connection:
                return await users.fetch_periods(connection, user_id=user_id, limit=limit)

    async def credit_history(self, user_id: str, limit: int) -> list[CreditEntry]:
        with translate_errors("credit_history"):
            async with self._connection() as connection:
                return await credit_ledger.fetch_entries(connection, user_id=user_id, limit=limit)

    async def credit_balances(self, user_id: str) -> dict[CreditKey, tuple[int, int]]:
        with translate_errors("credit_balances"):
            async with self._connection() as connection:
                return await credit_ledger.fetch_balances(connection, user_id=user_id)

    async def find_purchase(self, delivery_id: str) -> CreditPurchaseRecord | None:
        with translate_errors("find_purchase"):
            async with self._connection() as connection:
                return await credit_ledger.fetch_purchase(connection, delivery_id=delivery_id)

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None:
        with translate_errors("find_plan_event"):
            async with self._connection() as connection:
                return await plan_events.fetch_plan_event(connection, delivery_id=delivery_id)

    async def close(self) -> None:
        await self._pool.close()


async def _begin_write(
    connection: Any, fence: Fence | None, user_ids: Sequence[str], *, with_id: bool
) -> tuple[int | None, bool, int | None]:
    """The fence's epoch as this transaction sees it, share-locked (None: no fence, or no claim
    row), whether its shard owns the slot of every user in `user_ids` (true for a shard of no map),
    and the transaction's id (None unless `with_id`), in one statement."""
    if fence is None and not with_id:
        return None, True, None
    transaction_id = "pg_current_xact_id()::text::bigint" if with_id else "null::bigint"
    if fence is None:
        return None, True, await connection.fetchval(f"select {transaction_id}")
    row = await connection.fetchrow(
        f"""
        select epoch, slots is null or slots @> $2::integer[] as owns, {transaction_id} as transaction_id
        from shard_activations where owner = $1 for share
        """,
        fence.owner,
        sorted({slot_of(user_id) for user_id in user_ids}),
    )
    if row is None:
        return None, True, None
    return row["epoch"], row["owns"], row["transaction_id"]


async def _record_delivery(connection: Any, delivery: Delivery) -> bool:
    if isinstance(delivery, PlanEventRecord):
        return await plan_events.insert_plan_event(connection, record=delivery)
    return await credit_ledger.insert_purchase(connection, purchase=delivery)


@dataclass(frozen=True, slots=True)
class PostgresStoreFactory:
    """Picklable recipe for a `PostgresStore`: the gateway hands it to each shard actor."""

    dsn: str
    limits: PoolLimits = field(default_factory=PoolLimits)

    async def __call__(self) -> PostgresStore:
        pool = await create_pool(self.dsn, self.limits, role="shard")
        return PostgresStore(pool, acquire_timeout_s=self.limits.connect_timeout_s)

    def __repr__(self) -> str:
        # The DSN may carry a password; never print it.
        return f"PostgresStoreFactory(limits={self.limits!r})"
