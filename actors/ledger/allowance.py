"""Periods and time accounting: billing a session through an instant, the allowance then purchased
minutes, periods that roll over or switch, held tails, and the alarms that drive them. See
`actors.ledger`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from actors.empty import EMPTY, writable
from actors.ledger.alerts import Alerts
from actors.ledger.state import (
    ALARM_PRIORITY,
    MAX_ALARMS_PER_ADVANCE,
    Alarm,
    PeriodState,
    Tail,
    meter_key,
)
from actors.periods import PeriodBounds, period_containing
from actors.plans import Plan
from actors.records import (
    MONTHLY_BUCKET,
    PURCHASED_BUCKET,
    EndReason,
    HoldRecord,
    HoldState,
    SessionRecord,
)


class Allowance(Alerts):
    __slots__ = ()

    def advance(self, now_ms: int) -> list[Alarm]:
        """Fire, in time order, every alarm due at or before `now_ms`."""
        fired: list[Alarm] = []
        # Each tail's release and each hold's expiry fires once and removes its alarm; besides
        # those, a handful (an end, a boundary or two).
        bound = MAX_ALARMS_PER_ADVANCE + len(self._tails) + len(self._holds)
        for _ in range(bound):
            alarm = self._next_alarm()
            if alarm is None or alarm.at_ms > now_ms:
                return fired
            self._bump()
            if alarm.kind == "stale":
                self._end(self._require_session().last_heartbeat_at_ms, "stale")
            elif alarm.kind == "release":
                assert alarm.session_id is not None
                self._settle(alarm.session_id, capture=False)
            elif alarm.kind == "expire":
                assert alarm.hold_id is not None
                self._resolve_hold(alarm.hold_id, 0, "expired", alarm.at_ms)
            elif alarm.kind == "limit":
                self._end_at_limit(alarm.at_ms)
            else:
                self._roll_over(now_ms)
            self._note_balance(alarm.at_ms)
            fired.append(alarm)
        raise AssertionError(f"more than {bound} alarms in one advance")

    def _next_alarm(self) -> Alarm | None:
        candidates = [Alarm("period_end", self._period.end_ms)]
        if (session := self._session) is not None:
            candidates.append(Alarm("stale", session.last_heartbeat_at_ms + self._policy.stale_session_ms))
            candidates.append(Alarm("limit", self._exhaustion_ms()))
        candidates += [Alarm("release", tail.release_at_ms, key) for key, tail in self._tails.items()]
        candidates += [Alarm("expire", hold.expires_at_ms, hold_id=key) for key, hold in self._holds.items()]
        return min(candidates, key=lambda alarm: (alarm.at_ms, ALARM_PRIORITY[alarm.kind]))

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
        tails[record.session_id] = Tail(record, heard_at + self._policy.stale_session_ms, draws)

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
        at_ms = record.ended_at_ms if capture else tail.release_at_ms
        billed = self._resolve_draws(tail.draws, tail.held_ms if capture else 0, at_ms, reference=None)
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

    def _resolve_draws(
        self, draws: Iterable[tuple[int, int, int]], capture: int, at_ms: int, *, reference: str | None
    ) -> int:
        """Resolve what a tail or a minute hold holds, once: bill `capture` of it where it is held
        (the allowance first, then purchased minutes, in the periods it was held in, even after
        they ended) and free the rest. Returns what was billed."""
        self._materialize()  # open consumption at the balances before the hold is resolved
        to_bill = capture
        for start, allowance, purchased in draws:
            period = self._resident_period(start)
            balance_before = period.remaining_ms
            period.held_ms -= allowance
            period.held_purchased_ms -= purchased
            self._purchased_held_ms -= purchased
            from_allowance = min(allowance, to_bill)
            from_purchased = min(purchased, to_bill - from_allowance)
            to_bill -= from_allowance + from_purchased
            period.used_ms += from_allowance
            period.purchased_used_ms += from_purchased
            self.purchased_ms -= from_purchased
            monthly = (MONTHLY_BUCKET, start)
            # (What is held is in the balance, so billing it never takes the balance below zero.)
            expected = balance_before - from_allowance
            if from_allowance:
                self._record(
                    monthly,
                    delta=-from_allowance,
                    balance_after=expected,
                    reason="consume",
                    at_ms=at_ms,
                    reference=reference,
                )
            if from_purchased:
                self._record(
                    (PURCHASED_BUCKET, None),
                    delta=-from_purchased,
                    balance_after=self.purchased_ms,
                    reason="consume",
                    at_ms=at_ms,
                    reference=reference,
                )
            if period.remaining_ms != expected:
                # What a lowered plan had left in the balance only for what was held goes.
                self._record(
                    monthly,
                    delta=period.remaining_ms - expected,
                    balance_after=period.remaining_ms,
                    reason="adjust",
                    at_ms=at_ms,
                )
            if self._held_over.get(start) is period and (
                from_allowance or from_purchased or not period.holds
            ):
                # An archived period: its row is written again (what it billed, or no longer holds).
                self._archive(period)
        assert to_bill == 0, "a capture is never more than what is held"
        return capture

    def _resolve_hold(self, hold_id: str, capture: int, state: HoldState, at_ms: int) -> HoldRecord:
        """Resolve an unresolved hold once: bill `capture` of it where it holds, free the rest."""
        hold = self._holds[hold_id]
        assert 0 <= capture <= hold.amount
        if hold.meter is None:
            self._drop_hold(hold_id)
            self._resolve_draws(hold.draws, capture, at_ms, reference=hold.reference or hold.hold_id)
        else:
            self._resolve_meter_hold(hold, capture, at_ms)
        resolved = replace(
            hold,
            state=state,
            captured=capture,
            released=hold.amount - capture,
            resolved_at_ms=at_ms,
            version=self.version,
        )
        self._keep_hold(resolved)
        return resolved

    def _drop_hold(self, hold_id: str) -> None:
        holds = self._holds = writable(self._holds)
        del holds[hold_id]
        self._holds = holds or EMPTY

    def _resolve_meter_hold(self, hold: HoldRecord, capture: int, at_ms: int) -> None:
        """Count `capture` in the window the hold was made in, and drop the hold; the credit
        ledger's balance of that window moves by what it billed, and by what freeing the rest
        takes out of a balance only what was held kept up."""
        meter, window_start = hold.meter, hold.window_start_ms
        assert meter is not None
        state = self._meters.get(meter)
        if window_start is None:
            # Held while the meter had no limit: counted in the window it was made in (if that is
            # still the meter's), with no credit-ledger balance to move.
            self._drop_hold(hold.hold_id)
            if state is not None and state.holds_instant(hold.created_at_ms):
                state.used += capture
            return
        key = meter_key(meter, window_start)
        self._materialize()
        expected = self._balance_of(key) - capture  # (the balance before, the hold still in it)
        self._drop_hold(hold.hold_id)
        if state is not None and state.is_window(window_start):
            state.used += capture
        if capture:
            self._record(
                key,
                delta=-capture,
                balance_after=expected,
                reason="consume",
                at_ms=at_ms,
                reference=hold.reference or hold.hold_id,
            )
        after = self._balance_of(key)
        if after != expected:
            self._record(key, delta=after - expected, balance_after=after, reason="adjust", at_ms=at_ms)

    def _keep_hold(self, record: HoldRecord) -> None:
        """A hold's newest record: to be written; once resolved, kept for idempotent answers."""
        unsynced = self._unsynced_holds = writable(self._unsynced_holds)
        unsynced[record.hold_id] = record
        if record.is_held:
            holds = self._holds = writable(self._holds)
            holds[record.hold_id] = record
            return
        resolved = self._resolved_holds = writable(self._resolved_holds)
        resolved.pop(record.hold_id, None)
        resolved[record.hold_id] = record
        while len(resolved) > self._policy.resolved_holds_kept:
            del resolved[next(iter(resolved))]

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
        self, period: PeriodState, duration_ms: int, at_ms: int, holding: list[tuple[int, int, int]] | None
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

    def _archive(self, period: PeriodState) -> None:
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
        self._period = PeriodState(bounds.start_ms, bounds.end_ms, self.plan, self._plan_limit_ms(), 0)
        self._open_period_entry(now_ms)
        self._emit_period_rolled(old, old.end_ms)

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
        self._period = PeriodState(bounds.start_ms, bounds.end_ms, target.name, target.limit_ms, 0)
        self._open_period_entry(now_ms)
        self._emit_period_rolled(old, now_ms)
