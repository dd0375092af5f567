"""A `LedgerStore` with the faults a real Postgres has, switched by the simulation.

`FaultyStore` wraps the one `MemoryStore` every shard of a run shares (the
database outlives the shards). Each shard activation gets its own wrapper, its
"connection": when the simulation kills a shard, its wrapper is severed and
every call through it fails, as a dead process's connections do; a commit it
had already sent may still land (a held commit), as it would in Postgres.

The faults, each as Postgres shows it:

- latency: every call waits a while before it runs (and a write, sometimes,
  before its reply comes back);
- down: every call fails with `StoreUnavailable`; nothing is written;
- lost reply: the write commits, but its caller gets `StoreOutcomeUnknown`;
- cut: the connection drops mid-transaction: nothing is written, and the
  caller gets `StoreOutcomeUnknown` (it must ask the transaction's status);
- held commit: the caller gets `StoreOutcomeUnknown` while its COMMIT is still
  in progress; it lands (or fails) a little later, and until then
  `write_outcome` says "unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

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
from actors.routing import ShardMap
from actors.store import (
    Fence,
    MemoryStore,
    Ownership,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    WriteOutcome,
    WriteReceipt,
)

T = TypeVar("T")
WriteFault = Literal["lose_reply", "cut", "hold"]


@dataclass
class Faults:
    """What the store does now; the simulation's nemesis changes it as the run goes."""

    down: bool = False
    latency_s: tuple[float, float] = (0.0, 0.0)  # each call waits uniformly within this
    next_write: WriteFault | None = None  # applied to the next save, then cleared
    hold_s: tuple[float, float] = (0.2, 3.0)  # how long a held commit takes to land
    # Handoffs whose commit is still landing: a read of ownership waits for them, as Postgres's
    # `FOR SHARE` read waits for the row lock of a transaction still committing.
    moves_landing: set[asyncio.Task[None]] = field(default_factory=set)


