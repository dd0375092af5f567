"""UserLedger holds: what they take, how they resolve, and the cases a review found."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from actors.errors import HoldNotFound, HoldResolved, InvalidCapture, NoCredits, TooManyHolds
from actors.ledger import LedgerPolicy, PlanEvent, UserLedger
from actors.plans import parse_plans
from actors.times import from_datetime
from tests.unit.actors.support import DEC_1, MIN, SEC, STALE_MS, T0

PLANS = parse_plans(
    """
    default_plan = "free"
    [plans.free]
    minutes = 10
    [plans.free.meters.g]
    limit = 5
    window = "day"
    [plans.open]
    minutes = 10
    [plans.open.meters.g]
    limit = "unlimited"
    window = "day"
    [plans.per]
    minutes = 10
    [plans.per.meters.g]
    limit = 5
    window = "period"
    """,
    source="hold tests",
)
POLICY = LedgerPolicy(plans=PLANS, stale_session_ms=STALE_MS, low_balance_ms=0)
NOV_11 = from_datetime(datetime(2026, 11, 11, tzinfo=UTC))


def ledger(plan: str | None = None, now: int = T0) -> UserLedger:
    return UserLedger.new("u1", POLICY, now, plan=plan)


def balances_add_up(user: UserLedger, now: int) -> None:
    """Each live balance is what the credit ledger's entries for it add up to."""
    snapshot = user.snapshot()
    sums: dict[tuple[str, int | None], int] = {}
    for entry in snapshot.entries:
        key = (entry.bucket, entry.window_start_ms)
        sums[key] = sums.get(key, 0) + entry.delta
        assert entry.balance_after == sums[key], entry
    for key, live in user.balances(now).items():
        assert sums.get(key, 0) == live, key


def test_a_meter_hold_is_unavailable_to_uses_and_holds_until_resolved() -> None:
    user = ledger()
    held = user.create_hold(T0, "h1", meter="g", amount=4, ttl_ms=60 * SEC)
    with pytest.raises(NoCredits):
        user.create_hold(T0, "h2", meter="g", amount=2, ttl_ms=60 * SEC)
    with pytest.raises(NoCredits):
        user.consume_meter(T0, "g", 2)
    captured = user.capture_hold(T0 + SEC, "h1", 3)
    assert (captured.state, captured.captured, captured.released) == ("captured", 3, 1)
    assert user.capture_hold(T0 + 2 * SEC, "h1", 3) == captured, "the same capture answers the same"
    with pytest.raises(HoldResolved):
        user.release_hold(T0 + 2 * SEC, "h1")
    meter = user.credits(T0 + 2 * SEC).meters["g"]
    assert (meter.used, meter.held, meter.remaining) == (3, 0, 2)
    assert held.version < captured.version
    balances_add_up(user, T0 + 2 * SEC)


def test_a_capture_of_more_than_is_held_changes_nothing() -> None:
    user = ledger()
    user.create_hold(T0, "h1", meter="g", amount=2, ttl_ms=60 * SEC)
    version = user.version
    with pytest.raises(InvalidCapture):
        user.capture_hold(T0, "h1", 3)
    assert user.version == version and user.hold("h1") is not None and user.hold("h1").is_held  # type: ignore[union-attr]
    with pytest.raises(HoldNotFound):
        user.capture_hold(T0, "nope")


def test_a_minute_hold_bills_the_month_it_was_made_in() -> None:
    user = ledger(now=DEC_1 - MIN)
    user.create_hold(DEC_1 - MIN, "h1", meter=None, amount=3 * MIN, ttl_ms=10 * MIN)
    assert user.usage(DEC_1 - MIN).remaining_ms == 7 * MIN
    user.advance(DEC_1 + MIN)  # December begins with the hold open
    assert user.usage(DEC_1 + MIN).remaining_ms == 10 * MIN, "December's allowance is whole"
    user.capture_hold(DEC_1 + MIN, "h1", 2 * MIN)
    november = [p for p in user.snapshot().periods if p.end_ms == DEC_1]
    assert [p.used_ms for p in november] == [2 * MIN]
    assert user.usage(DEC_1 + MIN).used_ms == 0
    balances_add_up(user, DEC_1 + MIN)


def test_a_minute_hold_shortens_a_running_sessions_end_and_never_takes_its_unbilled_time() -> None:
    user = ledger()
    started = user.start_session(T0, "s1")
    assert started.ends_at_ms == T0 + 10 * MIN
    with pytest.raises(NoCredits):  # 30 s have run since the session's last heartbeat
        user.create_hold(T0 + 30 * SEC, "h1", meter=None, amount=10 * MIN - 29 * SEC, ttl_ms=MIN)
    user.create_hold(T0 + 30 * SEC, "h1", meter=None, amount=4 * MIN, ttl_ms=MIN)
    assert user.current_session(T0 + 30 * SEC).ends_at_ms == T0 + 6 * MIN
    user.release_hold(T0 + 40 * SEC, "h1")
    assert user.current_session(T0 + 40 * SEC).ends_at_ms == T0 + 10 * MIN


