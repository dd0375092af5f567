"""Property tests: random sequences of ledger operations keep the ledger's invariants.

The state machine drives one `UserLedger` with starts, heartbeats (including
duplicate and reordered `seq`), ends, plan events (including late and replayed
ones), restores from its own snapshot, and a clock that jumps across period
boundaries. After every step it checks:

- at most one session is open;
- billing never pushes the period's usage past its limit;
- `version` never decreases, and grows whenever the durable state changes;
- minutes are conserved: what sessions were billed equals what periods
  recorded (plus whatever `reset_usage` wiped), and equals the `consume`
  entries of the credit ledger's minute buckets;
- every balance equals the sum of its credit-ledger entries, each entry's
  `balance_after` is the running sum, and sequence numbers have no gaps;
- no bucket goes negative;
- no session is billed for more time than it ran, nor past its client's last
  sign of life (its start, a heartbeat or an end); a stale session is billed
  only to its last heartbeat;
- what a period has billed or holds never grows past its limit (a tail held
  under a plan later lowered may be billed, but nothing new is taken);
- held time is held once: what the tails and minute holds hold is what the ledger shows held;
- holds: every hold ends in exactly one terminal state and never changes after it; captured ≤
  amount and captured + released = amount; a hold past its `expires_at` is resolved; what holds
  and uses take of a meter never passes its limit; captured minutes are billed in the periods
  (sessions' time plus captured holds = what periods recorded = the minute `consume` entries).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.errors import HoldResolved, LedgerError, SessionEnded, SessionNotFound
from actors.ledger import LedgerPolicy, PlanEvent, UserLedger
from actors.plans import parse_plans
from actors.records import (
    ALERT_EXHAUSTED,
    ALERT_LOW,
    ALERT_NONE,
    MONTHLY_BUCKET,
    PURCHASED_BUCKET,
    CreditEntry,
    HoldRecord,
    LedgerEvent,
    LedgerSnapshot,
    MeterRecord,
    PeriodRecord,
    SessionRecord,
    StoredLedger,
    UserRecord,
)
from actors.times import MS_PER_MINUTE, MS_PER_SECOND, from_datetime

PLANS = parse_plans(
    """
    default_plan = "free"
    [plans.free]
    minutes = 3
    [plans.free.meters.g]
    limit = 3
    window = "day"
    [plans.basic]
    minutes = 20
    [plans.basic.meters.g]
    limit = "unlimited"
    window = "day"
    [plans.basic.meters.p]
    limit = 2
    window = "period"
    [plans.tiny]
    minutes = 0.1
    [plans.none]
    minutes = 0
    """,
    source="property test",
)
POLICY = LedgerPolicy(plans=PLANS, stale_session_ms=2 * MS_PER_MINUTE, low_balance_ms=MS_PER_MINUTE)
# Start an hour before a month ends, so boundaries are crossed often.
START_MS = from_datetime(datetime(2026, 1, 31, 23, 0, tzinfo=UTC))

clock_steps = st.one_of(
    st.integers(min_value=0, max_value=5 * MS_PER_SECOND),
    st.integers(min_value=0, max_value=3 * MS_PER_MINUTE),
    st.integers(min_value=0, max_value=40 * 24 * 60 * MS_PER_MINUTE),
)


def _without_versions(
    user: UserRecord, periods: dict[int, PeriodRecord], sessions: dict[str, SessionRecord]
) -> tuple[object, ...]:
    """What a store holds, minus version numbers: to tell whether anything durable changed. (The
    order key of billing's events is left out too: a renewal that changes nothing moves it alone,
    without a version, and the plan events keep it.)"""
    return (
        replace(user, version=0, plan_event_at_ms=None, plan_event_id=None),
        tuple(replace(p, version=0) for _, p in sorted(periods.items())),
        tuple(replace(x, version=0) for _, x in sorted(sessions.items())),
    )


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = START_MS
        self.ledger = UserLedger.new("u", POLICY, self.now)
        self.counter = 0
        self.known_sessions: list[str] = []
        # The model: when each session last heard from its client (a heartbeat it accepted), when
        # its client last called for it at all (its last sign of life), and its last accepted seq.
        self.last_beat: dict[str, int] = {}
        self.contact: dict[str, int] = {}
        self.last_seq: dict[str, int] = {}
        self.seq = 0
        # Everything ever recorded, latest record per key (as a store would keep it).
        self.periods: dict[int, PeriodRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.meters: dict[str, MeterRecord] = {}
        self.entries: dict[int, CreditEntry] = {}
        self.events: dict[str, LedgerEvent] = {}
        self.holds: dict[str, HoldRecord] = {}
        self.reset_ms = 0
        self.last_version = 0
        self.last_content: tuple[object, ...] | None = None
        self.used_before = self.ledger.used_ms
        self.spent_before = self.ledger.used_ms
        self.period_before = self.ledger.period.start_ms

    # ------------------------------------------------------------------ rules

    @rule(step=clock_steps)
    def tick(self, step: int) -> None:
        self.now += step
        self.ledger.advance(self.now)

    @rule(topic=st.none() | st.text(min_size=1, max_size=5))
    def start(self, topic: str | None) -> None:
        self.counter += 1
        session_id = f"s{self.counter}"
        try:
            self.ledger.start_session(self.now, session_id, topic=topic)
        except LedgerError:
            return
        self.known_sessions.append(session_id)
        self.last_beat[session_id] = self.now
        self.contact[session_id] = self.now

    @rule(data=st.data(), seq_delta=st.none() | st.integers(min_value=-2, max_value=2))
    @precondition(lambda self: bool(self.known_sessions))
    def heartbeat(self, data: st.DataObject, seq_delta: int | None) -> None:
        session_id = data.draw(st.sampled_from(self.known_sessions))
        seq = None
        if seq_delta is not None:
            self.seq = max(0, self.seq + seq_delta)
            seq = self.seq
        self.contact[session_id] = self.now
        try:
            result = self.ledger.heartbeat(self.now, session_id, seq=seq)
        except (SessionEnded, SessionNotFound):
            return
        assert result.session_id == session_id
        if result.state != "active":
            return
        previous = self.last_seq.get(session_id)
        if seq is None or previous is None or seq > previous:
            self.last_beat[session_id] = self.now
            if seq is not None:
                self.last_seq[session_id] = seq

    @rule(data=st.data())
    @precondition(lambda self: bool(self.known_sessions))
    def end(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(self.known_sessions))
        self.contact[session_id] = self.now
        first = self.ledger.end_session(self.now, session_id)
        again = self.ledger.end_session(self.now, session_id)
        assert first.session_id == again.session_id
        assert first.end_reason == again.end_reason
        assert first.session_used_ms == again.session_used_ms

    @rule(minutes=st.integers(min_value=1, max_value=5))
    def purchase(self, minutes: int) -> None:
        before = self.ledger.purchased_ms
        assert self.ledger.add_credits(
            self.now, minutes * MS_PER_MINUTE, reason="purchase", reference=None
        ) == (before + minutes * MS_PER_MINUTE)

    @rule(meter=st.sampled_from(["g", "p", "x"]), amount=st.integers(min_value=1, max_value=3))
    def consume(self, meter: str, amount: int) -> None:
        try:
            self.ledger.consume_meter(self.now, meter, amount)
        except LedgerError:
            return

    @rule(
        meter=st.none() | st.sampled_from(["g", "p", "x"]),
        amount=st.integers(min_value=1, max_value=3),
        minutes_ms=st.integers(min_value=1, max_value=4 * MS_PER_MINUTE),
        ttl_s=st.integers(min_value=1, max_value=600),
    )
    def hold(self, meter: str | None, amount: int, minutes_ms: int, ttl_s: int) -> None:
        self.counter += 1
        try:
            hold = self.ledger.create_hold(
                self.now,
                f"h{self.counter}",
                meter=meter,
                amount=minutes_ms if meter is None else amount,
                ttl_ms=ttl_s * MS_PER_SECOND,
                reference=None if self.counter % 2 else f"ref{self.counter}",
            )
        except LedgerError:
            return
        assert hold.state == "held" and hold.expires_at_ms == self.now + ttl_s * MS_PER_SECOND
        if meter is not None:
            self._meter_within_limit(meter)

    def _meter_within_limit(self, meter: str) -> None:
        view = self.ledger.credits(self.now).meters[meter]
        if view.limit is not None:
            assert view.used + view.held <= view.limit, "used and held past a meter's limit"

    def _some_hold(self, data: st.DataObject) -> str:
        known = sorted(self.holds, key=lambda key: int(key[1:])) or ["h0"]
        return data.draw(st.sampled_from([*known, "h-unknown"]))

    @rule(data=st.data(), part=st.none() | st.integers(min_value=0, max_value=5 * MS_PER_MINUTE))
    def capture(self, data: st.DataObject, part: int | None) -> None:
        hold_id = self._some_hold(data)
        before = self.ledger.hold(hold_id)
        try:
            captured = self.ledger.capture_hold(self.now, hold_id, part)
        except LedgerError:
            return
        assert captured.state == "captured"
        assert captured.captured == (captured.amount if part is None else part)
        if before is not None and not before.is_held:
            assert captured == before, "a capture repeated answers the same"

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = self._some_hold(data)
        try:
            released = self.ledger.release_hold(self.now, hold_id)
        except HoldResolved as refusal:
            assert refusal.fields["state"] in ("captured", "expired")
            return
        except LedgerError:
            return
        assert released.state == "released" and released.released == released.amount

    @rule(data=st.data(), ttl_s=st.integers(min_value=1, max_value=600))
    def extend(self, data: st.DataObject, ttl_s: int) -> None:
        hold_id = self._some_hold(data)
        try:
            extended = self.ledger.extend_hold(self.now, hold_id, ttl_s * MS_PER_SECOND)
        except LedgerError:
            return
        assert extended.is_held and extended.expires_at_ms == self.now + ttl_s * MS_PER_SECOND

    @rule(
        plan=st.sampled_from(["free", "basic", "tiny", "none"]),
        action=st.sampled_from(["upgrade", "downgrade", "cancel"]),
        age=st.integers(min_value=-10 * MS_PER_MINUTE, max_value=10 * MS_PER_MINUTE),
        delivery=st.sampled_from(["a", "b", "c", "d"]),
        reset=st.booleans(),
        anchor=st.none()
        | st.tuples(
            st.integers(min_value=-40 * 24 * 60, max_value=0),
            st.sampled_from([7 * 24 * 60, 30 * 24 * 60, 45]),
        ),
    )
    def change_plan(
        self, plan: str, action: str, age: int, delivery: str, reset: bool, anchor: tuple[int, int] | None
    ) -> None:
        used = self.ledger.used_ms
        limit = self.ledger.limit_ms
        period = self.ledger.period.start_ms
        period_start = period_end = None
        if anchor is not None:
            period_start = self.now + anchor[0] * MS_PER_MINUTE
            period_end = period_start + anchor[1] * MS_PER_MINUTE
        change = PlanEvent(
            plan=plan,
            action=action,  # type: ignore[arg-type]
            occurred_at_ms=self.now + age,
            delivery_id=delivery,
            reset_usage=reset,
            period_start_ms=period_start,
            period_end_ms=period_end,
        )
        try:
            applied = self.ledger.change_plan(self.now, change)
        except LedgerError:
            return  # (a subscription period too short for the stale timeout)
        if self.ledger.period.start_ms == period and self.ledger.used_ms > used:
            # A change that ends the session bills under the limit that applied until then.
            assert self.ledger.used_ms <= limit, "billed past the old limit at a plan change"
        if applied and reset and self.ledger.period.start_ms == period:
            self.reset_ms += used
        self.used_before = self.ledger.used_ms
        self.spent_before = self.ledger.used_ms + self.ledger.held_in_period_ms

    @rule()
    def crash_and_restore(self) -> None:
        """Rebuild from a fully synced snapshot: the restored ledger must behave the same."""
        snapshot = self.ledger.snapshot()
        self._absorb(snapshot)
        open_sessions = [s for s in snapshot.sessions if s.is_open]
        pending = [s for s in self.sessions.values() if s.is_pending]
        stored_periods = [p for p in snapshot.periods if not p.archived]
        if open_sessions:
            heard = open_sessions[0].last_heartbeat_at_ms
            stored_periods += [
                p for p in self.periods.values() if p.archived and p.start_ms <= heard < p.end_ms
            ]
        open_holds = [h for h in self.holds.values() if h.is_held]
        held_in = {start for record in pending for start, *_ in record.pending}
        held_in |= {start for hold in open_holds for start, *_ in hold.draws}
        stored_periods += [
            p
            for p in self.periods.values()
            if p.archived and p.start_ms in held_in and p not in stored_periods
        ]
        stored = StoredLedger(
            user=snapshot.user,
            periods=tuple(stored_periods),
            open_session=open_sessions[0] if open_sessions else None,
            meters=tuple(self.meters.values()),
            pending_sessions=tuple(pending),
            holds=tuple(open_holds),
        )
        before_credits = self.ledger.credits(self.now)
        before_usage = self.ledger.usage(self.now)
        before_deadline = self.ledger.next_deadline_ms()
        self.ledger = UserLedger.restore(stored, POLICY, self.now)
        # The round trip keeps the user's row and meters as they were (versions aside).
        again = self.ledger.clone().snapshot()
        assert replace(again.user, version=0) == replace(snapshot.user, version=0)
        meters = {replace(m, version=0) for m in snapshot.meters}
        assert {replace(m, version=0) for m in again.meters} == meters
        after_usage = self.ledger.usage(self.now)
        assert replace(after_usage, version=0) == replace(before_usage, version=0)
        assert after_usage.version > before_usage.version, "versions after a restore are newer"
        assert self.ledger.next_deadline_ms() == before_deadline
        assert replace(self.ledger.credits(self.now), version=0) == replace(before_credits, version=0)
        assert self.ledger.open_holds() == sorted(open_holds, key=lambda h: (h.created_at_ms, h.hold_id))
        alive = {x.session_id for x in open_sessions} | {x.session_id for x in pending}
        self.known_sessions = [s for s in self.known_sessions if s in alive]

    @rule(days=st.integers(min_value=0, max_value=40))
    def a_clone_is_a_twin_that_changes_alone(self, days: int) -> None:
        """`clone().snapshot() == snapshot()`, and whatever is done to the clone leaves the original
        as it was (the shard mutates a clone, writes it, and only then swaps it in)."""
        original = self.ledger.snapshot()
        deadline = self.ledger.next_deadline_ms()
        twin = self.ledger.clone()
        assert twin.snapshot() == original
        assert twin.next_deadline_ms() == deadline
        later = self.now + days * 24 * 60 * MS_PER_MINUTE
        twin.add_credits(self.now, MS_PER_MINUTE, reason="grant", reference=None)
        for operation in (
            lambda: twin.consume_meter(self.now, "g", 1),
            lambda: twin.create_hold(self.now, "twin-hold", meter=None, amount=1000, ttl_ms=1000),
            lambda: twin.capture_hold(self.now, "twin-hold", 500),
            lambda: twin.start_session(self.now, "twin-session"),
            lambda: twin.heartbeat(later, "twin-session"),
            lambda: twin.change_plan(later, PlanEvent("twin", "basic", "upgrade", later, reset_usage=True)),
        ):
            with contextlib.suppress(LedgerError):
                operation()
        twin.advance(later)
        twin.snapshot()
        twin.mark_synced(twin.version)
        assert self.ledger.snapshot() == original
        assert self.ledger.next_deadline_ms() == deadline

    # ------------------------------------------------------------- invariants

    def _absorb(self, snapshot: LedgerSnapshot) -> None:
        for period in snapshot.periods:
            kept = self.periods.get(period.start_ms)
            if kept is None or kept.version <= period.version:
                self.periods[period.start_ms] = period
        for session in snapshot.sessions:
            kept_session = self.sessions.get(session.session_id)
            if kept_session is None or kept_session.version <= session.version:
                self.sessions[session.session_id] = session
        for meter in snapshot.meters:
            kept_meter = self.meters.get(meter.meter)
            if kept_meter is None or kept_meter.version <= meter.version:
                self.meters[meter.meter] = meter
        for entry in snapshot.entries:
            assert self.entries.setdefault(entry.seq, entry) == entry, "an entry never changes once written"
        for event in snapshot.events:
            assert event.event_id not in self.events, "an event is written with one write only"
            self.events[event.event_id] = event
        for hold in snapshot.holds:
            kept_hold = self.holds.get(hold.hold_id)
            if kept_hold is not None and not kept_hold.is_held:
                assert hold == kept_hold, "a resolved hold never changes"
            if kept_hold is None or kept_hold.version <= hold.version:
                self.holds[hold.hold_id] = hold
        self.ledger.mark_synced(snapshot.version)

    @invariant()
    def checks(self) -> None:
        snapshot = self.ledger.snapshot()
        self._absorb(snapshot)

        # version never decreases, and grows whenever anything durable changed
        assert snapshot.version >= self.last_version
        content = _without_versions(snapshot.user, self.periods, self.sessions)
        if self.last_content is not None and content != self.last_content:
            assert snapshot.version > self.last_version, "state changed without a version bump"
        self.last_version = snapshot.version
        self.last_content = content

        # billing and holding never push what the period spent or holds past its limit
        spent = self.ledger.used_ms + self.ledger.held_in_period_ms
        if self.ledger.period.start_ms == self.period_before and spent > self.spent_before:
            assert spent <= self.ledger.limit_ms, "billed or held past the limit"
        self.used_before = self.ledger.used_ms
        self.spent_before = spent
        self.period_before = self.ledger.period.start_ms

        # what the tails hold is what the ledger shows held, and it is unavailable
        pending = [s for s in self.sessions.values() if s.is_pending]
        held = sum(allowance + purchased for record in pending for _, allowance, purchased in record.pending)
        held += sum(h.amount for h in self.holds.values() if h.is_held and h.meter is None)
        assert held == self.ledger.held_ms

        # every hold: one terminal state, its parts adding up; none held past its deadline
        for hold in self.holds.values():
            assert hold.state in ("held", "captured", "released", "expired")
            if hold.is_held:
                assert hold.expires_at_ms > self.now and hold.captured == hold.released == 0
                assert self.ledger.hold(hold.hold_id) == hold
            else:
                assert 0 <= hold.captured <= hold.amount
                assert hold.captured + hold.released == hold.amount
                assert hold.resolved_at_ms is not None
                if hold.state != "captured":
                    assert hold.captured == 0
        assert [h.hold_id for h in self.ledger.open_holds()] == [
            h.hold_id
            for h in sorted(self.holds.values(), key=lambda h: (h.created_at_ms, h.hold_id))
            if h.is_held
        ]

        # at most one open session, and it is the ledger's active one
        open_sessions = [s for s in self.sessions.values() if s.is_open]
        assert len(open_sessions) <= 1
        assert [s.session_id for s in open_sessions] == (
            [self.ledger.active_session_id] if self.ledger.active_session_id else []
        )

        # minutes are conserved between sessions, periods and the credit ledger
        billed = sum(s.used_ms for s in self.sessions.values())
        billed += sum(h.captured for h in self.holds.values() if h.meter is None)
        recorded = sum(p.total_used_ms for p in self.periods.values())
        assert billed == recorded + self.reset_ms, (billed, recorded, self.reset_ms)
        consumed = sum(
            -e.delta
            for e in self.entries.values()
            if e.reason == "consume" and e.bucket in (MONTHLY_BUCKET, PURCHASED_BUCKET)
        )
        assert consumed == billed

        # every balance is what its entries add up to; running sums and sequence numbers hold
        assert sorted(self.entries) == list(range(1, len(self.entries) + 1))
        chains: dict[tuple[str, int | None], list[CreditEntry]] = defaultdict(list)
        for seq in sorted(self.entries):
            entry = self.entries[seq]
            chains[(entry.bucket, entry.window_start_ms)].append(entry)
        for chain in chains.values():
            running = 0
            for entry in chain:
                running += entry.delta
                assert entry.balance_after == running >= 0, entry
        for key, live in self.ledger.balances(self.now).items():
            assert sum(e.delta for e in chains.get(key, [])) == live, key
        assert self.ledger.purchased_ms >= 0

        # the alert level recorded is the balance's own (so no crossing goes unannounced), and
        # every low_balance/exhausted event was made at a balance at or under its threshold
        warning = self.ledger.usage(self.now).warning
        recorded_level = self.ledger.snapshot().user.alert_level
        assert (
            recorded_level
            == {None: ALERT_NONE, "low_balance": ALERT_LOW, "exhausted": ALERT_EXHAUSTED}[warning]
        )
        for event in self.events.values():
            if event.kind == "low_balance":
                assert event.remaining_ms <= POLICY.low_balance_ms, event
            elif event.kind == "exhausted":
                assert event.remaining_ms == 0, event

        # no session billed for more than it ran, nor past its last sign of life; silence is never billed
        for session in self.sessions.values():
            end = session.ended_at_ms if session.ended_at_ms is not None else session.last_heartbeat_at_ms
            assert 0 <= session.used_ms <= end - session.started_at_ms
            assert session.used_ms <= self.contact[session.session_id] - session.started_at_ms, (
                "billed past the last sign of life"
            )
            if session.end_reason == "stale":
                heard = self.last_beat[session.session_id]
                assert session.ended_at_ms == session.last_heartbeat_at_ms == heard
                assert session.used_ms <= heard - session.started_at_ms


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
