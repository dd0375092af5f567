"""UserLedger threshold events: announced once per crossing, re-armed by a rise, written with the change."""

from __future__ import annotations

from dataclasses import replace

from actors.ledger import RECENT_EVENTS_KEPT, PlanEvent, UserLedger
from actors.records import ALERT_LOW, LedgerEvent, StoredLedger
from tests.unit.actors.support import DEC_1, MIN, POLICY, SEC, T0


def ledger(plan: str | None = None, now: int = T0) -> UserLedger:
    return UserLedger.new("u1", POLICY, now, plan=plan)


def kinds(events: tuple[LedgerEvent, ...]) -> list[str]:
    return [event.kind for event in events]


def run_session(user: UserLedger, session_id: str, start: int, minutes: int) -> None:
    """A session of `minutes`, heartbeating every minute (silence would end it stale)."""
    user.start_session(start, session_id)
    for minute in range(1, minutes):
        user.heartbeat(start + minute * MIN, session_id)
    user.end_session(start + minutes * MIN, session_id)


def restored(user: UserLedger, now: int) -> UserLedger:
    """The ledger as a shard rebuilds it from its latest snapshot."""
    snapshot = user.snapshot()
    stored = StoredLedger(user=snapshot.user, periods=snapshot.periods[:1], open_session=None)
    return UserLedger.restore(stored, POLICY, now)


class TestLowBalance:
    def test_crossing_twice_without_a_top_up_announces_once(self) -> None:
        user = ledger()  # free: 10 minutes; low balance at 5
        run_session(user, "s1", T0, 6)
        assert kinds(user.events_after(0)) == ["low_balance"]
        run_session(user, "s2", T0 + 10 * MIN, 1)  # still low: 3 minutes left
        assert kinds(user.events_after(0)) == ["low_balance"]

    def test_the_event_carries_the_balance_and_the_instant_it_was_billed(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 4 * MIN, "s1")
        assert user.events_after(0) == ()
        user.heartbeat(T0 + 6 * MIN, "s1")
        (event,) = user.events_after(0)
        assert (event.kind, event.occurred_at_ms, event.version) == (
            "low_balance",
            T0 + 6 * MIN,
            user.version,
        )
        assert (event.remaining_ms, event.used_ms, event.limit_ms) == (4 * MIN, 6 * MIN, 10 * MIN)
        assert (event.plan, event.period_end_ms, event.user_id) == ("free", DEC_1, "u1")

    def test_a_top_up_above_the_threshold_rearms_it(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 6)
        user.add_credits(T0 + 7 * MIN, 10 * MIN, reason="purchase", reference="order-1")  # 14 left
        run_session(user, "s2", T0 + 8 * MIN, 2)  # 12 left: above 5, nothing
        assert kinds(user.events_after(0)) == ["low_balance"]
        run_session(user, "s3", T0 + 11 * MIN, 8)  # 4 left: a new crossing
        assert kinds(user.events_after(0)) == ["low_balance", "low_balance"]

    def test_a_top_up_that_stays_under_the_threshold_does_not_rearm(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 8)  # 2 left
        user.add_credits(T0 + 9 * MIN, 1 * MIN, reason="grant", reference=None)  # 3 left: still low
        run_session(user, "s2", T0 + 10 * MIN, 1)
        assert kinds(user.events_after(0)) == ["low_balance"]

    def test_a_user_who_starts_under_the_threshold_is_not_told_until_a_new_crossing(self) -> None:
        user = ledger("tiny")  # 6 seconds: under the threshold from the start
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 2 * SEC, "s1")
        assert user.events_after(0) == ()


class TestExhausted:
    def test_the_limit_alarm_announces_exhausted_at_the_instant_the_balance_ran_out(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 6 * MIN, "s1")
        user.advance(T0 + 20 * MIN)
        low, exhausted = user.events_after(0)
        assert (low.kind, exhausted.kind) == ("low_balance", "exhausted")
        assert exhausted.occurred_at_ms == T0 + 10 * MIN
        assert exhausted.remaining_ms == 0
        assert user.active_session_id is None

    def test_falling_straight_to_zero_announces_both_thresholds_in_order(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 4 * MIN, "s1")  # 6 minutes left
        user.end_session(T0 + 12 * MIN, "s1")  # the limit alarm bills the 6 at once
        assert kinds(user.events_after(0)) == ["low_balance", "exhausted"]
        assert len({event.version for event in user.events_after(0)}) == 1

    def test_a_new_period_rearms_both(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 10)
        assert kinds(user.events_after(0)) == ["low_balance", "exhausted"]
        run_session(user, "s2", DEC_1 + MIN, 10)
        assert kinds(user.events_after(0)) == [
            "low_balance",
            "exhausted",
            "period_rolled",
            "low_balance",
            "exhausted",
        ]


