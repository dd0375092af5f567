"""The per-user ledger: a pure state machine over one user's minutes and counts.

`UserLedger` is the single writer of a user's state. It does no I/O, imports
neither Ray nor a database driver, and never reads a clock: every operation
takes `now_ms`. That makes it deterministic: the same operations at the same
instants give the same state, which is what lets a restarted shard rebuild a
user from Postgres and reach the same alarms.

Balances (DESIGN.md, *Plans, periods, credits*):

- Two minute buckets: the plan's allowance for the current period (it resets
  at each period start) and purchased minutes (never expire). Consumption
  takes the allowance first, then purchased minutes, so a session runs on
  into purchased minutes without a gap.
- Count meters from the plan (`limit` or unlimited, per UTC day or per
  period); a use that would pass the limit is refused whole.
- Every change to a balance is an entry in the credit ledger (`CreditBook`).

Time accounting (DESIGN.md, *Time accounting*):

- A running session is billed from its start to its last heartbeat; each
  heartbeat bills the time since the previous one. `last_heartbeat_at_ms` is
  therefore also "billed through".
- Billing never takes more than the balance, and never goes past the client's
  last sign of life. When the balance runs out the session ends
  `limit_reached` at that exact instant (the *limit* alarm), whether or not a
  heartbeat arrives: the gate closes then. The stretch from its last
  heartbeat to that instant is not billed yet but *held* (a `_Tail`: unavailable
  to anything else, shown as held): a heartbeat or an end of that session
  within `stale_session_ms` of its last heartbeat shows the client was alive,
  and bills it (capture); otherwise it is dropped when that time comes (the
  *release* alarm). An honest client that ends its session pays exactly to the
  limit; a dead one pays to its last heartbeat. A tail holds what the session
  would have been billed (allowance first, then purchased minutes, in the
  periods the time fell in) and is billed there, even after the period ended.
- No heartbeat for `stale_session_ms` ends the session `stale`, billed to its
  last heartbeat (the *stale* alarm): silence is never billed.
- At the period's end (the *period* alarm) the period is archived and a new
  one starts (a calendar month, or the billing anchor's period). A session
  running across the boundary has its time split at the boundary: the part
  before is billed to the old period (kept as `_prior` until the session's
  billing passes the boundary), the part after to the new.

Every mutation increments `version` exactly once. Operations first fire every
alarm due at `now_ms` (`advance`), in time order, so the outcome never depends
on whether a shard's timer or a request got there first.

Guarantees: at most one active session; billing never takes the allowance
below zero or purchased minutes below zero, nor what is held; a session is
billed at most to its last sign of life (start, heartbeat, end); `version` strictly increases with
every change; for each bucket and window, the credit ledger's deltas add up to
the balance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from actors.credits import CreditBook, CreditKey
from actors.empty import EMPTY, writable
from actors.errors import MeterNotFound, NoCredits, SessionActive, SessionEnded, SessionNotFound, UnknownPlan
from actors.periods import PeriodAnchor, PeriodBounds, period_containing, utc_day
from actors.plans import MeterSpec, Plan, PlanCatalog
from actors.records import (
    ALERT_EXHAUSTED,
    ALERT_LOW,
    ALERT_NONE,
    METER_BUCKET_PREFIX,
    MONTHLY_BUCKET,
    PURCHASED_BUCKET,
    CreditReason,
    Difficulty,
    EndReason,
    EventKind,
    LedgerEvent,
    LedgerSnapshot,
    MeterRecord,
    PeriodRecord,
    PlanAction,
    PlanEvent,
    PurchaseReason,
    ReplyRecord,
    SessionRecord,
    StoredLedger,
    UserRecord,
)
from actors.replies import IdempotencyKey, ReplyBook
from actors.views import (
    ActiveSessionView,
    CreditsView,
    CurrentSession,
    MeterConsumed,
    MeterView,
    PeriodSummary,
    SessionProgress,
    SessionStarted,
    UsageView,
    Warning,
)

AlarmKind = Literal["stale", "release", "limit", "period_end"]

# Alarms due at the same instant fire in this order: silence first (it bills
# nothing), then a held tail's release (it frees what it held), then the limit
# (it holds to the instant), then the period's end.
_ALARM_PRIORITY: dict[AlarmKind, int] = {"stale": 0, "release": 1, "limit": 2, "period_end": 3}

# One `advance` fires at most a few alarms (an end, a boundary or two); a
# larger count means the state machine is looping, which is a bug.
MAX_ALARMS_PER_ADVANCE = 16

# A ledger rebuilt from a store continues this far above the stored version.
# Changes not yet written when a shard died had versions above the stored one
# that clients may have seen; no user makes 2^20 changes within one sync
# interval, so every version after a restore is newer than any before it.
RESTORE_VERSION_GAP = 1 << 20

# Events a ledger keeps for live streams once they are durable (unwritten ones are always kept).
RECENT_EVENTS_KEPT = 8

# The event announcing each alert level, and the warning the API shows at it.
_ALERT_EVENTS: dict[int, EventKind] = {ALERT_LOW: "low_balance", ALERT_EXHAUSTED: "exhausted"}
_ALERT_WARNINGS: dict[int, Warning | None] = {
    ALERT_NONE: None,
    ALERT_LOW: "low_balance",
    ALERT_EXHAUSTED: "exhausted",
}


class StoredStateError(ValueError):
    """What a store holds of a user cannot make a ledger (rows that break the ledger's rules, as
    an older version could write): that user cannot be served until the rows are repaired."""


@dataclass(frozen=True, slots=True)
class LedgerPolicy:
    """Settings every ledger of a shard shares (one object, referenced by all)."""

    plans: PlanCatalog
    stale_session_ms: int
    low_balance_ms: int
    ended_sessions_kept: int = 8

    def __post_init__(self) -> None:
        assert self.stale_session_ms > 0, "stale_session_ms must be positive"
        assert self.low_balance_ms >= 0, "low_balance_ms must not be negative"


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: AlarmKind
    at_ms: int
    session_id: str | None = None  # the tail a `release` frees


@dataclass(slots=True)
class _Period:
    start_ms: int
    end_ms: int
    plan: str
    limit_ms: int
    used_ms: int  # taken from the allowance
    purchased_used_ms: int = 0  # taken from purchased minutes during this period
    # Held by tails (never stored: rebuilt from them): of the allowance, and of purchased minutes
    # in this period. A period that holds anything stays at hand after it ends (held over).
    held_ms: int = 0
    held_purchased_ms: int = 0

    @property
    def holds(self) -> bool:
        return bool(self.held_ms or self.held_purchased_ms)

    @property
    def remaining_ms(self) -> int:
        """The allowance's balance, as the credit ledger keeps it: what is held is in it, and it
        never drops below what is held (a plan lowered while time is held does not take that
        time away: it stays billable until the hold is resolved)."""
        return max(0, self.limit_ms - self.used_ms, self.held_ms)

    @property
    def available_ms(self) -> int:
        """What of the allowance can still be spent: the balance less what is held."""
        return max(0, self.limit_ms - self.used_ms - self.held_ms)

    @property
    def total_used_ms(self) -> int:
        """Both buckets: the allowance and purchased minutes (as `PeriodRecord.total_used_ms`)."""
        return self.used_ms + self.purchased_used_ms

    def record(self, user_id: str, *, archived: bool, version: int) -> PeriodRecord:
        return PeriodRecord(
            user_id=user_id,
            start_ms=self.start_ms,
            end_ms=self.end_ms,
            plan=self.plan,
            used_ms=self.used_ms,
            limit_ms=self.limit_ms,
            archived=archived,
            version=version,
            purchased_used_ms=self.purchased_used_ms,
        )


@dataclass(slots=True)
class _Session:
    session_id: str
    started_at_ms: int
    last_heartbeat_at_ms: int
    used_ms: int
    topic: str | None
    difficulty: Difficulty | None
    last_seq: int | None = None

    def record(self, user_id: str, *, version: int) -> SessionRecord:
        return SessionRecord(
            session_id=self.session_id,
            user_id=user_id,
            started_at_ms=self.started_at_ms,
            last_heartbeat_at_ms=self.last_heartbeat_at_ms,
            used_ms=self.used_ms,
            topic=self.topic,
            difficulty=self.difficulty,
            version=version,
            last_seq=self.last_seq,
        )


@dataclass(slots=True)
class _Tail:
    """The unbilled end of a session the limit ended: held until the client shows it was alive
    (captured, billed) or `release_at_ms` comes first (released, never billed).

    `draws` are what it holds: per period (by start), from its allowance and from purchased
    minutes. `record` is the session's final record while pending (billed to its last heartbeat)."""

    record: SessionRecord
    release_at_ms: int
    draws: list[tuple[int, int, int]]

    @property
    def held_ms(self) -> int:
        return sum(allowance + purchased for _, allowance, purchased in self.draws)


