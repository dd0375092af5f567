"""The per-user ledger: a pure state machine over one user's minutes.

`UserLedger` is the single writer of a user's state. It does no I/O, imports
neither Ray nor a database driver, and never reads a clock: every operation
takes `now_ms`. That makes it deterministic: the same operations at the same
instants give the same state, which is what lets a restarted shard rebuild a
user from Postgres and reach the same alarms.

Time accounting (DESIGN.md, *Time accounting*):

- A running session is billed from its start to its last heartbeat; each
  heartbeat bills the time since the previous one. `last_heartbeat_at_ms` is
  therefore also "billed through".
- Billing never takes the period past its limit. When the balance runs out
  the session ends `limit_reached` at that exact instant (the *limit* alarm),
  whether or not a heartbeat arrives.
- No heartbeat for `stale_session_ms` ends the session `stale`, billed to its
  last heartbeat (the *stale* alarm): silence is never billed.
- At the period's end (the *period* alarm) the period is archived and a new
  one starts. A session running across the boundary has its time split at the
  boundary: the part before is billed to the old period (kept as `_prior`
  until the session's billing passes the boundary), the part after to the new.

Every mutation increments `version` exactly once. Operations first fire every
alarm due at `now_ms` (`advance`), in time order, so the outcome never depends
on whether a shard's timer or a request got there first.

Guarantees: at most one active session; billing never pushes `used_ms` past
the limit; `version` strictly increases with every change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from actors.errors import NoCredits, SessionActive, SessionEnded, SessionNotFound, UnknownPlan
from actors.periods import PeriodBounds, calendar_month
from actors.plans import PlanCatalog
from actors.records import (
    Difficulty,
    EndReason,
    LedgerSnapshot,
    PeriodRecord,
    PlanAction,
    SessionRecord,
    StoredLedger,
    UserRecord,
)
from actors.views import (
    ActiveSessionView,
    CurrentSession,
    SessionProgress,
    SessionStarted,
    UsageView,
    Warning,
)

AlarmKind = Literal["stale", "limit", "period_end"]

# Alarms due at the same instant fire in this order: silence first (it bills
# nothing), then the limit (it bills to the instant), then the period's end.
_ALARM_PRIORITY: dict[AlarmKind, int] = {"stale": 0, "limit": 1, "period_end": 2}

# One `advance` fires at most a few alarms (an end, a boundary or two); a
# larger count means the state machine is looping, which is a bug.
MAX_ALARMS_PER_ADVANCE = 16


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


@dataclass(frozen=True, slots=True)
class PlanChange:
    """A plan event from billing. `delivery_id` orders events with equal `occurred_at_ms`."""

    plan: str
    action: PlanAction
    occurred_at_ms: int
    delivery_id: str
    reset_usage: bool = False


@dataclass(slots=True)
class _Period:
    start_ms: int
    end_ms: int
    plan: str
    limit_ms: int
    used_ms: int

    @property
    def remaining_ms(self) -> int:
        return max(0, self.limit_ms - self.used_ms)

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


class UserLedger:
    """One user's plan, period, running session and version. See the module docstring."""

    __slots__ = (
        "_ended",
        "_period",
        "_policy",
        "_prior",
        "_session",
        "_unsynced_periods",
        "_unsynced_sessions",
        "plan",
        "plan_event_at_ms",
        "plan_event_id",
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
    ) -> None:
        self.user_id = user_id
        self.plan = plan
        self.version = version
        self.plan_event_at_ms = plan_event_at_ms
        self.plan_event_id = plan_event_id
        # The newest version known durable; a ledger restored from a store starts clean.
        self.synced_version = version
        self._policy = policy
        self._period = period
        self._session = session
        self._prior = prior
        # Ended sessions kept for idempotent ends (bounded), and records not yet durable.
        self._ended: dict[str, SessionRecord] = {}
        self._unsynced_sessions: dict[str, SessionRecord] = {}
        self._unsynced_periods: dict[int, PeriodRecord] = {}

    # ----------------------------------------------------------------- creation

    @classmethod
    def new(cls, user_id: str, policy: LedgerPolicy, now_ms: int, *, plan: str | None = None) -> UserLedger:
        """A user never seen before: the default plan (or `plan`), a fresh period, version 0."""
        chosen = policy.plans.get(plan) if plan is not None else policy.plans.default
        if chosen is None:
            raise UnknownPlan(f"unknown plan {plan!r}", plan=plan)
        bounds = calendar_month(now_ms)
        period = _Period(bounds.start_ms, bounds.end_ms, chosen.name, chosen.limit_ms, 0)
        return cls(user_id=user_id, policy=policy, plan=chosen.name, period=period, version=0)

    @classmethod
    def restore(cls, stored: StoredLedger, policy: LedgerPolicy, now_ms: int) -> UserLedger:
        """Rebuild a ledger from what a store holds. Call `advance` next to fire what fell due."""
        user = stored.user
        versions = [user.version, *(p.version for p in stored.periods)]
        if stored.open_session is not None:
            versions.append(stored.open_session.version)
        if stored.periods:
            newest = stored.periods[0]
            period = _Period(newest.start_ms, newest.end_ms, newest.plan, newest.limit_ms, newest.used_ms)
        else:
            plan = policy.plans.get(user.plan) or policy.plans.default
            bounds = calendar_month(now_ms)
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
            older = stored.periods[1] if len(stored.periods) > 1 else None
            if older is not None and session.last_heartbeat_at_ms < period.start_ms:
                prior = _Period(older.start_ms, older.end_ms, older.plan, older.limit_ms, older.used_ms)
        return cls(
            user_id=user.user_id,
            policy=policy,
            plan=user.plan,
            period=period,
            version=max(versions),
            session=session,
            prior=prior,
            plan_event_at_ms=user.plan_event_at_ms,
            plan_event_id=user.plan_event_id,
        )

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
        )
        twin.synced_version = self.synced_version
        twin._ended = dict(self._ended)
        twin._unsynced_sessions = dict(self._unsynced_sessions)
        twin._unsynced_periods = dict(self._unsynced_periods)
        return twin

    # ------------------------------------------------------------------ queries

    @property
    def period(self) -> PeriodBounds:
        return PeriodBounds(self._period.start_ms, self._period.end_ms)

    @property
    def used_ms(self) -> int:
        return self._period.used_ms

    @property
    def limit_ms(self) -> int:
        return self._period.limit_ms

    @property
    def remaining_ms(self) -> int:
        return self._period.remaining_ms

    @property
    def active_session_id(self) -> str | None:
        return self._session.session_id if self._session is not None else None

    def has_credits(self, now_ms: int) -> bool:
        """May this user go on? Answered from memory."""
        self.advance(now_ms)
        return self._period.remaining_ms > 0

    def usage(self, now_ms: int) -> UsageView:
        self.advance(now_ms)
        return self._usage_view()

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
            remaining_ms=self._period.remaining_ms,
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
        records = {**self._ended, **self._unsynced_sessions}
        if self._session is not None:
            records[self._session.session_id] = self._session.record(self.user_id, version=self.version)
        return list(records.values())

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
        if self._period.remaining_ms <= 0:
            raise NoCredits("no minutes left in this period", period_end_ms=self._period.end_ms)
        assert session_id not in self._ended, "session ids are never reused"
        self._bump()
        self._session = _Session(session_id, now_ms, now_ms, 0, topic, difficulty)
        return SessionStarted(
            session_id=session_id,
            started_at_ms=now_ms,
            remaining_ms=self._period.remaining_ms,
            ends_at_ms=self._ends_at_ms(),
            version=self.version,
        )

    def heartbeat(self, now_ms: int, session_id: str, *, seq: int | None = None) -> SessionProgress:
        """Bill the time since the previous heartbeat. A `seq` not above the last one changes nothing."""
        self.advance(now_ms)
        session = self._session
        if session is None or session.session_id != session_id:
            return self.heartbeat_after_end(session_id, self.ended_session(session_id))
        if seq is not None and session.last_seq is not None and seq <= session.last_seq:
            return self._active_progress(session)
        self._bump()
        session.last_seq = seq if seq is not None else session.last_seq
        exhausted_at = self._bill(now_ms)
        if exhausted_at is not None:
            record = self._end(exhausted_at, "limit_reached")
            return self._ended_progress(record)
        return self._active_progress(session)

    def end_session(self, now_ms: int, session_id: str) -> SessionProgress:
        """End the session now. Ending an ended session returns its final result again."""
        self.advance(now_ms)
        session = self._session
        if session is None or session.session_id != session_id:
            ended = self.ended_session(session_id)
            if ended is None:
                raise SessionNotFound("no such session", session_id=session_id)
            return self._ended_progress(ended)
        self._bump()
        exhausted_at = self._bill(now_ms)
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

    # -------------------------------------------------------------------- plans

    def change_plan(self, now_ms: int, change: PlanChange) -> bool:
        """Apply a plan event unless an event at least as recent was applied. Returns whether applied."""
        self.advance(now_ms)
        target = (
            self._policy.plans.default if change.action == "cancel" else self._policy.plans.get(change.plan)
        )
        if target is None:
            raise UnknownPlan(f"unknown plan {change.plan!r}", plan=change.plan)
        if self.plan_event_at_ms is not None:
            last = (self.plan_event_at_ms, self.plan_event_id or "")
            if (change.occurred_at_ms, change.delivery_id) <= last:
                return False
        self._bump()
        session = self._session
        if session is not None and not change.reset_usage:
            left_after = max(0, target.limit_ms - self._period.used_ms)
            if left_after < now_ms - session.last_heartbeat_at_ms:
                # The old plan covered the session up to this change; the new one
                # leaves nothing for the time since: the session ends now, at the
                # limit that applied until now (as the limit alarm would have).
                exhausted_at = self._bill(now_ms)
                self._end(exhausted_at if exhausted_at is not None else now_ms, "limit_reached")
        self.plan = target.name
        self.plan_event_at_ms = change.occurred_at_ms
        self.plan_event_id = change.delivery_id
        self._period.plan = target.name
        self._period.limit_ms = target.limit_ms
        if change.reset_usage:
            self._period.used_ms = 0
        # A downgrade may leave nothing to spend: a session still running ends now.
        self.advance(now_ms)
        return True

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
            elif alarm.kind == "limit":
                exhausted_at = self._bill(alarm.at_ms)
                assert exhausted_at is not None, "the limit alarm fires when the balance runs out"
                self._end(exhausted_at, "limit_reached")
            else:
                self._roll_over(now_ms)
            fired.append(alarm)
        raise AssertionError(f"more than {MAX_ALARMS_PER_ADVANCE} alarms in one advance")

    def _next_alarm(self) -> Alarm | None:
        candidates = [Alarm("period_end", self._period.end_ms)]
        if (session := self._session) is not None:
            candidates.append(Alarm("stale", session.last_heartbeat_at_ms + self._policy.stale_session_ms))
            candidates.append(Alarm("limit", self._exhaustion_ms()))
        return min(candidates, key=lambda alarm: (alarm.at_ms, _ALARM_PRIORITY[alarm.kind]))

    # -------------------------------------------------------------- persistence

    @property
    def is_dirty(self) -> bool:
        """True when this version is not yet durable."""
        return self.version > self.synced_version

    def snapshot(self) -> LedgerSnapshot:
        """Everything a write must make durable, at the current version."""
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
        user = UserRecord(
            user_id=self.user_id,
            plan=self.plan,
            version=version,
            plan_event_at_ms=self.plan_event_at_ms,
            plan_event_id=self.plan_event_id,
        )
        return LedgerSnapshot(user=user, periods=tuple(periods), sessions=tuple(sessions))

    def mark_synced(self, version: int) -> None:
        """A snapshot taken at `version` is durable: forget records it covered."""
        self._unsynced_sessions = {
            key: record for key, record in self._unsynced_sessions.items() if record.version > version
        }
        self._unsynced_periods = {
            key: record for key, record in self._unsynced_periods.items() if record.version > version
        }
        self.synced_version = max(self.synced_version, version)

    # ---------------------------------------------------------------- internals

    def _bump(self) -> None:
        self.version += 1

    def _require_session(self) -> _Session:
        assert self._session is not None
        return self._session

    def _exhaustion_ms(self) -> int:
        """When the balance runs out if the running session goes on (within the current period)."""
        at = self._require_session().last_heartbeat_at_ms
        if (prior := self._prior) is not None:
            if at + prior.remaining_ms < prior.end_ms:
                return at + prior.remaining_ms
            at = prior.end_ms
        return at + self._period.remaining_ms

    def _ends_at_ms(self) -> int:
        """`ends_at` as the API shows it: past the period's end, the next allowance counts too."""
        exhaustion = self._exhaustion_ms()
        if exhaustion > self._period.end_ms:
            return self._period.end_ms + self._plan_limit_ms()
        return exhaustion

    def _plan_limit_ms(self) -> int:
        plan = self._policy.plans.get(self.plan)
        return plan.limit_ms if plan is not None else self._period.limit_ms

    def _bill(self, to_ms: int) -> int | None:
        """Bill the running session through `to_ms`, capped by the balance.

        Returns the instant the balance ran out, or None if some is left.
        """
        session = self._require_session()
        at = session.last_heartbeat_at_ms
        to_ms = max(to_ms, at)  # a clock stepping back bills nothing
        if (prior := self._prior) is not None:
            segment_end = min(to_ms, prior.end_ms)
            taken = min(segment_end - at, prior.remaining_ms)
            prior.used_ms += taken
            session.used_ms += taken
            ran_out_inside = prior.remaining_ms == 0 and segment_end < prior.end_ms
            if at + taken < segment_end or ran_out_inside:
                session.last_heartbeat_at_ms = at + taken
                return at + taken
            at = segment_end
            if to_ms < prior.end_ms:
                session.last_heartbeat_at_ms = at
                return None
            # Whatever was left of the old allowance at the boundary is gone; the new one starts.
            self._retire_prior()
        taken = min(to_ms - at, self._period.remaining_ms)
        self._period.used_ms += taken
        session.used_ms += taken
        session.last_heartbeat_at_ms = at + taken
        if at + taken < to_ms or self._period.remaining_ms == 0:
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
        self._unsynced_sessions[record.session_id] = record
        self._ended[record.session_id] = record
        while len(self._ended) > self._policy.ended_sessions_kept:
            del self._ended[next(iter(self._ended))]
        return record

    def _retire_prior(self) -> None:
        prior = self._prior
        assert prior is not None
        self._unsynced_periods[prior.start_ms] = prior.record(
            self.user_id, archived=True, version=self.version
        )
        self._prior = None

    def _roll_over(self, now_ms: int) -> None:
        old = self._period
        session = self._session
        straddling = session is not None and session.last_heartbeat_at_ms < old.end_ms
        if straddling:
            # The stale alarm ends a silent session long before a second boundary.
            assert self._prior is None, "a session cannot straddle two period boundaries"
            self._prior = old
            bounds = calendar_month(old.end_ms)
        else:
            self._unsynced_periods[old.start_ms] = old.record(
                self.user_id, archived=True, version=self.version
            )
            # Nobody was using minutes: skip straight to the period containing now.
            bounds = calendar_month(max(now_ms, old.end_ms))
        self._period = _Period(bounds.start_ms, bounds.end_ms, self.plan, self._plan_limit_ms(), 0)

    def _warning(self) -> Warning | None:
        remaining = self._period.remaining_ms
        if remaining <= 0:
            return "exhausted"
        if remaining <= self._policy.low_balance_ms:
            return "low_balance"
        return None

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
            used_ms=self._period.used_ms,
            remaining_ms=self._period.remaining_ms,
            purchased_ms=0,
            warning=self._warning(),
            active_session=active,
            version=self.version,
        )

    def _active_progress(self, session: _Session) -> SessionProgress:
        return SessionProgress(
            session_id=session.session_id,
            state="active",
            end_reason=None,
            session_used_ms=session.used_ms,
            used_ms=self._period.used_ms,
            remaining_ms=self._period.remaining_ms,
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
            used_ms=self._period.used_ms,
            remaining_ms=self._period.remaining_ms,
            warning=self._warning(),
            ends_at_ms=None,
            version=self.version,
        )
