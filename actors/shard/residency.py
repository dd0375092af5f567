"""Residency: which users are in memory, loading them, and the one place a change is recorded.

A user is loaded from the store the first time they are needed, once, however
many requests ask at the same moment (single-flight), and the users asked for
in the same moment are loaded together, in one store call. Every change to a
resident ledger is recorded by `changed`: the user becomes dirty (written by
the next flush), their next alarm is armed, and their streams wake.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import structlog

from actors.errors import Unavailable
from actors.ledger import LedgerPolicy, StoredStateError, UserLedger
from actors.routing import slot_of
from actors.shard.config import (
    ACTIVATION_BATCH_USERS,
    RETRY_DELAY_MAX_S,
    RETRY_DELAY_MIN_S,
    UNREADABLE_RETRY_MS,
    ShardConfig,
)
from actors.shard.watchers import Watchers
from actors.store import LedgerStore, StoreError, UnreadableLedger
from actors.timers import DeadlineHeap

log = structlog.get_logger("actors.shard")

T = TypeVar("T")


class Residency:
    def __init__(
        self,
        config: ShardConfig,
        clock: Callable[[], int],
        *,
        watchers: Watchers,
        running: Callable[[], Awaitable[object]],
    ) -> None:
        self._config = config
        self._policy: LedgerPolicy = config.policy
        self._clock = clock
        self._watchers = watchers
        self._running = running  # waits (bounded) until the shard serves; `Unavailable` if it won't
        # Whether this shard serves a user now (its slot is owned: `placement`), and how many times
        # the user's slot changed hands here so far; set by the shard.
        self.mine: Callable[[str], bool] = lambda user_id: True
        self.stamp: Callable[[str], int] = lambda user_id: 0
        self.store: LedgerStore | None = None  # set once the shard has connected
        self.ledgers: dict[str, UserLedger] = {}
        self.dirty: set[str] = set()  # users with changes the store does not have yet
        self.timers = DeadlineHeap()  # each resident user's next alarm
        self.timer_wakeup = asyncio.Event()  # an earlier alarm was armed
        self.flush_soon = asyncio.Event()  # a session ended: write it promptly
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._next_load: asyncio.Task[None] | None = None  # the load users asked for now will join
        self._next_load_users: list[str] = []
        # Users whose stored rows could not make a ledger: the reason, and when to try again.
        self.unreadable: dict[str, tuple[str, int]] = {}
        self.activations = 0  # users loaded since the shard started
        self.reactivating = True  # until every user with an open session is loaded
        self.alarms_fired = 0
        self.alarms_by_kind: Counter[str] = Counter()

    def require_store(self) -> LedgerStore:
        assert self.store is not None, "store used before start"
        return self.store

    # ---------------------------------------------------------------- changes

    def changed(self, user_id: str, ledger: UserLedger) -> None:
        """Record that `ledger` (the user's live one) may have changed."""
        if ledger.is_dirty:
            self.dirty.add(user_id)
        self._watchers.wake(user_id, ledger.version)
        if self.timers.arm(user_id, ledger.next_deadline_ms()):
            self.timer_wakeup.set()

    def install(self, user_id: str, ledger: UserLedger) -> None:
        """Make `ledger` (a draft that was just written) the user's live ledger."""
        self.ledgers[user_id] = ledger
        if not ledger.is_dirty:
            self.dirty.discard(user_id)
        self.changed(user_id, ledger)

    def advance(self, user_id: str, ledger: UserLedger, now: int) -> int:
        """Fire the user's due alarms; a session they end is written promptly, not at the next sync."""
        session_id = ledger.active_session_id
        alarms = ledger.advance(now)
        self.alarms_fired += len(alarms)
        self.alarms_by_kind.update(alarm.kind for alarm in alarms)
        if session_id is not None and ledger.active_session_id is None:
            ended = ledger.ended_session(session_id)
            assert ended is not None
            log.info(
                "session_ended",
                user_id=user_id,
                session_id=session_id,
                end_reason=ended.end_reason,
                session_used_ms=ended.used_ms,
            )
            self.flush_soon.set()
        self.changed(user_id, ledger)
        return len(alarms)

    def active_session_count(self) -> int:
        return sum(1 for ledger in self.ledgers.values() if ledger.active_session_id is not None)

    # ------------------------------------------------------------- activation

    async def activate(self, user_id: str) -> None:
        """Make the user resident (loading them if need be); `Unavailable` if they cannot be."""
        if user_id in self.ledgers:
            return
        await self._running()
        self._refuse_if_unreadable(user_id)
        task = self._loading.get(user_id)
        if task is None:
            # Users asked for in the same moment (a gateway's batch, say) are loaded together, in
            # one store call, by the load that starts once the current calls have had their turn.
            if self._next_load is None or len(self._next_load_users) >= ACTIVATION_BATCH_USERS:
                # The task is handed its own list: by the time it runs, a newer one may be current.
                self._next_load_users = []
                self._next_load = asyncio.get_running_loop().create_task(
                    self._load_together(self._next_load_users)
                )
            self._next_load_users.append(user_id)
            task = self._loading[user_id] = self._next_load
            task.add_done_callback(functools.partial(self._loaded, user_id))
            task.add_done_callback(retrieve)  # its failure is each waiter's; none may be left
        # Shielded: a caller giving up must not cancel the load others wait for.
        await asyncio.shield(task)
        if user_id not in self.ledgers:
            self._refuse_if_unreadable(user_id)

    def _refuse_if_unreadable(self, user_id: str) -> None:
        """`Unavailable` for a user whose stored state could not be read, until it is tried again."""
        unreadable = self.unreadable.get(user_id)
        if unreadable is None:
            return
        reason, retry_at_ms = unreadable
        if self._clock() >= retry_at_ms:
            del self.unreadable[user_id]  # perhaps repaired: the next load tries again
            return
        raise Unavailable(
            "this user's stored state cannot be read; an operator must repair it (the shard's log "
            "says why: user_unreadable)",
            reason=reason,
        )

    def _loaded(self, user_id: str, task: asyncio.Task[None]) -> None:
        if self._loading.get(user_id) is task:
            del self._loading[user_id]

    async def _load_together(self, users: list[str]) -> None:
        await asyncio.sleep(0)  # the other calls of this moment add their users first
        if self._next_load_users is users:
            self._next_load = None
        await self.load(users)

    async def load(self, user_ids: list[str]) -> None:
        stamps = [self.stamp(user_id) for user_id in user_ids]
        try:
            stored = await self.require_store().load(user_ids, now_ms=self._clock())
        except StoreError as exc:
            raise Unavailable.of_store() from exc
        now = self._clock()
        for user_id, stamp in zip(user_ids, stamps, strict=True):
            if user_id in self.ledgers or not self.mine(user_id) or self.stamp(user_id) != stamp:
                # Its slot was handed off (or away and back) while it loaded: what was read may
                # predate the other shard's writes. It is loaded again when next asked for.
                continue
            found = stored.get(user_id)
            try:
                if isinstance(found, UnreadableLedger):
                    raise StoredStateError(found.reason)
                if found is not None:
                    ledger = UserLedger.restore(found, self._policy, now)
                else:
                    ledger = UserLedger.new(user_id, self._policy, now)
                self.ledgers[user_id] = ledger
                # Alarms that fell due while the user was not resident fire now.
                self.advance(user_id, ledger, now)
            except Exception as exc:
                # One user's rows must not cost the others their load (nor the shard its start):
                # that user is refused, and tried again later, after a repair perhaps.
                self.ledgers.pop(user_id, None)
                self.dirty.discard(user_id)
                self.timers.arm(user_id, None)
                self.unreadable[user_id] = (repr(exc), now + UNREADABLE_RETRY_MS)
                log.error(
                    "user_unreadable",
                    shard=self._config.shard_index,
                    user_id=user_id,
                    error=repr(exc),
                    retry_in_s=UNREADABLE_RETRY_MS // 1000,
                    hint="the user's rows break the ledger's rules (written by an older version?)",
                )
                continue
            self.activations += 1

    async def reactivate_in_background(self) -> None:
        """Load every user of this shard with an open session (their alarms must run), retrying
        until it is done (requests are served meanwhile: one for such a user loads them first)."""
        while True:
            try:
                await retrying("reactivate_open_sessions", self._reactivate, shard=self._config.shard_index)
                break
            except Exception:  # an unexpected failure must not leave open sessions unwatched
                log.exception("reactivation_failed", shard=self._config.shard_index)
                await asyncio.sleep(RETRY_DELAY_MAX_S)
        self.reactivating = False
        log.info(
            "shard_reactivated",
            shard=self._config.shard_index,
            resident_users=len(self.ledgers),
            active_sessions=self.active_session_count(),
        )

    async def _reactivate(self, slots: Collection[int] | None = None) -> None:
        """Load this shard's users with open sessions or holds (of `slots` only, if given)."""
        mine = [
            user_id
            for user_id in await self.require_store().open_session_users()
            if self.mine(user_id) and (slots is None or slot_of(user_id) in slots)
        ]
        for begin in range(0, len(mine), ACTIVATION_BATCH_USERS):
            await self.load(mine[begin : begin + ACTIVATION_BATCH_USERS])

    async def reactivate_slots(self, slots: Sequence[int], alarmed: Sequence[str] | None = None) -> None:
        """Slots this shard was just given: load their users with alarms (open sessions, held tails,
        holds), retried while the store is down, so that their alarms run here from now on:
        `alarmed` if the handoff named them (no scan of every open session), else as the store
        finds them."""
        gained = frozenset(slots)
        load: Callable[[], Awaitable[None]]
        if alarmed is None:
            load = functools.partial(self._reactivate, gained)
        else:
            load = functools.partial(
                self.load, [user_id for user_id in alarmed if slot_of(user_id) in gained]
            )
        await retrying("reactivate_gained_slots", load, shard=self._config.shard_index)

    def evict(self, user_id: str) -> None:
        """Forget a resident user (handed to another shard): their ledger, alarms and dirt."""
        self.ledgers.pop(user_id, None)
        self.dirty.discard(user_id)
        self.unreadable.pop(user_id, None)
        self.timers.arm(user_id, None)
        # Streams waiting on the user wake, and are told where the user went when they ask again.
        self._watchers.wake(user_id, sys.maxsize)


async def retrying(what: str, operation: Callable[[], Awaitable[T]], *, shard: int) -> T:
    """`operation`, tried again with backoff while the store (or the shard) is unavailable."""
    delay = RETRY_DELAY_MIN_S
    while True:
        try:
            return await operation()
        except (StoreError, OSError, Unavailable) as exc:
            log.warning("shard_start_retry", shard=shard, step=what, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_DELAY_MAX_S)


def retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's failure as seen (its waiters, if any are left, get it too)."""
    if not task.cancelled():
        task.exception()
