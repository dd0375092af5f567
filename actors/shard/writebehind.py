"""Write-behind: dirty ledgers written every `sync_interval_s`, in batches of one store call each.

Retried with backoff while the store is down, and on `stop`. A user whose rows
the store refuses outright (not an outage) is set aside, so the other users'
writes go through. A busy user is left to the operation holding its turn (see
the shard's docstring). The loop also checks the shard's fence, settles the
writes in doubt nobody is asking about, and (shard 0) prunes expired replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from actors.records import LedgerSnapshot
from actors.shard.config import (
    ALARM_FLUSH_DELAY_S,
    FLUSH_BATCH_USERS,
    PRUNE_EVERY_S,
    RETRY_DELAY_MIN_S,
)
from actors.shard.fencing import Fencing
from actors.shard.parts import ShardPart
from actors.store import StoreError, StoreUnavailable
from actors.turns import UserTurns

log = structlog.get_logger("actors.shard")

# Ledgers snapshotted (or marked written) between two yields of the loop: a snapshot costs 15-60 us
# (more when it sets off the collector), so a slice keeps a flush's stall near a few milliseconds.
SLICE_USERS = 64
_T = TypeVar("_T")


def _slices(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for begin in range(0, len(items), SLICE_USERS):
        yield items[begin : begin + SLICE_USERS]


@dataclass(eq=False)
class WriteBehind(ShardPart):
    turns: UserTurns
    fencing: Fencing
    unwritable: set[str] = field(default_factory=set, init=False)  # refused rows; kept out of flushes
    flushes: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    last_flush_at_ms: int | None = field(default=None, init=False)
    last_flush_duration_ms: float | None = field(default=None, init=False)
    # Held by a flush, and by a handoff of slots (`placement`) so that no flush interleaves.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    # Asks the store which slots the shard owns (and whether its claim still holds), each sync.
    refresh_placement: Callable[[], Awaitable[object]] | None = field(default=None, init=False)
    _next_prune_ms: int = field(default=0, init=False)

    async def flush(self) -> int:
        """Write every dirty ledger now, in batches of one store call each. Returns users written."""
        residency = self.residency
        ledgers = residency.ledgers
        written = 0
        async with self.lock:
            began = time.perf_counter()
            held_back = self.unwritable | self.durable.in_doubt.keys()
            users = [u for u in residency.dirty if u not in held_back and ledgers[u].is_dirty]
            for begin in range(0, len(users), FLUSH_BATCH_USERS):
                # A busy user is written by the operation holding its turn (see the shard's docstring); a
                # durable write's credit entries are numbered in its draft, so writing the live ledger beside
                # it could number them twice. Checked as each is taken: a turn may begin meanwhile. Taken in
                # slices that give the loop back between them, so a flush of thousands does not stall the
                # answers.
                snapshots: list[LedgerSnapshot] = []
                for part in _slices(users[begin : begin + FLUSH_BATCH_USERS]):
                    snapshots.extend(
                        ledgers[user_id].snapshot() for user_id in part if self._writable_now(user_id)
                    )
                    await asyncio.sleep(0)
                try:
                    saved = await self._save_isolating_failures(snapshots)
                except StoreError:
                    self.failures += 1
                    raise
                for written_part in _slices(saved):
                    for snapshot in written_part:
                        user_id = snapshot.user.user_id
                        ledger = ledgers[user_id]
                        ledger.mark_synced(snapshot.version)
                        if not ledger.is_dirty:
                            residency.dirty.discard(user_id)
                    await asyncio.sleep(0)
                written += len(saved)
            residency.dirty = {user_id for user_id in residency.dirty if ledgers[user_id].is_dirty}
            self.flushes += 1
            self.last_flush_at_ms = self.clock()
            self.last_flush_duration_ms = round((time.perf_counter() - began) * 1000, 3)
        return written

    def _writable_now(self, user_id: str) -> bool:
        """Checked as each user is taken, since the flush yields between slices: not busy, and not
        newly in doubt or refused (a write in doubt is settled first: until then the live ledger
        may number credit entries its draft already wrote)."""
        return self.residency.mine(user_id) and not (
            self.turns.busy(user_id) or user_id in self.durable.in_doubt or user_id in self.unwritable
        )

    async def _save_isolating_failures(self, snapshots: list[LedgerSnapshot]) -> list[LedgerSnapshot]:
        """Save a batch; if the store refuses it outright, halve it until the refused users are found.

        An outage (`StoreUnavailable`) is raised as is: the whole batch is retried later.
        """
        try:
            await self.fencing.save(snapshots)
            return snapshots
        except StoreUnavailable:
            raise
        except StoreError as exc:
            if len(snapshots) == 1:
                user_id = snapshots[0].user.user_id
                self.unwritable.add(user_id)
                log.error("user_unwritable", shard=self.config.shard_index, user_id=user_id, error=repr(exc))
                return []
        middle = len(snapshots) // 2
        return [
            *await self._save_isolating_failures(snapshots[:middle]),
            *await self._save_isolating_failures(snapshots[middle:]),
        ]

    async def _prune_replies_when_due(self) -> None:
        """Shard 0 deletes expired `Idempotency-Key` replies from the store every `PRUNE_EVERY_S`."""
        now = self.clock()
        if self.config.shard_index != 0 or now < self._next_prune_ms:
            return
        self._next_prune_ms = now + PRUNE_EVERY_S * 1000
        pruned = await self.residency.require_store().prune_replies(now)
        if pruned:
            log.info("idempotency_keys_pruned", keys=pruned)

    # The loop waits with `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11, `wait_for` loses
    # a cancellation that arrives as the event fires, and `stop()` would then wait on a loop that
    # never ends.

    async def run(self, running: Callable[[], bool]) -> None:
        """Flush every `sync_interval_s` (sooner when a session ended) while `running()`."""
        interval_s = self.config.sync_interval_s
        soon = self.residency.flush_soon
        retry_s = 0.0
        while running():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_s or interval_s):
                    await soon.wait()
                    await asyncio.sleep(ALARM_FLUSH_DELAY_S)
            soon.clear()
            try:
                if self.refresh_placement is not None:
                    # First: what the store says this shard owns decides what it may write.
                    await self.refresh_placement()
                written = await self.flush()
                retry_s = 0.0
                if written:
                    log.debug("flushed", shard=self.config.shard_index, users=written)
                await self.durable.resolve_idle(self.turns)
                await self._prune_replies_when_due()
            except Exception as exc:
                # Whatever went wrong, the loop must survive it: dirty state stays dirty
                # and the next attempt comes with backoff.
                retry_s = min(max(retry_s * 2, RETRY_DELAY_MIN_S * 5), interval_s)
                log.warning(
                    "flush_failed",
                    shard=self.config.shard_index,
                    dirty_users=len(self.residency.dirty),
                    retry_in_s=retry_s,
                    error=repr(exc),
                    exc_info=not isinstance(exc, StoreError),
                )
