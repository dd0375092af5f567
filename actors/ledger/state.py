"""What one user's ledger is made of: its state, the values it holds, and their round trip
through a store (`snapshot`, `clone`; `UserLedger.restore` rebuilds one). See `actors.ledger`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, Self

from actors.credits import CreditBook, CreditKey
from actors.empty import EMPTY
from actors.periods import PeriodAnchor, PeriodBounds
from actors.plans import Plan, PlanCatalog
from actors.records import (
    ALERT_EXHAUSTED,
    ALERT_LOW,
    ALERT_NONE,
    METER_BUCKET_PREFIX,
    MONTHLY_BUCKET,
    PURCHASED_BUCKET,
    CreditReason,
    Difficulty,
    EventKind,
    HoldRecord,
    LedgerEvent,
    LedgerSnapshot,
    MeterRecord,
    PeriodRecord,
    ReplyRecord,
    SessionRecord,
    UserRecord,
)
from actors.replies import IdempotencyKey, ReplyBook
from actors.views import (
    PeriodSummary,
    Warning,
)

AlarmKind = Literal["stale", "release", "expire", "limit", "period_end"]

# Alarms due at the same instant fire in this order: silence first (it bills
# nothing), then a held tail's release and a hold's expiry (they free what they
# held), then the limit (it holds to the instant), then the period's end.
ALARM_PRIORITY: dict[AlarmKind, int] = {"stale": 0, "release": 1, "expire": 2, "limit": 3, "period_end": 4}

# One `advance` fires at most a few alarms (an end, a boundary or two) besides
# the tails' releases and the holds' expiries; a larger count means the state
# machine is looping, which is a bug.
MAX_ALARMS_PER_ADVANCE = 16

# A ledger rebuilt from a store continues this far above the stored version.
# Changes not yet written when a shard died had versions above the stored one
# that clients may have seen; no user makes 2^20 changes within one sync
# interval, so every version after a restore is newer than any before it.
RESTORE_VERSION_GAP = 1 << 20

# Events a ledger keeps for live streams once they are durable (unwritten ones are always kept).
RECENT_EVENTS_KEPT = 8

# The event announcing each alert level, and the warning the API shows at it.
ALERT_EVENTS: dict[int, EventKind] = {ALERT_LOW: "low_balance", ALERT_EXHAUSTED: "exhausted"}
ALERT_WARNINGS: dict[int, Warning | None] = {
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
    # Unresolved holds a user may have at once (past it, `TooManyHolds`), and resolved ones kept
    # in memory for idempotent answers (older ones are read from the store).
    max_open_holds: int = 100
    resolved_holds_kept: int = 16

    def __post_init__(self) -> None:
        assert self.stale_session_ms > 0, "stale_session_ms must be positive"
        assert self.low_balance_ms >= 0, "low_balance_ms must not be negative"
        assert self.max_open_holds >= 1, "max_open_holds must be positive"


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: AlarmKind
    at_ms: int
    session_id: str | None = None  # the tail a `release` frees
    hold_id: str | None = None  # the hold an `expire` releases


@dataclass(slots=True)
class PeriodState:
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
class SessionState:
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
class Tail:
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
class MeterState:
    window_start_ms: int
    window_end_ms: int
    used: int

    def counts_in(self, window: PeriodBounds) -> bool:
        """Whether this state is the count of `window` (a closed one counts in none)."""
        return self.window_start_ms == window.start_ms and self.window_end_ms == window.end_ms

    def holds_instant(self, at_ms: int) -> bool:
        """Whether `at_ms` falls in this state's window (never, once closed)."""
        return self.window_start_ms <= at_ms < self.window_end_ms

    def is_window(self, start_ms: int) -> bool:
        """Whether this state is the open count of the window starting at `start_ms`."""
        return not self.closed and self.window_start_ms == start_ms

    @property
    def closed(self) -> bool:
        """Ended in the credit ledger (`UserLedger._close_window`): an empty interval."""
        return self.window_end_ms == self.window_start_ms


def meter_key(meter: str, window_start_ms: int) -> CreditKey:
    return (METER_BUCKET_PREFIX + meter, window_start_ms)


def period_from(record: PeriodRecord) -> PeriodState:
    return PeriodState(
        record.start_ms, record.end_ms, record.plan, record.limit_ms, record.used_ms, record.purchased_used_ms
    )


