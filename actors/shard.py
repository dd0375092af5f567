"""LedgerShard: many user ledgers in one process, with their timers and write-behind.

A plain class (Ray is applied to it in `hosting`), driven by one asyncio loop.

Guarantees:

- **One writer per user.** A user always lives on the shard its id hashes to;
  within the shard, a ledger operation never awaits, so each one is atomic.
- **Lazy activation.** A user is loaded from the store the first time it is
  needed, once, however many requests ask at the same moment (single-flight).
- **Durable writes before answering** for session start, session end and plan
  changes: the operation runs on a clone of the ledger, the clone's snapshot
  is written, and only then is the clone swapped in. If the write fails the
  clone is dropped: nothing changed, and the caller gets `Unavailable`. While
  such a write is in flight, other operations on that user wait for it (an
  input gate, as in Durable Objects); other users are not held up.
- **Write-behind** for everything else: dirty ledgers are written every
  `sync_interval_s` in one batched call, retried with backoff while the
  store is down, and on `stop`.
- **One timer** (a deadline heap) fires stale-session, credits-run-out and
  period-end alarms for every resident user.
- **Restart.** On start the shard activates every user with an open session
  and re-arms their alarms, so a session that went silent while the shard was
  down still ends `stale`, billed to its last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import structlog

from actors.errors import EventConflict, Overloaded, SessionNotFound, Unavailable
from actors.ledger import LedgerPolicy, PlanChange, UserLedger
from actors.records import Difficulty, PlanAction, PlanEventRecord, SessionRecord
from actors.routing import shard_index
from actors.store import CountingStore, LedgerStore, StoreError
from actors.timers import DeadlineHeap
from actors.times import wall_clock_ms
from actors.views import (
    CurrentSession,
    PlanChangeResult,
    SessionProgress,
    SessionStarted,
    SessionSummary,
    UsageView,
)

log = structlog.get_logger("actors.shard")

T = TypeVar("T")
ShardState = Literal["starting", "running", "draining", "stopped"]

# A timer sleep never exceeds this, so a stepped wall clock is noticed soon.
TIMER_SLEEP_MAX_S = 30.0
# An alarm for a user whose durable write is in flight is retried this much later.
GATE_RETRY_MS = 50
# Sessions ended by an alarm are written within this delay (coalescing several).
ALARM_FLUSH_DELAY_S = 0.2
# Store connection and restart recovery retry between these bounds.
RETRY_DELAY_MIN_S = 0.1
RETRY_DELAY_MAX_S = 5.0
# Users loaded per store call when re-activating open sessions after a restart.
ACTIVATION_BATCH_USERS = 500
# Users written per store call by one flush.
FLUSH_BATCH_USERS = 5_000


@dataclass(frozen=True, slots=True)
class ShardConfig:
    shard_index: int
    shard_count: int
    policy: LedgerPolicy
    sync_interval_s: float = 30.0
    max_pending_calls: int = 10_000
    start_wait_s: float = 10.0

    def __post_init__(self) -> None:
        assert 0 <= self.shard_index < self.shard_count, "shard_index out of range"
        assert self.sync_interval_s > 0, "sync_interval_s must be positive"
        assert self.max_pending_calls > 0, "max_pending_calls must be positive"


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
    store_calls: dict[str, int] = field(default_factory=dict)


class _Gate:
    """Serializes durable writes for one user; exists only while someone holds or waits."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


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
        self._ledgers: dict[str, UserLedger] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._gates: dict[str, _Gate] = {}
        self._dirty: set[str] = set()
        self._timers = DeadlineHeap()
        self._pending_calls = 0
        self._alarms_fired = 0
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
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        self._store = CountingStore(await self._retrying("store_connect", self._store_factory))
        await self._retrying("reactivate_open_sessions", self._reactivate_open_sessions)
        self._state = "running"
        self._background = [
            asyncio.get_running_loop().create_task(self._timer_loop()),
            asyncio.get_running_loop().create_task(self._flush_loop()),
        ]
        log.info(
            "shard_started",
            shard=self._config.shard_index,
            resident_users=len(self._ledgers),
            active_sessions=self._active_session_count(),
        )

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        delay = RETRY_DELAY_MIN_S
        while True:
            try:
                return await operation()
            except (StoreError, OSError) as exc:
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
        self._state = "draining"
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._store is not None:
            try:
                await self.flush()
            finally:
                await self._store.close()
        self._state = "stopped"
        log.info("shard_stopped", shard=self._config.shard_index)

    async def _running(self) -> CountingStore:
        if self._state == "running":
            return self._require_store()
        if self._state != "starting":
            raise Unavailable("shard is shutting down")
        try:
            async with asyncio.timeout(self._config.start_wait_s):
                await self.start()
        except TimeoutError:
            raise Unavailable("shard is still starting (storage unreachable?)") from None
        return self._require_store()

    def _require_store(self) -> CountingStore:
        assert self._store is not None, "store used before start"
        return self._store

    # ------------------------------------------------------------ user reads

    async def usage(self, user_id: str) -> UsageView:
        async with self._admitted():
            ledger = await self._ledger(user_id)
            view = ledger.usage(self._clock())
            self._after_change(user_id, ledger)
            return view

    async def has_credits(self, user_id: str) -> bool:
        async with self._admitted():
            ledger = await self._ledger(user_id)
            allowed = ledger.has_credits(self._clock())
            self._after_change(user_id, ledger)
            return allowed

    async def current_session(self, user_id: str) -> CurrentSession:
        async with self._admitted():
            ledger = await self._ledger(user_id)
            try:
                return ledger.current_session(self._clock())
            finally:
                self._after_change(user_id, ledger)

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionSummary]:
        """Newest first: the store's history with this shard's newer, not yet written state on top."""
        async with self._admitted():
            store = await self._running()
            await self._ledger(user_id)
            try:
                stored = await store.list_sessions(user_id, limit)
            except StoreError as exc:
                raise Unavailable("session history is unavailable") from exc
            ledger = await self._ledger(user_id)
            merged = {record.session_id: record for record in stored}
            for record in ledger.resident_sessions():
                merged[record.session_id] = record
            newest = sorted(merged.values(), key=lambda r: (-r.started_at_ms, r.session_id))[:limit]
            return [_summary(record) for record in newest]

    # ----------------------------------------------------------- user writes

    async def start_session(
        self,
        user_id: str,
        *,
        topic: str | None = None,
        difficulty: Difficulty | None = None,
        request_id: str | None = None,
    ) -> SessionStarted:
        session_id = self._new_session_id()
        started = await self._durable(
            user_id,
            lambda ledger, now: ledger.start_session(now, session_id, topic=topic, difficulty=difficulty),
        )
        log.info("session_started", user_id=user_id, session_id=session_id, request_id=request_id)
        return started

    async def heartbeat(
        self, user_id: str, session_id: str, *, seq: int | None = None, request_id: str | None = None
    ) -> SessionProgress:
        """Write-behind: the time billed is durable at the next flush."""
        async with self._admitted():
            ledger = await self._ledger(user_id)
            try:
                progress = ledger.heartbeat(self._clock(), session_id, seq=seq)
            except SessionNotFound:
                record = await self._stored_ended_session(user_id, session_id)
                progress = (await self._ledger(user_id)).heartbeat_after_end(session_id, record)
            finally:
                self._after_change(user_id, self._ledgers[user_id])
            if progress.state == "ended" and self._ledgers[user_id].is_dirty:
                # The client hears that its session is over: write the end first.
                await self._write_through(user_id)
            return progress

    async def end_session(
        self, user_id: str, session_id: str, *, request_id: str | None = None
    ) -> SessionProgress:
        try:
            ended = await self._durable(user_id, lambda ledger, now: ledger.end_session(now, session_id))
        except SessionNotFound:
            record = await self._stored_ended_session(user_id, session_id)
            if record is None:
                raise
            return (await self._ledger(user_id)).progress_of(record)
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
        self, user_id: str, event: PlanEvent, *, request_id: str | None = None
    ) -> PlanChangeResult:
        """Apply a plan event once per delivery id. An event older than the last applied one is
        recorded, not applied."""
        async with self._admitted():
            store = await self._running()
            await self._activate(user_id)
            async with self._gate(user_id):
                try:
                    known = await store.find_plan_event(event.delivery_id)
                except StoreError as exc:
                    raise Unavailable("storage is unavailable") from exc
                if known is not None:
                    if not known.same_event(_plan_event_record(user_id, event, applied=False, response={})):
                        raise EventConflict(
                            "this delivery id was used for a different event", delivery_id=event.delivery_id
                        )
                    return PlanChangeResult(
                        applied=known.applied, usage=UsageView.from_dict(known.response["usage"])
                    )
                ledger = self._ledgers[user_id]
                draft = ledger.clone()
                now = self._clock()
                change = PlanChange(
                    plan=event.plan,
                    action=event.action,
                    occurred_at_ms=event.occurred_at_ms,
                    delivery_id=event.delivery_id,
                    reset_usage=event.reset_usage,
                )
                applied = draft.change_plan(now, change)
                usage = draft.usage(now)
                record = _plan_event_record(
                    user_id, event, applied=applied, response={"applied": applied, "usage": usage.to_dict()}
                )
                await self._write_and_commit(user_id, draft, plan_event=record)
        log.info(
            "plan_event",
            user_id=user_id,
            delivery_id=event.delivery_id,
            plan=usage.plan,
            applied=applied,
            request_id=request_id,
        )
        return PlanChangeResult(applied=applied, usage=usage)

    # ------------------------------------------------------------- operations

    async def flush(self) -> int:
        """Write every dirty ledger now, in batches of one store call each. Returns users written."""
        store = self._require_store()
        written = 0
        async with self._flush_lock:
            users = [user_id for user_id in self._dirty if self._ledgers[user_id].is_dirty]
            for begin in range(0, len(users), FLUSH_BATCH_USERS):
                batch = users[begin : begin + FLUSH_BATCH_USERS]
                snapshots = [self._ledgers[user_id].snapshot() for user_id in batch]
                try:
                    await store.save(snapshots)
                except StoreError:
                    self._flush_failures += 1
                    raise
                for snapshot in snapshots:
                    user_id = snapshot.user.user_id
                    ledger = self._ledgers[user_id]
                    ledger.mark_synced(snapshot.version)
                    if not ledger.is_dirty:
                        self._dirty.discard(user_id)
                written += len(snapshots)
            self._dirty = {user_id for user_id in self._dirty if self._ledgers[user_id].is_dirty}
            self._flushes += 1
            self._last_flush_at_ms = self._clock()
        return written

    def fire_due_alarms(self) -> int:
        """Fire every alarm due now. The timer loop calls this; tests with a fake clock may too."""
        now = self._clock()
        fired = 0
        for user_id in self._timers.pop_due(now):
            ledger = self._ledgers.get(user_id)
            if ledger is None:
                continue
            if user_id in self._gates:
                self._timers.arm(user_id, now + GATE_RETRY_MS)
                continue
            fired += self._advance(user_id, ledger, now)
        return fired

    def _advance(self, user_id: str, ledger: UserLedger, now: int) -> int:
        """Fire the user's due alarms; a session they end is written promptly, not at the next sync."""
        session_id = ledger.active_session_id
        fired = len(ledger.advance(now))
        self._alarms_fired += fired
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
            store_calls=dict(store.calls) if store is not None else {},
        )

    async def ready(self) -> ShardStats:
        """Wait (bounded) until started, then report stats."""
        await self._running()
        return await self.stats()

    # -------------------------------------------------------------- internals

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        if self._pending_calls >= self._config.max_pending_calls:
            raise Overloaded("shard has too many pending calls", limit=self._config.max_pending_calls)
        self._pending_calls += 1
        try:
            yield
        finally:
            self._pending_calls -= 1

    async def _ledger(self, user_id: str) -> UserLedger:
        """The user's committed ledger, once no durable write for them is in flight."""
        await self._activate(user_id)
        while user_id in self._gates:
            async with self._gate(user_id):
                pass
        return self._ledgers[user_id]

    async def _activate(self, user_id: str) -> None:
        if user_id in self._ledgers:
            return
        await self._running()
        task = self._loading.get(user_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load([user_id]))
            self._loading[user_id] = task
            task.add_done_callback(lambda done: self._loading.pop(user_id, None))
        # Shielded: a caller giving up must not cancel the load others wait for.
        await asyncio.shield(task)

    async def _load(self, user_ids: list[str]) -> None:
        store = self._require_store()
        try:
            stored = await store.load(user_ids)
        except StoreError as exc:
            raise Unavailable("cannot load user from storage") from exc
        now = self._clock()
        for user_id in user_ids:
            if user_id in self._ledgers:
                continue
            found = stored.get(user_id)
            if found is not None:
                ledger = UserLedger.restore(found, self._policy, now)
            else:
                ledger = UserLedger.new(user_id, self._policy, now)
            self._ledgers[user_id] = ledger
            # Alarms that fell due while the user was not resident fire now.
            self._advance(user_id, ledger, now)

    @contextlib.asynccontextmanager
    async def _gate(self, user_id: str) -> AsyncIterator[None]:
        gate = self._gates.get(user_id)
        if gate is None:
            gate = self._gates[user_id] = _Gate()
        gate.users += 1
        try:
            async with gate.lock:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[user_id]

    async def _durable(self, user_id: str, operate: Callable[[UserLedger, int], T]) -> T:
        """Run `operate` on a clone, make the clone durable, then swap it in."""
        async with self._admitted():
            await self._running()
            await self._activate(user_id)
            async with self._gate(user_id):
                ledger = self._ledgers[user_id]
                draft = ledger.clone()
                result = operate(draft, self._clock())
                if draft.version != ledger.version:
                    await self._write_and_commit(user_id, draft)
                return result

    async def _write_and_commit(
        self, user_id: str, draft: UserLedger, *, plan_event: PlanEventRecord | None = None
    ) -> None:
        snapshot = draft.snapshot()
        try:
            await self._require_store().save([snapshot], plan_event=plan_event)
        except StoreError as exc:
            raise Unavailable("storage is unavailable; nothing was changed") from exc
        draft.mark_synced(snapshot.version)
        self._ledgers[user_id] = draft
        self._after_change(user_id, draft)

    async def _write_through(self, user_id: str) -> None:
        """Write this user now. With the store down, leave it to the flush: alarm-made ends are
        deterministic, so a crash before the retry recomputes the same end on recovery."""
        ledger = self._ledgers[user_id]
        snapshot = ledger.snapshot()
        try:
            await self._require_store().save([snapshot])
        except StoreError as exc:
            log.warning("write_through_deferred", user_id=user_id, error=repr(exc))
            self._flush_soon.set()
            return
        current = self._ledgers[user_id]
        current.mark_synced(snapshot.version)
        if not current.is_dirty:
            self._dirty.discard(user_id)

    async def _stored_ended_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        """A session this ledger no longer holds in memory, from the store (None if unknown or open)."""
        try:
            record = await self._require_store().find_session(user_id, session_id)
        except StoreError as exc:
            raise Unavailable("storage is unavailable") from exc
        return record if record is not None and not record.is_open else None

    def _after_change(self, user_id: str, ledger: UserLedger) -> None:
        if ledger.is_dirty:
            self._dirty.add(user_id)
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