class TestPlanAndPeriodEvents:
    def test_an_applied_plan_change_is_announced_with_what_it_replaced(self) -> None:
        user = ledger()
        change = PlanEvent(plan="basic", action="upgrade", occurred_at_ms=T0, delivery_id="d1")
        assert user.change_plan(T0 + SEC, change)
        (event,) = user.events_after(0)
        assert (event.kind, event.plan, event.previous_plan, event.action) == (
            "plan_changed",
            "basic",
            "free",
            "upgrade",
        )
        assert event.limit_ms == 100 * MIN
        assert not user.change_plan(T0 + 2 * SEC, change)  # a replay is not applied, and not announced
        assert len(user.events_after(0)) == 1

    def test_a_downgrade_under_the_threshold_is_announced_with_the_crossing(self) -> None:
        user = ledger()
        change = PlanEvent(plan="tiny", action="downgrade", occurred_at_ms=T0, delivery_id="d1")
        user.change_plan(T0, change)
        assert kinds(user.events_after(0)) == ["plan_changed", "low_balance"]

    def test_the_period_end_is_announced_with_the_period_it_closed(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 2)
        user.advance(DEC_1 + SEC)
        (event,) = user.events_after(0)
        assert event.kind == "period_rolled"
        assert event.occurred_at_ms == DEC_1
        assert event.previous_period_end_ms == DEC_1
        assert event.previous_used_ms == 2 * MIN
        assert (event.period_start_ms, event.used_ms, event.remaining_ms) == (DEC_1, 0, 10 * MIN)

    def test_a_subscription_anchor_that_opens_a_new_period_announces_it(self) -> None:
        user = ledger()
        change = PlanEvent(
            plan="basic",
            action="upgrade",
            occurred_at_ms=T0,
            delivery_id="d1",
            period_start_ms=T0,
            period_end_ms=T0 + 30 * 24 * 60 * MIN,
        )
        user.change_plan(T0, change)
        assert kinds(user.events_after(0)) == ["period_rolled", "plan_changed"]
        rolled = user.events_after(0)[0]
        assert (rolled.period_start_ms, rolled.previous_period_end_ms, rolled.plan) == (T0, T0, "basic")


class TestEventsAreWrittenWithTheirChange:
    def test_the_snapshot_carries_unwritten_events_until_they_are_synced(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 6)
        snapshot = user.snapshot()
        assert kinds(snapshot.events) == ["low_balance"]
        assert snapshot.user.alert_level == ALERT_LOW
        user.mark_synced(snapshot.version)
        assert user.snapshot().events == ()
        assert kinds(user.events_after(0)) == ["low_balance"]  # still there for live streams

    def test_an_event_made_during_a_write_is_left_for_the_next(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 6)
        in_flight = user.snapshot()
        run_session(user, "s2", T0 + 7 * MIN, 5)
        user.mark_synced(in_flight.version)
        assert kinds(user.snapshot().events) == ["exhausted"]

    def test_a_restored_ledger_remembers_what_it_announced(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 6)
        again = restored(user, T0 + 7 * MIN)
        run_session(again, "s2", T0 + 7 * MIN, 1)
        assert again.events_after(0) == ()

    def test_a_row_from_before_alert_levels_derives_the_level_from_the_balance(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 6)
        snapshot = user.snapshot()
        old_row = replace(snapshot.user, alert_level=None)
        again = UserLedger.restore(
            StoredLedger(user=old_row, periods=snapshot.periods[:1], open_session=None), POLICY, T0 + 7 * MIN
        )
        run_session(again, "s2", T0 + 7 * MIN, 1)
        assert again.events_after(0) == ()

    def test_events_after_a_version_are_those_a_stream_has_not_seen(self) -> None:
        user = ledger()
        run_session(user, "s1", T0, 6)
        seen = user.version
        run_session(user, "s2", T0 + 7 * MIN, 5)
        assert kinds(user.events_after(seen)) == ["exhausted"]
        assert user.events_after(user.version) == ()

    def test_durable_events_are_forgotten_past_the_bound_but_unwritten_ones_never(self) -> None:
        user = ledger()
        at = T0
        for n in range(RECENT_EVENTS_KEPT + 3):
            at += MIN
            change = PlanEvent(
                plan="basic" if n % 2 else "pro", action="upgrade", occurred_at_ms=at, delivery_id="d"
            )
            user.change_plan(at, change)
        assert len(user.snapshot().events) == RECENT_EVENTS_KEPT + 3  # none written yet: all kept
        user.mark_synced(user.version)
        at += MIN
        user.change_plan(at, PlanEvent(plan="free", action="cancel", occurred_at_ms=at, delivery_id="d"))
        assert len(user.events_after(0)) == RECENT_EVENTS_KEPT
        assert user.events_after(0)[-1].action == "cancel"

    def test_event_ids_are_stable_and_distinct(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 4 * MIN, "s1")
        user.end_session(T0 + 12 * MIN, "s1")
        low, exhausted = user.events_after(0)
        assert low.event_id != exhausted.event_id
        assert low.event_id == replace(low, remaining_ms=1).event_id  # named by user, version and kind
        assert low.event_id.startswith("evt_") and len(low.event_id) == 36