@dataclass(slots=True)
class _Meter:
    window_start_ms: int
    window_end_ms: int
    used: int

    def counts_in(self, window: PeriodBounds) -> bool:
        """Whether this state is the count of `window` (a closed one counts in none)."""
        return self.window_start_ms == window.start_ms and self.window_end_ms == window.end_ms

    @property
    def closed(self) -> bool:
        """Ended in the credit ledger (`UserLedger._close_window`): an empty interval."""
        return self.window_end_ms == self.window_start_ms


def _meter_key(meter: str, window_start_ms: int) -> CreditKey:
    return (METER_BUCKET_PREFIX + meter, window_start_ms)


class UserLedger:
    """One user's plan, period, balances, meters, running session and version. See the module docstring."""

    __slots__ = (
        "_alert",
        "_book",
        "_ended",
        "_events",
        "_held_over",
        "_meters",
        "_period",
        "_policy",
        "_prior",
        "_purchased_held_ms",
        "_replies",
        "_session",
        "_tails",
        "_unsynced_periods",
        "_unsynced_sessions",
        "anchor",
        "plan",
        "plan_event_at_ms",
        "plan_event_id",
        "purchased_ms",
        "synced_version",
        "user_id",
        "version",
    )

    def __init__(
        self,
        *,
        user_id: str,
        policy: LedgerPolicy,
        plan: str,
        period: _Period,
        version: int,
        session: _Session | None = None,
        prior: _Period | None = None,
        plan_event_at_ms: int | None = None,
        plan_event_id: str | None = None,
        purchased_ms: int = 0,
        anchor: PeriodAnchor | None = None,
        meters: dict[str, _Meter] | None = None,
        book: CreditBook | None = None,
        replies: ReplyBook | None = None,
        alert_level: int | None = None,
        tails: dict[str, _Tail] | None = None,
        held_over: dict[int, _Period] | None = None,
    ) -> None:
        """`tails` hold what the periods (`period`, `prior`, `held_over`) say they hold."""
        self.user_id = user_id
        self.plan = plan
        self.version = version
        self.plan_event_at_ms = plan_event_at_ms
        self.plan_event_id = plan_event_id
        self.purchased_ms = purchased_ms
        self.anchor = anchor
        # The newest version known durable; a ledger restored from a store starts clean.
        self.synced_version = version
        self._policy = policy
        self._period = period
        self._session = session
        self._prior = prior
        self._meters: Mapping[str, _Meter] = meters or EMPTY
        self._book = book if book is not None else CreditBook(user_id)
        self._replies = replies if replies is not None else ReplyBook(user_id)
        # Ended sessions kept for idempotent ends (bounded), and records not yet durable.
        # (Each of these is usually empty: see `actors.empty`.)
        self._ended: Mapping[str, SessionRecord] = EMPTY
        self._unsynced_sessions: Mapping[str, SessionRecord] = EMPTY
        self._unsynced_periods: Mapping[int, PeriodRecord] = EMPTY
        # Tails of sessions the limit ended, by session id; archived periods some tail still holds
        # allowance in, by start; and the purchased minutes tails hold.
        self._tails: Mapping[str, _Tail] = tails or EMPTY
        self._held_over: Mapping[int, _Period] = held_over or EMPTY
        self._purchased_held_ms = sum(
            purchased for tail in self._tails.values() for *_, purchased in tail.draws
        )
        # Threshold events: the alert level last announced, and the events not yet durable
        # followed by (at most RECENT_EVENTS_KEPT) recent ones, oldest first.
        self._alert = alert_level if alert_level is not None else self._level()
        self._events: tuple[LedgerEvent, ...] = ()

    # ----------------------------------------------------------------- creation

    @classmethod
    def new(cls, user_id: str, policy: LedgerPolicy, now_ms: int, *, plan: str | None = None) -> UserLedger:
        """A user never seen before: the default plan (or `plan`), a fresh period, version 0."""
        chosen = policy.plans.get(plan) if plan is not None else policy.plans.default
        if chosen is None:
            raise UnknownPlan(f"unknown plan {plan!r}", plan=plan)
        bounds = period_containing(None, now_ms)
        period = _Period(bounds.start_ms, bounds.end_ms, chosen.name, chosen.limit_ms, 0)
        ledger = cls(user_id=user_id, policy=policy, plan=chosen.name, period=period, version=0)
        ledger._open_period_entry(now_ms)
        return ledger

    @classmethod
    def restore(cls, stored: StoredLedger, policy: LedgerPolicy, now_ms: int) -> UserLedger:
        """Rebuild a ledger from what a store holds. Call `advance` next to fire what fell due.

        Raises `StoredStateError` when the rows cannot make a ledger (they break its rules)."""
        user = stored.user
        versions = [user.version, *(p.version for p in stored.periods), *(m.version for m in stored.meters)]
        if stored.open_session is not None:
            versions.append(stored.open_session.version)
        versions += [record.version for record in stored.pending_sessions]
        plan_event = (user.plan_event_at_ms, user.plan_event_id)
        applied = stored.last_applied_plan_event
        if applied is not None and (plan_event[0] is None or applied > (plan_event[0], plan_event[1] or "")):
            plan_event = applied  # a renewal that changed nothing moves only the order (`change_plan`)
        anchor = None
        if user.anchor_start_ms is not None:
            anchor = PeriodAnchor(
                start_ms=user.anchor_start_ms, months=user.anchor_months, duration_ms=user.anchor_duration_ms
            )
        if stored.periods:
            period = _period_from(stored.periods[0])
        else:
            plan = policy.plans.get(user.plan) or policy.plans.default
            bounds = period_containing(anchor, now_ms)
            period = _Period(bounds.start_ms, bounds.end_ms, user.plan, plan.limit_ms, 0)
        session = None
        prior = None
        if (open_session := stored.open_session) is not None:
            session = _Session(
                session_id=open_session.session_id,
                started_at_ms=open_session.started_at_ms,
                last_heartbeat_at_ms=open_session.last_heartbeat_at_ms,
                used_ms=open_session.used_ms,
                topic=open_session.topic,
                difficulty=open_session.difficulty,
                last_seq=open_session.last_seq,
            )
            for older in stored.periods[1:]:
                if older.archived and older.start_ms <= session.last_heartbeat_at_ms < older.end_ms:
                    prior = _period_from(older)  # the session's unbilled time starts in that period
                    break
        archived = {record.start_ms: record for record in stored.periods[1:] if record.archived}
        held_over: dict[int, _Period] = {}
        tails: dict[str, _Tail] = {}
        for record in stored.pending_sessions:
            tail = _Tail(record, record.last_heartbeat_at_ms + policy.stale_session_ms, list(record.pending))
            for start, allowance, purchased in tail.draws:
                if start == period.start_ms:
                    holder = period
                elif prior is not None and start == prior.start_ms:
                    holder = prior
                elif start in held_over:
                    holder = held_over[start]
                elif start in archived:
                    holder = held_over[start] = _period_from(archived[start])
                else:
                    raise StoredStateError(
                        f"session {record.session_id} holds time in a period starting at {start} "
                        "that the store did not return"
                    )
                holder.held_ms += allowance
                holder.held_purchased_ms += purchased
            tails[record.session_id] = tail
        meters = {m.meter: _Meter(m.window_start_ms, m.window_end_ms, m.used) for m in stored.meters}
        ledger = cls(
            user_id=user.user_id,
            policy=policy,
            plan=user.plan,
            period=period,
            version=max(versions),
            session=session,
            prior=prior,
            plan_event_at_ms=plan_event[0],
            plan_event_id=plan_event[1],
            purchased_ms=user.purchased_ms,
            anchor=anchor,
            meters=meters,
            book=CreditBook(user.user_id, next_seq=user.next_entry_seq),
            replies=ReplyBook(user.user_id, stored.replies),
            alert_level=user.alert_level,
            tails=tails,
            held_over=held_over,
        )
        # Clean (nothing to write yet), but numbered above anything seen before the restore.
        ledger.version += RESTORE_VERSION_GAP
        ledger.synced_version = ledger.version
        return ledger

    def clone(self) -> UserLedger:
        """An independent copy: mutate it, make it durable, then swap it in (or drop it)."""
        twin = UserLedger(
            user_id=self.user_id,
            policy=self._policy,
            plan=self.plan,
            period=replace(self._period),
            version=self.version,
            session=replace(self._session) if self._session is not None else None,
            prior=replace(self._prior) if self._prior is not None else None,
            plan_event_at_ms=self.plan_event_at_ms,
            plan_event_id=self.plan_event_id,
            purchased_ms=self.purchased_ms,
            anchor=self.anchor,
            meters={name: replace(meter) for name, meter in self._meters.items()},
            book=self._book.clone(),
            replies=self._replies.clone(),
            alert_level=self._alert,
            tails={key: replace(tail, draws=list(tail.draws)) for key, tail in self._tails.items()},
            held_over={start: replace(period) for start, period in self._held_over.items()},
        )
        twin._events = self._events
        twin.synced_version = self.synced_version
        twin._ended = dict(self._ended) if self._ended else EMPTY
        twin._unsynced_sessions = dict(self._unsynced_sessions) if self._unsynced_sessions else EMPTY
        twin._unsynced_periods = dict(self._unsynced_periods) if self._unsynced_periods else EMPTY
        return twin

    # ------------------------------------------------------------------ queries

    @property
    def period(self) -> PeriodBounds:
        return PeriodBounds(self._period.start_ms, self._period.end_ms)

    @property
    def used_ms(self) -> int:
        """Time taken from the allowance this period."""
        return self._period.used_ms

    @property
    def limit_ms(self) -> int:
        return self._period.limit_ms

    @property
    def remaining_ms(self) -> int:
        """What can still be spent: the allowance left this period plus purchased minutes, less
        what is held."""
        return self._period.available_ms + self.purchased_available_ms

    @property
    def purchased_available_ms(self) -> int:
        """Purchased minutes less those held."""
        return self.purchased_ms - self._purchased_held_ms

    @property
    def held_ms(self) -> int:
        """Minutes held (by the tails of sessions the limit ended), in every period."""
        return sum(tail.held_ms for tail in self._tails.values())

    @property
    def held_in_period_ms(self) -> int:
        """Of the current period's allowance, what is held (so `used_ms + held_in_period_ms` is
        what the period has spent or promised)."""
        return self._period.held_ms

    @property
    def active_session_id(self) -> str | None:
        return self._session.session_id if self._session is not None else None

    def has_credits(self, now_ms: int) -> bool:
        """May this user go on? Answered from memory."""
        self.advance(now_ms)
        return self.remaining_ms > 0

    def usage(self, now_ms: int) -> UsageView:
        self.advance(now_ms)
        return self._usage_view()

    def credits(self, now_ms: int) -> CreditsView:
        """Both minute buckets and every meter of the plan, as of `now_ms`."""
        self.advance(now_ms)
        plan = self._current_plan()
        meters = {}
        if plan is not None:
            for name, spec in plan.meters.items():
                window, used = self._meter_window(name, spec, now_ms)
                remaining = None if spec.limit is None else max(0, spec.limit - used)
                meters[name] = MeterView(spec.limit, used, remaining, spec.window, window.end_ms)
        return CreditsView(
            allowance_remaining_ms=self._period.available_ms,
            purchased_ms=self.purchased_available_ms,
            remaining_ms=self.remaining_ms,
            meters=meters,
            version=self.version,
        )

    def current_session(self, now_ms: int) -> CurrentSession:
        self.advance(now_ms)
        session = self._session
        if session is None:
            raise SessionNotFound("no active session")
        return CurrentSession(
            session_id=session.session_id,
            started_at_ms=session.started_at_ms,
            last_heartbeat_at_ms=session.last_heartbeat_at_ms,
            used_ms=session.used_ms,
            remaining_ms=self.remaining_ms,
            ends_at_ms=self._ends_at_ms(),
            topic=session.topic,
            difficulty=session.difficulty,
            version=self.version,
        )

    def ended_session(self, session_id: str) -> SessionRecord | None:
        """The final record of a recently ended session, if this ledger still holds it."""
        return self._unsynced_sessions.get(session_id) or self._ended.get(session_id)

    def resident_sessions(self) -> list[SessionRecord]:
        """The sessions this ledger holds in memory: the running one and recently ended ones."""
        records = {**self._ended, **self._unsynced_sessions, **{k: t.record for k, t in self._tails.items()}}
        if self._session is not None:
            records[self._session.session_id] = self._session.record(self.user_id, version=self.version)
        return list(records.values())

    def resident_periods(self) -> list[PeriodSummary]:
        """The periods this ledger holds in memory: current, prior, archived but not yet written."""
        records = [self._period.record(self.user_id, archived=False, version=self.version)]
        if self._prior is not None:
            records.append(self._prior.record(self.user_id, archived=True, version=self.version))
        records.extend(self._unsynced_periods.values())
        return [PeriodSummary.of(record) for record in records]

    def balances(self, now_ms: int) -> dict[CreditKey, int]:
        """The live balance of every bucket the credit ledger tracks now (for reconciliation)."""
        self.advance(now_ms)
        found: dict[CreditKey, int] = {
            (MONTHLY_BUCKET, self._period.start_ms): self._period.remaining_ms,
            (PURCHASED_BUCKET, None): self.purchased_ms,
        }
        if self._prior is not None:
            found[(MONTHLY_BUCKET, self._prior.start_ms)] = self._prior.remaining_ms
        for start, period in self._held_over.items():
            found[(MONTHLY_BUCKET, start)] = period.remaining_ms
        plan = self._current_plan()
        for name, meter in self._meters.items():
            spec = plan.meters.get(name) if plan is not None else None
            in_window = meter.window_start_ms <= now_ms < meter.window_end_ms
            if spec is not None and spec.limit is not None and in_window:
                found[_meter_key(name, meter.window_start_ms)] = max(0, spec.limit - meter.used)
        return found

    def events_after(self, version: int) -> tuple[LedgerEvent, ...]:
        """The events this ledger still holds that came after `version` (for live streams)."""
        return tuple(event for event in self._events if event.version > version)

    def next_deadline_ms(self) -> int | None:
        """When the next alarm falls due (there is always the period's end)."""
        alarm = self._next_alarm()
        return alarm.at_ms if alarm is not None else None

    # ---------------------------------------------------------------- sessions

    def start_session(
        self,
        now_ms: int,
        session_id: str,
        *,
        topic: str | None = None,
        difficulty: Difficulty | None = None,
    ) -> SessionStarted:
        self.advance(now_ms)
        if self._session is not None:
            raise SessionActive("a session is already active", session_id=self._session.session_id)
        if self.remaining_ms <= 0:
            raise NoCredits("no minutes left in this period", period_end_ms=self._period.end_ms)
        assert session_id not in self._ended, "session ids are never reused"
        self._bump()
        self._session = _Session(session_id, now_ms, now_ms, 0, topic, difficulty)
        return SessionStarted(
            session_id=session_id,
            started_at_ms=now_ms,
            remaining_ms=self.remaining_ms,
            ends_at_ms=self._ends_at_ms(),
            version=self.version,
        )

    def heartbeat(self, now_ms: int, session_id: str, *, seq: int | None = None) -> SessionProgress:
        """Bill the time since the previous heartbeat. A `seq` not above the last one changes nothing."""
        self.advance(now_ms)
        session = self._session
        if session is None or session.session_id != session_id:
            if session_id in self._tails:
                # Any heartbeat of the session, even one sent again with its old `seq`, was sent by
                # a client still alive after its last heartbeat: the held time is billed. (Told
                # otherwise, a client could later be told a second, different final account.)
                return self._ended_progress(self._capture(session_id, now_ms))
            return self.heartbeat_after_end(session_id, self.ended_session(session_id))
        if seq is not None and session.last_seq is not None and seq <= session.last_seq:
            return self._active_progress(session)
        self._bump()
        session.last_seq = seq if seq is not None else session.last_seq
        exhausted_at = self._bill(now_ms)
        self._note_balance(exhausted_at if exhausted_at is not None else now_ms)
        if exhausted_at is not None:
            record = self._end(exhausted_at, "limit_reached")
            return self._ended_progress(record)
        return self._active_progress(session)

    def end_session(self, now_ms: int, session_id: str) -> SessionProgress:
        """End the session now. Ending an ended session returns its final result again."""
        self.advance(now_ms)
        session = self._session
        if session is None or session.session_id != session_id:
            if session_id in self._tails:
                return self._ended_progress(self._capture(session_id, now_ms))
            ended = self.ended_session(session_id)
            if ended is None:
                raise SessionNotFound("no such session", session_id=session_id)
            return self._ended_progress(ended)
        self._bump()
        exhausted_at = self._bill(now_ms)
        self._note_balance(exhausted_at if exhausted_at is not None else now_ms)
        if exhausted_at is not None:
            record = self._end(exhausted_at, "limit_reached")
        else:
            record = self._end(now_ms, "user_ended")
        return self._ended_progress(record)

    def progress_of(self, record: SessionRecord) -> SessionProgress:
        """The answer to ending a session that ended earlier (known from a store)."""
        return self._ended_progress(record)

    def heartbeat_after_end(self, session_id: str, record: SessionRecord | None) -> SessionProgress:
        """The answer to a heartbeat for a session that is not running.

        A session that ran out of balance answers `ended`/`limit_reached`, so the
        client hears the same thing whether the limit alarm or its heartbeat got
        there first; a session the user ended or that went stale is `SessionEnded`.
        """
        if record is None:
            raise SessionNotFound("no such session", session_id=session_id)
        if record.end_reason == "limit_reached":
            return self._ended_progress(record)
        raise SessionEnded(
            "the session has ended",
            session_id=session_id,
            end_reason=record.end_reason,
            session_used_ms=record.used_ms,
        )

    # ------------------------------------------------------------ credits, meters

    def add_credits(
        self, now_ms: int, amount_ms: int, *, reason: PurchaseReason, reference: str | None
    ) -> int:
        """Add purchased minutes (they never expire). Returns the purchased balance."""
        assert amount_ms > 0, "callers validate the amount"
        self.advance(now_ms)
        self._bump()
        self._materialize()
        self.purchased_ms += amount_ms
        self._record(
            (PURCHASED_BUCKET, None),
            delta=amount_ms,
            balance_after=self.purchased_ms,
            reason=reason,
            at_ms=now_ms,
            reference=reference,
        )
        self._note_balance(now_ms)
        return self.purchased_ms

    def consume_meter(self, now_ms: int, meter: str, amount: int) -> MeterConsumed:
        """Use `amount` of a count meter, all of it or (past the limit) none of it."""
        assert amount > 0, "callers validate the amount"
        self.advance(now_ms)
        plan = self._current_plan()
        spec = plan.meters.get(meter) if plan is not None else None
        if spec is None:
            raise MeterNotFound(f"the plan has no meter {meter!r}", meter=meter)
        window, used = self._meter_window(meter, spec, now_ms)
        if spec.limit is not None and used + amount > spec.limit:
            raise NoCredits(
                f"meter {meter!r} allows {spec.limit} per {spec.window}",
                meter=meter,
                remaining=max(0, spec.limit - used),
                resets_at_ms=window.end_ms,
            )
        self._bump()
        state = self._meters.get(meter)
        if state is None or not state.counts_in(window):
            self._materialize()  # the old window's open uses, while its balance is still known
            if state is not None:
                self._close_window(meter, state, spec, now_ms)
            state = _Meter(window.start_ms, window.end_ms, 0)
            meters = self._meters = writable(self._meters)
            meters[meter] = state
            if spec.limit is not None:
                key = _meter_key(meter, window.start_ms)
                self._record(key, delta=spec.limit, balance_after=spec.limit, reason="reset", at_ms=now_ms)
        state.used += amount
        if spec.limit is not None:
            self._book.consume(_meter_key(meter, window.start_ms), amount, now_ms)
        return MeterConsumed(
            meter=meter,
            remaining=None if spec.limit is None else spec.limit - state.used,
            resets_at_ms=window.end_ms,
            version=self.version,
        )

    def _meter_window(self, meter: str, spec: MeterSpec, now_ms: int) -> tuple[PeriodBounds, int]:
        """The meter's current window and the uses counted in it."""
        window = utc_day(now_ms) if spec.window == "day" else self.period
        state = self._meters.get(meter)
        used = state.used if state is not None and state.counts_in(window) else 0
        return window, used

    # -------------------------------------------------------------------- plans

    def change_plan(self, now_ms: int, change: PlanEvent) -> bool:
        """Apply a plan event unless an event at least as recent was applied. Returns whether applied."""
        self.advance(now_ms)
        target = (
            self._policy.plans.default if change.action == "cancel" else self._policy.plans.get(change.plan)
        )
        if target is None:
            raise UnknownPlan(f"unknown plan {change.plan!r}", plan=change.plan)
        anchor = None
        if change.period_start_ms is not None and change.period_end_ms is not None:
            if change.period_start_ms >= change.period_end_ms:
                raise UnknownPlan("the subscription period must start before it ends", plan=change.plan)
            anchor = PeriodAnchor.from_subscription(change.period_start_ms, change.period_end_ms)
            if anchor.shortest_period_ms < 2 * self._policy.stale_session_ms:
                raise UnknownPlan(
                    "the subscription period is too short: it must last twice the stale-session timeout",
                    plan=change.plan,
                )
        if self.plan_event_at_ms is not None:
            last = (self.plan_event_at_ms, self.plan_event_id or "")
            if (change.occurred_at_ms, change.delivery_id) <= last:
                return False
        if self._renews(target, anchor, change):
            # Nothing changes (no version, no event); only the order of billing's events moves on,
            # so an older event arriving late is still not applied (kept in the plan events too).
            self.plan_event_at_ms = change.occurred_at_ms
            self.plan_event_id = change.delivery_id
            return True
        self._bump()
        self._materialize()  # open consumption is booked against the balances before the change
        old_plan = self._current_plan()
        previous_plan = self.plan
        switched = False
        if anchor is not None and anchor != self.anchor:
            self.anchor = anchor
            bounds = period_containing(anchor, now_ms)
            in_place = (
                bounds.start_ms == self._period.start_ms
                or now_ms == self._period.start_ms
                # A session straddling a boundary has billed nothing to the current period yet:
                # renew it rather than put a second boundary inside the session's unbilled time.
                or self._prior is not None
            )
            if in_place:
                # The same period (or one that began this instant): renewed to the subscription's end.
                self._period.end_ms = bounds.end_ms
            else:
                # The current period closes now and the anchored one opens now; the ones after it
                # follow the anchor exactly. Period starts only ever grow, so no two share a start.
                self._switch_period(now_ms, PeriodBounds(now_ms, bounds.end_ms), target)
                switched = True
        if not switched:
            self._apply_plan_to_period(now_ms, target, reset_usage=change.reset_usage)
        self.plan = target.name
        self.plan_event_at_ms = change.occurred_at_ms
        self.plan_event_id = change.delivery_id
        self._adjust_meters(now_ms, old_plan, target)
        self._emit("plan_changed", now_ms, previous_plan=previous_plan, action=change.action)
        self._note_balance(now_ms)
        # A downgrade may leave nothing to spend: a session still running ends now.
        self.advance(now_ms)
        return True

    def _renews(self, target: Plan, anchor: PeriodAnchor | None, change: PlanEvent) -> bool:
        """Whether `change` is a renewal that changes nothing: the plan in force, no reset, and no
        period, or the subscription period already in force (the one that anchored the user, or
        the current period exactly, once periods have rolled on)."""
        if target.name != self.plan or change.reset_usage:
            return False
        if anchor is None:
            return True
        current = (self._period.start_ms, self._period.end_ms)
        named = (change.period_start_ms, change.period_end_ms)
        return self.anchor is not None and (anchor == self.anchor or named == current)

    def _apply_plan_to_period(self, now_ms: int, target: Plan, *, reset_usage: bool) -> None:
        session = self._session
        if session is not None and not reset_usage:
            left_after = (
                max(0, target.limit_ms - self._period.used_ms - self._period.held_ms)
                + self.purchased_available_ms
            )
            if left_after < now_ms - session.last_heartbeat_at_ms:
                # The old plan covered the session up to this change; the new one
                # leaves nothing for the time since: the session ends now, at the
                # balance that applied until now (as the limit alarm would have),
                # its time since the last heartbeat held until the client is heard from.
                self._end_at_limit(now_ms)
                self._materialize()
        before = self._period.remaining_ms
        self._period.plan = target.name
        self._period.limit_ms = target.limit_ms
        if reset_usage:
            self._period.used_ms = 0
        if self._period.remaining_ms != before:
            self._record(
                (MONTHLY_BUCKET, self._period.start_ms),
                delta=self._period.remaining_ms - before,
                balance_after=self._period.remaining_ms,
                reason="adjust",
                at_ms=now_ms,
            )

    def _switch_period(self, now_ms: int, bounds: PeriodBounds, target: Plan) -> None:
        """Billing anchored the user to a new period: the current one closes now, the new one opens."""
        assert bounds.start_ms == now_ms > self._period.start_ms, "a switch opens the new period now"
        old = self._period
        old.end_ms = now_ms
        session = self._session
        if session is not None and session.last_heartbeat_at_ms < old.end_ms:
            assert self._prior is None, "a switch while a session straddles renews in place"
            self._prior = old  # the running session's time until now belongs to the old period
        else:
            self._archive(old)
        self._period = _Period(bounds.start_ms, bounds.end_ms, target.name, target.limit_ms, 0)
        self._open_period_entry(now_ms)
        self._emit_period_rolled(old, now_ms)

    def _adjust_meters(self, now_ms: int, old_plan: Plan | None, target: Plan) -> None:
        """Keep each meter's credit-ledger balance in its current window right when its limit changes.

        A window that has passed, or whose kind changes (a day for a period, or back), is closed
        instead (`_close_window`): the next use opens a window of the new plan afresh. So the
        balance of a meter window not closed is always `limit - used` under the current plan."""
        for name, state in self._meters.items():
            if state.closed:
                continue
            old_spec = old_plan.meters.get(name) if old_plan is not None else None
            new_spec = target.meters.get(name)
            kind_changes = (
                old_spec is not None and new_spec is not None and old_spec.window != new_spec.window
            )
            if now_ms >= state.window_end_ms or kind_changes:
                self._close_window(name, state, old_spec, now_ms)
                continue
            old_limit = old_spec.limit if old_spec is not None else None
            new_limit = new_spec.limit if new_spec is not None else None
            if old_limit == new_limit:
                continue
            key = _meter_key(name, state.window_start_ms)
            old_balance = max(0, old_limit - state.used) if old_limit is not None else None
            new_balance = max(0, new_limit - state.used) if new_limit is not None else None
            if old_balance is None and new_balance is not None:
                self._record(key, delta=new_balance, balance_after=new_balance, reason="reset", at_ms=now_ms)
            elif old_balance is not None:
                after = new_balance if new_balance is not None else 0
                if after != old_balance:
                    self._record(
                        key, delta=after - old_balance, balance_after=after, reason="adjust", at_ms=now_ms
                    )

    def _close_window(self, name: str, state: _Meter, spec: MeterSpec | None, at_ms: int) -> None:
        """End a meter window in the credit ledger: what is left of it (under `spec`, the plan its
        balance was kept by) expires, so its chain of entries ends at 0. A later window under the
        same key (a day and a month can start at the same instant) then starts a chain of its own
        on a balance of 0, and every chain adds up. A closed window is an empty interval."""
        if state.closed:
            return
        balance = max(0, spec.limit - state.used) if spec is not None and spec.limit is not None else 0
        if balance:
            key = _meter_key(name, state.window_start_ms)
            self._record(key, delta=-balance, balance_after=0, reason="adjust", at_ms=at_ms)
        state.window_end_ms = state.window_start_ms

    # ------------------------------------------------------------------- alarms

    def advance(self, now_ms: int) -> list[Alarm]:
        """Fire, in time order, every alarm due at or before `now_ms`."""
        fired: list[Alarm] = []
        for _ in range(MAX_ALARMS_PER_ADVANCE):
            alarm = self._next_alarm()
            if alarm is None or alarm.at_ms > now_ms:
                return fired
            self._bump()
            if alarm.kind == "stale":
                self._end(self._require_session().last_heartbeat_at_ms, "stale")
            elif alarm.kind == "release":
                assert alarm.session_id is not None
                self._settle(alarm.session_id, capture=False)
            elif alarm.kind == "limit":
                self._end_at_limit(alarm.at_ms)
            else:
                self._roll_over(now_ms)
            self._note_balance(alarm.at_ms)
            fired.append(alarm)
        raise AssertionError(f"more than {MAX_ALARMS_PER_ADVANCE} alarms in one advance")

    def _next_alarm(self) -> Alarm | None:
        candidates = [Alarm("period_end", self._period.end_ms)]
        if (session := self._session) is not None:
            candidates.append(Alarm("stale", session.last_heartbeat_at_ms + self._policy.stale_session_ms))
            candidates.append(Alarm("limit", self._exhaustion_ms()))
        candidates += [Alarm("release", tail.release_at_ms, key) for key, tail in self._tails.items()]
        return min(candidates, key=lambda alarm: (alarm.at_ms, _ALARM_PRIORITY[alarm.kind]))

    # -------------------------------------------------------------------- tails

    def _end_at_limit(self, end_ms: int) -> None:
        """The balance ran out (or a plan change left none) at `end_ms`: the session ends then, and
        the stretch since its last heartbeat, unbilled, is held as its tail until the client shows
        it was alive (`_capture`) or stays silent until its stale deadline (`_settle`)."""
        session = self._require_session()
        heard_at = session.last_heartbeat_at_ms
        draws: list[tuple[int, int, int]] = []
        exhausted_at = self._bill(end_ms, holding=draws)
        record = self._end(exhausted_at if exhausted_at is not None else end_ms, "limit_reached")
        if not draws:
            return  # nothing unbilled (the balance ran out at a heartbeat)
        record = replace(record, pending=tuple(draws))
        self._keep_ended(record)
        tails = self._tails = writable(self._tails)
        tails[record.session_id] = _Tail(record, heard_at + self._policy.stale_session_ms, draws)

    def _capture(self, session_id: str, now_ms: int) -> SessionRecord:
        """The client of a session whose tail is held showed it was alive: bill the tail."""
        self._bump()
        record = self._settle(session_id, capture=True)
        self._note_balance(now_ms)
        return record

    def _settle(self, session_id: str, *, capture: bool) -> SessionRecord:
        """Resolve a tail, once: bill what it holds where it holds it (capture), or free it
        (release). Returns the session's final record."""
        tails = self._tails = writable(self._tails)
        tail = tails.pop(session_id)
        self._tails = tails or EMPTY
        record = tail.record
        assert record.ended_at_ms is not None
        self._materialize()  # open consumption at the balances before the tail is resolved
        billed = 0
        for start, allowance, purchased in tail.draws:
            period = self._resident_period(start)
            balance_before = period.remaining_ms
            period.held_ms -= allowance
            period.held_purchased_ms -= purchased
            self._purchased_held_ms -= purchased
            if capture:
                # (Never more than the balance the credit ledger has: what is held is in it.)
                from_allowance = min(allowance, balance_before)
                from_purchased = min(purchased, self.purchased_ms)
                period.used_ms += from_allowance
                period.purchased_used_ms += from_purchased
                self.purchased_ms -= from_purchased
                self._book.consume((MONTHLY_BUCKET, start), from_allowance, record.ended_at_ms)
                self._book.consume((PURCHASED_BUCKET, None), from_purchased, record.ended_at_ms)
                billed += from_allowance + from_purchased
            elif period.remaining_ms != balance_before:
                # Released, what a lowered plan had left in the balance only for this hold goes.
                self._record(
                    (MONTHLY_BUCKET, start),
                    delta=period.remaining_ms - balance_before,
                    balance_after=period.remaining_ms,
                    reason="adjust",
                    at_ms=tail.release_at_ms,
                )
            if self._held_over.get(start) is period and (capture or not period.holds):
                # An archived period: its row is written again (what it billed, or no longer holds).
                self._archive(period)
        settled = replace(
            record,
            used_ms=record.used_ms + billed,
            # Billed through the end: the client was heard from after it.
            last_heartbeat_at_ms=record.ended_at_ms if capture else record.last_heartbeat_at_ms,
            pending=(),
            version=self.version,
        )
        self._keep_ended(settled)
        return settled

    def _resident_period(self, start_ms: int) -> _Period:
        """The period starting at `start_ms` that a tail holds time in: current, prior or held over."""
        for period in (self._period, self._prior):
            if period is not None and period.start_ms == start_ms:
                return period
        return self._held_over[start_ms]

    # ------------------------------------------------------------------ replies

    def reply(self, key: str, now_ms: int) -> ReplyRecord | None:
        """The reply remembered for an `Idempotency-Key`, unless it has expired."""
        return self._replies.get(key, now_ms)

    def remember_reply(self, request: IdempotencyKey, outcome: str, now_ms: int) -> None:
        """Remember what a keyed request answered. It is no change to the user's state (the
        version stays); the reply goes with the ledger's next write, at this version or later."""
        self._replies.remember(request, outcome, now_ms, version=self.version + 1)

    # -------------------------------------------------------------- persistence

    @property
    def is_dirty(self) -> bool:
        """True when this version is not yet durable."""
        return self.version > self.synced_version

    def snapshot(self) -> LedgerSnapshot:
        """Everything a write must make durable, at the current version."""
        self._materialize()
        version = self.version
        periods = [self._period.record(self.user_id, archived=False, version=version)]
        if self._prior is not None:
            periods.append(self._prior.record(self.user_id, archived=True, version=version))
        periods.extend(
            record
            for start, record in self._unsynced_periods.items()
            if self._prior is None or start != self._prior.start_ms
        )
        # Ended sessions first: a store that allows one open session per user
        # must see the old one closed before the new one appears.
        sessions = list(self._unsynced_sessions.values())
        if self._session is not None:
            sessions.append(self._session.record(self.user_id, version=version))
        anchor = self.anchor
        user = UserRecord(
            user_id=self.user_id,
            plan=self.plan,
            version=version,
            plan_event_at_ms=self.plan_event_at_ms,
            plan_event_id=self.plan_event_id,
            purchased_ms=self.purchased_ms,
            anchor_start_ms=anchor.start_ms if anchor is not None else None,
            anchor_months=anchor.months if anchor is not None else 0,
            anchor_duration_ms=anchor.duration_ms if anchor is not None else 0,
            next_entry_seq=self._book.next_seq,
            alert_level=self._alert,
        )
        meters = tuple(
            MeterRecord(self.user_id, name, m.window_start_ms, m.window_end_ms, m.used, version)
            for name, m in self._meters.items()
        )
        return LedgerSnapshot(
            user=user,
            periods=tuple(periods),
            sessions=tuple(sessions),
            meters=meters,
            entries=self._book.pending,
            replies=self._replies.pending,
            events=self.events_after(self.synced_version),
        )

    def mark_synced(self, version: int) -> None:
        """A snapshot taken at `version` is durable: forget records it covered."""
        self._unsynced_sessions = {
            key: record for key, record in self._unsynced_sessions.items() if record.version > version
        } or EMPTY
        self._unsynced_periods = {
            key: record for key, record in self._unsynced_periods.items() if record.version > version
        } or EMPTY
        self._book.mark_synced(version)
        self._replies.mark_synced(version)
        self.synced_version = max(self.synced_version, version)

    # ---------------------------------------------------------------- internals

    def _bump(self) -> None:
        self.version += 1

    def _current_plan(self) -> Plan | None:
        return self._policy.plans.get(self.plan)

    def _require_session(self) -> _Session:
        assert self._session is not None
        return self._session

    def _materialize(self) -> None:
        """Book open consumption as entries. Call before any change to a balance other than
        consumption, so each `consume` entry carries the balance it left."""
        self._book.materialize(version=self.version, balance_of=self._balance_of)

    def _record(
        self,
        key: CreditKey,
        *,
        delta: int,
        balance_after: int,
        reason: CreditReason,
        at_ms: int,
        reference: str | None = None,
    ) -> None:
        self._book.record(
            key,
            delta=delta,
            balance_after=balance_after,
            reason=reason,
            at_ms=at_ms,
            version=self.version,
            balance_of=self._balance_of,
            reference=reference,
        )

    def _balance_of(self, key: CreditKey) -> int:
        """A bucket's balance now (consumption is only ever open for buckets the ledger holds)."""
        bucket, window = key
        if bucket == PURCHASED_BUCKET:
            return self.purchased_ms
        if bucket == MONTHLY_BUCKET:
            assert window is not None
            return self._resident_period(window).remaining_ms
        meter = bucket.removeprefix(METER_BUCKET_PREFIX)
        state = self._meters[meter]
        plan = self._current_plan()
        spec = plan.meters.get(meter) if plan is not None else None
        assert spec is not None and spec.limit is not None and state.window_start_ms == window
        return max(0, spec.limit - state.used)

    def _open_period_entry(self, now_ms: int) -> None:
        """The allowance of a period that just started (the `reset` of the monthly bucket)."""
        period = self._period
        self._record(
            (MONTHLY_BUCKET, period.start_ms),
            delta=period.remaining_ms,
            balance_after=period.remaining_ms,
            reason="reset",
            at_ms=max(now_ms, period.start_ms),
        )

    def _budget_in_current_period(self) -> tuple[int, int]:
        """Where billing of the running session resumes in the current period, and the
        purchased minutes left then; for a session straddling the boundary, after the
        old period's part. (If the balance runs out before the boundary, `_exhaustion_ms`
        answers first.)"""
        at = self._require_session().last_heartbeat_at_ms
        purchased = self.purchased_available_ms
        if (prior := self._prior) is not None:
            spent_from_purchased = max(0, (prior.end_ms - at) - prior.available_ms)
            purchased = max(0, purchased - spent_from_purchased)
            at = prior.end_ms
        return at, purchased

    def _exhaustion_ms(self) -> int:
        """When the balance runs out if the running session goes on (within the current period)."""
        at = self._require_session().last_heartbeat_at_ms
        if (prior := self._prior) is not None:
            left = prior.available_ms + self.purchased_available_ms
            if at + left < prior.end_ms:
                return at + left
        start, purchased = self._budget_in_current_period()
        return start + self._period.available_ms + purchased

    def _ends_at_ms(self) -> int:
        """`ends_at` as the API shows it: past the period's end, the next allowance counts too."""
        exhaustion = self._exhaustion_ms()
        if exhaustion <= self._period.end_ms:
            return exhaustion
        start, purchased = self._budget_in_current_period()
        spent_from_purchased = max(0, (self._period.end_ms - start) - self._period.available_ms)
        return self._period.end_ms + self._plan_limit_ms() + max(0, purchased - spent_from_purchased)

    def _plan_limit_ms(self) -> int:
        plan = self._current_plan()
        return plan.limit_ms if plan is not None else self._period.limit_ms

    def _take(
        self, period: _Period, duration_ms: int, at_ms: int, holding: list[tuple[int, int, int]] | None
    ) -> int:
        """Bill up to `duration_ms` of session time to `period`: allowance first, then purchased.
        With `holding`, hold it instead (a tail), and note there what was held where."""
        from_allowance = min(duration_ms, period.available_ms)
        from_purchased = min(duration_ms - from_allowance, self.purchased_available_ms)
        if holding is not None:
            period.held_ms += from_allowance
            period.held_purchased_ms += from_purchased
            self._purchased_held_ms += from_purchased
            if from_allowance or from_purchased:
                holding.append((period.start_ms, from_allowance, from_purchased))
            return from_allowance + from_purchased
        period.used_ms += from_allowance
        period.purchased_used_ms += from_purchased
        self.purchased_ms -= from_purchased
        self._require_session().used_ms += from_allowance + from_purchased
        self._book.consume((MONTHLY_BUCKET, period.start_ms), from_allowance, at_ms)
        self._book.consume((PURCHASED_BUCKET, None), from_purchased, at_ms)
        return from_allowance + from_purchased

    def _bill(self, to_ms: int, *, holding: list[tuple[int, int, int]] | None = None) -> int | None:
        """Bill the running session through `to_ms`, capped by the balance (with `holding`: hold
        it, leaving what the session was billed, and its last heartbeat, as they were).

        Returns the instant the balance ran out, or None if some is left.
        """
        session = self._require_session()
        at = session.last_heartbeat_at_ms
        to_ms = max(to_ms, at)  # a clock stepping back bills nothing

        def billed_through(instant: int) -> None:
            if holding is None:
                session.last_heartbeat_at_ms = instant

        if (prior := self._prior) is not None:
            segment_end = min(to_ms, prior.end_ms)
            taken = self._take(prior, segment_end - at, segment_end, holding)
            nothing_left = prior.available_ms + self.purchased_available_ms == 0
            if at + taken < segment_end or (nothing_left and segment_end < prior.end_ms):
                billed_through(at + taken)
                return at + taken
            at = segment_end
            if to_ms < prior.end_ms:
                billed_through(at)
                return None
            # Whatever was left of the old allowance at the boundary is gone; the new one starts.
            self._retire_prior()
        taken = self._take(self._period, to_ms - at, to_ms, holding)
        billed_through(at + taken)
        if at + taken < to_ms or self.remaining_ms == 0:
            return at + taken
        return None

    def _end(self, at_ms: int, reason: EndReason) -> SessionRecord:
        session = self._require_session()
        record = replace(
            session.record(self.user_id, version=self.version), ended_at_ms=at_ms, end_reason=reason
        )
        self._session = None
        if self._prior is not None:
            self._retire_prior()
        self._keep_ended(record)
        return record

    def _keep_ended(self, record: SessionRecord) -> None:
        """An ended session's (newest) record: to be written, and kept for idempotent answers."""
        unsynced = self._unsynced_sessions = writable(self._unsynced_sessions)
        unsynced[record.session_id] = record
        ended = self._ended = writable(self._ended)
        ended.pop(record.session_id, None)
        ended[record.session_id] = record
        while len(ended) > self._policy.ended_sessions_kept:
            del ended[next(iter(ended))]

    def _retire_prior(self) -> None:
        prior = self._prior
        assert prior is not None
        self._archive(prior)
        self._prior = None

    def _archive(self, period: _Period) -> None:
        """Close a period: its open consumption becomes entries while its balance is still known.
        A period a tail still holds time in stays at hand (held over) until the tail is resolved."""
        self._materialize()
        unsynced = self._unsynced_periods = writable(self._unsynced_periods)
        unsynced[period.start_ms] = period.record(self.user_id, archived=True, version=self.version)
        if period.holds:
            held_over = self._held_over = writable(self._held_over)
            held_over[period.start_ms] = period
        elif period.start_ms in self._held_over:
            held_over = self._held_over = writable(self._held_over)
            del held_over[period.start_ms]
            self._held_over = held_over or EMPTY

    def _roll_over(self, now_ms: int) -> None:
        old = self._period
        session = self._session
        straddling = session is not None and session.last_heartbeat_at_ms < old.end_ms
        if straddling and self._prior is not None:
            # A second boundary inside one unbilled gap (only a period shortened by a switch is
            # that short): the current period got none of the session's time; it closes, and the
            # session's time after the first boundary goes to the next period.
            self._archive(old)
            bounds = period_containing(self.anchor, old.end_ms)
        elif straddling:
            self._prior = old
            bounds = period_containing(self.anchor, old.end_ms)
        else:
            self._archive(old)
            # Nobody was using minutes: skip straight to the period containing now.
            bounds = period_containing(self.anchor, max(now_ms, old.end_ms))
        self._period = _Period(bounds.start_ms, bounds.end_ms, self.plan, self._plan_limit_ms(), 0)
        self._open_period_entry(now_ms)
        self._emit_period_rolled(old, old.end_ms)

    def _warning(self) -> Warning | None:
        return _ALERT_WARNINGS[self._level()]

    def _level(self) -> int:
        """The balance's alert level now (`ALERT_*`)."""
        remaining = self.remaining_ms
        if remaining <= 0:
            return ALERT_EXHAUSTED
        if remaining <= self._policy.low_balance_ms:
            return ALERT_LOW
        return ALERT_NONE

    def _note_balance(self, at_ms: int) -> None:
        """After a change to the balance: announce each alert level it fell to that is armed
        (once per crossing, `low_balance` before `exhausted`), and re-arm the levels it rose above."""
        level = self._level()
        for crossed in range(self._alert + 1, level + 1):
            self._emit(_ALERT_EVENTS[crossed], at_ms)
        self._alert = level

    def _emit_period_rolled(self, previous: _Period, at_ms: int) -> None:
        self._emit(
            "period_rolled",
            at_ms,
            previous_period_start_ms=previous.start_ms,
            previous_period_end_ms=previous.end_ms,
            previous_used_ms=previous.total_used_ms,
        )

    def _emit(
        self,
        kind: EventKind,
        at_ms: int,
        *,
        previous_plan: str | None = None,
        action: PlanAction | None = None,
        previous_period_start_ms: int | None = None,
        previous_period_end_ms: int | None = None,
        previous_used_ms: int | None = None,
    ) -> None:
        """Record an event of this version; it is written with the ledger's next write."""
        assert all((e.version, e.kind) != (self.version, kind) for e in self._events), "one per version"
        period = self._period
        event = LedgerEvent(
            user_id=self.user_id,
            kind=kind,
            version=self.version,
            occurred_at_ms=at_ms,
            plan=period.plan,
            period_start_ms=period.start_ms,
            period_end_ms=period.end_ms,
            limit_ms=period.limit_ms,
            used_ms=period.total_used_ms,
            remaining_ms=self.remaining_ms,
            previous_plan=previous_plan,
            action=action,
            previous_period_start_ms=previous_period_start_ms,
            previous_period_end_ms=previous_period_end_ms,
            previous_used_ms=previous_used_ms,
        )
        events = (*self._events, event)
        # Forget the oldest durable events past the bound; an unwritten one is never dropped.
        durable = sum(1 for e in events if e.version <= self.synced_version)
        self._events = events[min(durable, max(0, len(events) - RECENT_EVENTS_KEPT)) :]

    def _usage_view(self) -> UsageView:
        session = self._session
        active = None
        if session is not None:
            active = ActiveSessionView(
                session_id=session.session_id,
                started_at_ms=session.started_at_ms,
                last_heartbeat_at_ms=session.last_heartbeat_at_ms,
                used_ms=session.used_ms,
                ends_at_ms=self._ends_at_ms(),
            )
        return UsageView(
            user_id=self.user_id,
            plan=self.plan,
            period_start_ms=self._period.start_ms,
            period_end_ms=self._period.end_ms,
            limit_ms=self._period.limit_ms,
            used_ms=self._period.total_used_ms,
            allowance_remaining_ms=self._period.available_ms,
            purchased_ms=self.purchased_available_ms,
            remaining_ms=self.remaining_ms,
            warning=self._warning(),
            active_session=active,
            version=self.version,
            held_ms=self.held_ms,
        )

    def _active_progress(self, session: _Session) -> SessionProgress:
        return SessionProgress(
            session_id=session.session_id,
            state="active",
            end_reason=None,
            session_used_ms=session.used_ms,
            used_ms=self._period.total_used_ms,
            remaining_ms=self.remaining_ms,
            warning=self._warning(),
            ends_at_ms=self._ends_at_ms(),
            version=self.version,
        )

    def _ended_progress(self, record: SessionRecord) -> SessionProgress:
        return SessionProgress(
            session_id=record.session_id,
            state="ended",
            end_reason=record.end_reason,
            session_used_ms=record.used_ms,
            used_ms=self._period.total_used_ms,
            remaining_ms=self.remaining_ms,
            warning=self._warning(),
            ends_at_ms=None,
            version=self.version,
        )


def _period_from(record: PeriodRecord) -> _Period:
    return _Period(
        record.start_ms, record.end_ms, record.plan, record.limit_ms, record.used_ms, record.purchased_used_ms
    )
