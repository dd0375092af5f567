"""A `MemoryStore` with fault switches, for tests: the product's store has none.

`available = False` makes every call fail as an outage would. The write faults
act on the next save only:

- `lose_next_commit_reply`: it applies, then fails as a lost COMMIT reply would;
- `hold_next_commit`: it fails as a lost reply would, with its commit still in
  progress until `finish_pending_commit()` (or `abort_pending_commit()`);
- `cut_next_write`: it fails mid-transaction as a dropped connection would: its
  transaction aborts, but the caller is not told which.

A failed write's transaction answers `write_outcome` as the database would.
(The simulation's `tests/simulation/faults.py` injects the same faults at random.)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from actors.records import Delivery, LedgerSnapshot
from actors.store import (
    Fence,
    MemoryStore,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    WriteOutcome,
    WriteReceipt,
)

# What the fault transactions are numbered from (well above the memory store's own).
_FAULT_TRANSACTIONS = 1 << 40


class FaultyMemoryStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.available = True
        self.lose_next_commit_reply = False
        self.hold_next_commit = False
        self.cut_next_write = False
        self.pending_commit: tuple[int, Sequence[LedgerSnapshot], Delivery | None, Fence | None] | None = None
        self._outcomes: dict[int, WriteOutcome] = {}
        self._fault_transactions = itertools.count(_FAULT_TRANSACTIONS)

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        if (self.cut_next_write or self.hold_next_commit) and not (
            fence is not None and self.epochs.get(fence.owner) != fence.epoch  # refused first
        ):
            transaction = next(self._fault_transactions)
            if receipt is not None:
                receipt.transaction_id = transaction
            if self.cut_next_write:
                self.cut_next_write = False
                self._outcomes[transaction] = "aborted"
                raise StoreOutcomeUnknown("connection lost during the write")
            self.hold_next_commit = False
            self._outcomes[transaction] = "unknown"  # in progress
            self.pending_commit = (transaction, snapshots, delivery, fence)
            raise StoreOutcomeUnknown("no answer to COMMIT; the commit is still in progress")
        await super().save(snapshots, delivery=delivery, receipt=receipt, fence=fence)
        if self.lose_next_commit_reply:
            self.lose_next_commit_reply = False
            raise StoreOutcomeUnknown("the write landed but its acknowledgement was lost")

    async def move_slots(self, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
        """With `cut_next_write`, nothing moves; with `lose_next_commit_reply`, the slots move: either
        way the caller gets `StoreOutcomeUnknown`."""
        if self.cut_next_write:
            self.cut_next_write = False
            raise StoreOutcomeUnknown("connection lost during the handoff")
        epoch = await super().move_slots(fence, slots, to_shard)
        if self.lose_next_commit_reply:
            self.lose_next_commit_reply = False
            raise StoreOutcomeUnknown("the handoff landed but its acknowledgement was lost")
        return epoch

    async def finish_pending_commit(self) -> None:
        """Let a held commit land (see `hold_next_commit`)."""
        assert self.pending_commit is not None
        transaction, snapshots, delivery, fence = self.pending_commit
        self.pending_commit = None
        try:
            await MemoryStore.save(self, snapshots, delivery=delivery, fence=fence)
        except StoreError:
            self._outcomes[transaction] = "aborted"  # it failed as it landed
            raise
        self._outcomes[transaction] = "committed"

    def abort_pending_commit(self) -> None:
        """A held commit failed after all (see `hold_next_commit`)."""
        assert self.pending_commit is not None
        transaction, *_ = self.pending_commit
        self.pending_commit = None
        self._outcomes[transaction] = "aborted"

    async def write_outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        self._check_available()
        if receipt.transaction_id in self._outcomes:
            return self._outcomes[receipt.transaction_id]
        return await super().write_outcome(receipt)

    def _check_available(self) -> None:
        if not self.available:
            raise StoreUnavailable("memory store switched off")


def _checked(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def call(self: FaultyMemoryStore, *args: Any, **kwargs: Any) -> Any:
        self._check_available()
        return await method(self, *args, **kwargs)

    return call


# Every store call fails while the store is switched off (`close` aside).
for _name in (
    "load",
    "open_session_users",
    "claim",
    "ownership",
    "move_slots",
    "save",
    "prune_replies",
    "find_session",
    "find_hold",
    "list_sessions",
    "list_periods",
    "credit_history",
    "credit_balances",
    "find_plan_event",
    "find_purchase",
):
    setattr(FaultyMemoryStore, _name, _checked(getattr(FaultyMemoryStore, _name)))