class FaultyStore:
    """One shard activation's connection to the shared `MemoryStore` (see the module docstring)."""

    _transactions = itertools.count(-1, -1)  # ids of the writes this wrapper decides itself

    def __init__(self, inner: MemoryStore, faults: Faults, rng: random.Random) -> None:
        self.inner = inner
        self.faults = faults
        self._rng = rng
        self.severed = False
        self._outcomes: dict[int, WriteOutcome] = {}
        self._landing: set[asyncio.Task[None]] = set()

    def sever(self) -> None:
        """The process using this connection died: every call from now on fails."""
        self.severed = True

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        await self._wait()
        self._check()
        return await operation()

    async def _wait(self) -> None:
        low, high = self.faults.latency_s
        if high > 0:
            await asyncio.sleep(self._rng.uniform(low, high))

    def _check(self) -> None:
        if self.severed:
            raise StoreUnavailable("connection closed: the shard's process is gone")
        if self.faults.down:
            raise StoreUnavailable("the database is down")

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        await self._wait()
        self._check()
        fault, self.faults.next_write = self.faults.next_write, None
        if fault == "cut":
            self._decide(receipt, "aborted")
            raise StoreOutcomeUnknown("connection lost during the write")
        if fault == "hold":
            transaction = self._decide(receipt, "unknown")
            low, high = self.faults.hold_s
            landing = asyncio.get_running_loop().create_task(
                self._land(transaction, self._rng.uniform(low, high), snapshots, delivery, fence)
            )
            self._landing.add(landing)
            landing.add_done_callback(self._landing.discard)
            raise StoreOutcomeUnknown("no answer to COMMIT; the commit is still in progress")
        await self.inner.save(snapshots, delivery=delivery, receipt=receipt, fence=fence)
        if fault == "lose_reply":
            raise StoreOutcomeUnknown("the write landed but its acknowledgement was lost")
        if self._rng.random() < 0.5:
            await self._wait()  # the reply takes its time too

    def _decide(self, receipt: WriteReceipt | None, outcome: WriteOutcome) -> int:
        transaction = next(self._transactions)
        self._outcomes[transaction] = outcome
        if receipt is not None:
            receipt.transaction_id = transaction
        return transaction

    async def _land(
        self,
        transaction: int,
        delay_s: float,
        snapshots: Sequence[LedgerSnapshot],
        delivery: Delivery | None,
        fence: Fence | None,
    ) -> None:
        await asyncio.sleep(delay_s)
        try:
            await self.inner.save(snapshots, delivery=delivery, fence=fence)
        except StoreError:
            self._outcomes[transaction] = "aborted"
        else:
            self._outcomes[transaction] = "committed"

    async def write_outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        await self._wait()
        self._check()
        if receipt.transaction_id is not None and receipt.transaction_id in self._outcomes:
            return self._outcomes[receipt.transaction_id]
        return await self.inner.write_outcome(receipt)

    async def load(self, user_ids: Sequence[str], *, now_ms: int) -> dict[str, StoredLedger]:
        return await self._call(lambda: self.inner.load(user_ids, now_ms=now_ms))

    async def open_session_users(self) -> list[str]:
        return await self._call(self.inner.open_session_users)

    async def claim(self, owner: str) -> Fence:
        return await self._call(lambda: self.inner.claim(owner))

    async def ownership(self, fence: Fence) -> Ownership:
        if self.faults.moves_landing:
            await asyncio.gather(*self.faults.moves_landing, return_exceptions=True)
        return await self._call(lambda: self.inner.ownership(fence))

    async def move_slots(self, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
        """A handoff's commit, with the write faults: cut (not moved), lost reply (moved), held
        (moved a little later); each answered `StoreOutcomeUnknown`."""
        await self._wait()
        self._check()
        fault, self.faults.next_write = self.faults.next_write, None
        if fault == "cut":
            raise StoreOutcomeUnknown("connection lost during the handoff")
        if fault == "hold":
            low, high = self.faults.hold_s

            async def land() -> None:
                await asyncio.sleep(self._rng.uniform(low, high))
                with contextlib.suppress(StoreError):
                    await self.inner.move_slots(fence, slots, to_shard)

            landing = asyncio.get_running_loop().create_task(land())
            self._landing.add(landing)
            landing.add_done_callback(self._landing.discard)
            self.faults.moves_landing.add(landing)
            landing.add_done_callback(self.faults.moves_landing.discard)
            raise StoreOutcomeUnknown("no answer to COMMIT; the handoff is still in progress")
        epoch = await self.inner.move_slots(fence, slots, to_shard)
        if fault == "lose_reply":
            raise StoreOutcomeUnknown("the handoff landed but its acknowledgement was lost")
        return epoch

    async def read_map(self, namespace: str) -> ShardMap | None:
        return await self._call(lambda: self.inner.read_map(namespace))

    async def create_map(self, namespace: str, count: int) -> ShardMap:
        return await self._call(lambda: self.inner.create_map(namespace, count))

    async def set_target(self, namespace: str, target: int | None) -> ShardMap:
        return await self._call(lambda: self.inner.set_target(namespace, target))

    async def prune_replies(self, now_ms: int) -> int:
        return await self._call(lambda: self.inner.prune_replies(now_ms))

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        return await self._call(lambda: self.inner.find_session(user_id, session_id))

    async def find_hold(self, user_id: str, hold_id: str) -> HoldRecord | None:
        return await self._call(lambda: self.inner.find_hold(user_id, hold_id))

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        return await self._call(lambda: self.inner.list_sessions(user_id, limit))

    async def list_periods(self, user_id: str, limit: int) -> list[PeriodRecord]:
        return await self._call(lambda: self.inner.list_periods(user_id, limit))

    async def credit_history(self, user_id: str, limit: int) -> list[CreditEntry]:
        return await self._call(lambda: self.inner.credit_history(user_id, limit))

    async def credit_balances(self, user_id: str) -> dict[CreditKey, tuple[int, int]]:
        return await self._call(lambda: self.inner.credit_balances(user_id))

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None:
        return await self._call(lambda: self.inner.find_plan_event(delivery_id))

    async def find_purchase(self, delivery_id: str) -> CreditPurchaseRecord | None:
        return await self._call(lambda: self.inner.find_purchase(delivery_id))

    async def close(self) -> None:
        self.severed = True

    async def settle(self) -> None:
        """Let every held commit land (the end of a run)."""
        while self._landing:
            await asyncio.gather(*self._landing, return_exceptions=True)
