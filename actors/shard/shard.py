"""LedgerShard: many user ledgers in one process, with their timers and write-behind.

A plain class (Ray is applied to it in `hosting`), driven by one asyncio loop.

Guarantees:

- **One writer per user.** A user always lives on the shard its id hashes to.
- **One operation per user at a time** (the actor model's mailbox, `actors.turns`).
  Every operation on a resident user runs in the user's *turn*: at most one
  operation per user holds it, the others wait in arrival order, and one that
  waits for the store (a durable write, a history read) keeps it until it is
  done. Uncontended, taking and giving back the turn costs no await and no
  allocation. A waiter is bounded (`wait_budget_s`, then `Unavailable`:
  nothing changed), and so is a user's line (`USER_WAITERS_MAX`, then
  `Overloaded`). Users never wait for each other: one user's operations delay
  another's only by the shard's own CPU. The timer fires a busy user's alarms
  in that user's line, when its turn comes; the flush leaves a busy user to
  the operation holding its turn, because every operation that holds a turn
  across a wait writes the user's whole state itself (or fails and leaves it
  dirty for the next flush).
- **Lazy activation.** A user is loaded from the store the first time it is
  needed, once, however many requests ask at the same moment (single-flight).
- **Durable writes before answering** for session start, session end and plan
  changes: the operation runs on a clone of the ledger, the clone's snapshot
  is written, and only then is the clone swapped in. If the write fails the
  clone is dropped: nothing changed, and the caller gets `Unavailable`. The
  operation holds the user's turn until then (the Durable Object input gate).
- **Write-behind** for everything else: dirty ledgers are written every
  `sync_interval_s` in one batched call, retried with backoff while the
  store is down, and on `stop`.
- **One timer** (a deadline heap) fires stale-session, credits-run-out and
  period-end alarms for every resident user.
- **Restart.** On start the shard serves at once and, in the background,
  activates every user with an open session and re-arms their alarms, so a
  session that went silent while the shard was down still ends `stale`, billed
  to its last heartbeat (a request for such a user meanwhile loads them first).
- **Bounded.** A durable operation waits at most `wait_budget_s` to begin and
  `write_timeout_s` for its write. A write that failed in a way that leaves
  its outcome unknown is settled by its transaction's status: committed, the
  operation succeeded; aborted, nothing changed; if that cannot be told yet,
  the user is *in doubt* and every operation on them answers `Unavailable`
  until it can (then the ledger is adopted from the store or kept as it is).
- **At most once per `Idempotency-Key`** (see `actors.replies`): a keyed
  request's outcome is remembered with the change it made, and a retry gets
  it again; a retry while the first is still running is `IdempotencyInFlight`.
- **Isolated failures.** A user whose rows the store refuses outright (not an
  outage) is set aside by the flush, so the other users' writes go through. A
  user whose stored state cannot make a ledger (a time an older version let
  in) is refused (`Unavailable`, and a `user_unreadable` log line saying why)
  and tried again a minute later; the other users load and re-arm as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import structlog

from actors.errors import (
    EventConflict,
    IdempotencyInFlight,
    IdempotencyMismatch,
    LedgerError,
    Overloaded,
    RateLimited,
    SessionEnded,
    SessionNotFound,
    Unavailable,
)
from actors.groupcommit import GroupCommit
from actors.ledger import LedgerPolicy, PlanChange, StoredStateError, UserLedger
from actors.ratelimit import TokenBucket
from actors.records import (
    CreditEntry,
    CreditPurchaseRecord,
    Delivery,
    Difficulty,
    LedgerSnapshot,
    PlanAction,
    PlanEventRecord,
    PurchaseReason,
    ReplyRecord,
    SessionRecord,
    StoredLedger,
)
from actors.replies import IdempotencyKey, encode_refusal, encode_result, is_replayable, replay
from actors.routing import shard_index
from actors.store import (
    CountingStore,
    LedgerStore,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    UnreadableLedger,
    WriteOutcome,
    WriteReceipt,
)
from actors.timers import DeadlineHeap
from actors.times import wall_clock_ms
from actors.turns import TooManyWaiters, UserTurns
from actors.views import (
    BalanceCheck,
    CreditsAdded,
    CreditsView,
    CurrentSession,
    MeterConsumed,
    Page,
    PeriodSummary,
    PlanChangeResult,
    Reconciliation,
    SessionProgress,
    SessionStarted,
    SessionSummary,
    UsageChange,
    UsageView,
)

log = structlog.get_logger("actors.shard")

T = TypeVar("T")
R = TypeVar("R")
D = TypeVar("D", PlanEventRecord, CreditPurchaseRecord)
# `fenced`: a newer activation of this shard claimed its users (this process was replaced but
# still runs, e.g. on a node cut off from the cluster); it refuses every call from then on.
ShardState = Literal["starting", "running", "draining", "stopped", "fenced"]

# The methods that take one of the user's rate-limit tokens (`_limit_rate`). A gateway that was
# told `RateLimited` may refuse these for the same user, without calling, until the wait is over.
RATE_LIMITED_METHODS = frozenset(
    {
        "usage",
        "has_credits",
        "current_session",
        "list_sessions",
        "start_session",
        "heartbeat",
        "end_session",
        "consume_meter",
        "credits",
        "usage_history",
        "credit_history",
    }
)
# The methods a gateway may send together in one `batch` call: answered from memory (a cold user's
# activation aside), so none holds up the others in its batch for long.
BATCHABLE_METHODS = frozenset(
    {"usage", "usage_of", "has_credits", "current_session", "heartbeat", "consume_meter", "credits"}
)
# Writes a gateway may batch too, in batches of their own (each is durable before it answers, so it
# would hold up the reads of a batch it shared): each call is still its own write and transaction.
BATCHABLE_WRITES = frozenset({"start_session", "end_session"})
# A timer sleep never exceeds this, so a stepped wall clock is noticed soon.
TIMER_SLEEP_MAX_S = 30.0
# A user whose stored state could not be read is refused this long before it is tried again.
UNREADABLE_RETRY_MS = 60_000
# Operations one user may have waiting for their turn; more are refused (`Overloaded`).
USER_WAITERS_MAX = 64
# A batch answers the calls done by then; the others are fetched one by one (`collect`).
BATCH_WAIT_MAX_S = 0.02
# The answer of a batched call that was not collected is dropped this long after it is ready.
DEFERRED_KEPT_S = 60.0
# Sessions ended by an alarm are written within this delay (coalescing several).
ALARM_FLUSH_DELAY_S = 0.2
# Store connection and restart recovery retry between these bounds.
RETRY_DELAY_MIN_S = 0.1
RETRY_DELAY_MAX_S = 5.0
# Users loaded per store call when re-activating open sessions after a restart.
ACTIVATION_BATCH_USERS = 500
# Users written per store call by one flush.
FLUSH_BATCH_USERS = 5_000
# An alarm for a user whose last write is in doubt is retried this much later.
DOUBT_RETRY_MS = 1_000
# Expired `Idempotency-Key` replies are deleted from the store this often (by shard 0).
PRUNE_EVERY_S = 600
# Streams waiting for a change, per shard (each holds one pending `watch` call).
MAX_WATCHERS = 10_000


@dataclass(frozen=True, slots=True)
class ShardConfig:
    shard_index: int
    shard_count: int
    policy: LedgerPolicy
    sync_interval_s: float = 30.0
    max_pending_calls: int = 10_000
    start_wait_s: float = 3.0
    # A durable operation: time to begin (start, activation, the user's gate),
    # then time for its write, then time to read back a write that failed
    # ambiguously. Their sum stays below the gateway's call timeout, so the
    # shard gives up (and says so) before the caller stops listening.
    wait_budget_s: float = 3.0
    write_timeout_s: float = 6.0
    resolve_timeout_s: float = 2.0
    # Set (`<namespace>/<shard name>`, by `actors.hosting`): the shard claims it in the store on
    # start, and its writes land only while no newer activation has claimed it (fencing).
    owner: str | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.shard_index < self.shard_count, "shard_index out of range"
        assert self.sync_interval_s > 0, "sync_interval_s must be positive"
        assert self.max_pending_calls > 0, "max_pending_calls must be positive"
        assert min(self.wait_budget_s, self.write_timeout_s, self.resolve_timeout_s) > 0, (
            "budgets must be positive"
        )

    @property
    def durable_call_max_s(self) -> float:
        """The longest a durable operation can take inside the shard."""
        return self.wait_budget_s + self.write_timeout_s + self.resolve_timeout_s


@dataclass(frozen=True, slots=True)
class PlanEvent:
    """A plan change as billing sent it; `delivery_id` is the webhook id that deduplicates retries."""

    delivery_id: str
    plan: str
    action: PlanAction
    occurred_at_ms: int
    reset_usage: bool = False
    period_start_ms: int | None = None
    period_end_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Purchase:
    """Minutes billing added; `delivery_id` is the webhook id that deduplicates retries."""

    delivery_id: str
    minutes_ms: int
    reason: PurchaseReason
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class ShardStats:
    shard_index: int
    shard_count: int
    state: ShardState
    resident_users: int
    active_sessions: int
    dirty_users: int
    pending_calls: int
    armed_timers: int
    alarms_fired: int
    flushes: int
    flush_failures: int
    last_flush_at_ms: int | None
    users_in_doubt: int = 0
    unwritable_users: int = 0
    unreadable_users: int = 0  # stored state that cannot make a ledger (see `user_unreadable` logs)
    watchers: int = 0
    store_calls: dict[str, int] = field(default_factory=dict)
    # Still loading the users with open sessions after a start (it serves meanwhile).
    reactivating: bool = False
    activations: int = 0  # users loaded into memory since the shard started
    alarms_by_kind: dict[str, int] = field(default_factory=dict)  # stale, limit, period_end
    last_flush_duration_ms: float | None = None
    host: str = ""  # where the shard runs: its node's host name and its process id
    pid: int = 0
    # Durable writes (session starts and ends, ...) and the transactions they shared.
    durable_writes: int = 0
    durable_transactions: int = 0
    busy_users: int = 0  # users with an operation running now


class _Known(Exception):
    """A keyed request's outcome is already in the ledger (raised by `_begin`, caught by `_once`)."""

    def __init__(self, record: ReplyRecord) -> None:
        super().__init__(record.key)
        self.record = record


