"""The webhook body of each event kind, and the delivery backoff."""

from __future__ import annotations

import pytest

from actors.ledger import PlanEvent, UserLedger
from gateway.events import retry_delay_s
from persistence.events import event_payload
from tests.unit.actors.support import DEC_1, MIN, POLICY, T0


def test_a_period_rolled_body_names_the_period_it_closed() -> None:
    user = UserLedger.new("alice", POLICY, T0)
    user.start_session(T0, "s1")
    user.end_session(T0 + 90_000, "s1")
    user.advance(DEC_1 + 1)
    (event,) = user.events_after(user.version - 1)
    body = event_payload(event)
    assert body == {
        "id": event.event_id,
        "type": "period_rolled",
        "timestamp": "2026-12-01T00:00:00Z",
        "data": {
            "user_id": "alice",
            "version": event.version,
            "plan": "free",
            "period_start": "2026-12-01T00:00:00Z",
            "period_end": "2027-01-01T00:00:00Z",
            "minutes_limit": 10.0,
            "minutes_used": 0.0,
            "minutes_remaining": 10.0,
            "previous_period": {
                "period_start": "2026-11-01T00:00:00Z",
                "period_end": "2026-12-01T00:00:00Z",
                "minutes_used": 1.5,
            },
        },
    }


def test_a_plan_changed_body_says_what_it_replaced_and_how() -> None:
    user = UserLedger.new("alice", POLICY, T0)
    user.change_plan(T0, PlanEvent(plan="free", action="cancel", occurred_at_ms=T0, delivery_id="d"))
    user.change_plan(
        T0 + MIN, PlanEvent(plan="pro", action="upgrade", occurred_at_ms=T0 + MIN, delivery_id="d")
    )
    body = event_payload(user.events_after(0)[-1])
    assert body["type"] == "plan_changed"
    assert (body["data"]["previous_plan"], body["data"]["plan"], body["data"]["action"]) == (
        "free",
        "pro",
        "upgrade",
    )
    assert body["timestamp"] == "2026-11-10T12:01:00Z"
    assert "previous_period" not in body["data"]


@pytest.mark.parametrize(
    ("attempts", "low", "high"), [(1, 0.8, 1.2), (2, 1.6, 2.4), (4, 6.4, 9.6), (9, 8, 12), (500, 8, 12)]
)
def test_retries_double_from_a_second_up_to_the_cap_with_jitter(
    attempts: int, low: float, high: float
) -> None:
    for _ in range(50):
        assert low <= retry_delay_s(attempts, retry_max_s=10) <= high
