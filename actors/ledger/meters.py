"""Count meters: a use is decided whole against the plan's limit in the meter's window (a UTC day
or the period); windows close in the credit ledger when they pass or their plan changes."""

from __future__ import annotations

from actors.empty import writable
from actors.errors import MeterNotFound, NoCredits
from actors.ledger.allowance import Allowance
from actors.ledger.state import (
    MeterState,
    meter_key,
)
from actors.periods import PeriodBounds, utc_day
from actors.plans import MeterSpec, Plan
from actors.views import (
    MeterConsumed,
)


class Meters(Allowance):
    __slots__ = ()

    def consume_meter(self, now_ms: int, meter: str, amount: int) -> MeterConsumed:
        """Use `amount` of a count meter, all of it or (past the limit) none of it."""
        assert amount > 0, "callers validate the amount"
        self.advance(now_ms)
        plan = self._current_plan()
        spec = plan.meters.get(meter) if plan is not None else None
        if spec is None:
            raise MeterNotFound(f"the plan has no meter {meter!r}", meter=meter)
        window, used = self._meter_window(meter, spec, now_ms)
        if spec.limit is not None and used + amount > spec.limit:
            raise NoCredits(
                f"meter {meter!r} allows {spec.limit} per {spec.window}",
                meter=meter,
                remaining=max(0, spec.limit - used),
                resets_at_ms=window.end_ms,
            )
        self._bump()
        state = self._meters.get(meter)
        if state is None or not state.counts_in(window):
            self._materialize()  # the old window's open uses, while its balance is still known
            if state is not None:
                self._close_window(meter, state, spec, now_ms)
            state = MeterState(window.start_ms, window.end_ms, 0)
            meters = self._meters = writable(self._meters)
            meters[meter] = state
            if spec.limit is not None:
                key = meter_key(meter, window.start_ms)
                self._record(key, delta=spec.limit, balance_after=spec.limit, reason="reset", at_ms=now_ms)
        state.used += amount
        if spec.limit is not None:
            self._book.consume(meter_key(meter, window.start_ms), amount, now_ms)
        return MeterConsumed(
            meter=meter,
            remaining=None if spec.limit is None else spec.limit - state.used,
            resets_at_ms=window.end_ms,
            version=self.version,
        )

    def _meter_window(self, meter: str, spec: MeterSpec, now_ms: int) -> tuple[PeriodBounds, int]:
        """The meter's current window and the uses counted in it."""
        window = utc_day(now_ms) if spec.window == "day" else self.period
        state = self._meters.get(meter)
        used = state.used if state is not None and state.counts_in(window) else 0
        return window, used

    def _adjust_meters(self, now_ms: int, old_plan: Plan | None, target: Plan) -> None:
        """Keep each meter's credit-ledger balance in its current window right when its limit changes.

        A window that has passed, or whose kind changes (a day for a period, or back), is closed
        instead (`_close_window`): the next use opens a window of the new plan afresh. So the
        balance of a meter window not closed is always `limit - used` under the current plan."""
        for name, state in self._meters.items():
            if state.closed:
                continue
            old_spec = old_plan.meters.get(name) if old_plan is not None else None
            new_spec = target.meters.get(name)
            kind_changes = (
                old_spec is not None and new_spec is not None and old_spec.window != new_spec.window
            )
            if now_ms >= state.window_end_ms or kind_changes:
                self._close_window(name, state, old_spec, now_ms)
                continue
            old_limit = old_spec.limit if old_spec is not None else None
            new_limit = new_spec.limit if new_spec is not None else None
            if old_limit == new_limit:
                continue
            key = meter_key(name, state.window_start_ms)
            old_balance = max(0, old_limit - state.used) if old_limit is not None else None
            new_balance = max(0, new_limit - state.used) if new_limit is not None else None
            if old_balance is None and new_balance is not None:
                self._record(key, delta=new_balance, balance_after=new_balance, reason="reset", at_ms=now_ms)
            elif old_balance is not None:
                after = new_balance if new_balance is not None else 0
                if after != old_balance:
                    self._record(
                        key, delta=after - old_balance, balance_after=after, reason="adjust", at_ms=now_ms
                    )

    def _close_window(self, name: str, state: MeterState, spec: MeterSpec | None, at_ms: int) -> None:
        """End a meter window in the credit ledger: what is left of it (under `spec`, the plan its
        balance was kept by) expires, so its chain of entries ends at 0. A later window under the
        same key (a day and a month can start at the same instant) then starts a chain of its own
        on a balance of 0, and every chain adds up. A closed window is an empty interval."""
        if state.closed:
            return
        balance = max(0, spec.limit - state.used) if spec is not None and spec.limit is not None else 0
        if balance:
            key = meter_key(name, state.window_start_ms)
            self._record(key, delta=-balance, balance_after=0, reason="adjust", at_ms=at_ms)
        state.window_end_ms = state.window_start_ms