class LedgerShard:
    """Hosts the ledgers of the users whose ids hash to `config.shard_index`. See module docstring."""

    def __init__(
        self,
        config: ShardConfig,
        store_factory: Callable[[], Awaitable[LedgerStore]],
        *,
        clock: Callable[[], int] = wall_clock_ms,
        new_session_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._config = config
        self._policy = config.policy
        self._store_factory = store_factory
        self._clock = clock
        self._new_session_id = new_session_id
        self._state: ShardState = "starting"
        self._store: CountingStore | None = None
        self._commits: GroupCommit | None = None  # the durable writes' shared transactions
        self._reactivating = True  # until every user with an open session is loaded
        self._ledgers: dict[str, UserLedger] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._next_load: asyncio.Task[None] | None = None  # the load users asked for now will join
        self._next_load_users: list[str] = []
        self._turns = UserTurns(waiters_max=USER_WAITERS_MAX)
        self._alarms_in_line: set[str] = set()  # busy users whose due alarms wait for their turn
        # Users whose stored rows could not make a ledger: the reason, and when to try again.
        self._unreadable: dict[str, tuple[str, int]] = {}
        # Batched calls still running when their batch answered, by ticket (see `batch`).
        self._deferred: dict[int, asyncio.Task[tuple[bool, Any]]] = {}
        self._tickets = itertools.count(1)
        self._dirty: set[str] = set()
        # Users whose last durable write has an unknown outcome (user -> its write's receipt).
        self._in_doubt: dict[str, WriteReceipt] = {}
        # Users whose rows the store refuses outright; kept out of flushes.
        self._unwritable: set[str] = set()
        self._timers = DeadlineHeap()
        # Streams waiting for a user's next change: one event per user with the version its
        # waiters have seen (only a newer one wakes them), replaced when it fires; and how many
        # streams wait on each user (the last one out removes a quiet user's event).
        self._watchers: dict[str, tuple[asyncio.Event, int]] = {}
        self._waiting: Counter[str] = Counter()
        # Keyed requests still running: (user, Idempotency-Key) -> the request's hash.
        self._claims: dict[tuple[str, str], str] = {}
        self._next_prune_ms = 0
        # Each resident user's request budget (see `actors.ratelimit`).
        self._buckets: dict[str, TokenBucket] = {}
        self._pending_calls = 0
        self._alarms_fired = 0
        self._alarms_by_kind: Counter[str] = Counter()
        self._activations = 0
        self._last_flush_duration_ms: float | None = None
        self._host, self._pid = socket.gethostname(), os.getpid()  # a restart is a new process
        self._flushes = 0
        self._flush_failures = 0
        self._last_flush_at_ms: int | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._flush_lock = asyncio.Lock()
        self._timer_wakeup = asyncio.Event()
        self._flush_soon = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect the store, re-activate users with open sessions, start timers and flushes. Idempotent."""
        task = self._start_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            if self._state != "starting":
                raise Unavailable("shard is shutting down")
            # First start, or a start that failed on an unexpected error: try again.
            task = self._start_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(task)

    async def _start(self) -> None:
        if self._store is None:  # a retried start keeps the store it already opened
            self._store = CountingStore(await self._retrying("store_connect", self._store_factory))
            store = self._store
            store.on_fenced = self._fence_lost
            self._commits = GroupCommit(
                lambda snapshots, receipt: store.save(snapshots, receipt=receipt),
                timeout_s=self._config.write_timeout_s,
            )
        owner = self._config.owner
        if owner is not None and self._store.fence is None:
            # Before anyone is loaded: what this activation reads is then all an older one wrote.
            claimed = self._store
            fence = await self._retrying("store_claim", lambda: claimed.claim(owner))
            log.info("shard_claimed", shard=self._config.shard_index, owner=owner, epoch=fence.epoch)
        # Serving starts at once: the users with open sessions are loaded in the background (their
        # alarms must run even if no request comes for them), and a request for one of them loads
        # that user first, as any cold user is loaded. After a restart with 50k open sessions on a
        # shard, this is the difference between answering in ~1 s and in ~8 s.
        self._state = "running"
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._timer_loop()),
            loop.create_task(self._flush_loop()),
            loop.create_task(self._reactivate_in_background()),
        ]
        log.info("shard_started", shard=self._config.shard_index)

    async def _reactivate_in_background(self) -> None:
        while True:
            try:
                await self._retrying("reactivate_open_sessions", self._reactivate_open_sessions)
                break
            except Exception:  # an unexpected failure must not leave open sessions unwatched
                log.exception("reactivation_failed", shard=self._config.shard_index)
                await asyncio.sleep(RETRY_DELAY_MAX_S)
        self._reactivating = False
        log.info(
            "shard_reactivated",
            shard=self._config.shard_index,
            resident_users=len(self._ledgers),
            active_sessions=self._active_session_count(),
        )

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        delay = RETRY_DELAY_MIN_S
        while True:
            try:
                return await operation()
            except (StoreError, OSError, Unavailable) as exc:
                log.warning("shard_start_retry", shard=self._config.shard_index, step=what, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX_S)

    async def _reactivate_open_sessions(self) -> None:
        store = self._require_store()
        mine = [
            user_id
            for user_id in await store.open_session_users()
            if shard_index(user_id, self._config.shard_count) == self._config.shard_index
        ]
        for begin in range(0, len(mine), ACTIVATION_BATCH_USERS):
            await self._load(mine[begin : begin + ACTIVATION_BATCH_USERS])

    async def stop(self) -> None:
        """Drain: stop timers, write every dirty ledger, close the store."""
        if self._state in ("draining", "stopped"):
            return
        fenced = self._state == "fenced"
        self._state = "draining"
        # Operations under way finish first (new ones are refused now): the final flush leaves a
        # busy user to the operation holding its turn, which may write nothing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.durable_call_max_s):
                await self._turns.wait_idle()
        tasks = list(self._background)
        if self._start_task is not None and not self._start_task.done():
            tasks.append(self._start_task)  # still retrying its way up: give up
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if self._store is not None:
                try:
                    if not fenced:  # a replaced activation may write nothing
                        await self.flush()
                finally:
                    await self._store.close()
        finally:
            self._state = "stopped"
            log.info("shard_stopped", shard=self._config.shard_index, dirty_users_left=len(self._dirty))

    async def _running(self) -> CountingStore:
        if self._state == "running":
            return self._require_store()
        if self._state == "fenced":
            raise Unavailable("this shard was replaced by a newer activation")
        if self._state != "starting":
            raise Unavailable("shard is shutting down")
        try:
            async with asyncio.timeout(self._config.start_wait_s):
                await self.start()
        except TimeoutError:
            raise Unavailable("shard is still starting (storage unreachable?)") from None
        if not self._is_running():  # the state may have moved on while we waited
            raise Unavailable("shard is shutting down")
        return self._require_store()

    def _is_running(self) -> bool:
        return self._state == "running"

    def _require_store(self) -> CountingStore:
        assert self._store is not None, "store used before start"
        return self._store

    # ------------------------------------------------------------ user reads

    async def usage(self, user_id: str) -> UsageView:
        return await self._in_turn(user_id, lambda ledger, now: ledger.usage(now), rate_limited=True)

    async def usage_of(self, user_id: str) -> UsageView:
        """`usage` for billing and ops (internal calls): not counted against the user's rate limit."""
        return await self._in_turn(user_id, lambda ledger, now: ledger.usage(now))

    async def has_credits(self, user_id: str) -> bool:
        return await self._in_turn(user_id, lambda ledger, now: ledger.has_credits(now), rate_limited=True)

    async def current_session(self, user_id: str) -> CurrentSession:
        return await self._in_turn(
            user_id, lambda ledger, now: ledger.current_session(now), rate_limited=True
        )

    async def list_sessions(self, user_id: str, limit: int) -> Page[SessionSummary]:
        """Newest first: the store's history with this shard's newer, not yet written state on top."""
        await self._limit_rate(user_id, deadline=self._begin_by())
        async with self._admitted():
            store = await self._running()
            stored = await self._read("session history", store.list_sessions(user_id, limit))

        def merge(ledger: UserLedger, now: int) -> Page[SessionSummary]:
            merged = {record.session_id: record for record in stored}
            for record in ledger.resident_sessions():
                merged[record.session_id] = record
            newest = sorted(merged.values(), key=lambda r: (-r.started_at_ms, r.session_id))[:limit]
            return Page([_summary(record) for record in newest], ledger.version)

        return await self._in_turn(user_id, merge)

    # ----------------------------------------------------------- user writes

    async def start_session(
        self,
        user_id: str,
        *,
        topic: str | None = None,
        difficulty: Difficulty | None = None,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> SessionStarted:
        async def start() -> SessionStarted:
            session_id = self._new_session_id()
            started, _ = await self._durable(
                user_id,
                lambda ledger, now: ledger.start_session(now, session_id, topic=topic, difficulty=difficulty),
                idem=idem,
                rate_limited=True,
            )
            log.info("session_started", user_id=user_id, session_id=session_id, request_id=request_id)
            return started

        return await self._once(user_id, idem, start)

    async def heartbeat(
        self,
        user_id: str,
        session_id: str,
        *,
        seq: int | None = None,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> SessionProgress:
        """Write-behind: the time billed is durable at the next flush."""
        return await self._once(user_id, idem, lambda: self._heartbeat(user_id, session_id, seq, idem))

    async def _heartbeat(
        self, user_id: str, session_id: str, seq: int | None, idem: IdempotencyKey | None
    ) -> SessionProgress:
        async with self._admitted():
            ledger = await self._begin(user_id, idem=idem, rate_limited=True)
            try:
                now = self._clock()
                deadline = ledger.next_deadline_ms()
                if ledger.active_session_id == session_id and (deadline is None or now < deadline):
                    # The common case: no alarm is due, so the session goes on; written behind.
                    progress = ledger.heartbeat(now, session_id, seq=seq)
                    self._after_change(user_id, ledger)
                    return progress
                return await self._heartbeat_that_may_end(user_id, ledger, session_id, seq, now, idem)
            finally:
                self._turns.release(user_id)

    async def _heartbeat_that_may_end(
        self,
        user_id: str,
        ledger: UserLedger,
        session_id: str,
        seq: int | None,
        now: int,
        idem: IdempotencyKey | None,
    ) -> SessionProgress:
        """A heartbeat with an alarm due, or for a session that is not running: its answer may be
        the session's final account, which is durable before a client hears it (or, if it cannot
        be made durable, nothing changes and the caller gets `Unavailable`). In the user's turn."""
        draft = ledger.clone()
        outcome: SessionProgress | LedgerError
        try:
            try:
                outcome = draft.heartbeat(now, session_id, seq=seq)
            except SessionNotFound:
                record = await self._stored_ended_session(user_id, session_id)
                outcome = draft.heartbeat_after_end(session_id, record)
                if outcome.state == "ended":
                    return outcome  # ended long ago: final and durable already
        except LedgerError as refusal:
            outcome = refusal
        ended = isinstance(outcome, SessionEnded) or (
            isinstance(outcome, SessionProgress) and outcome.state == "ended"
        )
        changed = draft.version != ledger.version
        if ended and (changed or ledger.is_dirty):
            if idem is not None:  # the reply to a keyed heartbeat goes with the write it answers
                if isinstance(outcome, LedgerError):
                    if is_replayable(outcome):
                        draft.remember_reply(idem, encode_refusal(outcome), now)
                else:
                    draft.remember_reply(idem, encode_result(outcome), now)
            await self._write_and_commit(user_id, draft)
        elif changed:  # an alarm fired (a period rolled, say) and the session goes on: written behind
            self._ledgers[user_id] = draft
            self._after_change(user_id, draft)
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    async def end_session(
        self,
        user_id: str,
        session_id: str,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> SessionProgress:
        return await self._once(
            user_id, idem, lambda: self._end_session(user_id, session_id, request_id, idem)
        )

    async def _end_session(
        self, user_id: str, session_id: str, request_id: str | None, idem: IdempotencyKey | None
    ) -> SessionProgress:
        try:
            # An end is durable before it is answered, whoever ended the session (an alarm, say).
            ended, changed = await self._durable(
                user_id,
                lambda ledger, now: ledger.end_session(now, session_id),
                idem=idem,
                write_dirty=True,
                rate_limited=True,
            )
        except SessionNotFound:
            record = await self._stored_ended_session(user_id, session_id)
            if record is None:
                raise
            return await self._in_turn(user_id, lambda ledger, now: ledger.progress_of(record))
        if not changed:
            return ended  # ended before: nothing new to log
        log.info(
            "session_ended",
            user_id=user_id,
            session_id=session_id,
            end_reason=ended.end_reason,
            session_used_ms=ended.session_used_ms,
            request_id=request_id,
        )
        return ended

    async def change_plan(
        self,
        user_id: str,
        event: PlanEvent,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> PlanChangeResult:
        """Apply a plan event once per delivery id. An event older than the last applied one is
        recorded, not applied."""
        return await self._once(user_id, idem, lambda: self._change_plan(user_id, event, request_id, idem))

    async def _change_plan(
        self, user_id: str, event: PlanEvent, request_id: str | None, idem: IdempotencyKey | None
    ) -> PlanChangeResult:
        asked = _plan_event_record(user_id, event, applied=False, response={})

        def apply(draft: UserLedger, now: int) -> tuple[PlanChangeResult, PlanEventRecord]:
            change = PlanChange(
                plan=event.plan,
                action=event.action,
                occurred_at_ms=event.occurred_at_ms,
                delivery_id=event.delivery_id,
                reset_usage=event.reset_usage,
                period_start_ms=event.period_start_ms,
                period_end_ms=event.period_end_ms,
            )
            applied = draft.change_plan(now, change)
            usage = draft.usage(now)
            response = {"applied": applied, "usage": usage.to_dict()}
            return PlanChangeResult(applied, usage), replace(asked, applied=applied, response=response)

        result = await self._deliver(
            user_id,
            event.delivery_id,
            find=lambda store: store.find_plan_event(event.delivery_id),
            same=lambda known: known.same_event(asked),
            replay=lambda known: PlanChangeResult(
                known.applied, UsageView.from_dict(known.response["usage"])
            ),
            apply=apply,
            idem=idem,
        )
        log.info(
            "plan_event",
            user_id=user_id,
            delivery_id=event.delivery_id,
            plan=result.usage.plan,
            applied=result.applied,
            request_id=request_id,
        )
        return result

    async def add_credits(
        self,
        user_id: str,
        purchase: Purchase,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> CreditsAdded:
        """Add purchased minutes once per delivery id, durably before answering."""
        return await self._once(user_id, idem, lambda: self._add_credits(user_id, purchase, request_id, idem))

    async def _add_credits(
        self, user_id: str, purchase: Purchase, request_id: str | None, idem: IdempotencyKey | None
    ) -> CreditsAdded:
        asked = CreditPurchaseRecord(
            delivery_id=purchase.delivery_id,
            user_id=user_id,
            minutes_ms=purchase.minutes_ms,
            reason=purchase.reason,
            reference=purchase.reference,
            response={},
        )

        def apply(draft: UserLedger, now: int) -> tuple[CreditsAdded, CreditPurchaseRecord]:
            balance = draft.add_credits(
                now, purchase.minutes_ms, reason=purchase.reason, reference=purchase.reference
            )
            usage = draft.usage(now)
            response = {"purchased_ms": balance, "usage": usage.to_dict()}
            return CreditsAdded(balance, usage), replace(asked, response=response)

        result = await self._deliver(
            user_id,
            purchase.delivery_id,
            find=lambda store: store.find_purchase(purchase.delivery_id),
            same=lambda known: known.same_request(asked),
            replay=lambda known: CreditsAdded(
                known.response["purchased_ms"], UsageView.from_dict(known.response["usage"])
            ),
            apply=apply,
            idem=idem,
        )
        log.info(
            "credits_added",
            user_id=user_id,
            delivery_id=purchase.delivery_id,
            minutes_ms=purchase.minutes_ms,
            reason=purchase.reason,
            request_id=request_id,
        )
        return result

    async def _deliver(
        self,
        user_id: str,
        delivery_id: str,
        *,
        find: Callable[[CountingStore], Awaitable[D | None]],
        same: Callable[[D], bool],
        replay: Callable[[D], R],
        apply: Callable[[UserLedger, int], tuple[R, D]],
        idem: IdempotencyKey | None,
    ) -> R:
        """Apply a delivery from billing at most once: a retry gets the first answer again."""
        async with self._admitted():
            deadline = self._begin_by()
            ledger = await self._begin(user_id, deadline=deadline, idem=idem)
            try:
                known = await self._read("storage", find(self._require_store()), deadline=deadline)
                if known is not None:
                    if not same(known):
                        raise EventConflict(
                            "this delivery id was used for a different request", delivery_id=delivery_id
                        )
                    return replay(known)
                draft = ledger.clone()
                now = self._clock()
                result, record = apply(draft, now)
                if idem is not None:
                    draft.remember_reply(idem, encode_result(result), now)
                await self._write_and_commit(user_id, draft, delivery=record)
                return result
            finally:
                self._turns.release(user_id)

    async def consume_meter(
        self, user_id: str, meter: str, amount: int, *, idem: IdempotencyKey | None = None
    ) -> MeterConsumed:
        """Use a count meter: decided in memory, written behind."""
        return await self._once(
            user_id,
            idem,
            lambda: self._in_turn(
                user_id,
                lambda ledger, now: ledger.consume_meter(now, meter, amount),
                idem,
                rate_limited=True,
            ),
        )

    async def credits(self, user_id: str) -> CreditsView:
        return await self._in_turn(user_id, lambda ledger, now: ledger.credits(now), rate_limited=True)

    async def usage_history(self, user_id: str, periods: int) -> Page[PeriodSummary]:
        """Newest first: the store's periods with this shard's newer, not yet written ones on top."""
        await self._limit_rate(user_id, deadline=self._begin_by())
        async with self._admitted():
            store = await self._running()
            stored = await self._read("usage history", store.list_periods(user_id, periods))

        def merge(ledger: UserLedger, now: int) -> Page[PeriodSummary]:
            ledger.advance(now)
            merged = {record.start_ms: PeriodSummary.of(record) for record in stored}
            for summary in ledger.resident_periods():
                merged[summary.period_start_ms] = summary
            newest = sorted(merged.values(), key=lambda p: -p.period_start_ms)[:periods]
            return Page(newest, ledger.version)

        return await self._in_turn(user_id, merge)

    async def credit_history(self, user_id: str, limit: int) -> Page[CreditEntry]:
        """Newest first. The user is written first, so consumption still open is in it."""
        async with self._admitted():
            ledger = await self._begin(user_id, rate_limited=True)
            try:
                await self._write_user(user_id)
                store = self._require_store()
                entries = await self._read("credit history", store.credit_history(user_id, limit))
                return Page(entries, ledger.version)
            finally:
                self._turns.release(user_id)

    async def reconcile(self, user_id: str) -> Reconciliation:
        """Compare the live balances with what the credit ledger's entries add up to."""
        async with self._admitted():
            await self._begin(user_id)
            try:
                return await self._reconcile(user_id)
            finally:
                self._turns.release(user_id)

    async def _reconcile(self, user_id: str) -> Reconciliation:
        """Write the user, then compare (the caller holds the user's turn)."""
        # Alarms due now fire first, so the state written is the state compared.
        now = self._clock()
        self._advance(user_id, self._ledgers[user_id], now)
        await self._write_user(user_id, even_if_clean=True)
        derived = await self._read("the credit ledger", self._require_store().credit_balances(user_id))
        ledger = self._ledgers[user_id]
        checks = tuple(
            BalanceCheck(
                bucket=bucket,
                window_start_ms=window,
                live=live,
                derived=derived.get((bucket, window), (0, 0))[0],
                recorded=derived.get((bucket, window), (0, 0))[1],
            )
            for (bucket, window), live in sorted(ledger.balances(now).items(), key=lambda item: str(item[0]))
        )
        return Reconciliation(user_id=user_id, checks=checks, version=ledger.version)

    async def watch(self, user_id: str, after_version: int, timeout_s: float) -> UsageChange | None:
        """Once the version is above `after_version`: the usage object and the events since
        (those the ledger still holds); None if `timeout_s` passes first."""
        if self._waiting.total() >= MAX_WATCHERS:
            raise Overloaded("too many streams on this shard", limit=MAX_WATCHERS)
        change = await self._change_since(user_id, after_version)
        if change is not None:
            return change
        resident = self._ledgers.get(user_id)
        seen = resident.version if resident is not None else after_version
        event, _ = self._watchers.setdefault(user_id, (asyncio.Event(), seen))
        self._waiting[user_id] += 1
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return None
        finally:
            self._waiting[user_id] -= 1
            if self._waiting[user_id] == 0:
                del self._waiting[user_id]
                if user_id in self._watchers and self._watchers[user_id][0] is event:
                    del self._watchers[user_id]
        return await self._change_since(user_id, after_version)

    async def _change_since(self, user_id: str, after_version: int) -> UsageChange | None:
        def change(ledger: UserLedger, now: int) -> UsageChange | None:
            view = ledger.usage(now)
            if view.version <= after_version:
                return None
            return UsageChange(usage=view, events=ledger.events_after(after_version))

        return await self._in_turn(user_id, change)

    # ------------------------------------------------------------- operations

    async def flush(self) -> int:
        """Write every dirty ledger now, in batches of one store call each. Returns users written."""
        written = 0
        async with self._flush_lock:
            began = time.perf_counter()
            held_back = self._unwritable | self._in_doubt.keys()
            users = [u for u in self._dirty if u not in held_back and self._ledgers[u].is_dirty]
            for begin in range(0, len(users), FLUSH_BATCH_USERS):
                # A busy user is written by the operation holding its turn (see the module docstring);
                # a durable write's credit entries are numbered in its draft, so writing the live
                # ledger beside it could number them twice. Checked per batch: a turn may begin
                # meanwhile.
                batch = [u for u in users[begin : begin + FLUSH_BATCH_USERS] if not self._turns.busy(u)]
                snapshots = [self._ledgers[user_id].snapshot() for user_id in batch]
                try:
                    saved = await self._save_isolating_failures(snapshots)
                except StoreError:
                    self._flush_failures += 1
                    raise
                for snapshot in saved:
                    user_id = snapshot.user.user_id
                    ledger = self._ledgers[user_id]
                    ledger.mark_synced(snapshot.version)
                    if not ledger.is_dirty:
                        self._dirty.discard(user_id)
                written += len(saved)
            self._dirty = {user_id for user_id in self._dirty if self._ledgers[user_id].is_dirty}
            self._flushes += 1
            self._last_flush_at_ms = self._clock()
            self._last_flush_duration_ms = round((time.perf_counter() - began) * 1000, 3)
        return written

    async def _save_isolating_failures(self, snapshots: list[LedgerSnapshot]) -> list[LedgerSnapshot]:
        """Save a batch; if the store refuses it outright, halve it until the refused users are found.

        An outage (`StoreUnavailable`) is raised as is: the whole batch is retried later.
        """
        try:
            await self._require_store().save(snapshots)
            return snapshots
        except StoreUnavailable:
            raise
        except StoreError as exc:
            if len(snapshots) == 1:
                user_id = snapshots[0].user.user_id
                self._unwritable.add(user_id)
                log.error("user_unwritable", shard=self._config.shard_index, user_id=user_id, error=repr(exc))
                return []
        middle = len(snapshots) // 2
        return [
            *await self._save_isolating_failures(snapshots[:middle]),
            *await self._save_isolating_failures(snapshots[middle:]),
        ]

    def fire_due_alarms(self) -> int:
        """Fire every alarm due now. The timer loop calls this; tests with a fake clock may too."""
        now = self._clock()
        fired = 0
        for user_id in self._timers.pop_due(now):
            if user_id not in self._ledgers:
                continue
            if user_id in self._in_doubt:
                # Settled by the user's next operation, or by the flush loop; come back then.
                self._timers.arm(user_id, now + DOUBT_RETRY_MS)
                continue
            if self._turns.busy(user_id):
                # Its alarms fire in its line, when its turn comes (once, however often asked).
                if user_id not in self._alarms_in_line:
                    self._turns.call_when_free(user_id, functools.partial(self._alarm_in_turn, user_id))
                    self._alarms_in_line.add(user_id)
                continue
            fired += self._alarm(user_id, now)
        return fired

    def _alarm_in_turn(self, user_id: str) -> None:
        self._alarms_in_line.discard(user_id)
        now = self._clock()
        if user_id in self._in_doubt:
            self._timers.arm(user_id, now + DOUBT_RETRY_MS)  # come back once the doubt is settled
        elif user_id in self._ledgers:
            self._alarm(user_id, now)

    def _alarm(self, user_id: str, now: int) -> int:
        """Fire the user's alarms due at `now` (the caller holds, or could take, the user's turn)."""
        try:
            return self._advance(user_id, self._ledgers[user_id], now)
        except Exception:
            # One user's failure must not cost the others their alarms.
            log.exception("alarm_failed", shard=self._config.shard_index, user_id=user_id)
            self._timers.arm(user_id, now + DOUBT_RETRY_MS)
            return 0

    def _advance(self, user_id: str, ledger: UserLedger, now: int) -> int:
        """Fire the user's due alarms; a session they end is written promptly, not at the next sync."""
        session_id = ledger.active_session_id
        alarms = ledger.advance(now)
        fired = len(alarms)
        self._alarms_fired += fired
        self._alarms_by_kind.update(alarm.kind for alarm in alarms)
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
            self._flush_soon.set()
        self._after_change(user_id, ledger)
        return fired

    async def batch(
        self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
    ) -> list[tuple[bool | None, Any]]:
        """Run several calls that arrived together at a gateway, as one Ray call (Ray's per-call cost
        is paid once). Each is exactly the call it would have been alone, run concurrently; each
        answer is `(True, result)` or `(False, the exception it raised)`, in order.

        A batch answers once its calls are done or `BATCH_WAIT_MAX_S` has passed, whichever comes
        first: a call still running then (waiting for its user's turn behind a durable write, or
        for a slow store) is answered `(None, ticket)`, and the caller fetches its answer with
        `collect(ticket)`. So one user's wait never holds up the other calls of its batch, nor the
        gateway's next batch."""

        async def one(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
            if method not in BATCHABLE_METHODS and method not in BATCHABLE_WRITES:
                return False, ValueError(f"{method!r} cannot be batched")
            try:
                return True, await getattr(self, method)(*args, **kwargs)
            except Exception as exc:  # handed back to the caller that made this call
                return False, exc

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(one(*call)) for call in calls]
        if not tasks:
            return []
        await asyncio.wait(tasks, timeout=BATCH_WAIT_MAX_S)
        answers: list[tuple[bool | None, Any]] = []
        for task in tasks:
            if task.done():
                answers.append(task.result())
                continue
            ticket = next(self._tickets)
            self._deferred[ticket] = task
            # Kept for its caller a while after it is done; a caller that never comes (its gateway
            # died) leaves nothing behind for long.
            task.add_done_callback(functools.partial(self._forget_deferred_later, ticket))
            answers.append((None, ticket))
        return answers

    def _forget_deferred_later(self, ticket: int, _: asyncio.Task[tuple[bool, Any]]) -> None:
        asyncio.get_running_loop().call_later(DEFERRED_KEPT_S, self._deferred.pop, ticket, None)

    async def collect(self, ticket: int) -> tuple[bool, Any]:
        """The answer of a batched call that `batch` answered `(None, ticket)`, once it is done."""
        task = self._deferred.pop(ticket, None)
        if task is None:
            return False, Unavailable("this call's answer is no longer kept; retry it")
        return await asyncio.shield(task)

    async def stats(self) -> ShardStats:
        store = self._store
        return ShardStats(
            shard_index=self._config.shard_index,
            shard_count=self._config.shard_count,
            state=self._state,
            resident_users=len(self._ledgers),
            active_sessions=self._active_session_count(),
            dirty_users=len(self._dirty),
            pending_calls=self._pending_calls,
            armed_timers=len(self._timers),
            alarms_fired=self._alarms_fired,
            flushes=self._flushes,
            flush_failures=self._flush_failures,
            last_flush_at_ms=self._last_flush_at_ms,
            users_in_doubt=len(self._in_doubt),
            unwritable_users=len(self._unwritable),
            unreadable_users=len(self._unreadable),
            watchers=self._waiting.total(),
            store_calls=dict(store.calls) if store is not None else {},
            reactivating=self._reactivating,
            activations=self._activations,
            alarms_by_kind=dict(self._alarms_by_kind),
            last_flush_duration_ms=self._last_flush_duration_ms,
            host=self._host,
            pid=self._pid,
            durable_writes=self._commits.writes if self._commits is not None else 0,
            durable_transactions=self._commits.transactions if self._commits is not None else 0,
            busy_users=len(self._turns),
        )

    async def ready(self) -> ShardStats:
        """Wait (bounded) until started, then report stats."""
        await self._running()
        return await self.stats()

    # -------------------------------------------------------------- internals

    async def _check_fence(self) -> None:
        """Whether a newer activation claimed this shard, asked even when there was nothing to
        write: a replaced shard that only serves reads learns of it within one sync interval."""
        store = self._require_store()
        if store.fence is not None and not await store.holds(store.fence):
            self._fence_lost()

    def _fence_lost(self) -> None:
        if self._state != "running":
            return
        self._state = "fenced"
        self._timer_wakeup.set()  # the loops see the state and end
        self._flush_soon.set()
        log.error(
            "shard_fenced",
            shard=self._config.shard_index,
            owner=self._config.owner,
            hint="a newer activation of this shard claimed its users; this one refuses every call",
        )

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        if self._state == "fenced":
            raise Unavailable("this shard was replaced by a newer activation")
        if self._state in ("draining", "stopped"):
            # After the final flush nothing may change in memory only.
            raise Unavailable("shard is shutting down")
        if self._pending_calls >= self._config.max_pending_calls:
            raise Overloaded("shard has too many pending calls", limit=self._config.max_pending_calls)
        self._pending_calls += 1
        try:
            yield
        finally:
            self._pending_calls -= 1

    def _begin_by(self) -> float:
        """The loop time by which an operation starting now must have begun (`wait_budget_s`)."""
        return asyncio.get_running_loop().time() + self._config.wait_budget_s

    async def _begin(
        self,
        user_id: str,
        *,
        deadline: float | None = None,
        idem: IdempotencyKey | None = None,
        rate_limited: bool = False,
    ) -> UserLedger:
        """Take the user's turn: returns the user's live ledger, for the caller alone until it calls
        `self._turns.release(user_id)` (always, in a `finally`).

        Uncontended and resident, this neither awaits nor allocates. Otherwise it loads the user,
        waits in the user's line and settles a write in doubt, all by `deadline` (default: within
        `wait_budget_s`): past it, `Unavailable` (nothing was done). A keyed request whose outcome
        the ledger already holds ends here with `_Known` (see `_once`); a `rate_limited` one takes
        a token of the user's rate limit here (`RateLimited`); either way the turn is given back."""
        if user_id not in self._ledgers or user_id in self._in_doubt or not self._turns.try_take(user_id):
            await self._wait_for_turn(user_id, deadline if deadline is not None else self._begin_by())
        ledger = self._ledgers[user_id]
        if idem is not None and (known := ledger.reply(idem.key, self._clock())) is not None:
            self._turns.release(user_id)
            raise _Known(known)
        if rate_limited:
            try:
                self._take_token(user_id, ledger)
            except RateLimited:
                self._turns.release(user_id)
                raise
        return ledger

    async def _wait_for_turn(self, user_id: str, deadline: float) -> None:
        """`_begin`'s slow path: on return the caller holds the user's turn, and no write is in doubt."""
        took = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._running()
                await self._activate(user_id)
                if not self._turns.try_take(user_id):
                    await self._turns.take(user_id, deadline=deadline)
                took = True
                if user_id in self._in_doubt:
                    await self._resolve_doubt(user_id)
        except TimeoutError:
            if took:
                self._turns.release(user_id)
            raise Unavailable("the shard is too busy to begin this operation; nothing was changed") from None
        except TooManyWaiters:
            raise Overloaded(
                "too many calls are waiting for this user; nothing was changed", limit=USER_WAITERS_MAX
            ) from None
        except BaseException:
            if took:
                self._turns.release(user_id)
            raise

    async def _read(self, what: str, read: Awaitable[T], *, deadline: float | None = None) -> T:
        """A store read an operation needs, by `deadline` (default: within `resolve_timeout_s`):
        `Unavailable` if the store fails or is too slow (nothing was changed)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._config.resolve_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await read
        except (StoreError, TimeoutError) as exc:
            raise Unavailable(f"{what} is unavailable; nothing was changed") from exc

    async def _in_turn(
        self,
        user_id: str,
        operate: Callable[[UserLedger, int], T],
        idem: IdempotencyKey | None = None,
        *,
        rate_limited: bool = False,
    ) -> T:
        """Run `operate` on the user's live ledger in the user's turn, with no await inside: it is
        answered from memory (a change it makes is written behind)."""
        async with self._admitted():
            ledger = await self._begin(user_id, idem=idem, rate_limited=rate_limited)
            try:
                return operate(ledger, self._clock())
            finally:
                try:
                    self._after_change(user_id, ledger)
                finally:
                    self._turns.release(user_id)

    async def _activate(self, user_id: str) -> None:
        if user_id in self._ledgers:
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
            task.add_done_callback(_retrieve)  # its failure is each waiter's; none may be left
        # Shielded: a caller giving up must not cancel the load others wait for.
        await asyncio.shield(task)
        if user_id not in self._ledgers:
            self._refuse_if_unreadable(user_id)

    def _refuse_if_unreadable(self, user_id: str) -> None:
        """`Unavailable` for a user whose stored state could not be read, until it is tried again."""
        unreadable = self._unreadable.get(user_id)
        if unreadable is None:
            return
        reason, retry_at_ms = unreadable
        if self._clock() >= retry_at_ms:
            del self._unreadable[user_id]  # perhaps repaired: the next load tries again
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
        await self._load(users)

    async def _load(self, user_ids: list[str]) -> None:
        store = self._require_store()
        try:
            stored = await store.load(user_ids, now_ms=self._clock())
        except StoreError as exc:
            raise Unavailable("cannot load user from storage") from exc
        now = self._clock()
        for user_id in user_ids:
            if user_id in self._ledgers:
                continue
            found = stored.get(user_id)
            try:
                if isinstance(found, UnreadableLedger):
                    raise StoredStateError(found.reason)
                if found is not None:
                    ledger = UserLedger.restore(found, self._policy, now)
                else:
                    ledger = UserLedger.new(user_id, self._policy, now)
                self._ledgers[user_id] = ledger
                # Alarms that fell due while the user was not resident fire now.
                self._advance(user_id, ledger, now)
            except Exception as exc:
                # One user's rows must not cost the others their load (nor the shard its start):
                # that user is refused, and tried again later, after a repair perhaps.
                self._ledgers.pop(user_id, None)
                self._dirty.discard(user_id)
                self._timers.arm(user_id, None)
                self._unreadable[user_id] = (repr(exc), now + UNREADABLE_RETRY_MS)
                log.error(
                    "user_unreadable",
                    shard=self._config.shard_index,
                    user_id=user_id,
                    error=repr(exc),
                    retry_in_s=UNREADABLE_RETRY_MS // 1000,
                    hint="the user's rows break the ledger's rules (written by an older version?)",
                )
                continue
            self._activations += 1

    async def _durable(
        self,
        user_id: str,
        operate: Callable[[UserLedger, int], T],
        *,
        idem: IdempotencyKey | None = None,
        write_dirty: bool = False,
        rate_limited: bool = False,
    ) -> tuple[T, bool]:
        """Run `operate` on a clone, make the clone durable (with the reply to `idem`), then swap
        it in, all in the user's turn. Returns the result and whether anything changed (and was
        written). With `write_dirty`, a live ledger that changed nothing now but has changes not
        yet written (an alarm's) is written before the answer too."""
        async with self._admitted():
            ledger = await self._begin(user_id, idem=idem, rate_limited=rate_limited)
            try:
                draft = ledger.clone()
                now = self._clock()
                result = operate(draft, now)
                changed = draft.version != ledger.version
                if changed:
                    if idem is not None:
                        draft.remember_reply(idem, encode_result(result), now)
                    await self._write_and_commit(user_id, draft)
                elif write_dirty and ledger.is_dirty:
                    await self._write_and_commit(user_id, draft)
                return result, changed
            finally:
                self._turns.release(user_id)

    async def _limit_rate(self, user_id: str, *, deadline: float) -> None:
        """Take a rate-limit token before a read that goes to the store ahead of its turn (the
        others take theirs in `_begin`); the user is loaded first, by `deadline`."""
        async with self._admitted():
            try:
                async with asyncio.timeout_at(deadline):
                    await self._running()
                    await self._activate(user_id)
            except TimeoutError:
                raise Unavailable(
                    "the shard is too busy to begin this operation; nothing was changed"
                ) from None
        self._take_token(user_id, self._ledgers[user_id])

    def _take_token(self, user_id: str, ledger: UserLedger) -> None:
        """Take one of the user's tokens (their plan's `rate_limit`); `RateLimited` when none is left.
        Decided in the call that does the work, with no I/O."""
        plan = self._policy.plans.get(ledger.plan)
        limit = plan.rate_limit if plan is not None else None
        if limit is None:
            return
        now = self._clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = TokenBucket(float(limit.burst), now)
        wait_s = bucket.take(limit, now)
        if wait_s > 0:
            raise RateLimited.waiting(wait_s)

    async def _once(self, user_id: str, idem: IdempotencyKey | None, run: Callable[[], Awaitable[R]]) -> R:
        """Run a request at most once per `Idempotency-Key`: a retry gets the first outcome again.

        The operation looks the key up in the user's turn (`_begin`), after any write in doubt is
        settled, so what it finds is the truth. Durable operations remember their reply in the
        write they make; any other outcome is remembered here, on the live ledger (still in the
        operation's turn: nothing runs between its end and this), and written with its next write."""
        if idem is None:
            return await run()
        slot = (user_id, idem.key)
        running = self._claims.get(slot)
        if running is not None:
            if running != idem.request_hash:
                raise IdempotencyMismatch(
                    "this Idempotency-Key was used for a different request", idempotency_key=idem.key
                )
            raise IdempotencyInFlight(
                "a request with this Idempotency-Key is still running; retry shortly",
                idempotency_key=idem.key,
            )
        self._claims[slot] = idem.request_hash
        try:
            try:
                result = await run()
            except _Known as known:
                replayed: R = replay(known.record, idem)
                return replayed
            except LedgerError as exc:
                if is_replayable(exc) and user_id in self._ledgers:
                    self._ledgers[user_id].remember_reply(idem, encode_refusal(exc), self._clock())
                raise
            ledger = self._ledgers[user_id]
            if ledger.reply(idem.key, self._clock()) is None:
                ledger.remember_reply(idem, encode_result(result), self._clock())
            return result
        finally:
            del self._claims[slot]

    async def _write_and_commit(
        self, user_id: str, draft: UserLedger, *, delivery: Delivery | None = None
    ) -> None:
        """Write `draft` and make it the live ledger once durable. Not cancellable half-way: a
        caller cancelled meanwhile still waits (within the write's bound) for its transaction, so
        memory always follows what Postgres holds, and the user's turn is held until then."""
        work = asyncio.get_running_loop().create_task(self._commit_draft(user_id, draft, delivery))
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

    async def _commit_draft(self, user_id: str, draft: UserLedger, delivery: Delivery | None) -> None:
        snapshot = draft.snapshot()
        receipt = WriteReceipt()
        try:
            if delivery is None:  # shares a transaction with the writes of this moment
                assert self._commits is not None, "the store opens first"
                await self._commits.write(snapshot, receipt)
            else:
                async with asyncio.timeout(self._config.write_timeout_s):
                    await self._require_store().save([snapshot], delivery=delivery, receipt=receipt)
        except StoreOutcomeUnknown as exc:
            await self._settle(user_id, receipt, exc)
        except StoreError as exc:
            raise Unavailable("storage is unavailable; nothing was changed") from exc
        except TimeoutError as exc:
            # Our own bound fired: how far the write got is for its transaction to tell.
            await self._settle(user_id, receipt, exc)
        draft.mark_synced(snapshot.version)
        self._ledgers[user_id] = draft
        if not draft.is_dirty:
            self._dirty.discard(user_id)
        self._after_change(user_id, draft)

    async def _settle(self, user_id: str, receipt: WriteReceipt, exc: BaseException) -> None:
        """A write's answer was lost: return if its transaction committed, raise `Unavailable` if
        it did not. When that cannot be told yet, the user is in doubt until it can."""
        outcome = await self._outcome(receipt)
        if outcome == "committed":
            log.warning("write_committed_despite_error", user_id=user_id, error=repr(exc))
            return
        if outcome == "aborted":
            raise Unavailable("storage is unavailable; nothing was changed") from exc
        self._in_doubt[user_id] = receipt
        log.warning("write_in_doubt", user_id=user_id, transaction=receipt.transaction_id, error=repr(exc))
        raise Unavailable("storage failed during the write; retry shortly") from exc

    async def _outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        """The write's outcome as its transaction tells it, waiting at most `resolve_timeout_s`."""
        try:
            async with asyncio.timeout(self._config.resolve_timeout_s):
                return await self._require_store().write_outcome(receipt)
        except (StoreError, TimeoutError):
            return "unknown"

    async def _resolve_doubt(self, user_id: str) -> None:
        """Settle a write of unknown outcome: adopt the store's state if it committed.

        The caller holds the user's turn."""
        receipt = self._in_doubt.get(user_id)
        if receipt is None:
            return
        outcome = await self._outcome(receipt)
        if outcome == "unknown":
            raise Unavailable("this user's last write is still unresolved; retry shortly")
        if outcome == "committed":
            # Nothing changed this user since (everything waited on the doubt), so the stored
            # state is the whole truth.
            try:
                async with asyncio.timeout(self._config.resolve_timeout_s):
                    stored = await self._require_store().load([user_id], now_ms=self._clock())
            except (StoreError, TimeoutError) as exc:
                raise Unavailable("this user's last write is still unresolved; retry shortly") from exc
            found = stored.get(user_id)
            try:
                if not isinstance(found, StoredLedger):
                    raise StoredStateError(found.reason if found is not None else "the user's rows are gone")
                ledger = UserLedger.restore(found, self._policy, self._clock())
            except Exception as exc:  # rows that make no ledger: this user is refused, not the shard
                log.error("user_unreadable", user_id=user_id, error=repr(exc), after="a write in doubt")
                raise Unavailable("this user's last write is still unresolved; retry shortly") from exc
            self._ledgers[user_id] = ledger
            self._dirty.discard(user_id)
            self._advance(user_id, ledger, self._clock())
        log.info("write_in_doubt_settled", user_id=user_id, outcome=outcome)
        del self._in_doubt[user_id]
        self._after_change(user_id, self._ledgers[user_id])  # its alarms, held back meanwhile

    async def _settle_doubts(self) -> None:
        """Settle the writes in doubt of users nobody is calling (a call settles its user's first)."""
        for user_id in list(self._in_doubt):
            if not self._turns.try_take(user_id):
                continue  # the operation holding the turn settles it
            try:
                await self._resolve_doubt(user_id)
            except Unavailable as exc:
                log.info("write_in_doubt_still", user_id=user_id, error=repr(exc))
            finally:
                self._turns.release(user_id)

    async def _write_user(self, user_id: str, *, even_if_clean: bool = False) -> None:
        """Make this user's state durable now (the caller holds the user's turn)."""
        ledger = self._ledgers[user_id]
        if not (ledger.is_dirty or even_if_clean):
            return
        snapshot = ledger.snapshot()
        try:
            async with asyncio.timeout(self._config.write_timeout_s):
                await self._require_store().save([snapshot])
        except (StoreError, TimeoutError) as exc:
            raise Unavailable("storage is unavailable; nothing was changed") from exc
        ledger.mark_synced(snapshot.version)
        if not ledger.is_dirty:
            self._dirty.discard(user_id)

    async def _stored_ended_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        """A session this ledger no longer holds in memory, from the store (None if unknown, open,
        or still pending: the ledger holds those)."""
        store = self._require_store()
        record = await self._read("session history", store.find_session(user_id, session_id))
        return record if record is not None and not record.is_open and not record.is_pending else None

    def _after_change(self, user_id: str, ledger: UserLedger) -> None:
        if ledger.is_dirty:
            self._dirty.add(user_id)
        watched = self._watchers.get(user_id)
        if watched is not None and ledger.version > watched[1]:
            # The version moved: wake every stream of this user (reads that change nothing do not).
            del self._watchers[user_id]
            watched[0].set()
        if self._timers.arm(user_id, ledger.next_deadline_ms()):
            self._timer_wakeup.set()

    def _active_session_count(self) -> int:
        return sum(1 for ledger in self._ledgers.values() if ledger.active_session_id is not None)

    # The loops wait with `asyncio.timeout`, not `asyncio.wait_for`: on Python
    # 3.11, `wait_for` loses a cancellation that arrives as the event fires,
    # and `stop()` would then wait on a loop that never ends.

    async def _timer_loop(self) -> None:
        while self._state == "running":
            self._timer_wakeup.clear()
            try:
                self.fire_due_alarms()
            except Exception:
                log.exception("alarm_failed", shard=self._config.shard_index)
            deadline = self._timers.next_deadline_ms()
            sleep_s = TIMER_SLEEP_MAX_S
            if deadline is not None:
                sleep_s = min(sleep_s, max(0.0, (deadline - self._clock()) / 1000))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep_s):
                    await self._timer_wakeup.wait()

    async def _prune_replies_when_due(self) -> None:
        """Shard 0 deletes expired `Idempotency-Key` replies from the store every `PRUNE_EVERY_S`."""
        now = self._clock()
        if self._config.shard_index != 0 or now < self._next_prune_ms:
            return
        self._next_prune_ms = now + PRUNE_EVERY_S * 1000
        pruned = await self._require_store().prune_replies(now)
        if pruned:
            log.info("idempotency_keys_pruned", keys=pruned)

    async def _flush_loop(self) -> None:
        interval_s = self._config.sync_interval_s
        retry_s = 0.0
        while self._state == "running":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_s or interval_s):
                    await self._flush_soon.wait()
                    await asyncio.sleep(ALARM_FLUSH_DELAY_S)
            self._flush_soon.clear()
            try:
                written = await self.flush()
                retry_s = 0.0
                if written:
                    log.debug("flushed", shard=self._config.shard_index, users=written)
                await self._check_fence()
                await self._settle_doubts()
                await self._prune_replies_when_due()
            except Exception as exc:
                # Whatever went wrong, the loop must survive it: dirty state stays dirty
                # and the next attempt comes with backoff.
                retry_s = min(max(retry_s * 2, RETRY_DELAY_MIN_S * 5), interval_s)
                log.warning(
                    "flush_failed",
                    shard=self._config.shard_index,
                    dirty_users=len(self._dirty),
                    retry_in_s=retry_s,
                    error=repr(exc),
                    exc_info=not isinstance(exc, StoreError),
                )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's failure as seen (its waiters, if any are left, get it too)."""
    if not task.cancelled():
        task.exception()


def _summary(record: SessionRecord) -> SessionSummary:
    return SessionSummary(
        session_id=record.session_id,
        started_at_ms=record.started_at_ms,
        ended_at_ms=record.ended_at_ms,
        used_ms=record.used_ms,
        topic=record.topic,
        difficulty=record.difficulty,
        end_reason=record.end_reason,
    )


def _plan_event_record(
    user_id: str, event: PlanEvent, *, applied: bool, response: dict[str, object]
) -> PlanEventRecord:
    return PlanEventRecord(
        delivery_id=event.delivery_id,
        user_id=user_id,
        plan=event.plan,
        action=event.action,
        occurred_at_ms=event.occurred_at_ms,
        reset_usage=event.reset_usage,
        period_start_ms=event.period_start_ms,
        period_end_ms=event.period_end_ms,
        applied=applied,
        response=dict(response),
    )
