"""Durable writes: a user's change written before it is answered, and the writes in doubt.

A durable operation runs on a clone of the user's ledger (a *draft*); the
draft's snapshot is written (sharing a transaction with the other durable
writes of the same moment: `GroupCommit`), and only then does the draft become
the live ledger. If the write fails the draft is dropped: nothing changed, and
the caller gets `Unavailable`.

A write whose answer was lost (the connection broke as it committed, or our own
bound fired) is settled by its transaction's status: committed, it succeeded;
aborted, nothing changed. If that cannot be told yet, the user is *in doubt*:
every operation on them answers `Unavailable` until it can, and then the
ledger is adopted from the store (committed) or kept as it is (aborted).

Every store failure an operation meets becomes `Unavailable.of_store`, saying whether
anything changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from actors.errors import Unavailable
from actors.groupcommit import GroupCommit
from actors.ledger import LedgerPolicy, StoredStateError, UserLedger
from actors.records import Delivery, SessionRecord, StoredLedger
from actors.shard.config import ShardConfig
from actors.shard.fencing import Fencing
from actors.shard.residency import Residency
from actors.store import StoreError, StoreOutcomeUnknown, WriteOutcome, WriteReceipt
from actors.turns import UserTurns

log = structlog.get_logger("actors.shard")

T = TypeVar("T")


class Durable:
    def __init__(
        self, config: ShardConfig, clock: Callable[[], int], residency: Residency, fencing: Fencing
    ) -> None:
        self._config = config
        self._policy: LedgerPolicy = config.policy
        self._clock = clock
        self._residency = residency
        self._fencing = fencing
        self._commits = GroupCommit(
            lambda snapshots, receipt: fencing.save(snapshots, receipt=receipt),
            timeout_s=config.write_timeout_s,
        )
        # Users whose last durable write has an unknown outcome (user -> its write's receipt).
        self.in_doubt: dict[str, WriteReceipt] = {}

    @property
    def writes(self) -> int:
        return self._commits.writes

    @property
    def transactions(self) -> int:
        return self._commits.transactions

    async def read(self, what: str, read: Awaitable[T], *, deadline: float | None = None) -> T:
        """A store read an operation needs, by `deadline` (default: within `resolve_timeout_s`):
        `Unavailable` if the store fails or is too slow (nothing was changed)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._config.resolve_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await read
        except (StoreError, TimeoutError) as exc:
            raise Unavailable.of_store(what) from exc

    async def commit(self, user_id: str, draft: UserLedger, *, delivery: Delivery | None = None) -> None:
        """Write `draft` and make it the live ledger once durable. Not cancellable half-way: a
        caller cancelled meanwhile still waits (within the write's bound) for its transaction, so
        memory always follows what Postgres holds, and the user's turn is held until then."""
        work = asyncio.get_running_loop().create_task(self._commit(user_id, draft, delivery))
        cancelled = False
        while True:
            try:
                await asyncio.shield(work)
                break
            except asyncio.CancelledError:
                if work.done():
                    raise
                cancelled = True  # see it through, then let the cancellation go on
        if cancelled:
            raise asyncio.CancelledError

    async def _commit(self, user_id: str, draft: UserLedger, delivery: Delivery | None) -> None:
        snapshot = draft.snapshot()
        receipt = WriteReceipt()
        try:
            if delivery is None:  # shares a transaction with the writes of this moment
                await self._commits.write(snapshot, receipt)
            else:
                async with asyncio.timeout(self._config.write_timeout_s):
                    await self._fencing.save([snapshot], delivery=delivery, receipt=receipt)
        except StoreOutcomeUnknown as exc:
            await self._settle(user_id, receipt, exc)
        except StoreError as exc:
            raise Unavailable.of_store() from exc
        except TimeoutError as exc:
            # Our own bound fired: how far the write got is for its transaction to tell.
            await self._settle(user_id, receipt, exc)
        draft.mark_synced(snapshot.version)
        self._residency.install(user_id, draft)

    async def write_user(self, user_id: str, *, even_if_clean: bool = False) -> None:
        """Make this user's live state durable now (the caller holds the user's turn)."""
        ledger = self._residency.ledgers[user_id]
        if not (ledger.is_dirty or even_if_clean):
            return
        snapshot = ledger.snapshot()
        try:
            async with asyncio.timeout(self._config.write_timeout_s):
                await self._fencing.save([snapshot])
        except (StoreError, TimeoutError) as exc:
            raise Unavailable.of_store() from exc
        ledger.mark_synced(snapshot.version)
        if not ledger.is_dirty:
            self._residency.dirty.discard(user_id)

    async def _settle(self, user_id: str, receipt: WriteReceipt, exc: BaseException) -> None:
        """A write's answer was lost: return if its transaction committed, raise `Unavailable` if
        it did not. When that cannot be told yet, the user is in doubt until it can."""
        outcome = await self._outcome(receipt)
        if outcome == "committed":
            log.warning("write_committed_despite_error", user_id=user_id, error=repr(exc))
            return
        if outcome == "aborted":
            raise Unavailable.of_store() from exc
        self.in_doubt[user_id] = receipt
        log.warning("write_in_doubt", user_id=user_id, transaction=receipt.transaction_id, error=repr(exc))
        raise Unavailable.of_store(changed=True) from exc

    async def _outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        """The write's outcome as its transaction tells it, waiting at most `resolve_timeout_s`."""
        try:
            async with asyncio.timeout(self._config.resolve_timeout_s):
                return await self._residency.require_store().write_outcome(receipt)
        except (StoreError, TimeoutError):
            return "unknown"

    async def resolve(self, user_id: str) -> None:
        """Settle a write of unknown outcome: adopt the store's state if it committed. The caller
        holds the user's turn."""
        receipt = self.in_doubt.get(user_id)
        if receipt is None:
            return
        unresolved = Unavailable("this user's last write is still unresolved; retry shortly")
        outcome = await self._outcome(receipt)
        if outcome == "unknown":
            raise unresolved
        residency = self._residency
        if outcome == "committed":
            # Nothing changed this user since (everything waited on the doubt), so the stored
            # state is the whole truth.
            try:
                async with asyncio.timeout(self._config.resolve_timeout_s):
                    stored = await residency.require_store().load([user_id], now_ms=self._clock())
            except (StoreError, TimeoutError) as exc:
                raise unresolved from exc
            found = stored.get(user_id)
            try:
                if not isinstance(found, StoredLedger):
                    raise StoredStateError(found.reason if found is not None else "the user's rows are gone")
                ledger = UserLedger.restore(found, self._policy, self._clock())
            except Exception as exc:  # rows that make no ledger: this user is refused, not the shard
                log.error("user_unreadable", user_id=user_id, error=repr(exc), after="a write in doubt")
                raise unresolved from exc
            residency.ledgers[user_id] = ledger
            residency.dirty.discard(user_id)
            residency.advance(user_id, ledger, self._clock())
        log.info("write_in_doubt_settled", user_id=user_id, outcome=outcome)
        del self.in_doubt[user_id]
        residency.changed(user_id, residency.ledgers[user_id])  # its alarms, held back meanwhile

    async def resolve_idle(self, turns: UserTurns) -> None:
        """Settle the writes in doubt of users nobody is calling (a call settles its user's first)."""
        for user_id in list(self.in_doubt):
            if not turns.try_take(user_id):
                continue  # the operation holding the turn settles it
            try:
                await self.resolve(user_id)
            except Unavailable as exc:
                log.info("write_in_doubt_still", user_id=user_id, error=repr(exc))
            finally:
                turns.release(user_id)

    async def stored_ended_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        """A session the ledger no longer holds in memory, from the store (None if unknown, open,
        or still pending: the ledger holds those)."""
        store = self._residency.require_store()
        record = await self.read("session history", store.find_session(user_id, session_id))
        return record if record is not None and not record.is_open and not record.is_pending else None
