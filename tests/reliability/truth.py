""" "Nothing lost", defined once: what clients were told, checked against what Postgres holds.

The tests record every acknowledged answer in a `GroundTruth` while they inject
faults, then `assert_nothing_lost` checks, after recovery:

- every acknowledged session start has its row, and every acknowledged end is ended;
- minutes billed per session are at least what the last acknowledged answer
  said minus one sync interval (a crash may forget that much heartbeat time),
  and never more than the acknowledged time plus the time covered by requests
  that got no answer (those may have been applied);
- every acknowledged plan change and purchase is recorded exactly once;
- no duplicate rows; each user's balances equal what the credit ledger derives.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from tests.harness import signed

# Responses show minutes with two decimals: 0.01 min is 600 ms.
ROUNDING_MS = 600


@dataclass
class SessionTruth:
    user_id: str
    session_id: str
    acked_ms: int = 0  # billed time in the last acknowledged answer
    ended: bool = False  # an end (by the client, or reported by a heartbeat) was acknowledged
    unanswered_ms: int = 0  # time since the last answer covered by requests that got none
    last_answer_at: float = field(default_factory=time.monotonic)


@dataclass
class GroundTruth:
    sessions: dict[str, SessionTruth] = field(default_factory=dict)
    plan_changes: dict[str, str] = field(default_factory=dict)  # delivery id -> user
    purchases: dict[str, str] = field(default_factory=dict)  # delivery id -> user
    faults: list[str] = field(default_factory=list)

    def started(self, user_id: str, answer: dict[str, Any]) -> SessionTruth:
        truth = SessionTruth(user_id, answer["session_id"])
        self.sessions[truth.session_id] = truth
        return truth

    def answered(self, session_id: str, answer: dict[str, Any]) -> None:
        """A heartbeat or end was acknowledged with this body."""
        truth = self.sessions[session_id]
        truth.acked_ms = max(truth.acked_ms, round(answer["session_minutes"] * 60_000))
        truth.ended = truth.ended or answer["state"] == "ended"
        truth.unanswered_ms = 0
        truth.last_answer_at = time.monotonic()

    def unanswered(self, session_id: str) -> None:
        """A heartbeat or end got no answer (or an error): it may still have been applied."""
        truth = self.sessions[session_id]
        truth.unanswered_ms = round((time.monotonic() - truth.last_answer_at) * 1000)

    @property
    def users(self) -> set[str]:
        return (
            {s.user_id for s in self.sessions.values()}
            | set(self.plan_changes.values())
            | set(self.purchases.values())
        )


async def assert_nothing_lost(
    database: asyncpg.Connection,
    http: httpx.AsyncClient,
    truth: GroundTruth,
    *,
    sync_interval_s: float,
) -> dict[str, Any]:
    """Check the definition above; return the figures checked (tests print them)."""
    rows = await database.fetch(
        "select id::text as id, user_id, ended_at, used_ms from usage_sessions where id = any($1::uuid[])",
        list(truth.sessions),
    )
    stored = {row["id"]: row for row in rows}
    missing = sorted(set(truth.sessions) - set(stored))
    assert not missing, f"acknowledged starts missing: {missing}"
    sync_ms = round(sync_interval_s * 1000)
    billed_ms = acked_ms = 0
    for session_id, session in truth.sessions.items():
        row = stored[session_id]
        assert row["user_id"] == session.user_id
        if session.ended:
            assert row["ended_at"] is not None, f"acknowledged end lost: {session_id}"
        low = session.acked_ms - sync_ms - ROUNDING_MS
        high = session.acked_ms + session.unanswered_ms + ROUNDING_MS
        assert low <= row["used_ms"] <= high, (
            f"session {session_id}: billed {row['used_ms']} ms, acknowledged {session.acked_ms} ms "
            f"(+{session.unanswered_ms} ms unanswered), allowed [{low}, {high}]"
        )
        billed_ms += row["used_ms"]
        acked_ms += session.acked_ms
    plan_counts = Counter(
        row["delivery_id"]
        for row in await database.fetch(
            "select delivery_id from plan_events where delivery_id = any($1::text[])",
            list(truth.plan_changes),
        )
    )
    assert all(plan_counts[d] == 1 for d in truth.plan_changes), f"plan events not once each: {plan_counts}"
    purchase_counts = Counter(
        row["delivery_id"]
        for row in await database.fetch(
            "select delivery_id from credit_purchases where delivery_id = any($1::text[])",
            list(truth.purchases),
        )
    )
    assert all(purchase_counts[d] == 1 for d in truth.purchases), (
        f"purchases not once each: {purchase_counts}"
    )
    entries = await database.fetch(
        """
        select user_id, reference, count(*) as n from credit_ledger
        where user_id = any($1::text[]) and reference is not null
          and reason in ('purchase', 'grant', 'refund')
        group by user_id, reference having count(*) > 1
        """,
        list(truth.users),
    )
    assert not entries, f"purchases booked twice in the credit ledger: {entries}"
    drifting = []
    for user_id in sorted(truth.users):
        report = await http.get(f"/internal/v1/users/{user_id}/reconcile", headers=signed("")[1])
        assert report.status_code == 200, report.text
        if report.json()["drift_found"]:
            drifting.append(report.json())
    assert not drifting, f"balances differ from the credit ledger: {drifting}"
    return {
        "users": len(truth.users),
        "sessions": len(truth.sessions),
        "ended": sum(s.ended for s in truth.sessions.values()),
        "acknowledged_min": round(acked_ms / 60_000, 2),
        "billed_min": round(billed_ms / 60_000, 2),
        "plan_changes": len(truth.plan_changes),
        "purchases": len(truth.purchases),
        "faults": truth.faults,
    }
