"""Threshold events: `low_balance` and `exhausted` once per crossing, `plan_changed`, `period_rolled`;
kept for live streams and written with the ledger (the outbox). See `actors.ledger`."""

from __future__ import annotations

from actors.ledger.state import (
    ALERT_EVENTS,
    RECENT_EVENTS_KEPT,
    LedgerState,
    PeriodState,
)
from actors.records import (
    EventKind,
    LedgerEvent,
    PlanAction,
)


class Alerts(LedgerState):
    __slots__ = ()

    def _note_balance(self, at_ms: int) -> None:
        """After a change to the balance: announce each alert level it fell to that is armed
        (once per crossing, `low_balance` before `exhausted`), and re-arm the levels it rose above."""
        level = self._level()
        for crossed in range(self._alert + 1, level + 1):
            self._emit(ALERT_EVENTS[crossed], at_ms)
        self._alert = level

    def _emit_period_rolled(self, previous: PeriodState, at_ms: int) -> None:
        self._emit(
            "period_rolled",
            at_ms,
            previous_period_start_ms=previous.start_ms,
            previous_period_end_ms=previous.end_ms,
            previous_used_ms=previous.total_used_ms,
        )

    def _emit(
        self,
        kind: EventKind,
        at_ms: int,
        *,
        previous_plan: str | None = None,
        action: PlanAction | None = None,
        previous_period_start_ms: int | None = None,
        previous_period_end_ms: int | None = None,
        previous_used_ms: int | None = None,
    ) -> None:
        """Record an event of this version; it is written with the ledger's next write."""
        assert all((e.version, e.kind) != (self.version, kind) for e in self._events), "one per version"
        period = self._period
        event = LedgerEvent(
            user_id=self.user_id,
            kind=kind,
            version=self.version,
            occurred_at_ms=at_ms,
            plan=period.plan,
            period_start_ms=period.start_ms,
            period_end_ms=period.end_ms,
            limit_ms=period.limit_ms,
            used_ms=period.total_used_ms,
            remaining_ms=self.remaining_ms,
            previous_plan=previous_plan,
            action=action,
            previous_period_start_ms=previous_period_start_ms,
            previous_period_end_ms=previous_period_end_ms,
            previous_used_ms=previous_used_ms,
        )
        events = (*self._events, event)
        # Forget the oldest durable events past the bound; an unwritten one is never dropped.
        durable = sum(1 for e in events if e.version <= self.synced_version)
        self._events = events[min(durable, max(0, len(events) - RECENT_EVENTS_KEPT)) :]
