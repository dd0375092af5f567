"""What the ledger and shard unit tests share: plans, a policy, instants, a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime

from actors.ledger import LedgerPolicy
from actors.plans import parse_plans
from actors.times import MS_PER_MINUTE, MS_PER_SECOND, from_datetime

PLANS = parse_plans(
    """
    default_plan = "free"
    [plans.free]
    minutes = 10
    [plans.basic]
    minutes = 100
    [plans.pro]
    minutes = 500
    [plans.tiny]
    minutes = 0.1
    """,
    source="unit tests",
)
STALE_MS = 10 * MS_PER_MINUTE
POLICY = LedgerPolicy(plans=PLANS, stale_session_ms=STALE_MS, low_balance_ms=5 * MS_PER_MINUTE)
T0 = from_datetime(datetime(2026, 11, 10, 12, 0, tzinfo=UTC))
DEC_1 = from_datetime(datetime(2026, 12, 1, tzinfo=UTC))
SEC = MS_PER_SECOND
MIN = MS_PER_MINUTE


class FakeClock:
    """A clock the test moves by hand (epoch milliseconds)."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now
