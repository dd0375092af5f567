"""Group commit: the durable writes of one shard that arrive together share one transaction.

A session start or end must be in Postgres before it is answered. Written one
transaction each, a shard spends most of such a call on the round trips of its
own transaction (begin, the upserts, commit), so a burst of starts queues behind
them. `GroupCommit` keeps at most one transaction in flight per shard; the writes
that arrive meanwhile wait and go together in the next one, so under load a
transaction carries many users' writes, and when idle a write leaves at once,
alone (the same adaptive batching the gateway does for its calls).

Guarantees, for each write:
- It is answered only once its transaction has committed, or with the error of
  that transaction: a write never learns "committed" for a transaction that did
  not commit. All writes of one transaction share its `WriteReceipt`, so a write
  whose answer was lost is settled by that transaction's status, as before.
- One bad write does not fail the others: a transaction that fails for a reason
  other than the store being unreachable is retried as one transaction per write,
  and only the bad one gets the error.
- A caller that stops waiting (cancelled) before its write was taken into a
  transaction is simply dropped: nothing of it is written. Once taken, the
  transaction goes on for the others; the caller's receipt tells its outcome.
- Writes that record a delivery (a plan event, a purchase) are not grouped here:
  each records its own dedupe row in its own transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.records import LedgerSnapshot
from actors.store import StoreError, StoreOutcomeUnknown, StoreUnavailable, WriteReceipt

# Most users one transaction carries; a longer queue waits for the next one.
GROUP_COMMIT_USERS_MAX = 500

SaveFunction = Callable[[Sequence[LedgerSnapshot], WriteReceipt], Awaitable[None]]


@dataclass(slots=True)
class _Write:
    snapshot: LedgerSnapshot
    receipt: WriteReceipt
    deadline: float  # loop time: committed by then, or failed (a write's whole bound, queue included)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _SharedReceipt(WriteReceipt):
    """The receipt a group's transaction fills in, passing its id on to each write's own receipt at
    once (when the transaction begins), so a write's outcome can be asked for as soon as it can."""

    def __init__(self, receipts: list[WriteReceipt]) -> None:
        super().__init__()
        self._receipts = receipts

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "transaction_id":
            for receipt in getattr(self, "_receipts", ()):
                receipt.transaction_id = value


class GroupCommit:
    """Commits the snapshots handed to `write` in shared transactions, one in flight at a time.

    A write is bounded as a lone write was: committed, or failed, within `timeout_s` of being
    handed over, its wait for the transaction in flight included (so the shard still answers
    before the gateway stops waiting). A write not taken into a transaction by then is failed
    with `StoreUnavailable`: nothing of it was written."""

    def __init__(self, save: SaveFunction, *, timeout_s: float) -> None:
        self._save = save
        self._timeout_s = timeout_s
        self._queue: list[_Write] = []
        self._committer: asyncio.Task[None] | None = None
        self.transactions = 0  # committed or not, for the shard's figures
        self.writes = 0

    async def write(self, snapshot: LedgerSnapshot, receipt: WriteReceipt) -> None:
        """Returns once `snapshot` is committed; raises what its transaction raised (`StoreError`,
        or `TimeoutError` past its bound). `receipt` names the transaction, once it has begun."""
        loop = asyncio.get_running_loop()
        write = _Write(snapshot, receipt, loop.time() + self._timeout_s)
        self._queue.append(write)
        if self._committer is None:
            self._committer = loop.create_task(self._commit_all())
        try:
            await asyncio.shield(write.done)
        except asyncio.CancelledError:
            if write in self._queue:  # not taken yet: nothing of it will be written
                self._queue.remove(write)
            else:  # its transaction goes on; its outcome is for nobody to read
                write.done.add_done_callback(_consume)
            raise

    async def _commit_all(self) -> None:
        try:
            while self._queue:
                group = self._queue[:GROUP_COMMIT_USERS_MAX]
                del self._queue[:GROUP_COMMIT_USERS_MAX]
                await self._commit(group)
        finally:
            self._committer = None
            # Stopped early (cancelled): whatever still waits was never taken, so never written.
            _finish(self._queue, StoreUnavailable("the shard stopped before the write"))
            self._queue = []

    async def _commit(self, group: list[_Write]) -> None:
        now = asyncio.get_running_loop().time()
        late = [write for write in group if write.deadline <= now]
        _finish(late, StoreUnavailable("the write waited past its bound; nothing was written"))
        group = [write for write in group if write.deadline > now]
        if not group:
            return
        receipt = _SharedReceipt([write.receipt for write in group])
        try:
            self.transactions += 1
            self.writes += len(group)
            async with asyncio.timeout_at(min(write.deadline for write in group)):
                await self._save([write.snapshot for write in group], receipt)
        except StoreError as exc:
            if len(group) > 1 and not isinstance(exc, StoreUnavailable):
                # A statement failed on some write's data: find it, one transaction per write.
                for write in group:
                    await self._commit([write])
                return
            _finish(group, exc)
        except asyncio.CancelledError:  # the shard is stopping
            raise
        except Exception as exc:  # each waiter gets its transaction's error (TimeoutError included)
            _finish(group, exc)
        else:
            _finish(group, None)
        finally:
            # Cancelled (here or in the retries above): what began may have committed, so those
            # writes' outcome is their transaction's to tell; what never began was not written.
            for write in group:
                if not write.done.done():
                    began = write.receipt.transaction_id is not None
                    error = StoreOutcomeUnknown("the shard stopped during the write") if began else None
                    _finish([write], error or StoreUnavailable("the shard stopped before the write"))


def _finish(writes: list[_Write], error: BaseException | None) -> None:
    for write in writes:
        if write.done.done():
            continue
        if error is None:
            write.done.set_result(None)
        else:
            write.done.set_exception(error)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
