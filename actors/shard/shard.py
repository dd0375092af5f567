"""LedgerShard: many user ledgers in one process, with their timers and write-behind.

A plain class (Ray is applied to it in `hosting`), driven by one asyncio loop;
a façade over one module per concern (see `actors.shard`). Guarantees:

- **One writer per user**: a user always lives on the shard its id hashes to.
- **One operation per user at a time** (the actor model's mailbox, `actors.turns`;
  the pipeline, `execution`). Every operation on a resident user runs in the
  user's *turn*: at most one holds it, the others wait in arrival order, and
  one that waits for the store keeps it until it is done. Uncontended, taking
  and giving back the turn costs no await and no allocation. A waiter is
  bounded (`wait_budget_s`, then `Unavailable`: nothing changed), and so is a
  user's line (`USER_WAITERS_MAX`, then `Overloaded`). Users never wait for
  each other: one user's operations delay another's only by the shard's own
  CPU. The timer fires a busy user's alarms in that user's line, when its turn
  comes; the flush leaves a busy user to the operation holding its turn, which
  either writes the user's whole state itself or waits only for a bounded
  store read (the next flush writes what it leaves).
- **Lazy activation**, once per user however many ask (`residency`).
- **Durable before answering** for session starts and ends, billing's
  deliveries and a final account: on a clone, written, then swapped in; a
  failed write changes nothing; a write of unknown outcome leaves the user *in
  doubt*, refused until its transaction tells (`durable`).
- **Write-behind** for everything else, every `sync_interval_s`, retried while
  the store is down, and on `stop` (`writebehind`).
- **One timer** for every resident user's alarms (`alarms`).
- **Restart**: the shard serves at once and, in the background, loads every
  user with an open session and re-arms their alarms, so a session that went
  silent meanwhile still ends `stale`, billed to its last heartbeat.
- **At most once per `Idempotency-Key`** (`actors.replies`, `execution`).
- **Isolated failures**: a user the store refuses to write is set aside by the
  flush; a user whose stored state cannot make a ledger is refused (503, a
  `user_unreadable` log line) and tried again a minute later; the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from actors.errors import HoldNotFound, LedgerError, SessionEnded, SessionNotFound, Unavailable
from actors.ledger import HoldVerb, UserLedger
from actors.records import (
    CreditEntry,
    Difficulty,
    HoldRecord,
    PlanEvent,
    SessionRecord,
)
from actors.replies import IdempotencyKey, encode_outcome, encode_result
from actors.shard.alarms import Alarms
from actors.shard.batching import Batches
from actors.shard.config import (
    Handoff,
    Purchase,
    ShardConfig,
    ShardState,
    ShardStats,
)
from actors.shard.deliveries import Deliveries
from actors.shard.durable import Durable
from actors.shard.execution import AfterTurn, Execution
from actors.shard.fencing import Fencing
from actors.shard.operations import Turn, declared, operation, shard_call
from actors.shard.placement import Placement
from actors.shard.residency import Residency, retrying
from actors.shard.watchers import Watchers
from actors.shard.writebehind import WriteBehind
from actors.store import CountingStore, LedgerStore, StoreError
from actors.times import wall_clock_ms
from actors.views import (
    BalanceCheck,
    CreditsAdded,
    CreditsView,
    CurrentSession,
    HoldView,
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


class LedgerShard:
    """Hosts the ledgers of the users whose ids hash to `config.shard_index`. See module docstring.

    A façade: its lifecycle, and the declared operations (`actors.shard.operations`) over the
    collaborators that do the work (residency, execution, durable writes, write-behind, alarms,
    watchers; one module each)."""

    def __init__(
        self,
        config: ShardConfig,
        store_factory: Callable[[], Awaitable[LedgerStore]],
        *,
        clock: Callable[[], int] = wall_clock_ms,
        new_session_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        new_hold_id: Callable[[], str] = lambda: "hold_" + uuid.uuid4().hex,
    ) -> None:
        self._config = config
        self._store_factory = store_factory
        self._clock = clock
        self._new_session_id = new_session_id
        self._new_hold_id = new_hold_id
        self._hold_counts: Counter[str] = Counter()  # created, captured, released (expired: the alarms)
        self._state: ShardState = "starting"
        self._store: CountingStore | None = None
        self._watchers = Watchers()
        self._residency = Residency(config, clock, watchers=self._watchers, running=self._running)
        self._fencing = Fencing(self._residency.require_store, self._fence_lost)
        self._durable = Durable(config, clock, self._residency, self._fencing)
        # What each collaborator is given first (`ShardPart`), then what it needs of its own.
        part = (config, clock, self._residency, self._durable)
        self.execution = Execution(*part, refusal=self._refusal, running=self._running)
        self._turns = self.execution.turns
        self._write_behind = WriteBehind(*part, turns=self._turns, fencing=self._fencing)
        self._alarms = Alarms(*part, turns=self._turns)
        self._placement = Placement(
            *part,
            turns=self._turns,
            fencing=self._fencing,
            flush_lock=self._write_behind.lock,
            forget=self.execution.forget,
            reactivate=self._residency.reactivate_slots,
        )
        self.execution.placement = self._placement
        self._residency.mine = self._placement.owns
        self._residency.stamp = self._placement.stamp
        self._write_behind.refresh_placement = self._placement.refresh
        self._deliveries = Deliveries(*part)
        self._batches = Batches(lambda name: getattr(self, name) if name in BATCHABLE else None)
        self._host, self._pid = socket.gethostname(), os.getpid()  # a restart is a new process
        self._start_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []

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
            self._store = CountingStore(
                await retrying("store_connect", self._store_factory, shard=self._config.shard_index)
            )
            self._residency.store = self._store
        owner = self._config.owner
        if owner is not None and self._fencing.fence is None:
            # Before anyone is loaded: what this activation reads is then all an older one wrote.
            fence = await retrying(
                "store_claim", lambda: self._fencing.claim(owner), shard=self._config.shard_index
            )
            log.info("shard_claimed", shard=self._config.shard_index, owner=owner, epoch=fence.epoch)
            # (Its users with alarms are loaded by the reactivation below, not once more per slot.)
            await retrying(
                "store_slots",
                lambda: self._placement.refresh(load_gained=False),
                shard=self._config.shard_index,
            )
        # Serving starts at once: the users with open sessions are loaded in the background (their
        # alarms must run even if no request comes for them), and a request for one of them loads
        # that user first, as any cold user is loaded. After a restart with 50k open sessions on a
        # shard, this is the difference between answering in ~1 s and in ~8 s.
        self._state = "running"
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._alarms.run(self._is_running)),
            loop.create_task(self._write_behind.run(self._is_running)),
            loop.create_task(self._residency.reactivate_in_background()),
        ]
        log.info("shard_started", shard=self._config.shard_index)

    @shard_call()
    async def stop(self) -> None:
        """Drain: stop timers, write every dirty ledger, close the store."""
        if self._state in ("draining", "stopped"):
            return
        fenced = self._state == "fenced"
        self._state = "draining"
        self._left_service()
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
            log.info(
                "shard_stopped", shard=self._config.shard_index, dirty_users_left=len(self._residency.dirty)
            )

    def _refusal(self) -> Unavailable | None:
        """Why a new call is refused now (None: it is taken)."""
        if self._state == "fenced":
            return Unavailable("this shard was replaced by a newer activation")
        if self._state in ("draining", "stopped"):
            # After the final flush nothing may change in memory only.
            return Unavailable("shard is shutting down")
        return None

    async def _running(self) -> None:
        """Return once the shard serves (waiting, bounded, while it starts); else `Unavailable`."""
        if self._state == "starting":
            try:
                async with asyncio.timeout(self._config.start_wait_s):
                    await self.start()
            except TimeoutError:
                raise Unavailable("shard is still starting (storage unreachable?)") from None
        if not self._is_running():  # the state may have moved on while we waited
            raise self._refusal() or Unavailable("shard is shutting down")

    def _is_running(self) -> bool:
        return self._state == "running"

    def _fence_lost(self) -> None:
        if self._state != "running":
            return
        self._state = "fenced"
        self._left_service()
        self._residency.timer_wakeup.set()  # the loops see the state and end
        self._residency.flush_soon.set()
        log.error(
            "shard_fenced",
            shard=self._config.shard_index,
            owner=self._config.owner,
            hint="a newer activation of this shard claimed its users; this one refuses every call",
        )

    # ------------------------------------------------------------ user reads

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def usage(self, turn: Turn) -> UsageView:
        return turn.ledger.usage(self._clock())

    @operation(lane="read", repeatable=True)
    async def usage_of(self, turn: Turn) -> UsageView:
        """`usage` for billing and ops (internal calls): not counted against the user's rate limit."""
        return turn.ledger.usage(self._clock())

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def has_credits(self, turn: Turn) -> bool:
        return turn.ledger.has_credits(self._clock())

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def current_session(self, turn: Turn) -> CurrentSession:
        return turn.ledger.current_session(self._clock())

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def credits(self, turn: Turn) -> CreditsView:
        return turn.ledger.credits(self._clock())

    @operation(rate_limited=True, repeatable=True, in_turn=False)
    async def list_sessions(self, user_id: str, limit: int) -> Page[SessionSummary]:
        """Newest first: the store's history with this shard's newer, not yet written state on top."""
        store = self._residency.require_store()
        stored = await self._durable.read("session history", store.list_sessions(user_id, limit))

        def merge(ledger: UserLedger, now: int) -> Page[SessionSummary]:
            merged = {record.session_id: record for record in stored}
            for record in ledger.resident_sessions():
                merged[record.session_id] = record
            newest = sorted(merged.values(), key=lambda r: (-r.started_at_ms, r.session_id))[:limit]
            return Page([SessionSummary.of(record) for record in newest], ledger.version)

        return await self.execution.in_turn(user_id, merge)

    @operation(rate_limited=True, repeatable=True, in_turn=False)
    async def usage_history(self, user_id: str, periods: int) -> Page[PeriodSummary]:
        """Newest first: the store's periods with this shard's newer, not yet written ones on top."""
        store = self._residency.require_store()
        stored = await self._durable.read("usage history", store.list_periods(user_id, periods))

        def merge(ledger: UserLedger, now: int) -> Page[PeriodSummary]:
            ledger.advance(now)
            merged = {record.start_ms: PeriodSummary.of(record) for record in stored}
            for summary in ledger.resident_periods():
                merged[summary.period_start_ms] = summary
            newest = sorted(merged.values(), key=lambda p: -p.period_start_ms)[:periods]
            return Page(newest, ledger.version)

        return await self.execution.in_turn(user_id, merge)

    @operation(rate_limited=True, repeatable=True)
    async def credit_history(self, turn: Turn, limit: int) -> Page[CreditEntry]:
        """Newest first. The user is written first, so consumption still open is in it."""
        await self._durable.write_user(turn.user_id)
        store = self._residency.require_store()
        entries = await self._durable.read("credit history", store.credit_history(turn.user_id, limit))
        return Page(entries, turn.ledger.version)

    @operation(repeatable=True)
    async def reconcile(self, turn: Turn) -> Reconciliation:
        """Compare the live balances with what the credit ledger's entries add up to (the user is
        written first, after the alarms due now, so the state written is the state compared)."""
        user_id, ledger = turn.user_id, turn.ledger
        now = self._clock()
        self._residency.advance(user_id, ledger, now)
        await self._durable.write_user(user_id, even_if_clean=True)
        store = self._residency.require_store()
        derived = await self._durable.read("the credit ledger", store.credit_balances(user_id))
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

    @shard_call(repeatable=True)
    async def watch(self, user_id: str, after_version: int, timeout_s: float) -> UsageChange | None:
        """Once the version is above `after_version`: the usage object and the events since
        (those the ledger still holds); None if `timeout_s` passes first."""
        self._watchers.admit()
        change = await self._change_since(user_id, after_version)
        if change is not None:
            return change
        resident = self._residency.ledgers.get(user_id)
        seen = resident.version if resident is not None else after_version
        if not await self._watchers.wait(user_id, seen, timeout_s):
            return None
        return await self._change_since(user_id, after_version)

    async def _change_since(self, user_id: str, after_version: int) -> UsageChange | None:
        def change(ledger: UserLedger, now: int) -> UsageChange | None:
            view = ledger.usage(now)
            if view.version <= after_version:
                return None
            return UsageChange(usage=view, events=ledger.events_after(after_version))

        return await self.execution.in_turn(user_id, change)

    # ----------------------------------------------------------- user writes

    @operation(rate_limited=True, lane="write")
    async def start_session(
        self,
        turn: Turn,
        *,
        topic: str | None = None,
        difficulty: Difficulty | None = None,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> SessionStarted:
        session_id = self._new_session_id()
        started, _ = await self._write(
            turn,
            lambda ledger, now: ledger.start_session(now, session_id, topic=topic, difficulty=difficulty),
        )
        log.info("session_started", user_id=turn.user_id, session_id=session_id, request_id=request_id)
        return started

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def heartbeat(
        self,
        turn: Turn,
        session_id: str,
        *,
        seq: int | None = None,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> SessionProgress:
        """Write-behind: the time billed is durable at the next flush."""
        ledger = turn.ledger
        now = self._clock()
        deadline = ledger.next_deadline_ms()
        if ledger.active_session_id == session_id and (deadline is None or now < deadline):
            # The common case: no alarm is due, so the session goes on; written behind.
            return ledger.heartbeat(now, session_id, seq=seq)
        return await self._heartbeat_that_may_end(turn, session_id, seq, now)

    async def _heartbeat_that_may_end(
        self, turn: Turn, session_id: str, seq: int | None, now: int
    ) -> SessionProgress:
        """A heartbeat with an alarm due, or for a session that is not running: its answer may be
        the session's final account, which is durable before a client hears it (or, if it cannot
        be made durable, nothing changes and the caller gets `Unavailable`)."""
        ledger, idem = turn.ledger, turn.idem
        draft = ledger.clone()
        outcome: SessionProgress | LedgerError
        try:
            try:
                outcome = draft.heartbeat(now, session_id, seq=seq)
            except SessionNotFound:
                record = await self._durable.stored_ended_session(turn.user_id, session_id)
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
            # The reply to a keyed heartbeat goes with the write it answers.
            if idem is not None and (reply := encode_outcome(outcome)) is not None:
                draft.remember_reply(idem, reply, now)
            await self._durable.commit(turn.user_id, draft)
        elif changed:  # an alarm fired (a period rolled, say) and the session goes on: written behind
            self._residency.ledgers[turn.user_id] = draft
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    @operation(rate_limited=True, lane="write", repeatable=True)
    async def end_session(
        self,
        turn: Turn,
        session_id: str,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> SessionProgress:
        try:
            # An end is durable before it is answered, whoever ended the session (an alarm, say).
            ended, changed = await self._write(
                turn, lambda ledger, now: ledger.end_session(now, session_id), write_dirty=True
            )
        except SessionNotFound as exc:
            # Ended long ago, perhaps: the store says, read outside the user's turn.
            unknown = exc

            def answer(record: SessionRecord | None, ledger: UserLedger, now: int) -> SessionProgress:
                if record is None:
                    raise unknown
                return ledger.progress_of(record)

            stored = self._durable.stored_ended_session
            raise AfterTurn(lambda: stored(turn.user_id, session_id), answer) from None
        if changed:
            log.info(
                "session_ended",
                user_id=turn.user_id,
                session_id=session_id,
                end_reason=ended.end_reason,
                session_used_ms=ended.session_used_ms,
                request_id=request_id,
            )
        return ended

    @operation(rate_limited=True, lane="read")
    async def consume_meter(
        self, turn: Turn, meter: str, amount: int, *, idem: IdempotencyKey | None = None
    ) -> MeterConsumed:
        """Use a count meter: decided in memory, written behind."""
        return turn.ledger.consume_meter(self._clock(), meter, amount)

    # ------------------------------------------------------------------ holds

    @operation(rate_limited=True, lane="write")
    async def create_hold(
        self,
        turn: Turn,
        *,
        meter: str | None,
        amount: int,
        ttl_ms: int,
        reference: str | None = None,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> HoldView:
        """Hold `amount` of `meter` (None: ms of minutes), durably before answering."""
        hold_id = self._new_hold_id()
        hold, _ = await self._write(
            turn,
            lambda ledger, now: HoldView.of(
                ledger.create_hold(
                    now, hold_id, meter=meter, amount=amount, ttl_ms=ttl_ms, reference=reference
                )
            ),
        )
        self._hold_counts["created"] += 1
        log.info(
            "hold_created",
            user_id=turn.user_id,
            hold_id=hold_id,
            meter=meter,
            amount=amount,
            expires_at_ms=hold.expires_at_ms,
            request_id=request_id,
        )
        return hold

    @operation(rate_limited=True, lane="write", repeatable=True)
    async def capture_hold(
        self,
        turn: Turn,
        hold_id: str,
        amount: float | None = None,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> HoldView:
        """Bill `amount` of the hold (as the API gives it: meter units, or minutes; None: all of it)
        and free the rest, durably before answering."""
        return await self._resolve(
            turn,
            hold_id,
            "capture",
            amount,
            lambda ledger, now: ledger.capture_hold(now, hold_id, ledger.in_units(hold_id, amount)),
            request_id,
        )

    @operation(rate_limited=True, lane="write", repeatable=True)
    async def release_hold(
        self, turn: Turn, hold_id: str, *, request_id: str | None = None, idem: IdempotencyKey | None = None
    ) -> HoldView:
        """Free the whole hold, durably before answering."""
        return await self._resolve(
            turn, hold_id, "release", None, lambda ledger, now: ledger.release_hold(now, hold_id), request_id
        )

    @operation(rate_limited=True, lane="write", repeatable=True)
    async def extend_hold(
        self,
        turn: Turn,
        hold_id: str,
        ttl_ms: int,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> HoldView:
        """The hold now expires `ttl_ms` from now (durable before answering)."""
        return await self._resolve(
            turn,
            hold_id,
            "extend",
            None,
            lambda ledger, now: ledger.extend_hold(now, hold_id, ttl_ms),
            request_id,
        )

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def get_hold(self, turn: Turn, hold_id: str) -> HoldView:
        try:
            return HoldView.of(turn.ledger.get_hold(self._clock(), hold_id))
        except HoldNotFound:
            raise self._hold_from_store(turn.user_id, hold_id, None, None) from None

    @operation(rate_limited=True, lane="read", repeatable=True)
    async def list_holds(self, turn: Turn) -> Page[HoldView]:
        """The user's unresolved holds, oldest first."""
        ledger = turn.ledger
        holds = ledger.list_holds(self._clock())
        return Page([HoldView.of(hold) for hold in holds], ledger.version)

    async def _resolve(
        self,
        turn: Turn,
        hold_id: str,
        verb: HoldVerb,
        amount: float | None,
        operate: Callable[[UserLedger, int], HoldRecord],
        request_id: str | None,
    ) -> HoldView:
        try:
            # A repeat of how a hold was resolved is answered once that is durable (an expiry the
            # alarm wrote behind, say). A refusal (`HoldResolved`) is not waited for: the expiry it
            # names is derived again, at the same instant, by a shard that restarts without it.
            hold, changed = await self._write(
                turn, lambda ledger, now: HoldView.of(operate(ledger, now)), write_dirty=True
            )
        except HoldNotFound:
            raise self._hold_from_store(turn.user_id, hold_id, verb, amount) from None
        if changed and hold.version > turn.ledger.version:  # (not a repeat while an alarm fired)
            outcome = "extended" if verb == "extend" else f"{verb}d"
            self._hold_counts[outcome] += 1
            log.info(
                f"hold_{outcome}",
                user_id=turn.user_id,
                hold_id=hold_id,
                state=hold.state,
                captured=hold.captured,
                released=hold.released,
                request_id=request_id,
            )
        return hold

    def _hold_from_store(
        self, user_id: str, hold_id: str, verb: HoldVerb | None, amount: float | None
    ) -> AfterTurn:
        """A hold the ledger no longer holds in memory (resolved long ago): the store says, read
        outside the user's turn; it is answered as a repeat of `verb` (None: read)."""

        def answer(record: HoldRecord | None, ledger: UserLedger, now: int) -> HoldView:
            if record is None or record.is_held:  # (a held one is always in memory)
                raise HoldNotFound("no such hold", hold_id=hold_id)
            if verb is None:
                return HoldView.of(record)
            return HoldView.of(ledger.repeat(record, verb, ledger.units_of(record, amount)))

        store = self._residency.require_store()
        return AfterTurn(lambda: self._durable.read("holds", store.find_hold(user_id, hold_id)), answer)

    # ------------------------------------------------------------ billing

    @operation(repeatable=True, changes_plan=True)
    async def change_plan(
        self,
        turn: Turn,
        event: PlanEvent,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> PlanChangeResult:
        """Apply a plan event once per delivery id. An event older than the last applied one is
        recorded, not applied."""
        result = await self._deliveries.change_plan(turn, event)
        log.info(
            "plan_event",
            user_id=turn.user_id,
            delivery_id=event.delivery_id,
            plan=result.usage.plan,
            applied=result.applied,
            request_id=request_id,
        )
        return result

    @operation(repeatable=True)
    async def add_credits(
        self,
        turn: Turn,
        purchase: Purchase,
        *,
        request_id: str | None = None,
        idem: IdempotencyKey | None = None,
    ) -> CreditsAdded:
        """Add purchased minutes once per delivery id, durably before answering."""
        result = await self._deliveries.add_credits(turn, purchase)
        log.info(
            "credits_added",
            user_id=turn.user_id,
            delivery_id=purchase.delivery_id,
            minutes_ms=purchase.minutes_ms,
            reason=purchase.reason,
            request_id=request_id,
        )
        return result

    async def _write(
        self, turn: Turn, operate: Callable[[UserLedger, int], T], *, write_dirty: bool = False
    ) -> tuple[T, bool]:
        """Run `operate` on a clone, make the clone durable (with the reply to the turn's key),
        then swap it in. Returns the result and whether anything changed (and was written). With
        `write_dirty`, a live ledger that changed nothing now but has changes not yet written (an
        alarm's) is written before the answer too."""
        ledger = turn.ledger
        draft = ledger.clone()
        now = self._clock()
        result = operate(draft, now)
        changed = draft.version != ledger.version
        if changed:
            if turn.idem is not None:
                draft.remember_reply(turn.idem, encode_result(result), now)
            await self._durable.commit(turn.user_id, draft)
        elif write_dirty and ledger.is_dirty:
            await self._durable.commit(turn.user_id, draft)
        return result, changed

    # ------------------------------------------------------------- operations

    @shard_call()
    async def flush(self) -> int:
        """Write every dirty ledger now, in batches of one store call each. Returns users written."""
        return await self._write_behind.flush()

    def fire_due_alarms(self) -> int:
        """Fire every alarm due now. The timer loop calls this; tests with a fake clock may too."""
        return self._alarms.fire_due()

    async def batch(
        self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
    ) -> list[tuple[bool | None, Any]]:
        """Run several calls that arrived together at a gateway, as one Ray call (see
        `actors.shard.batching`). Only operations declared with a `lane` may be batched."""
        return await self._batches.run(calls)

    async def collect(self, ticket: int) -> tuple[bool, Any]:
        """The answer of a batched call that `batch` answered `(None, ticket)`, once it is done."""
        return await self._batches.collect(ticket)

    async def answer(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """One call of a batchable operation, as `batch` runs each (the data plane's calls:
        `actors.channel`): `(True, result)` or `(False, the exception it raised)`."""
        return await self._batches.one(method, args, kwargs)

    @property
    def epoch(self) -> int | None:
        """This activation's fencing epoch (None until it has claimed its shard, or unfenced)."""
        fence = self._fencing.fence
        return fence.epoch if fence is not None else None

    def _left_service(self) -> None:
        """Called once the shard no longer serves (fenced, or stopping); for its host to close what
        it opened for it."""

    @shard_call()
    async def release(self, slots: list[int], to_shard: int) -> Handoff:
        """Hand `slots` (those this shard owns) to shard `to_shard`: their users' state written
        through, then the slots moved in the store, then the users forgotten (`placement`).
        Returns what was handed off. Repeating it after a failure is safe."""
        await self._running()
        return await self._placement.release(slots, to_shard)

    @shard_call(repeatable=True)
    async def refresh_slots(self, alarmed: list[str] | None = None) -> list[int]:
        """Ask the store which slots this shard owns now, and serve them (the users of slots just
        given that have alarms are loaded: `alarmed`, a handoff's, else found in the store).
        Returns the slots owned."""
        await self._running()
        try:
            async with asyncio.timeout(self._config.resolve_timeout_s):
                await self._placement.refresh(alarmed)
        except (StoreError, TimeoutError) as exc:
            raise Unavailable.of_store() from exc
        return self._placement.owned

    @shard_call(repeatable=True)
    async def stats(self) -> ShardStats:
        store, residency, write_behind = self._store, self._residency, self._write_behind
        open_holds = held_minutes_ms = held_units = 0
        for ledger in residency.ledgers.values():
            count, minutes_ms, units = ledger.held_totals()
            open_holds += count
            held_minutes_ms += minutes_ms
            held_units += units
        return ShardStats(
            shard_index=self._config.shard_index,
            shard_count=self._config.shard_count,
            state=self._state,
            resident_users=len(residency.ledgers),
            active_sessions=residency.active_session_count(),
            dirty_users=len(residency.dirty),
            pending_calls=self.execution.pending_calls,
            armed_timers=len(residency.timers),
            alarms_fired=residency.alarms_fired,
            flushes=write_behind.flushes,
            flush_failures=write_behind.failures,
            last_flush_at_ms=write_behind.last_flush_at_ms,
            users_in_doubt=len(self._durable.in_doubt),
            unwritable_users=len(write_behind.unwritable),
            unreadable_users=len(residency.unreadable),
            watchers=len(self._watchers),
            store_calls=dict(store.calls) if store is not None else {},
            reactivating=self._residency.reactivating,
            activations=residency.activations,
            alarms_by_kind=dict(residency.alarms_by_kind),
            last_flush_duration_ms=write_behind.last_flush_duration_ms,
            host=self._host,
            pid=self._pid,
            durable_writes=self._durable.writes,
            durable_transactions=self._durable.transactions,
            busy_users=len(self._turns),
            holds_by_outcome={**self._hold_counts, "expired": residency.alarms_by_kind.get("expire", 0)},
            open_holds=open_holds,
            held_minutes_ms=held_minutes_ms,
            held_meter_units=held_units,
            slots=len(self._placement.owned),
            slots_leaving=self._placement.leaving,
            users_handed_off=self._placement.handed_off,
        )

    @shard_call()
    async def ready(self) -> ShardStats:
        """Wait (bounded) until started, then report stats."""
        await self._running()
        return await self.stats()


# What a gateway may send in a `batch`: the operations declared with a lane, and their lanes.
LANES = {name: spec.lane for name, spec in declared(LedgerShard).items() if spec.lane is not None}
BATCHABLE = frozenset(LANES)
