"""GroupCommit: durable writes that arrive together share one transaction, and only the writes
of a transaction that committed are told so. A store stand-in records each transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from actors.groupcommit import GroupCommit
from actors.records import LedgerSnapshot
from actors.store import StoreError, StoreUnavailable, WriteReceipt


class RecordingStore:
    """Commits each transaction after `delay_s`; fails one whose snapshots include `bad`."""

    def __init__(self, *, delay_s: float = 0.01, bad: str | None = None, down: bool = False) -> None:
        self.delay_s = delay_s
        self.bad = bad
        self.down = down
        self.committed: list[list[str]] = []
        self._next_transaction = 100

    async def save(self, snapshots: Sequence[LedgerSnapshot], receipt: WriteReceipt) -> None:
        self._next_transaction += 1
        receipt.transaction_id = self._next_transaction
        await asyncio.sleep(self.delay_s)
        names = [cast(str, snapshot) for snapshot in snapshots]
        if self.down:
            raise StoreUnavailable("connection refused")
        if self.bad in names:
            raise StoreError("check constraint violated")
        self.committed.append(names)


def snapshot(name: str) -> LedgerSnapshot:
    return cast(LedgerSnapshot, name)  # the committer never looks inside


async def write_all(commits: GroupCommit, names: list[str]) -> list[Any]:
    receipts = [WriteReceipt() for _ in names]
    outcomes = await asyncio.gather(
        *(commits.write(snapshot(name), receipt) for name, receipt in zip(names, receipts, strict=True)),
        return_exceptions=True,
    )
    return [(outcome, receipt.transaction_id) for outcome, receipt in zip(outcomes, receipts, strict=True)]


async def test_writes_arriving_during_a_transaction_leave_together_in_the_next() -> None:
    store = RecordingStore(delay_s=0.05)
    commits = GroupCommit(store.save, timeout_s=5)
    first = asyncio.create_task(commits.write(snapshot("a"), WriteReceipt()))
    await asyncio.sleep(0.01)  # "a" is in its transaction now
    outcomes = await write_all(commits, ["b", "c", "d"])
    await first
    assert store.committed == [["a"], ["b", "c", "d"]]
    assert [outcome for outcome, _ in outcomes] == [None, None, None]
    assert len({transaction for _, transaction in outcomes}) == 1  # one receipt for the group
    assert (commits.transactions, commits.writes) == (2, 4)


async def test_one_bad_write_fails_alone() -> None:
    store = RecordingStore(bad="c")
    commits = GroupCommit(store.save, timeout_s=5)
    outcomes = await write_all(commits, ["a", "b", "c", "d"])
    errors = [outcome for outcome, _ in outcomes]
    assert errors[:2] == [None, None] and errors[3] is None
    assert isinstance(errors[2], StoreError)
    assert sorted(name for names in store.committed for name in names) == ["a", "b", "d"]


async def test_an_unreachable_store_fails_the_whole_group_without_retrying_each_write() -> None:
    store = RecordingStore(down=True)
    commits = GroupCommit(store.save, timeout_s=5)
    outcomes = await write_all(commits, ["a", "b", "c"])
    assert all(isinstance(outcome, StoreUnavailable) for outcome, _ in outcomes)
    assert commits.transactions == 1 and store.committed == []


async def test_a_transaction_past_its_bound_is_a_timeout_with_its_receipt_filled_in() -> None:
    store = RecordingStore(delay_s=1.0)
    commits = GroupCommit(store.save, timeout_s=0.05)
    outcomes = await write_all(commits, ["a", "b"])
    assert all(isinstance(outcome, TimeoutError) for outcome, _ in outcomes)
    assert all(transaction is not None for _, transaction in outcomes)  # its outcome can be asked for
    assert store.committed == []


async def test_a_write_cancelled_before_its_transaction_began_is_not_written() -> None:
    store = RecordingStore(delay_s=0.05)
    commits = GroupCommit(store.save, timeout_s=5)
    first = asyncio.create_task(commits.write(snapshot("a"), WriteReceipt()))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(commits.write(snapshot("b"), WriteReceipt()))
    kept = asyncio.create_task(commits.write(snapshot("c"), WriteReceipt()))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await asyncio.gather(first, kept)
    assert store.committed == [["a"], ["c"]]


async def test_a_write_cancelled_inside_its_transaction_does_not_stop_the_others() -> None:
    store = RecordingStore(delay_s=0.05)
    commits = GroupCommit(store.save, timeout_s=5)
    leaving = asyncio.create_task(commits.write(snapshot("a"), WriteReceipt()))
    staying = asyncio.create_task(commits.write(snapshot("b"), WriteReceipt()))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await staying
    assert store.committed == [["a", "b"]]


class StubbornStore(RecordingStore):
    """A transaction that cannot be interrupted for `delay_s` (a COMMIT on a slow server)."""

    async def save(self, snapshots: Sequence[LedgerSnapshot], receipt: WriteReceipt) -> None:
        self._next_transaction += 1
        receipt.transaction_id = self._next_transaction
        ends_at = asyncio.get_running_loop().time() + self.delay_s
        cancelled = False
        while (left_s := ends_at - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.sleep(left_s)
            except asyncio.CancelledError:
                cancelled = True  # not now: it ends when it ends
        self.committed.append([cast(str, snapshot) for snapshot in snapshots])
        if cancelled:
            raise asyncio.CancelledError


async def test_a_write_queued_past_its_bound_fails_unwritten_so_the_shard_answers_in_time() -> None:
    store = StubbornStore(delay_s=0.3)
    commits = GroupCommit(store.save, timeout_s=0.2)
    first = asyncio.create_task(commits.write(snapshot("a"), WriteReceipt()))
    await asyncio.sleep(0.05)
    queued_receipt = WriteReceipt()
    with pytest.raises(StoreUnavailable, match="nothing was written"):
        await commits.write(snapshot("b"), queued_receipt)
    assert queued_receipt.transaction_id is None  # it never began: its outcome is "aborted"
    with pytest.raises(TimeoutError):
        await first
    assert store.committed == [["a"]]  # the first did commit in the end: its receipt will tell
