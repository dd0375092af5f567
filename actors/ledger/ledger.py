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

from actors.credits import CreditBook, CreditKey
from actors.errors import NoCredits, SessionActive, SessionEnded, SessionNotFound, UnknownPlan
from actors.ledger.holds import Holds
from actors.ledger.state import (
    RESTORE_VERSION_GAP,
    LedgerPolicy,
    MeterState,
    PeriodState,
    SessionState,
    StoredStateError,
    Tail,
    meter_key,
    period_from,
)
from actors.periods import PeriodAnchor, PeriodBounds, period_containing
from actors.plans import Plan
from actors.records import (
    MONTHLY_BUCKET,
    PURCHASED_BUCKET,
    Difficulty,
    HoldRecord,
    PlanEvent,
    PurchaseReason,
    SessionRecord,
    StoredLedger,
)
from actors.replies import ReplyBook
from actors.views import (
    ActiveSessionView,
    CreditsView,
    CurrentSession,
    MeterView,
    SessionProgress,
    SessionStarted,
    UsageView,
)


class UserLedger(Holds):
    """One user's plan, period, balances, meters, running session and version. See the module docstring.

    Built in layers, one module each: `state` (fields, snapshot, clone) < `alerts` < `allowance`
    (periods, billing, tails, alarms) < `meters` < `holds` < this (the operations and their
    answers)."""

    __slots__ = ()

    @classmethod
    def new(cls, user_id: str, policy: LedgerPolicy, now_ms: int, *, plan: str | None = None) -> UserLedger:
        """A user never seen before: the default plan (or `plan`), a fresh period, version 0."""
        chosen = policy.plans.get(plan) if plan is not None else policy.plans.default
        if chosen is None:
            raise UnknownPlan(f"unknown plan {plan!r}", plan=plan)
        bounds = period_containing(None, now_ms)
        period = PeriodState(bounds.start_ms, bounds.end_ms, chosen.name, chosen.limit_ms, 0)
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
        versions += [record.version for record in stored.holds]
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
            period = period_from(stored.periods[0])
        else:
            plan = policy.plans.get(user.plan) or policy.plans.default
            bounds = period_containing(anchor, now_ms)
            period = PeriodState(bounds.start_ms, bounds.end_ms, user.plan, plan.limit_ms, 0)
        session = None
        prior = None
        if (open_session := stored.open_session) is not None:
            session = SessionState(
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
                    prior = period_from(older)  # the session's unbilled time starts in that period
                    break
        archived = {record.start_ms: record for record in stored.periods[1:] if record.archived}
        held_over: dict[int, PeriodState] = {}
        tails: dict[str, Tail] = {}

        def hold_in_periods(draws: tuple[tuple[int, int, int], ...], holder_name: str) -> None:
            for start, allowance, purchased in draws:
                if start == period.start_ms:
                    holder = period
                elif prior is not None and start == prior.start_ms:
                    holder = prior
                elif start in held_over:
                    holder = held_over[start]
                elif start in archived:
                    holder = held_over[start] = period_from(archived[start])
                else:
                    raise StoredStateError(
                        f"{holder_name} holds time in a period starting at {start} "
                        "that the store did not return"
                    )
                holder.held_ms += allowance
                holder.held_purchased_ms += purchased

        for record in stored.pending_sessions:
            hold_in_periods(record.pending, f"session {record.session_id}")
            tails[record.session_id] = Tail(
                record, record.last_heartbeat_at_ms + policy.stale_session_ms, list(record.pending)
            )
        holds: dict[str, HoldRecord] = {}
        for hold in sorted(stored.holds, key=lambda h: (h.created_at_ms, h.hold_id)):
            if not hold.is_held:
                raise StoredStateError(f"hold {hold.hold_id} was returned as held but is {hold.state}")
            hold_in_periods(hold.draws, f"hold {hold.hold_id}")
            holds[hold.hold_id] = hold
        meters = {m.meter: MeterState(m.window_start_ms, m.window_end_ms, m.used) for m in stored.meters}
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
            holds=holds,
        )
        # Clean (nothing to write yet), but numbered above anything seen before the restore.
        ledger.version += RESTORE_VERSION_GAP
        ledger.synced_version = ledger.version
        return ledger

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
                remaining = self._meter_available(name, spec, window, used)
                held = self._meter_held_in(name, window)
                meters[name] = MeterView(spec.limit, used, remaining, spec.window, window.end_ms, held)
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
                found[meter_key(name, meter.window_start_ms)] = self._meter_balance(name, meter, spec.limit)
        for hold in self._holds.values():
            if hold.meter is not None and hold.window_start_ms is not None:
                key = meter_key(hold.meter, hold.window_start_ms)
                if key not in found:  # a window that ended still holds what is held in it
                    found[key] = self._balance_of(key)
        return found

    def next_deadline_ms(self) -> int | None:
        """When the next alarm falls due (there is always the period's end)."""
        alarm = self._next_alarm()
        return alarm.at_ms if alarm is not None else None

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
        self._session = SessionState(session_id, now_ms, now_ms, 0, topic, difficulty)
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
                # The same period (or one that began this instant): renewed to the subscription's end,
                # and so are the meter windows that are this period (their uses still count).
                for state in self._meters.values():
                    if state.counts_in(self.period):
                        state.window_end_ms = bounds.end_ms
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

    def _active_progress(self, session: SessionState) -> SessionProgress:
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
