"""A state machine over one `LedgerShard` (no Ray) on a `MemoryStore`, with crashes and outages.

The machine drives three users on one shard with a fake clock: session starts,
heartbeats (new, duplicate, old and skipped `seq`), ends (twice, too), plan
events (new, redelivered, late, conflicting), purchases (new, redelivered,
conflicting), count-meter uses (the unit-test plans have none: always refused),
`Idempotency-Key` retries, flushes, clock steps (small, past the stale timeout,
across a day and a month boundary), storage outages, and crashes: the store is
switched off, the shard is stopped (so nothing more is written and its memory
is lost) and a new shard is started on the same store and clock.

It keeps a model of what was acknowledged, and checks after every step the
definition of "nothing lost" of `tests/reliability/truth.py`, in-process:

1. every acknowledged start has its row; every acknowledged end (or heartbeat
   answering `ended`, or refusal saying `SessionEnded`) has its row ended once
   written (at once for an end answered with storage up, else after a flush or
   the restarted shard's recovery), and such a session never runs again;
2. per session, the store's billed time never drops below what was durable
   (set at each flush and durable write), answers never go below earlier
   answers of the same shard, a crash forgets at most the heartbeat time
   since the last write, and nothing is billed beyond the clients' last
   contact, whoever ended the session;
3. each acknowledged plan event and purchase is recorded exactly once (nothing
   else is), as answered, and purchased minutes are in the credit ledger once;
4. the plan is the one of the latest (occurred_at, delivery id) applied event,
   and `applied` is what that order says;
5. a keyed retry gets the first answer (or refusal) again, with no effect; a
   key reused for another request is `IdempotencyMismatch`;
6. after a flush: the store equals the live shard, minutes billed to sessions
   equal the credit ledger's consumption, and `reconcile` finds no drift.

During an outage durable operations fail with `Unavailable` and change
nothing; reads and heartbeats of resident users keep answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from actors.errors import (
    DomainError,
    EventConflict,
    IdempotencyMismatch,
    LedgerError,
    MeterNotFound,
    NoCredits,
    SessionActive,
    SessionEnded,
    SessionNotFound,
    Unavailable,
)
from actors.periods import calendar_month
from actors.records import MONTHLY_BUCKET, PURCHASED_BUCKET, PlanAction, PurchaseReason
from actors.replies import REPLY_TTL_MS, IdempotencyKey, is_replayable
from actors.shard import LedgerShard, PlanEvent, Purchase, ShardConfig
from actors.store import LedgerStore, StoreUnavailable
from actors.views import CreditsAdded, PlanChangeResult, SessionProgress, SessionStarted, UsageView
from tests.faulty_store import FaultyMemoryStore
from tests.unit.actors.support import DEC_1, MIN, PLANS, POLICY, SEC, STALE_MS, FakeClock

USERS = ("u0", "u1", "u2")
KEYS = ("k0", "k1")
# Twenty minutes before a month ends: the first boundary comes soon.
START_MS = DEC_1 - 20 * MIN

keys = st.none() | st.sampled_from(KEYS)
users = st.sampled_from(USERS)
small_steps = st.integers(min_value=0, max_value=20 * SEC)
ticks = st.one_of(
    st.tuples(st.just("by"), small_steps),
    st.tuples(st.just("by"), small_steps),
    st.tuples(st.just("by"), st.integers(min_value=0, max_value=4 * MIN)),
    st.tuples(st.just("by"), st.integers(min_value=0, max_value=4 * MIN)),
    st.tuples(st.just("by"), st.integers(min_value=STALE_MS - SEC, max_value=STALE_MS + 2 * MIN)),
    st.tuples(st.just("by"), st.integers(min_value=REPLY_TTL_MS - MIN, max_value=REPLY_TTL_MS + MIN)),
    st.tuples(st.just("month_end"), st.integers(min_value=-2 * MIN, max_value=2 * MIN)),
)


@dataclass
class SessionModel:
    user: str
    started_at: int
    last_contact: int  # the latest start, heartbeat or end sent for it (answered or not)
    floor: int = 0  # the least the live shard holds: answers since the last crash, or what survived it
    safe: int = 0  # the least the store holds: what was durable at the last write known
    told_ended: bool = False  # a client was told this session ended
    end_durable: bool = False  # ...and its row is ended in the store by now
    final: tuple[str | None, int] | None = None  # (end_reason, used_ms) the clients were told
    seq_hi: int = 0


@dataclass(frozen=True)
class Remembered:
    """What the shard answered to a keyed request (a result, or a replayable refusal)."""

    request_hash: str
    outcome: Any
    at_ms: int
    must_survive: bool  # written with its change: a crash does not forget it


@dataclass(frozen=True)
class Outcome:
    value: Any = None
    error: DomainError | None = None
    replayed: bool = False  # the answer to an earlier request with the same key


async def _cancel_the_rest() -> None:
    """Cancel whatever a failed example left running on its loop."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _redelivered_or_refused(
    outcome: Outcome, first: tuple[Any, Any, Any] | None, sent: Any, what: str
) -> bool:
    """Check a billing delivery's answer when it is a redelivery (`first`: the acknowledged
    `(user, sent, answer)` under its id) or a refusal; True if that was the case (nothing more to
    check), False for a first delivery that was applied."""
    error = outcome.error
    if first is not None:
        if first[1] != sent:
            assert isinstance(error, EventConflict | Unavailable), f"a conflicting {what}: {outcome!r}"
        elif error is None:
            assert outcome.value == first[2], f"a redelivered {what} answered otherwise"
        else:
            assert isinstance(error, Unavailable), error
        return True
    if error is not None:
        assert isinstance(error, Unavailable), f"a {what}: {error!r}"
        return True
    return False