class LedgerState:
    """The fields of a `UserLedger`, and what reads or writes them as a whole."""

    __slots__ = (
        "_alert",
        "_book",
        "_ended",
        "_events",
        "_held_over",
        "_holds",
        "_meters",
        "_period",
        "_policy",
        "_prior",
        "_purchased_held_ms",
        "_replies",
        "_resolved_holds",
        "_session",
        "_tails",
        "_unsynced_holds",
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
        period: PeriodState,
        version: int,
        session: SessionState | None = None,
        prior: PeriodState | None = None,
        plan_event_at_ms: int | None = None,
        plan_event_id: str | None = None,
        purchased_ms: int = 0,
        anchor: PeriodAnchor | None = None,
        meters: dict[str, MeterState] | None = None,
        book: CreditBook | None = None,
        replies: ReplyBook | None = None,
        alert_level: int | None = None,
        tails: dict[str, Tail] | None = None,
        held_over: dict[int, PeriodState] | None = None,
        holds: dict[str, HoldRecord] | None = None,
    ) -> None:
        """`tails` and the minute holds among `holds` (those held, oldest first) hold what the
        periods (`period`, `prior`, `held_over`) say they hold."""
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
        self._meters: Mapping[str, MeterState] = meters or EMPTY
        self._book = book if book is not None else CreditBook(user_id)
        self._replies = replies if replies is not None else ReplyBook(user_id)
        # Ended sessions kept for idempotent ends (bounded), and records not yet durable.
        # (Each of these is usually empty: see `actors.empty`.)
        self._ended: Mapping[str, SessionRecord] = EMPTY
        self._unsynced_sessions: Mapping[str, SessionRecord] = EMPTY
        self._unsynced_periods: Mapping[int, PeriodRecord] = EMPTY
        # Tails of sessions the limit ended, by session id; archived periods some tail still holds
        # allowance in, by start; and the purchased minutes tails hold.
        self._tails: Mapping[str, Tail] = tails or EMPTY
        self._held_over: Mapping[int, PeriodState] = held_over or EMPTY
        # Holds not yet resolved, oldest first; resolved ones kept for idempotent answers
        # (bounded), and hold records not yet durable.
        self._holds: Mapping[str, HoldRecord] = holds or EMPTY
        self._resolved_holds: Mapping[str, HoldRecord] = EMPTY
        self._unsynced_holds: Mapping[str, HoldRecord] = EMPTY
        self._purchased_held_ms = sum(
            purchased for tail in self._tails.values() for *_, purchased in tail.draws
        ) + sum(purchased for hold in self._holds.values() for *_, purchased in hold.draws)
        # Threshold events: the alert level last announced, and the events not yet durable
        # followed by (at most RECENT_EVENTS_KEPT) recent ones, oldest first.
        self._alert = alert_level if alert_level is not None else self._level()
        self._events: tuple[LedgerEvent, ...] = ()

    def clone(self) -> Self:
        """An independent copy: mutate it, make it durable, then swap it in (or drop it)."""
        twin = type(self)(
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
            holds=dict(self._holds),
        )
        twin._events = self._events
        twin.synced_version = self.synced_version
        twin._ended = dict(self._ended) if self._ended else EMPTY
        twin._unsynced_sessions = dict(self._unsynced_sessions) if self._unsynced_sessions else EMPTY
        twin._unsynced_periods = dict(self._unsynced_periods) if self._unsynced_periods else EMPTY
        twin._resolved_holds = dict(self._resolved_holds) if self._resolved_holds else EMPTY
        twin._unsynced_holds = dict(self._unsynced_holds) if self._unsynced_holds else EMPTY
        return twin

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
        """Minutes held (by minute holds and the tails of sessions the limit ended), in every period."""
        return sum(tail.held_ms for tail in self._tails.values()) + sum(
            hold.amount for hold in self._holds.values() if hold.meter is None
        )

    @property
    def held_in_period_ms(self) -> int:
        """Of the current period's allowance, what is held (so `used_ms + held_in_period_ms` is
        what the period has spent or promised)."""
        return self._period.held_ms

    @property
    def active_session_id(self) -> str | None:
        return self._session.session_id if self._session is not None else None

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

    def hold(self, hold_id: str) -> HoldRecord | None:
        """A hold this ledger holds in memory: unresolved, or recently resolved."""
        return (
            self._holds.get(hold_id) or self._unsynced_holds.get(hold_id) or self._resolved_holds.get(hold_id)
        )

    def held_totals(self) -> tuple[int, int, int]:
        """The unresolved holds: how many, the minutes (ms) and the meter units they hold."""
        holds = self._holds
        if not holds:
            return 0, 0, 0
        minutes = sum(hold.amount for hold in holds.values() if hold.meter is None)
        units = sum(hold.amount for hold in holds.values() if hold.meter is not None)
        return len(holds), minutes, units

    def open_holds(self) -> list[HoldRecord]:
        """The unresolved holds, oldest first (by creation, then id)."""
        return sorted(self._holds.values(), key=lambda hold: (hold.created_at_ms, hold.hold_id))

    def events_after(self, version: int) -> tuple[LedgerEvent, ...]:
        """The events this ledger still holds that came after `version` (for live streams)."""
        return tuple(event for event in self._events if event.version > version)

    def reply(self, key: str, now_ms: int) -> ReplyRecord | None:
        """The reply remembered for an `Idempotency-Key`, unless it has expired."""
        return self._replies.get(key, now_ms)

    def remember_reply(self, request: IdempotencyKey, outcome: str, now_ms: int) -> None:
        """Remember what a keyed request answered. It is no change to the user's state (the
        version stays); the reply goes with the ledger's next write, at this version or later."""
        self._replies.remember(request, outcome, now_ms, version=self.version + 1)

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
            holds=tuple(self._unsynced_holds.values()),
        )

    def mark_synced(self, version: int) -> None:
        """A snapshot taken at `version` is durable: forget records it covered."""
        self._unsynced_sessions = {
            key: record for key, record in self._unsynced_sessions.items() if record.version > version
        } or EMPTY
        self._unsynced_periods = {
            key: record for key, record in self._unsynced_periods.items() if record.version > version
        } or EMPTY
        self._unsynced_holds = {
            key: record for key, record in self._unsynced_holds.items() if record.version > version
        } or EMPTY
        self._book.mark_synced(version)
        self._replies.mark_synced(version)
        self.synced_version = max(self.synced_version, version)

    def _bump(self) -> None:
        self.version += 1

    def _current_plan(self) -> Plan | None:
        return self._policy.plans.get(self.plan)

    def _require_session(self) -> SessionState:
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
        assert window is not None
        state = self._meters.get(meter)
        if state is None or not state.is_window(window):
            return self._meter_held(meter, window)  # a window that ended holds only what is held
        return self._meter_balance(meter, state, self._meter_limit(meter))

    def _meter_held(self, meter: str, window_start_ms: int) -> int:
        """What the unresolved holds of a meter hold in the window starting at `window_start_ms`."""
        return sum(
            hold.amount
            for hold in self._holds.values()
            if hold.meter == meter and hold.window_start_ms == window_start_ms
        )

    def _meter_balance(self, meter: str, state: MeterState, limit: int | None) -> int:
        """A meter window's balance in the credit ledger: what is held is in it, and it never drops
        below what is held (as `PeriodState.remaining_ms`); a window without a limit has what is
        held in it (held while it had one) and nothing else."""
        held = self._meter_held(meter, state.window_start_ms)
        return held if limit is None else max(0, limit - state.used, held)

    def _meter_limit(self, meter: str) -> int | None:
        """The current plan's limit of a meter (None: unlimited, or no such meter)."""
        plan = self._current_plan()
        spec = plan.meters.get(meter) if plan is not None else None
        return spec.limit if spec is not None else None

    def _resident_period(self, start_ms: int) -> PeriodState:
        """The period starting at `start_ms` that a tail holds time in: current, prior or held over."""
        for period in (self._period, self._prior):
            if period is not None and period.start_ms == start_ms:
                return period
        return self._held_over[start_ms]

    def _warning(self) -> Warning | None:
        return ALERT_WARNINGS[self._level()]

    def _level(self) -> int:
        """The balance's alert level now (`ALERT_*`)."""
        remaining = self.remaining_ms
        if remaining <= 0:
            return ALERT_EXHAUSTED
        if remaining <= self._policy.low_balance_ms:
            return ALERT_LOW
        return ALERT_NONE