def test_holds_are_bounded_per_user() -> None:
    user = UserLedger.new("u1", LedgerPolicy(PLANS, STALE_MS, 0, max_open_holds=2), T0)
    user.create_hold(T0, "h1", meter=None, amount=SEC, ttl_ms=90 * SEC)
    user.create_hold(T0, "h2", meter=None, amount=SEC, ttl_ms=30 * SEC)
    with pytest.raises(TooManyHolds) as refused:
        user.create_hold(T0, "h3", meter=None, amount=SEC, ttl_ms=MIN)
    assert refused.value.fields["retry_after_s"] == 30


def test_many_holds_expiring_together_all_expire_in_one_advance() -> None:
    """(A review found `advance` bounded at 16 alarms, so 17 holds due at once broke the user.)"""
    user = ledger()
    for index in range(60):
        user.create_hold(T0, f"h{index}", meter=None, amount=SEC, ttl_ms=MIN)
    assert user.usage(T0 + 2 * MIN).held_ms == 0
    assert all(
        user.hold(f"h{index}") is None or user.hold(f"h{index}").state == "expired" for index in range(60)
    )  # type: ignore[union-attr]
    balances_add_up(user, T0 + 2 * MIN)


def test_a_hold_made_without_a_limit_is_never_charged_to_a_later_window() -> None:
    """(A review found a hold made on an unlimited day counted against the next day's limit.)"""
    user = ledger("open", now=NOV_11 - 30 * MIN)
    user.create_hold(NOV_11 - 30 * MIN, "h1", meter="g", amount=3, ttl_ms=50 * MIN)
    user.change_plan(NOV_11 + 10 * MIN, PlanEvent("d1", "free", "downgrade", NOV_11 + 10 * MIN))
    meter = user.credits(NOV_11 + 10 * MIN).meters["g"]
    assert (meter.used, meter.held, meter.remaining) == (0, 0, 5)
    user.consume_meter(NOV_11 + 11 * MIN, "g", 5)
    user.capture_hold(NOV_11 + 12 * MIN, "h1")
    assert user.credits(NOV_11 + 12 * MIN).meters["g"].used == 5, "the next day's count is its own"
    balances_add_up(user, NOV_11 + 12 * MIN)


def test_a_hold_made_without_a_limit_counts_once_the_same_window_gets_one() -> None:
    user = ledger("open")
    user.create_hold(T0, "h1", meter="g", amount=3, ttl_ms=50 * MIN)
    user.change_plan(T0 + MIN, PlanEvent("d1", "free", "downgrade", T0 + MIN))
    meter = user.credits(T0 + MIN).meters["g"]
    assert (meter.held, meter.remaining) == (3, 2)
    user.capture_hold(T0 + 2 * MIN, "h1", 1)
    balances_add_up(user, T0 + 2 * MIN)
    assert user.credits(T0 + 2 * MIN).meters["g"].remaining == 4


def test_an_amount_the_api_showed_captures_exactly_that() -> None:
    """A 0.135-minute hold is shown as 0.14 minutes; capturing 0.14 captures the hold."""
    user = ledger()
    hold = user.create_hold(T0, "h1", meter=None, amount=8_100, ttl_ms=MIN)
    assert user.units_of(hold, 0.14) == 8_100
    captured = user.capture_hold(T0, "h1", user.in_units("h1", 0.14))
    assert captured.captured == 8_100
    assert user.repeat(captured, "capture", user.units_of(captured, 0.14)) == captured
    with pytest.raises(InvalidCapture):
        user.units_of(user.create_hold(T0, "h2", meter="g", amount=2, ttl_ms=MIN), 1.5)


def test_a_renewal_in_place_keeps_the_periods_meter_count() -> None:
    """(A review found a renewal that moves the period's end reset a period-window meter.)"""
    start = T0  # the anchored period opens at the change, and the renewal names it
    end = from_datetime(datetime(2026, 12, 10, 12, tzinfo=UTC))
    user = ledger()
    user.change_plan(T0, PlanEvent("d1", "per", "upgrade", T0, period_start_ms=start, period_end_ms=end))
    user.consume_meter(T0 + MIN, "g", 5)
    later_end = from_datetime(datetime(2027, 1, 10, 12, tzinfo=UTC))
    user.change_plan(
        T0 + 2 * MIN,
        PlanEvent("d2", "per", "upgrade", T0 + 2 * MIN, period_start_ms=start, period_end_ms=later_end),
    )
    with pytest.raises(NoCredits):
        user.consume_meter(T0 + 3 * MIN, "g", 1)
    assert user.usage(T0 + 3 * MIN).period_end_ms == later_end
    balances_add_up(user, T0 + 3 * MIN)