def _same_refusal(a: BaseException, b: BaseException) -> bool:
    assert isinstance(a, DomainError) and isinstance(b, DomainError)
    return (type(a), a.detail, a.fields) == (type(b), b.detail, b.fields)


class ShardMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")
    plan_events = Bundle("plan_events")
    purchases = Bundle("purchases")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store = FaultyMemoryStore()
        self.clock = FakeClock(START_MS)
        self.session_ids = itertools.count(1)
        self.delivery_ids = itertools.count(1)
        self.shard = self._new_shard()
        self.run(self.shard.start())
        self.resident: set[str] = set()
        self.model: dict[str, SessionModel] = {}
        # Plan events: the latest applied (occurred_at, delivery id) and plan per user; the
        # acknowledged deliveries with their first answer.
        self.applied_at: dict[str, tuple[int, str]] = {}
        self.plan_of: dict[str, str] = {}
        self.plan_acked: dict[str, tuple[str, PlanEvent, PlanChangeResult]] = {}
        self.credit_acked: dict[str, tuple[str, Purchase, CreditsAdded]] = {}
        self.bought: Counter[str] = Counter()
        # Idempotency-Key replies the shard must still hold, and the requests they answer.
        self.replies: dict[tuple[str, str], Remembered] = {}
        self.keyed: dict[tuple[str, str], tuple[str, tuple[Any, ...]]] = {}

    # ------------------------------------------------------------- plumbing

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def _new_shard(self) -> LedgerShard:
        store = self.store

        async def factory() -> LedgerStore:
            return store

        config = ShardConfig(
            shard_index=0, shard_count=1, policy=POLICY, sync_interval_s=3600, start_wait_s=1
        )
        return LedgerShard(
            config, factory, clock=self.clock, new_session_id=lambda: f"s{next(self.session_ids)}"
        )

    def teardown(self) -> None:
        FIGURES["examples"] += 1
        try:
            self.store.available = True
            self.run(self.shard.stop())
        finally:
            try:
                self.run(_cancel_the_rest())
                self.run(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def _call(
        self, kind: str, user: str, args: tuple[Any, ...], idem: IdempotencyKey | None
    ) -> Awaitable[Any]:
        shard = self.shard
        if kind == "start":
            return shard.start_session(user, idem=idem)
        if kind == "heartbeat":
            return shard.heartbeat(user, args[0], seq=args[1], idem=idem)
        if kind == "end":
            return shard.end_session(user, args[0], idem=idem)
        if kind == "plan":
            return shard.change_plan(user, args[0], idem=idem)
        if kind == "credits":
            return shard.add_credits(user, args[0], idem=idem)
        assert kind == "meter"
        return shard.consume_meter(user, args[0], args[1], idem=idem)

    @staticmethod
    async def _attempt(call: Awaitable[Any]) -> Outcome:
        try:
            return Outcome(value=await call)
        except DomainError as exc:
            return Outcome(error=exc)

    async def _view_if_readable(self, user: str) -> UsageView | None:
        """The user's usage, if it can be read without loading the user during an outage."""
        if self.store.available or user in self.resident:
            view = await self.shard.usage(user)
            self.resident.add(user)
            return view
        return None

    async def _send(
        self, kind: str, user: str, args: tuple[Any, ...], key: str | None, *, durable: bool = False
    ) -> Outcome:
        """Send one request (keyed or not); check what keys and outages promise about it.

        `durable`: if it succeeds, it changes the user durably, and its reply with it."""
        idem = IdempotencyKey(key, f"{kind}{args!r}") if key is not None else None
        if idem is not None:
            known = self.replies.get((user, idem.key))
            if known is not None and self.clock.now < known.at_ms + REPLY_TTL_MS:
                return await self._replay(kind, user, args, idem, known)
        down = not self.store.available
        before = await self._view_if_readable(user) if down else None
        outcome = await self._attempt(self._call(kind, user, args, idem))
        error = outcome.error
        if isinstance(error, Unavailable):
            assert down, f"{kind} failed with storage up: {error!r}"
        else:
            assert not isinstance(error, IdempotencyMismatch), "no reply is known under this key"
            self.resident.add(user)
        if error is not None and before is not None:
            assert await self.shard.usage(user) == before, f"a failed {kind} changed the user"
        if idem is not None:
            if error is None:
                self.replies[(user, idem.key)] = Remembered(
                    idem.request_hash, outcome.value, self.clock.now, must_survive=durable
                )
                self.keyed[(user, idem.key)] = (kind, args)
            elif isinstance(error, LedgerError) and is_replayable(error):
                self.replies[(user, idem.key)] = Remembered(
                    idem.request_hash, error, self.clock.now, must_survive=False
                )
                self.keyed[(user, idem.key)] = (kind, args)
        return outcome

    async def _replay(
        self, kind: str, user: str, args: tuple[Any, ...], idem: IdempotencyKey, known: Remembered
    ) -> Outcome:
        """A request under a key whose reply the shard holds: the first answer again, no effect."""
        readable = self.store.available or user in self.resident
        effects = self._effects()
        before = await self._view_if_readable(user)
        outcome = await self._attempt(self._call(kind, user, args, idem))
        if not readable:
            assert isinstance(outcome.error, Unavailable), "the user cannot be loaded during the outage"
            return replace(outcome, replayed=True)
        if known.request_hash != idem.request_hash:
            assert isinstance(outcome.error, IdempotencyMismatch), f"key reused: {outcome!r}"
        elif isinstance(known.outcome, DomainError):
            assert outcome.error is not None and _same_refusal(outcome.error, known.outcome), (
                f"a keyed retry was refused otherwise: {outcome.error!r}, first {known.outcome!r}"
            )
        else:
            assert outcome.error is None, f"a keyed retry failed: {outcome.error!r}"
            assert outcome.value == known.outcome, "a keyed retry got another answer"
        assert self._effects() == effects, "a keyed retry had an effect on the store"
        assert await self.shard.usage(user) == before, "a keyed retry had an effect on the user"
        return replace(outcome, replayed=True)

    def _effects(self) -> tuple[object, ...]:
        """What only a (durable) change makes in the store; a background flush changes none of it."""
        return (
            frozenset(self.store.sessions),
            frozenset(self.store.plan_events),
            frozenset(self.store.purchases),
            tuple((u, r.plan, r.plan_event_id) for u, r in sorted(self.store.users.items())),
            self._purchased_entries(),
        )

    def _purchased_entries(self) -> tuple[tuple[str, str | None, int], ...]:
        return tuple(
            sorted(
                (e.user_id, e.reference, e.delta)
                for e in self.store.entries.values()
                if e.bucket == PURCHASED_BUCKET and e.reason != "consume"
            )
        )

    def _cap(self, session: SessionModel, end_reason: str | None) -> int:
        """The most a session can have been billed: time is billed up to its last contact (a start,
        heartbeat or end), never past it, whoever ended it (the balance running out holds the time
        since, billed only once the client is heard from)."""
        return session.last_contact - session.started_at

    def _answered(self, sid: str, used: int, *, ended: bool, reason: str | None, durable: bool) -> None:
        """A client was told this session's billed time (and, perhaps, that it ended)."""
        session = self.model[sid]
        assert used >= session.floor, f"{sid}: answered {used} ms after {session.floor} ms"
        cap = self._cap(session, reason if ended else None)
        assert used <= cap, f"{sid}: billed {used} ms ({reason}), at most {cap} ms ran"
        session.floor = used
        if not ended:
            assert not session.told_ended, f"{sid} runs again after its end was acknowledged"
            return
        session.told_ended = True
        if durable:
            session.end_durable = True
            session.safe = max(session.safe, used)
        if session.final is None:
            session.final = (reason, used)
        assert session.final == (reason, used), f"{sid} ended twice: {session.final} then {(reason, used)}"

    def _user_written(self, user: str) -> None:
        """A durable write of `user` made every one of its sessions durable as the shard holds it."""
        for session in self.model.values():
            if session.user == user:
                session.safe = max(session.safe, session.floor)

    # ---------------------------------------------------------------- rules

    @initialize(target=sessions, plans=st.lists(st.sampled_from(sorted(PLANS.plans)), min_size=3, max_size=3))
    def everyone_starts(self, plans: list[str]) -> Any:
        """Each user gets a plan and starts a session (as most examples should begin)."""
        started = []
        for user, plan in zip(USERS, plans, strict=True):
            self.run(
                self._plan(user, PlanEvent(f"p{next(self.delivery_ids)}", plan, "upgrade", START_MS), None)
            )
            started.append(self.run(self._start(user, None)))
        return multiple(*(sid for sid in started if sid is not None))

    @rule(target=sessions, user=users, key=keys)
    def start(self, user: str, key: str | None) -> Any:
        sid = self.run(self._start(user, key))
        return multiple() if sid is None else sid

    async def _start(self, user: str, key: str | None) -> str | None:
        now = self.clock.now
        outcome = await self._send("start", user, (), key, durable=True)
        if outcome.replayed:
            return None
        error = outcome.error
        if error is None:
            started = outcome.value
            assert isinstance(started, SessionStarted)
            assert self.store.available, "a session started while storage was down"
            assert started.session_id not in self.model and started.started_at_ms == now
            self._user_written(user)
            self.model[started.session_id] = SessionModel(user, now, last_contact=now)
            return started.session_id
        if isinstance(error, SessionActive):
            running = self.model[error.fields["session_id"]]
            assert running.user == user and not running.told_ended, error
        else:
            assert isinstance(error, NoCredits | Unavailable), error
        return None

    @rule(
        sid=sessions,
        after=small_steps,
        who=st.sampled_from(["owner", "owner", "owner", "other"]),
        seq=st.sampled_from(["next", "next", "none", "same", "older", "skip"]),
        key=keys,
    )
    def heartbeat(self, sid: str, after: int, who: str, seq: str, key: str | None) -> None:
        """A client's heartbeat, `after` ms after the previous step (the timer has not run yet)."""
        self.clock.now += after
        session = self.model[sid]
        number: int | None = {
            "next": session.seq_hi + 1,
            "none": None,
            "same": session.seq_hi,
            "older": max(0, session.seq_hi - 2),
            "skip": session.seq_hi + 3,
        }[seq]
        self.run(self._heartbeat(sid, self._user(session, who), number, key))

    @staticmethod
    def _user(session: SessionModel, who: str) -> str:
        """The session's owner, or another user."""
        return session.user if who == "owner" else USERS[(USERS.index(session.user) + 1) % len(USERS)]

    async def _heartbeat(self, sid: str, user: str, seq: int | None, key: str | None) -> None:
        session = self.model[sid]
        if user == session.user:
            session.last_contact = self.clock.now
            session.seq_hi = max(session.seq_hi, seq or 0)
        down = not self.store.available
        running = False
        if down and user == session.user and user in self.resident:
            view = await self.shard.usage(user)
            running = view.active_session is not None and view.active_session.session_id == sid
        outcome = await self._send("heartbeat", user, (sid, seq), key)
        if outcome.replayed:
            return
        error = outcome.error
        if running:
            assert error is None or not isinstance(error, Unavailable), "a heartbeat needed storage"
        if user != session.user:
            assert isinstance(error, SessionNotFound | Unavailable), f"another user's session: {outcome!r}"
            return
        if error is None:
            progress = outcome.value
            assert isinstance(progress, SessionProgress) and progress.session_id == sid
            ended = progress.state == "ended"
            self._answered(
                sid, progress.session_used_ms, ended=ended, reason=progress.end_reason, durable=not down
            )
        elif isinstance(error, SessionEnded):
            self._answered(
                sid,
                error.fields["session_used_ms"],
                ended=True,
                reason=error.fields["end_reason"],
                durable=False,  # nothing is written before this refusal
            )
        else:
            assert isinstance(error, Unavailable), f"heartbeat of an acknowledged session: {error!r}"

    @rule(
        sid=sessions, who=st.sampled_from(["owner", "owner", "owner", "other"]), key=keys, twice=st.booleans()
    )
    def end(self, sid: str, who: str, key: str | None, twice: bool) -> None:
        self.run(self._end(sid, self._user(self.model[sid], who), key, twice))

    async def _end(self, sid: str, user: str, key: str | None, twice: bool) -> None:
        session = self.model[sid]
        if user == session.user:
            session.last_contact = self.clock.now
        outcome = await self._send("end", user, (sid,), key)
        self._ended(sid, user, outcome)
        if twice:
            again = await self._send("end", user, (sid,), None)
            self._ended(sid, user, again)
            if not outcome.replayed and outcome.error is None and again.error is None:
                assert again.value == outcome.value, "ending twice answered differently"

    def _ended(self, sid: str, user: str, outcome: Outcome) -> None:
        """What an end answered."""
        session = self.model[sid]
        if outcome.replayed:
            return
        error = outcome.error
        if user != session.user:
            assert isinstance(error, SessionNotFound | Unavailable), f"another user's session: {outcome!r}"
            return
        if error is None:
            progress = outcome.value
            assert isinstance(progress, SessionProgress) and progress.session_id == sid
            assert progress.state == "ended", progress
            self._answered(
                sid,
                progress.session_used_ms,
                ended=True,
                reason=progress.end_reason,
                durable=self.store.available,
            )
        else:
            assert isinstance(error, Unavailable), f"end of an acknowledged session: {error!r}"

    @rule(
        target=plan_events,
        user=users,
        plan=st.sampled_from(sorted(PLANS.plans)),
        action=st.sampled_from(["upgrade", "downgrade", "cancel"]),
        age=st.integers(min_value=-10 * MIN, max_value=MIN),
        reset=st.booleans(),
        key=keys,
    )
    def change_plan(
        self, user: str, plan: str, action: PlanAction, age: int, reset: bool, key: str | None
    ) -> Any:
        event = PlanEvent(
            f"p{next(self.delivery_ids)}", plan, action, self.clock.now + age, reset_usage=reset
        )
        self.run(self._plan(user, event, key))
        return (user, event)

    @rule(sent=plan_events, conflicting=st.booleans(), key=keys)
    def redeliver_plan_event(self, sent: tuple[str, PlanEvent], conflicting: bool, key: str | None) -> None:
        """Billing sends a delivery again (or, conflicting, another event under its id)."""
        user, event = sent
        if conflicting:
            event = replace(event, occurred_at_ms=event.occurred_at_ms + 1)
        self.run(self._plan(user, event, key))

    async def _plan(self, user: str, event: PlanEvent, key: str | None) -> None:
        first = self.plan_acked.get(event.delivery_id)
        # A new delivery is written with its reply; a known one answers from the store, unchanged.
        outcome = await self._send("plan", user, (event,), key, durable=first is None)
        if outcome.replayed:
            return
        if _redelivered_or_refused(outcome, first, event, "plan event"):
            return
        result = outcome.value
        assert isinstance(result, PlanChangeResult)
        order = (event.occurred_at_ms, event.delivery_id)
        last = self.applied_at.get(user)
        assert result.applied == (last is None or order > last), (
            f"applied={result.applied} for {order} after {last}"
        )
        if result.applied:
            self.applied_at[user] = order
            self.plan_of[user] = "free" if event.action == "cancel" else event.plan
        assert result.usage.plan == self.plan_of.get(user, "free")
        self.plan_acked[event.delivery_id] = (user, event, result)
        self._user_written(user)

    @rule(
        target=purchases,
        user=users,
        minutes=st.integers(min_value=1, max_value=20),
        reason=st.sampled_from(["purchase", "grant"]),
        key=keys,
    )
    def add_credits(self, user: str, minutes: int, reason: PurchaseReason, key: str | None) -> Any:
        delivery_id = f"c{next(self.delivery_ids)}"
        purchase = Purchase(delivery_id, minutes * MIN, reason, reference=f"order-{delivery_id}")
        self.run(self._credits(user, purchase, key))
        return (user, purchase)

    @rule(sent=purchases, conflicting=st.booleans(), key=keys)
    def redeliver_purchase(self, sent: tuple[str, Purchase], conflicting: bool, key: str | None) -> None:
        """Billing sends a purchase again (or, conflicting, another amount under its id)."""
        user, purchase = sent
        if conflicting:
            purchase = replace(purchase, minutes_ms=purchase.minutes_ms + MIN)
        self.run(self._credits(user, purchase, key))

    async def _credits(self, user: str, purchase: Purchase, key: str | None) -> None:
        first = self.credit_acked.get(purchase.delivery_id)
        outcome = await self._send("credits", user, (purchase,), key, durable=first is None)
        if outcome.replayed:
            return
        if _redelivered_or_refused(outcome, first, purchase, "purchase"):
            return
        added = outcome.value
        assert isinstance(added, CreditsAdded)
        self.bought[user] += purchase.minutes_ms
        assert added.purchased_ms <= self.bought[user]
        self.credit_acked[purchase.delivery_id] = (user, purchase, added)
        self._user_written(user)

    @rule(user=users, key=keys)
    def consume_meter(self, user: str, key: str | None) -> None:
        """The unit-test plans have no count meters: every use is refused, and changes nothing."""
        outcome = self.run(self._send("meter", user, ("generations", 1), key))
        if not outcome.replayed:
            assert isinstance(outcome.error, MeterNotFound | Unavailable), outcome

    @rule(pick=st.integers(min_value=0, max_value=1000))
    @precondition(lambda self: bool(self.keyed))
    def retry_keyed_request(self, pick: int) -> None:
        """Send a keyed request again, as a client whose answer was lost would."""
        FIGURES["keyed_retries"] += 1
        (user, key), (kind, args) = list(self.keyed.items())[pick % len(self.keyed)]
        if kind == "start":
            self.run(self._start(user, key))
        elif kind == "heartbeat":
            self.run(self._heartbeat(args[0], user, args[1], key))
        elif kind == "end":
            self.run(self._end(args[0], user, key, False))
        elif kind == "plan":
            self.run(self._plan(user, args[0], key))
        elif kind == "credits":
            self.run(self._credits(user, args[0], key))
        else:
            self.run(self._send(kind, user, args, key))

    @rule(tick=ticks, clients_beat=st.booleans())
    def advance_clock(self, tick: tuple[str, int], clients_beat: bool) -> None:
        """Time passes; the shard's timer fires what fell due. With `clients_beat`, every client
        that believes its session runs sends a heartbeat (next seq) at the end of the step."""
        how, amount = tick
        if how == "by":
            self.clock.now += amount
        else:
            self.clock.now = max(self.clock.now, calendar_month(self.clock.now).end_ms + amount)
        self.shard.fire_due_alarms()  # as the shard's timer would, soon
        if clients_beat:
            for sid, session in list(self.model.items()):
                if not session.told_ended:
                    session.seq_hi += 1
                    self.run(self._heartbeat(sid, session.user, session.seq_hi, None))

    @rule()
    def flush(self) -> None:
        FIGURES["flushes"] += 1
        self.run(self._flush())

    async def _flush(self) -> None:
        if not self.store.available:
            with contextlib.suppress(StoreUnavailable):
                await self.shard.flush()
            return
        views = {user: await self.shard.usage(user) for user in USERS}
        self.resident.update(USERS)
        await self.shard.flush()
        for sid, session in self.model.items():
            row = self.store.sessions[sid]
            assert row.used_ms >= session.floor, (
                f"{sid}: {row.used_ms} ms written, {session.floor} ms answered"
            )
            session.safe = row.used_ms
            if session.told_ended:
                assert not row.is_open, f"{sid}: an acknowledged end is not written by the flush"
                session.end_durable = True
        for user, view in views.items():
            report = await self.shard.reconcile(user)
            assert not report.drifting, f"{user}: balances drift from the credit ledger: {report.drifting}"
            running = {view.active_session.session_id} if view.active_session else set()
            open_rows = {
                r.session_id for r in self.store.sessions.values() if r.user_id == user and r.is_open
            }
            assert open_rows == running, f"{user}: store has {open_rows} open, the shard runs {running}"
            if view.active_session is not None:
                assert (
                    self.store.sessions[view.active_session.session_id].used_ms == view.active_session.used_ms
                )
            stored = self.store.users[user]
            assert (stored.plan, stored.purchased_ms) == (view.plan, view.purchased_ms)
            period = self.store.periods[(user, view.period_start_ms)]
            assert not period.archived
            assert (period.total_used_ms, period.limit_ms) == (view.used_ms, view.limit_ms)
            billed = sum(r.used_ms for r in self.store.sessions.values() if r.user_id == user)
            consumed = sum(
                -e.delta
                for e in self.store.entries.values()
                if e.user_id == user
                and e.reason == "consume"
                and e.bucket in (MONTHLY_BUCKET, PURCHASED_BUCKET)
            )
            assert billed == consumed, f"{user}: sessions billed {billed} ms, the credit ledger {consumed} ms"

    @rule()
    @precondition(lambda self: self.store.available)
    def storage_down(self) -> None:
        FIGURES["outages"] += 1
        self.store.available = False

    @rule()
    @precondition(lambda self: not self.store.available)
    def storage_up(self) -> None:
        self.store.available = True

    @rule()
    def crash_and_restart(self) -> None:
        FIGURES["crashes"] += 1
        self.run(self._crash())

    async def _crash(self) -> None:
        self.store.available = False  # the process dies: nothing more is written
        with contextlib.suppress(Exception):
            await self.shard.stop()
        self.store.available = True
        for sid, session in self.model.items():
            row = self.store.sessions[sid]
            assert row.used_ms >= session.safe
            session.floor = session.safe = row.used_ms  # what the restarted shard starts from
            if row.is_open:
                assert not session.end_durable
                session.final = None  # the end was not written: recovery ends it again, as it finds it
            else:
                if session.final is not None:
                    assert session.final == (row.end_reason, row.used_ms), f"{sid}: {row} != {session.final}"
                session.end_durable = True
        for slot, reply in list(self.replies.items()):
            stored = self.store.replies.get(slot)
            written = (
                stored is not None
                and stored.request_hash == reply.request_hash
                and stored.created_at_ms == reply.at_ms
            )
            if not (reply.must_survive or written):
                del self.replies[slot]  # written behind, and lost with its effect
        self.resident = {r.user_id for r in self.store.sessions.values() if r.is_open or r.is_pending}
        self.shard = self._new_shard()
        await self.shard.start()

    # ------------------------------------------------------------ invariants

    @invariant()
    def store_holds_what_was_acknowledged(self) -> None:
        store = self.store
        assert set(store.sessions) == set(self.model), "a session row no start acknowledged"
        for sid, session in self.model.items():
            row = store.sessions[sid]
            assert (row.user_id, row.started_at_ms) == (session.user, session.started_at)
            assert session.safe <= row.used_ms <= self._cap(session, row.end_reason), (sid, row, session)
            assert row.used_ms <= (row.ended_at_ms or row.last_heartbeat_at_ms) - row.started_at_ms
            if session.end_durable:
                assert not row.is_open, f"{sid}: an acknowledged end is not in the store"
                if session.final is not None:
                    assert session.final == (row.end_reason, row.used_ms), (sid, row, session.final)
        assert set(store.plan_events) == set(self.plan_acked), "plan events recorded != acknowledged"
        for delivery_id, (user, event, result) in self.plan_acked.items():
            record = store.plan_events[delivery_id]
            assert (record.user_id, record.event.plan, record.event.action, record.event.occurred_at_ms) == (
                user,
                event.plan,
                event.action,
                event.occurred_at_ms,
            )
            assert record.applied == result.applied
        assert set(store.purchases) == set(self.credit_acked), "purchases recorded != acknowledged"
        entries = Counter((user, reference) for user, reference, _ in self._purchased_entries())
        for delivery_id, (user, purchase, _) in self.credit_acked.items():
            assert store.purchases[delivery_id].user_id == user
            assert entries[(user, purchase.reference)] == 1, f"{delivery_id} is not in the credit ledger once"
        for user in USERS:
            added = sum(delta for u, _, delta in self._purchased_entries() if u == user)
            assert added == self.bought[user], (
                f"{user}: {added} ms purchased, {self.bought[user]} acknowledged"
            )
            stored = store.users.get(user)
            if stored is not None:
                assert stored.purchased_ms <= self.bought[user]
                if user in self.applied_at:
                    # The order key of the last applied event: on the user's row, or (after a
                    # renewal that changed nothing, which writes no row) in the plan events.
                    recorded = [
                        (e.event.occurred_at_ms, e.delivery_id)
                        for e in store.plan_events.values()
                        if e.user_id == user and e.applied
                    ]
                    on_row = (stored.plan_event_at_ms or 0, stored.plan_event_id or "")
                    assert max([on_row, *recorded]) == self.applied_at[user]
                    assert stored.plan == self.plan_of[user]

    @invariant()
    def live_shard_agrees(self) -> None:
        self.run(self._live_shard_agrees())

    async def _live_shard_agrees(self) -> None:
        for user in USERS:
            if user not in self.resident:
                if not self.store.available:
                    try:
                        await self.shard.usage(user)
                    except Unavailable:
                        continue
                    raise AssertionError(f"{user} was loaded while storage was down")
                continue
            view = await self.shard.usage(user)  # reads answer from memory, outage or not
            assert view.plan == self.plan_of.get(user, "free")
            assert view.limit_ms == PLANS.plans[view.plan].limit_ms
            assert view.purchased_ms <= self.bought[user]
            running = view.active_session
            if running is not None:
                session = self.model[running.session_id]
                assert session.user == user and running.started_at_ms == session.started_at
                assert not session.told_ended, f"{running.session_id} runs after its end was acknowledged"
                assert session.floor <= running.used_ms <= self._cap(session, None), (running, session)


TestShardMachine = ShardMachine.TestCase

# What the machine ran, printed once the module is done (`pytest -s`).
FIGURES: Counter[str] = Counter()


@pytest.fixture(autouse=True, scope="module")
def print_figures() -> Iterator[None]:
    yield
    print(f"shard machine: {dict(FIGURES)}")


TestShardMachine.settings = settings(
    max_examples=400,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
