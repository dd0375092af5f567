"""UserLedger: sessions, billing, alarms, plans, periods and persistence records."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from actors.errors import NoCredits, SessionActive, SessionEnded, SessionNotFound, UnknownPlan
from actors.ledger import PlanEvent, UserLedger
from actors.records import StoredLedger
from actors.times import from_datetime
from tests.unit.actors.support import DEC_1, MIN, POLICY, SEC, STALE_MS, T0


def ledger(plan: str | None = None, now: int = T0) -> UserLedger:
    return UserLedger.new("u1", POLICY, now, plan=plan)


def change(plan: str, at: int, delivery: str = "d1", **kwargs: object) -> PlanEvent:
    action = kwargs.pop("action", "upgrade")
    return PlanEvent(plan=plan, action=action, occurred_at_ms=at, delivery_id=delivery, **kwargs)  # type: ignore[arg-type]


class TestNewUser:
    def test_new_user_gets_default_plan_and_calendar_month(self) -> None:
        usage = ledger().usage(T0)
        assert usage.plan == "free"
        assert usage.limit_ms == 10 * MIN
        assert usage.used_ms == 0
        assert usage.remaining_ms == 10 * MIN
        assert usage.period_start_ms == from_datetime(datetime(2026, 11, 1, tzinfo=UTC))
        assert usage.period_end_ms == DEC_1
        assert usage.active_session is None
        assert usage.warning is None
        assert usage.version == 0

    def test_new_user_is_not_dirty(self) -> None:
        assert not ledger().is_dirty

    def test_new_user_with_unknown_plan_is_refused(self) -> None:
        with pytest.raises(UnknownPlan):
            ledger("platinum")

    def test_has_credits_answers_from_state(self) -> None:
        user = ledger()
        assert user.has_credits(T0)
        user.change_plan(T0, change("tiny", T0))
        user.start_session(T0, "s1")
        assert not user.has_credits(T0 + 6 * SEC)


class TestStartSession:
    def test_start_returns_remaining_and_ends_at(self) -> None:
        started = ledger().start_session(T0, "s1", topic="verbs", difficulty="beginner")
        assert started.session_id == "s1"
        assert started.started_at_ms == T0
        assert started.remaining_ms == 10 * MIN
        assert started.ends_at_ms == T0 + 10 * MIN
        assert started.version == 1

    def test_second_start_while_active_is_refused_and_changes_nothing(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        version = user.version
        with pytest.raises(SessionActive) as refused:
            user.start_session(T0 + SEC, "s2")
        assert refused.value.fields["session_id"] == "s1"
        assert user.version == version
        assert user.active_session_id == "s1"

    def test_start_with_no_credits_is_refused(self) -> None:
        user = ledger("tiny")
        user.start_session(T0, "s1")
        user.advance(T0 + 6 * SEC)
        version = user.version
        with pytest.raises(NoCredits):
            user.start_session(T0 + 7 * SEC, "s2")
        assert user.version == version


class TestHeartbeat:
    def test_heartbeat_bills_time_since_previous(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        first = user.heartbeat(T0 + 30 * SEC, "s1")
        second = user.heartbeat(T0 + 75 * SEC, "s1")
        assert first.session_used_ms == 30 * SEC
        assert second.session_used_ms == 75 * SEC
        assert second.used_ms == 75 * SEC
        assert second.remaining_ms == 10 * MIN - 75 * SEC
        assert second.state == "active"
        assert second.ends_at_ms == T0 + 10 * MIN
        assert second.version > first.version

    def test_heartbeat_for_unknown_session_is_not_found(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        with pytest.raises(SessionNotFound):
            user.heartbeat(T0 + SEC, "other")

    def test_heartbeat_after_end_is_session_ended(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.end_session(T0 + MIN, "s1")
        with pytest.raises(SessionEnded) as ended:
            user.heartbeat(T0 + 2 * MIN, "s1")
        assert ended.value.fields["end_reason"] == "user_ended"

    def test_duplicate_and_reordered_seq_change_nothing(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 30 * SEC, "s1", seq=2)
        version = user.version
        duplicate = user.heartbeat(T0 + 40 * SEC, "s1", seq=2)
        reordered = user.heartbeat(T0 + 50 * SEC, "s1", seq=1)
        assert user.version == version
        assert duplicate.session_used_ms == reordered.session_used_ms == 30 * SEC
        assert user.heartbeat(T0 + 60 * SEC, "s1", seq=3).session_used_ms == 60 * SEC

    def test_heartbeat_after_limit_alarm_answers_ended_limit_reached(self) -> None:
        """The heartbeat shows the client was alive: the held time to the limit is billed, once."""
        user = ledger("tiny")
        user.start_session(T0, "s1")
        user.advance(T0 + 6 * SEC)
        version = user.version
        result = user.heartbeat(T0 + 30 * SEC, "s1")
        assert (result.state, result.end_reason) == ("ended", "limit_reached")
        assert result.session_used_ms == 6 * SEC
        assert user.version == version + 1
        again = user.heartbeat(T0 + 31 * SEC, "s1")
        assert again.session_used_ms == 6 * SEC
        assert user.version == version + 1

    def test_heartbeat_after_stale_end_is_session_ended(self) -> None:
        user = ledger("basic")
        user.start_session(T0, "s1")
        with pytest.raises(SessionEnded) as ended:
            user.heartbeat(T0 + STALE_MS + SEC, "s1")
        assert ended.value.fields["end_reason"] == "stale"

    def test_heartbeat_at_exhaustion_ends_session_limit_reached(self) -> None:
        user = ledger("tiny")
        user.start_session(T0, "s1")
        result = user.heartbeat(T0 + 6 * SEC, "s1")
        assert result.state == "ended"
        assert result.end_reason == "limit_reached"
        assert result.session_used_ms == 6 * SEC
        assert result.remaining_ms == 0
        assert result.warning == "exhausted"


class TestEndSession:
    def test_end_bills_to_now(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 30 * SEC, "s1")
        result = user.end_session(T0 + 45 * SEC, "s1")
        assert result.state == "ended"
        assert result.end_reason == "user_ended"
        assert result.session_used_ms == 45 * SEC
        assert user.active_session_id is None

    def test_end_is_idempotent(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        first = user.end_session(T0 + 45 * SEC, "s1")
        version = user.version
        again = user.end_session(T0 + 5 * MIN, "s1")
        assert again == first
        assert user.version == version

    def test_end_unknown_session_is_not_found(self) -> None:
        with pytest.raises(SessionNotFound):
            ledger().end_session(T0, "nope")


class TestAlarms:
    def test_session_ends_limit_reached_exactly_at_limit(self) -> None:
        """The gate closes at the limit; the time since the last heartbeat is held, not billed."""
        user = ledger("tiny")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 2 * SEC, "s1")
        assert user.next_deadline_ms() == T0 + 6 * SEC
        fired = user.advance(T0 + 9 * SEC)
        assert [alarm.kind for alarm in fired] == ["limit"]
        assert fired[0].at_ms == T0 + 6 * SEC
        record = user.ended_session("s1")
        assert record is not None
        assert record.end_reason == "limit_reached"
        assert record.ended_at_ms == T0 + 6 * SEC
        assert record.last_heartbeat_at_ms == T0 + 2 * SEC  # an alarm never moves it
        assert record.used_ms == 2 * SEC
        usage = user.usage(T0 + 9 * SEC)
        assert (usage.used_ms, usage.held_ms, usage.remaining_ms) == (2 * SEC, 4 * SEC, 0)
        assert usage.warning == "exhausted" and usage.active_session is None
        assert not user.has_credits(T0 + 9 * SEC)
        with pytest.raises(NoCredits):
            user.start_session(T0 + 9 * SEC, "s2")

    def test_a_heartbeat_sent_again_after_the_limit_bills_the_held_time_once(self) -> None:
        """Even with its old `seq`: the client sent it again, so it was alive after its last
        heartbeat. It bills the held time (no more), and its answer is the final one."""
        user = ledger("tiny")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 2 * SEC, "s1", seq=7)
        user.advance(T0 + 7 * SEC)
        again = user.heartbeat(T0 + 8 * SEC, "s1", seq=7)
        assert (again.state, again.end_reason, again.session_used_ms) == ("ended", "limit_reached", 6 * SEC)
        assert user.usage(T0 + 8 * SEC).held_ms == 0
        assert user.end_session(T0 + 9 * SEC, "s1").session_used_ms == 6 * SEC, "one final account"

    def test_a_silent_client_is_billed_to_its_last_heartbeat(self) -> None:
        user = ledger("tiny")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 2 * SEC, "s1")
        fired = user.advance(T0 + 2 * SEC + STALE_MS)
        assert [alarm.kind for alarm in fired] == ["limit", "release"]
        record = user.ended_session("s1")
        assert record is not None and not record.is_pending
        assert (record.end_reason, record.ended_at_ms, record.used_ms) == (
            "limit_reached",
            T0 + 6 * SEC,
            2 * SEC,
        )
        usage = user.usage(T0 + 2 * SEC + STALE_MS)
        assert (usage.used_ms, usage.held_ms, usage.remaining_ms) == (2 * SEC, 0, 4 * SEC)
        # A heartbeat after the release bills nothing more: it answers the final account.
        late = user.heartbeat(T0 + 3 * SEC + STALE_MS, "s1")
        assert (late.state, late.end_reason, late.session_used_ms) == ("ended", "limit_reached", 2 * SEC)

    def test_an_honest_client_ending_after_the_limit_pays_exactly_to_the_limit(self) -> None:
        user = ledger("tiny")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 2 * SEC, "s1")
        user.advance(T0 + 7 * SEC)
        ended = user.end_session(T0 + 40 * SEC, "s1")
        assert (ended.end_reason, ended.session_used_ms, ended.remaining_ms) == ("limit_reached", 6 * SEC, 0)
        record = user.ended_session("s1")
        assert record is not None and not record.is_pending
        assert (record.ended_at_ms, record.used_ms) == (T0 + 6 * SEC, 6 * SEC)
        assert user.used_ms == user.limit_ms
        assert user.usage(T0 + 41 * SEC).held_ms == 0
        assert user.advance(T0 + 2 * SEC + STALE_MS) == [], "nothing is left to release"

    def test_the_held_time_is_billed_in_the_period_it_was_held_in(self) -> None:
        """A client heard from after the period ended still pays the old period, not the new one."""
        start = DEC_1 - 4 * SEC
        user = ledger("tiny", now=start)
        user.start_session(start, "s1")
        user.advance(DEC_1 + 7 * SEC)  # the limit at DEC_1 + 6 s: 4 s held in Nov, 6 s in Dec
        usage = user.usage(DEC_1 + 7 * SEC)
        assert (usage.used_ms, usage.held_ms, usage.remaining_ms) == (0, 10 * SEC, 0)
        assert user.balances(DEC_1 + 7 * SEC)[("monthly", DEC_1 - 30 * 86_400_000)] == 6 * SEC
        ended = user.end_session(DEC_1 + 30 * SEC, "s1")
        assert ended.session_used_ms == 10 * SEC
        periods = {p.start_ms: p for p in user.snapshot().periods}
        assert periods[DEC_1].used_ms == 6 * SEC
        assert periods[DEC_1 - 30 * 86_400_000].used_ms == 4 * SEC
        assert periods[DEC_1 - 30 * 86_400_000].archived
        assert user.balances(DEC_1 + 31 * SEC) == {("monthly", DEC_1): 0, ("purchased", None): 0}

    def test_silent_session_ends_stale_billed_to_last_heartbeat(self) -> None:
        user = ledger("basic")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 30 * SEC, "s1")
        fired = user.advance(T0 + 30 * SEC + STALE_MS)
        assert [alarm.kind for alarm in fired] == ["stale"]
        record = user.ended_session("s1")
        assert record is not None
        assert record.end_reason == "stale"
        assert record.ended_at_ms == T0 + 30 * SEC
        assert record.used_ms == 30 * SEC
        assert user.used_ms == 30 * SEC

    def test_heartbeat_just_before_stale_deadline_keeps_session(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        result = user.heartbeat(T0 + STALE_MS - 1, "s1")
        assert result.state == "active"
        assert user.next_deadline_ms() == T0 + 10 * MIN  # the limit, now nearer than silence

    def test_nothing_fires_before_a_deadline(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        version = user.version
        assert user.advance(T0 + MIN) == []
        assert user.version == version

    def test_each_alarm_bumps_version(self) -> None:
        user = ledger("tiny")
        user.start_session(T0, "s1")
        version = user.version
        user.advance(T0 + 6 * SEC)
        assert user.version == version + 1


class TestPlans:
    def test_upgrade_takes_effect_immediately(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        assert user.change_plan(T0 + MIN, change("pro", T0 + MIN))
        usage = user.usage(T0 + MIN)
        assert usage.plan == "pro"
        assert usage.limit_ms == 500 * MIN
        assert usage.active_session is not None
        assert usage.active_session.ends_at_ms == T0 + 500 * MIN

    def test_older_event_is_not_applied(self) -> None:
        user = ledger()
        assert user.change_plan(T0, change("pro", T0, "d2"))
        version = user.version
        assert not user.change_plan(T0, change("basic", T0 - MIN, "d1"))
        assert user.plan == "pro"
        assert user.version == version

    def test_a_renewal_of_the_plan_in_force_with_the_current_period_changes_nothing(self) -> None:
        user = ledger()
        start, end = T0 - 5 * MIN, T0 - 5 * MIN + 30 * 86_400_000
        assert user.change_plan(T0, change("basic", T0, "d1", period_start_ms=start, period_end_ms=end))
        user.mark_synced(user.snapshot().version)
        version, events = user.version, user.events_after(0)
        assert user.change_plan(
            T0 + MIN, change("basic", T0 + MIN, "d2", period_start_ms=start, period_end_ms=end)
        )
        assert user.change_plan(T0 + 2 * MIN, change("basic", T0 + 2 * MIN, "d3"))  # no period: the same
        assert (user.version, user.events_after(0), user.is_dirty) == (version, events, False)
        later = user.usage(end + MIN)  # periods roll on; billing's renewal names the new one
        assert user.change_plan(
            end + 2 * MIN,
            change(
                "basic",
                end + 2 * MIN,
                "d5",
                period_start_ms=later.period_start_ms,
                period_end_ms=later.period_end_ms,
            ),
        )
        assert (user.version, user.usage(end + 2 * MIN).period_end_ms) == (later.version, later.period_end_ms)
        # The order of billing's events still moved: an event older than the renewal is not applied.
        assert not user.change_plan(T0 + 3 * MIN, change("pro", T0 + 90 * SEC, "d4"))
        assert user.plan == "basic"

    def test_the_order_a_renewal_moved_survives_a_restore_through_the_plan_events(self) -> None:
        user = ledger()
        assert user.change_plan(T0, change("basic", T0, "d1"))
        snapshot = user.snapshot()
        assert user.change_plan(T0 + MIN, change("basic", T0 + MIN, "d2"))  # writes no user row
        stored = StoredLedger(
            user=snapshot.user,
            periods=snapshot.periods,
            open_session=None,
            last_applied_plan_event=(T0 + MIN, "d2"),  # what the plan events hold
        )
        restored = UserLedger.restore(stored, POLICY, T0 + 2 * MIN)
        assert not restored.change_plan(T0 + 2 * MIN, change("pro", T0 + 30 * SEC, "d3"))
        assert restored.plan == "basic"

    def test_replayed_event_is_not_applied_twice(self) -> None:
        user = ledger()
        assert user.change_plan(T0, change("pro", T0, "d1", reset_usage=True))
        version = user.version
        assert not user.change_plan(T0 + MIN, change("pro", T0, "d1", reset_usage=True))
        assert user.version == version

    def test_equal_timestamps_are_ordered_by_delivery_id(self) -> None:
        forward, backward = ledger(), ledger()
        for user, order in ((forward, ("a", "b")), (backward, ("b", "a"))):
            for delivery in order:
                user.change_plan(T0, change("basic" if delivery == "a" else "pro", T0, delivery))
        assert forward.plan == backward.plan == "pro"

    def test_cancel_moves_to_default_plan(self) -> None:
        user = ledger("pro")
        user.change_plan(T0, change("pro", T0, "d1", action="cancel"))
        assert user.plan == "free"
        assert user.limit_ms == 10 * MIN

    def test_reset_usage_zeroes_the_period(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.end_session(T0 + 4 * MIN, "s1")
        user.change_plan(T0 + 5 * MIN, change("basic", T0, reset_usage=True))
        assert user.used_ms == 0

    def test_unknown_plan_is_refused_and_changes_nothing(self) -> None:
        user = ledger()
        with pytest.raises(UnknownPlan):
            user.change_plan(T0, change("platinum", T0))
        assert user.version == 0
        assert user.plan_event_at_ms is None

    def test_downgrade_below_usage_ends_running_session_at_the_change(self) -> None:
        """The time since the last heartbeat ran under the old plan: the session ends now, and that
        time is held, billed once the client is heard from."""
        user = ledger("pro")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 9 * MIN, "s1")
        user.heartbeat(T0 + 18 * MIN, "s1")
        user.change_plan(T0 + 18 * MIN + 20 * SEC, change("free", T0, action="downgrade"))
        record = user.ended_session("s1")
        assert record is not None
        assert record.end_reason == "limit_reached"
        assert record.ended_at_ms == T0 + 18 * MIN + 20 * SEC
        assert (user.used_ms, user.usage(T0 + 19 * MIN).held_ms) == (18 * MIN, 20 * SEC)
        assert user.usage(T0 + 19 * MIN).warning == "exhausted"
        assert user.heartbeat(T0 + 19 * MIN, "s1").session_used_ms == 18 * MIN + 20 * SEC
        assert user.used_ms == 18 * MIN + 20 * SEC

    def test_downgrade_that_leaves_room_bills_nothing_at_the_change(self) -> None:
        user = ledger("pro")
        user.start_session(T0, "s1")
        user.heartbeat(T0 + 2 * MIN, "s1")
        user.change_plan(T0 + 2 * MIN + 20 * SEC, change("free", T0, action="downgrade"))
        assert user.active_session_id == "s1"
        assert user.used_ms == 2 * MIN
        assert user.next_deadline_ms() == T0 + 10 * MIN  # the free plan's limit, from the last heartbeat


class TestPeriods:
    def test_period_rolls_over_at_boundary(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.end_session(T0 + 3 * MIN, "s1")
        fired = user.advance(DEC_1)
        assert [alarm.kind for alarm in fired] == ["period_end"]
        assert user.period.start_ms == DEC_1
        assert user.used_ms == 0
        archived = [p for p in user.snapshot().periods if p.archived]
        assert len(archived) == 1
        assert archived[0].used_ms == 3 * MIN
        assert archived[0].end_ms == DEC_1

    def test_idle_months_are_skipped(self) -> None:
        user = ledger()
        march = from_datetime(datetime(2027, 3, 15, tzinfo=UTC))
        user.advance(march)
        assert user.period.start_ms == from_datetime(datetime(2027, 3, 1, tzinfo=UTC))
        assert len([p for p in user.snapshot().periods if p.archived]) == 1

    def test_session_across_boundary_is_split_at_boundary(self) -> None:
        user = ledger("basic")
        user.start_session(DEC_1 - 8 * MIN, "s1")
        user.heartbeat(DEC_1 - 4 * MIN, "s1")
        result = user.heartbeat(DEC_1 + 5 * MIN, "s1")
        assert result.session_used_ms == 13 * MIN
        assert user.used_ms == 5 * MIN
        old = next(p for p in user.snapshot().periods if p.end_ms == DEC_1)
        assert old.archived
        assert old.used_ms == 8 * MIN

    def test_session_that_runs_out_before_boundary_ends_in_old_period(self) -> None:
        user = ledger()
        user.start_session(DEC_1 - 14 * MIN, "s1")
        user.heartbeat(DEC_1 - 6 * MIN, "s1")
        result = user.heartbeat(DEC_1 + MIN, "s1")
        assert (result.state, result.end_reason) == ("ended", "limit_reached")
        record = user.ended_session("s1")
        assert record is not None
        assert record.ended_at_ms == DEC_1 - 4 * MIN
        assert user.used_ms == 0
        old = next(p for p in user.snapshot().periods if p.end_ms == DEC_1)
        assert old.used_ms == old.limit_ms == 10 * MIN

    def test_restored_prior_period_can_run_out_before_boundary(self) -> None:
        """A prior period restored with less room than the gap is billed only up to its limit."""
        user = ledger("basic")
        user.start_session(DEC_1 - 5 * MIN, "s1")
        user.advance(DEC_1)
        snapshot = user.snapshot()
        prior = next(p for p in snapshot.periods if p.end_ms == DEC_1)
        squeezed = replace(prior, used_ms=prior.limit_ms - 2 * MIN)
        current = next(p for p in snapshot.periods if p.start_ms == DEC_1)
        open_session = next(s for s in snapshot.sessions if s.is_open)
        twin = UserLedger.restore(
            StoredLedger(user=snapshot.user, periods=(current, squeezed), open_session=open_session),
            POLICY,
            DEC_1,
        )
        assert twin.next_deadline_ms() == DEC_1 - 3 * MIN
        result = twin.heartbeat(DEC_1 + MIN, "s1")
        assert (result.state, result.end_reason, result.session_used_ms) == (
            "ended",
            "limit_reached",
            2 * MIN,
        )
        assert twin.used_ms == 0

    def test_silent_session_across_boundary_bills_nothing_after_last_heartbeat(self) -> None:
        user = ledger("basic")
        user.start_session(DEC_1 - 2 * MIN, "s1")
        user.advance(DEC_1 - 2 * MIN + STALE_MS)
        record = user.ended_session("s1")
        assert record is not None
        assert record.end_reason == "stale"
        assert record.used_ms == 0
        assert user.period.start_ms == DEC_1
        assert all(p.used_ms == 0 for p in user.snapshot().periods)

    def test_ends_at_counts_next_allowance_past_period_end(self) -> None:
        user = ledger("pro")
        started = user.start_session(DEC_1 - 5 * MIN, "s1")
        assert started.ends_at_ms == DEC_1 + 500 * MIN


class TestPersistence:
    def test_mutation_makes_dirty_and_sync_cleans(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        assert user.is_dirty
        snapshot = user.snapshot()
        user.mark_synced(snapshot.version)
        assert not user.is_dirty

    def test_snapshot_lists_ended_sessions_before_the_open_one(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        user.end_session(T0 + MIN, "s1")
        user.start_session(T0 + 2 * MIN, "s2")
        sessions = user.snapshot().sessions
        assert [s.session_id for s in sessions] == ["s1", "s2"]
        assert sessions[0].end_reason == "user_ended"
        assert sessions[1].is_open

    def test_sync_of_older_version_keeps_newer_records(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        snapshot = user.snapshot()
        user.end_session(T0 + MIN, "s1")
        user.mark_synced(snapshot.version)
        assert user.is_dirty
        assert [s.session_id for s in user.snapshot().sessions] == ["s1"]

    def test_restore_rebuilds_the_same_state(self) -> None:
        user = ledger("basic")
        user.start_session(T0, "s1", topic="t", difficulty="advanced")
        user.heartbeat(T0 + 40 * SEC, "s1", seq=4)
        snapshot = user.snapshot()
        open_session = next(s for s in snapshot.sessions if s.is_open)
        stored = StoredLedger(user=snapshot.user, periods=snapshot.periods, open_session=open_session)
        twin = UserLedger.restore(stored, POLICY, T0 + 41 * SEC)
        restored, original = twin.usage(T0 + 41 * SEC), user.usage(T0 + 41 * SEC)
        assert replace(restored, version=0) == replace(original, version=0)
        assert restored.version > original.version, "a restored ledger's versions are newer than any before"
        assert twin.next_deadline_ms() == user.next_deadline_ms()
        assert twin.heartbeat(T0 + 50 * SEC, "s1", seq=4).session_used_ms == 40 * SEC
        assert not twin.is_dirty or twin.version > snapshot.version

    def test_restore_of_straddling_session_keeps_prior_period(self) -> None:
        user = ledger("basic")
        user.start_session(DEC_1 - 3 * MIN, "s1")
        user.advance(DEC_1)
        snapshot = user.snapshot()
        periods = tuple(sorted(snapshot.periods, key=lambda p: -p.start_ms))
        open_session = next(s for s in snapshot.sessions if s.is_open)
        twin = UserLedger.restore(
            StoredLedger(user=snapshot.user, periods=periods, open_session=open_session), POLICY, DEC_1
        )
        twin.heartbeat(DEC_1 + 2 * MIN, "s1")
        old = next(p for p in twin.snapshot().periods if p.end_ms == DEC_1)
        assert old.used_ms == 3 * MIN
        assert twin.used_ms == 2 * MIN

    def test_clone_is_independent(self) -> None:
        user = ledger()
        user.start_session(T0, "s1")
        twin = user.clone()
        twin.end_session(T0 + MIN, "s1")
        assert user.active_session_id == "s1"
        assert twin.active_session_id is None
        assert user.version < twin.version
