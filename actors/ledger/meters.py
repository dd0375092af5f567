"""Count meters: a use is decided whole against the plan's limit in the meter's window (a UTC day
or the period); windows close in the credit ledger when they pass or their plan changes."""

from __future__ import annotations

from dataclasses import replace

from actors.empty import writable
from actors.errors import MeterNotFound, NoCredits
from actors.ledger.allowance import Allowance
from actors.ledger.state import (
    MeterState,
    meter_key,
)
from actors.periods import PeriodBounds, utc_day
from actors.plans import MeterSpec, Plan
from actors.records import HoldRecord
from actors.views import (
    MeterConsumed,
)


class Meters(Allowance):
    __slots__ = ()

    def consume_meter(self, now_ms: int, meter: str, amount: int) -> MeterConsumed:
        """Use `amount` of a count meter, all of it or (past the limit) none of it."""
        assert amount > 0, "callers validate the amount"
        self.advance(now_ms)
        spec = self._meter_spec(meter)
        window, used = self._meter_window(meter, spec, now_ms)
        self._check_meter(meter, spec, window, used, amount)
        self._bump()
        state = self._open_window(meter, spec, window, now_ms)
        state.used += amount
        if spec.limit is not None:
            self._book.consume(meter_key(meter, window.start_ms), amount, now_ms)
        return MeterConsumed(
            meter=meter,
            remaining=self._meter_available(meter, spec, window, state.used),
            resets_at_ms=window.end_ms,
            version=self.version,
        )

    def _meter_spec(self, meter: str) -> MeterSpec:
        plan = self._current_plan()
        spec = plan.meters.get(meter) if plan is not None else None
        if spec is None:
            raise MeterNotFound(f"the plan has no meter {meter!r}", meter=meter)
        return spec

    def _check_meter(self, meter: str, spec: MeterSpec, window: PeriodBounds, used: int, amount: int) -> None:
        """Refuse `amount` of a meter whole unless it is available (limit less used less held)."""
        available = self._meter_available(meter, spec, window, used)
        if available is not None and amount > available:
            raise NoCredits(
                f"meter {meter!r} allows {spec.limit} per {spec.window}",
                meter=meter,
                remaining=available,
                resets_at_ms=window.end_ms,
            )

    def _meter_available(self, meter: str, spec: MeterSpec, window: PeriodBounds, used: int) -> int | None:
        """What of a meter can still be used or held in `window` (None: it has no limit)."""
        if spec.limit is None:
            return None
        return max(0, spec.limit - used - self._meter_held_in(meter, window))

    def _meter_held_in(self, meter: str, window: PeriodBounds) -> int:
        """What the unresolved holds of a meter hold in `window` (with those made in it while the
        meter had no limit)."""
        untracked = sum(hold.amount for hold in self._holds_without_limit(meter, window))
        return self._meter_held(meter, window.start_ms) + untracked

    def _holds_without_limit(self, meter: str, window: PeriodBounds) -> list[HoldRecord]:
        """The unresolved holds of `meter` made in `window` while the meter had no limit."""
        return [
            hold
            for hold in self._holds.values()
            if hold.meter == meter
            and hold.window_start_ms is None
            and window.start_ms <= hold.created_at_ms < window.end_ms
        ]

    def _open_window(self, meter: str, spec: MeterSpec, window: PeriodBounds, now_ms: int) -> MeterState:
        """The meter's state in `window`, opening the window (and closing the one before) first."""
        state = self._meters.get(meter)
        if state is not None and state.counts_in(window):
            return state
        self._materialize()  # the old window's open uses, while its balance is still known
        if state is not None:
            self._close_window(meter, state, spec, now_ms)
        state = MeterState(window.start_ms, window.end_ms, 0)
        meters = self._meters = writable(self._meters)
        meters[meter] = state
        if spec.limit is not None:
            # (Holds already in a window of this start, one of another kind that a plan change
            # closed this instant, go on holding in this one: its chain of entries goes on.)
            carried = self._meter_held(meter, window.start_ms)
            self._track_holds(meter, window)
            balance = self._meter_balance(meter, state, spec.limit)
            key = meter_key(meter, window.start_ms)
            self._record(key, delta=balance - carried, balance_after=balance, reason="reset", at_ms=now_ms)
        return state

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
            old_balance = self._meter_balance(name, state, old_limit)
            if old_limit is None:
                self._track_holds(name, PeriodBounds(state.window_start_ms, state.window_end_ms))
            new_balance = self._meter_balance(name, state, new_limit)
            key = meter_key(name, state.window_start_ms)
            if old_limit is None or new_balance != old_balance:
                # (A limit again: the window's balance starts afresh, from what it held if anything.)
                self._record(
                    key,
                    delta=new_balance - old_balance,
                    balance_after=new_balance,
                    reason="reset" if old_limit is None else "adjust",
                    at_ms=now_ms,
                )

    def _close_window(self, name: str, state: MeterState, spec: MeterSpec | None, at_ms: int) -> None:
        """End a meter window in the credit ledger: what is left of it (under `spec`, the plan its
        balance was kept by) expires, so its chain of entries ends at 0. A later window under the
        same key (a day and a month can start at the same instant) then starts a chain of its own
        on a balance of 0, and every chain adds up. A closed window is an empty interval."""
        if state.closed:
            return
        balance = self._meter_balance(name, state, spec.limit if spec is not None else None)
        held = self._meter_held(name, state.window_start_ms)
        if balance != held:
            key = meter_key(name, state.window_start_ms)
            self._record(key, delta=held - balance, balance_after=held, reason="adjust", at_ms=at_ms)
        state.window_end_ms = state.window_start_ms

    def _track_holds(self, meter: str, window: PeriodBounds) -> None:
        """Holds of `meter` made in `window` while the meter had no limit: it has one again, so
        they count in the window's balance from now on. (Those of an earlier window never do.)"""
        for hold in self._holds_without_limit(meter, window):
            self._keep_hold(replace(hold, window_start_ms=window.start_ms, version=self.version))
