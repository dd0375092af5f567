"""UserLedger: purchased minutes, count meters, billing-anchored periods, the credit ledger."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from actors.credits import CreditKey
from actors.errors import MeterNotFound, NoCredits, UnknownPlan
from actors.ledger import LedgerPolicy, PlanEvent, UserLedger
from actors.periods import add_months
from actors.plans import parse_plans
from actors.records import CreditEntry, LedgerSnapshot, StoredLedger
from actors.times import MS_PER_MINUTE, MS_PER_SECOND, from_datetime

PLANS = parse_plans(
    """
    default_plan = "free"
    [plans.free]
    minutes = 10
    [plans.free.meters.generations]
    limit = 5
    window = "day"
    [plans.free.meters.exports]
    limit = 2
    window = "period"
    [plans.basic]
    minutes = 100
    [plans.basic.meters.generations]
    limit = 50
    window = "day"
    [plans.pro]
    minutes = 500
    [plans.pro.meters.generations]
    limit = "unlimited"
    window = "day"
    """,
    source="credits test",
)
POLICY = LedgerPolicy(plans=PLANS, stale_session_ms=10 * MS_PER_MINUTE, low_balance_ms=5 * MS_PER_MINUTE)
MIN = MS_PER_MINUTE
SEC = MS_PER_SECOND
T0 = from_datetime(datetime(2026, 11, 30, 23, 30, tzinfo=UTC))
DEC_1 = from_datetime(datetime(2026, 12, 1, tzinfo=UTC))


def ms(*args: int) -> int:
    return from_datetime(datetime(*args, tzinfo=UTC))  # type: ignore[misc]


class Ledgered:
    """A ledger whose snapshots are absorbed as a store would keep them (to check the credit ledger)."""

    def __init__(self, ledger: UserLedger, now: int) -> None:
        self.ledger = ledger
        self.now = now
        self.entries: dict[int, CreditEntry] = {}

    def sync(self) -> LedgerSnapshot:
        snapshot = self.ledger.snapshot()
        for entry in snapshot.entries:
            self.entries.setdefault(entry.seq, entry)
        self.ledger.mark_synced(snapshot.version)
        return snapshot

    def sums(self) -> dict[CreditKey, int]:
        totals: dict[CreditKey, int] = defaultdict(int)
        for entry in self.entries.values():
            totals[(entry.bucket, entry.window_start_ms)] += entry.delta
        return dict(totals)

    def assert_balances_add_up(self, now: int | None = None) -> None:
        """At `now` (default: the last instant the test told the ledger about)."""
        self.now = now if now is not None else self.now
        self.sync()
        sums = self.sums()
        for key, live in self.ledger.balances(self.now).items():
            assert sums.get(key, 0) == live, (key, sums.get(key), live)
        chains: dict[CreditKey, list[CreditEntry]] = defaultdict(list)
        for entry in sorted(self.entries.values(), key=lambda e: e.seq):
            chains[(entry.bucket, entry.window_start_ms)].append(entry)
        for chain in chains.values():
            running = 0
            for entry in chain:
                running += entry.delta
                assert entry.balance_after == running, entry
        assert sorted(self.entries) == list(range(1, len(self.entries) + 1)), "sequence numbers have no gaps"


def new(now: int = T0, plan: str | None = None) -> Ledgered:
    return Ledgered(UserLedger.new("u1", POLICY, now, plan=plan), now)


class TestTwoBuckets:
    def test_ten_monthly_and_five_purchased_minutes_run_a_twelve_minute_session(self) -> None:
        """Issue 3, first "done means": 10 from the allowance, 2 from purchases, 3 carry over."""
        book = new(ms(2026, 11, 30, 23, 40))
        ledger = book.ledger
        start = ms(2026, 11, 30, 23, 40)
        ledger.add_credits(start, 5 * MIN, reason="purchase", reference="order-1")
        started = ledger.start_session(start, "s1")
        assert started.remaining_ms == 15 * MIN
        assert started.ends_at_ms == start + 15 * MIN, "ends_at counts purchased minutes too"
        for minute in range(1, 13):
            ledger.heartbeat(start + minute * MIN, "s1")
            if minute == 6:
                book.sync()  # a flush in the middle of the session
        ended = ledger.end_session(start + 12 * MIN, "s1")
        assert ended.session_used_ms == 12 * MIN
        book.sync()
        consumed = defaultdict(int)
        for entry in book.entries.values():
            if entry.reason == "consume":
                consumed[entry.bucket] += -entry.delta
        assert dict(consumed) == {"monthly": 10 * MIN, "purchased": 2 * MIN}
        usage = ledger.usage(start + 12 * MIN)
        assert (usage.used_ms, usage.purchased_ms, usage.remaining_ms) == (12 * MIN, 3 * MIN, 3 * MIN)
        assert usage.warning == "low_balance"
        december = ledger.usage(DEC_1 + MIN)
        assert (december.limit_ms, december.allowance_remaining_ms, december.purchased_ms) == (
            10 * MIN,
            10 * MIN,
            3 * MIN,
        )
        assert december.used_ms == 0
        book.assert_balances_add_up(DEC_1 + MIN)

    def test_session_ends_when_both_buckets_are_empty(self) -> None:
        book = new()
        ledger = book.ledger
        ledger.add_credits(T0, 2 * MIN, reason="grant", reference=None)
        ledger.start_session(T0, "s1")
        for minute in range(1, 13):
            ledger.heartbeat(T0 + minute * MIN, "s1")
        record = ledger.ended_session("s1")
        assert record is not None and record.end_reason == "limit_reached"
        assert record.ended_at_ms == T0 + 12 * MIN
        assert ledger.remaining_ms == 0
        book.assert_balances_add_up(T0 + 12 * MIN)

    def test_purchase_during_a_session_moves_the_limit_alarm(self) -> None:
        ledger = new().ledger
        ledger.start_session(T0, "s1")
        assert ledger.next_deadline_ms() == T0 + 10 * MIN
        ledger.add_credits(T0 + MIN, 5 * MIN, reason="purchase", reference=None)
        assert (
            ledger.next_deadline_ms() == T0 + 10 * MIN
        )  # stale (last heartbeat T0 + 10 min) now comes first
        ledger.heartbeat(T0 + 9 * MIN, "s1")
        assert ledger.next_deadline_ms() == T0 + 15 * MIN

    def test_session_across_the_boundary_uses_purchased_minutes_of_either_side(self) -> None:
        book = new(DEC_1 - 20 * MIN)
        ledger = book.ledger
        ledger.add_credits(DEC_1 - 20 * MIN, 4 * MIN, reason="purchase", reference=None)
        ledger.start_session(DEC_1 - 12 * MIN, "s1")
        ledger.heartbeat(DEC_1 - 4 * MIN, "s1")  # 8 minutes: all from November's allowance
        ledger.heartbeat(DEC_1 + 2 * MIN, "s1")  # 4 before midnight (2 allowance + 2 purchased), 2 after
        november = next(p for p in ledger.snapshot().periods if p.end_ms == DEC_1)
        assert (november.used_ms, november.purchased_used_ms) == (10 * MIN, 2 * MIN)
        usage = ledger.usage(DEC_1 + 2 * MIN)
        assert (usage.used_ms, usage.purchased_ms) == (2 * MIN, 2 * MIN)
        book.assert_balances_add_up(DEC_1 + 2 * MIN)


class TestMeters:
    def test_five_a_day_allows_five_then_refuses_until_tomorrow(self) -> None:
        book = new()
        ledger = book.ledger
        for n in range(5):
            result = ledger.consume_meter(T0, "generations", 1)
            assert result.remaining == 4 - n
        version = ledger.version
        with pytest.raises(NoCredits) as refused:
            ledger.consume_meter(T0, "generations", 1)
        assert refused.value.fields["resets_at_ms"] == DEC_1
        assert ledger.version == version
        tomorrow = ledger.consume_meter(DEC_1 + SEC, "generations", 2)
        assert (tomorrow.remaining, tomorrow.resets_at_ms) == (3, DEC_1 + 86_400_000)
        book.assert_balances_add_up(DEC_1 + SEC)

    def test_a_use_past_the_limit_is_refused_whole(self) -> None:
        ledger = new().ledger
        ledger.consume_meter(T0, "generations", 4)
        with pytest.raises(NoCredits):
            ledger.consume_meter(T0, "generations", 2)
        assert ledger.credits(T0).meters["generations"].used == 4

    def test_period_window_meter_resets_with_the_period(self) -> None:
        ledger = new().ledger
        ledger.consume_meter(T0, "exports", 2)
        with pytest.raises(NoCredits):
            ledger.consume_meter(T0, "exports", 1)
        assert ledger.consume_meter(DEC_1, "exports", 1).remaining == 1

    def test_unknown_meter_is_not_found(self) -> None:
        with pytest.raises(MeterNotFound):
            new().ledger.consume_meter(T0, "videos", 1)

    def test_credits_view_lists_every_meter_of_the_plan(self) -> None:
        ledger = new().ledger
        ledger.consume_meter(T0, "generations", 2)
        view = ledger.credits(T0)
        assert view.meters["generations"].used == 2 and view.meters["generations"].remaining == 3
        assert view.meters["exports"].used == 0 and view.meters["exports"].resets_at_ms == DEC_1

    def test_plan_change_adjusts_the_meter_balance(self) -> None:
        book = new()
        ledger = book.ledger
        ledger.consume_meter(T0, "generations", 4)
        ledger.change_plan(T0, PlanEvent(plan="basic", action="upgrade", occurred_at_ms=T0, delivery_id="d1"))
        assert ledger.consume_meter(T0, "generations", 10).remaining == 36
        ledger.change_plan(
            T0, PlanEvent(plan="pro", action="upgrade", occurred_at_ms=T0 + 1, delivery_id="d2")
        )
        assert ledger.consume_meter(T0, "generations", 1000).remaining is None
        ledger.change_plan(
            T0, PlanEvent(plan="free", action="downgrade", occurred_at_ms=T0 + 2, delivery_id="d3")
        )
        with pytest.raises(NoCredits):
            ledger.consume_meter(T0, "generations", 1)
        book.assert_balances_add_up(T0)


class TestAnchoredPeriods:
    def test_subscription_period_becomes_the_users_period(self) -> None:
        book = new(ms(2026, 11, 10))
        ledger = book.ledger
        start, end = ms(2026, 11, 15, 9), ms(2026, 12, 15, 9)
        ledger.start_session(ms(2026, 11, 15, 10), "s1")
        ledger.end_session(ms(2026, 11, 15, 10, 3), "s1")
        change = PlanEvent(
            "d1", "basic", "upgrade", ms(2026, 11, 16), period_start_ms=start, period_end_ms=end
        )
        assert ledger.change_plan(ms(2026, 11, 16), change)
        usage = ledger.usage(ms(2026, 11, 16))
        # The anchored period opens when the change arrives and ends with the subscription's period.
        assert (usage.period_start_ms, usage.period_end_ms) == (ms(2026, 11, 16), end)
        assert (usage.limit_ms, usage.used_ms) == (100 * MIN, 0)
        archived = [p for p in ledger.snapshot().periods if p.archived]
        assert [(p.start_ms, p.end_ms, p.used_ms) for p in archived] == [
            (ms(2026, 11, 1), ms(2026, 11, 16), 3 * MIN)
        ]
        nxt = ledger.usage(end + SEC)
        assert (nxt.period_start_ms, nxt.period_end_ms) == (end, ms(2027, 1, 15, 9))
        book.assert_balances_add_up(end + SEC)

    def test_anchor_on_the_31st_renews_on_month_ends(self) -> None:
        ledger = new(ms(2027, 1, 31, 12)).ledger
        start = ms(2027, 1, 31)
        change = PlanEvent(
            "d1",
            "basic",
            "upgrade",
            ms(2027, 1, 31, 12),
            period_start_ms=start,
            period_end_ms=add_months(start, 1),
        )
        ledger.change_plan(ms(2027, 1, 31, 12), change)
        ends = []
        now = ms(2027, 1, 31, 12)
        for _ in range(4):
            end = ledger.usage(now).period_end_ms
            ends.append(datetime.fromtimestamp(end / 1000, tz=UTC).date().isoformat())
            now = end
        assert ends == ["2027-02-28", "2027-03-31", "2027-04-30", "2027-05-31"]

    def test_switch_during_a_session_splits_it_at_the_change(self) -> None:
        book = new(ms(2026, 11, 10), plan="basic")
        ledger = book.ledger
        ledger.start_session(ms(2026, 11, 20, 12), "s1")
        ledger.heartbeat(ms(2026, 11, 20, 12, 5), "s1")
        change_at = ms(2026, 11, 20, 12, 7)
        change = PlanEvent(
            "d1",
            "pro",
            "upgrade",
            change_at,
            period_start_ms=ms(2026, 11, 20),
            period_end_ms=ms(2026, 12, 20),
        )
        ledger.change_plan(change_at, change)
        ledger.heartbeat(ms(2026, 11, 20, 12, 10), "s1")
        periods = {p.start_ms: p for p in ledger.snapshot().periods}
        assert periods[ms(2026, 11, 1)].used_ms == 7 * MIN  # until the change
        assert periods[change_at].used_ms == 3 * MIN  # after it, in the period the change opened
        book.assert_balances_add_up(ms(2026, 11, 20, 12, 10))

    def test_subscription_period_shorter_than_twice_the_stale_timeout_is_refused(self) -> None:
        ledger = new().ledger
        change = PlanEvent(
            plan="pro",
            action="upgrade",
            occurred_at_ms=T0,
            delivery_id="d1",
            period_start_ms=T0,
            period_end_ms=T0 + 15 * MIN,
        )
        with pytest.raises(UnknownPlan, match="too short"):
            ledger.change_plan(T0, change)
        assert ledger.version == 0

    def test_restore_keeps_anchor_purchases_meters_and_sequence(self) -> None:
        book = new(ms(2026, 11, 10))
        ledger = book.ledger
        ledger.add_credits(ms(2026, 11, 10), 7 * MIN, reason="purchase", reference="r")
        ledger.consume_meter(ms(2026, 11, 10), "generations", 2)
        weekly = PlanEvent(
            "d1",
            "basic",
            "upgrade",
            ms(2026, 11, 10),
            period_start_ms=ms(2026, 11, 9),
            period_end_ms=ms(2026, 11, 16),
        )
        ledger.change_plan(ms(2026, 11, 10), weekly)
        snapshot = book.sync()
        twin = UserLedger.restore(
            StoredLedger(
                user=snapshot.user,
                periods=tuple(p for p in snapshot.periods if not p.archived),
                open_session=None,
                meters=snapshot.meters,
            ),
            POLICY,
            ms(2026, 11, 10),
        )
        later = ms(2026, 11, 17)
        assert replace(twin.usage(later), version=0) == replace(ledger.usage(later), version=0)
        assert replace(twin.credits(later), version=0) == replace(ledger.credits(later), version=0)
        assert twin.version > ledger.version
        twin.add_credits(later, MIN, reason="grant", reference=None)
        assert twin.snapshot().entries[-1].seq == snapshot.user.next_entry_seq + 1  # after the week's reset
