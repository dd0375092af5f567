"""Holds: an amount of a count meter or of minutes reserved now, for work whose cost is known only
afterwards, then resolved exactly once (API.md, *Holds*; the semantics of TigerBeetle's two-phase
transfers: pending, then post, void or timeout).

- **Made** only from what is available (limit - used - held, as everywhere an amount is checked),
  and only up to `LedgerPolicy.max_open_holds` unresolved at once. A minute hold draws on the
  period's allowance first, then purchased minutes (as session time does), and never on the time a
  running session has used since its last heartbeat. A meter hold holds in the meter's window.
- **Resolved once**: captured (whole or part; the rest freed at once), released, or expired at
  `expires_at_ms` (the *expire* alarm: `advance` fires it before any later operation, so a capture
  after the deadline finds the hold expired). What a capture bills goes where the hold was made:
  the period (even once it ended) or the meter window (even once it passed), as a `consume` entry
  of the credit ledger referenced by the hold's `reference` or id.
- **Repeatable**: resolving a hold again the same way (the same capture, a second release) answers
  the resolved hold again; any other resolution is `HoldResolved`.

A session's held tail (`allowance`) is resolved by the same code (`_resolve_draws`); it stays a
tail of its session rather than a hold record, because what captures and releases it is the
session's own life (a heartbeat or end, its stale deadline) and its account is the session's row.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from actors.errors import HoldNotFound, HoldResolved, InvalidCapture, NoCredits, TooManyHolds
from actors.ledger.meters import Meters
from actors.records import HoldRecord
from actors.times import minutes_to_ms, to_minutes

HoldVerb = Literal["capture", "release", "extend"]


class Holds(Meters):
    __slots__ = ()

    def create_hold(
        self,
        now_ms: int,
        hold_id: str,
        *,
        meter: str | None,
        amount: int,
        ttl_ms: int,
        reference: str | None = None,
    ) -> HoldRecord:
        """Hold `amount` of `meter` (None: `amount` ms of minutes) until `now_ms + ttl_ms`."""
        assert amount > 0 and ttl_ms > 0, "callers validate the amount and the ttl"
        self.advance(now_ms)
        assert self.hold(hold_id) is None, "hold ids are never reused"
        if len(self._holds) >= self._policy.max_open_holds:
            soonest = min(hold.expires_at_ms for hold in self._holds.values())
            raise TooManyHolds(
                f"at most {self._policy.max_open_holds} holds may be unresolved at once",
                retry_after_s=max(1, math.ceil((soonest - now_ms) / 1000)),
            )
        record = HoldRecord(
            hold_id=hold_id,
            user_id=self.user_id,
            meter=meter,
            amount=amount,
            state="held",
            reference=reference,
            created_at_ms=now_ms,
            expires_at_ms=now_ms + ttl_ms,
            version=self.version + 1,
        )
        if meter is None:
            available = self.remaining_ms - self._running_unbilled_ms(now_ms)
            if amount > available:
                raise NoCredits(
                    "not that many minutes are available",
                    remaining_ms=max(0, available),
                    period_end_ms=self._period.end_ms,
                )
            self._bump()
            draws: list[tuple[int, int, int]] = []
            self._take(self._period, amount, now_ms, draws)
            record = replace(record, draws=tuple(draws))
        else:
            spec = self._meter_spec(meter)
            window, used = self._meter_window(meter, spec, now_ms)
            self._check_meter(meter, spec, window, used, amount)
            self._bump()
            self._open_window(meter, spec, window, now_ms)
            if spec.limit is not None:
                record = replace(record, window_start_ms=window.start_ms)
        self._keep_hold(record)
        self._note_balance(now_ms)
        return record

    def capture_hold(self, now_ms: int, hold_id: str, amount: int | None = None) -> HoldRecord:
        """Bill `amount` of the hold (None: all of it) and free the rest, at once."""
        self.advance(now_ms)
        hold = self._held(hold_id, "capture", amount)
        if not hold.is_held:
            return hold
        if amount is not None and amount > hold.amount:
            raise InvalidCapture(
                f"the hold holds {hold.amount}; {amount} cannot be captured", hold_id=hold_id
            )
        self._bump()
        captured = self._resolve_hold(hold_id, hold.amount if amount is None else amount, "captured", now_ms)
        self._note_balance(now_ms)
        return captured

    def release_hold(self, now_ms: int, hold_id: str) -> HoldRecord:
        """Free all of the hold."""
        self.advance(now_ms)
        hold = self._held(hold_id, "release", None)
        if not hold.is_held:
            return hold
        self._bump()
        released = self._resolve_hold(hold_id, 0, "released", now_ms)
        self._note_balance(now_ms)
        return released

    def extend_hold(self, now_ms: int, hold_id: str, ttl_ms: int) -> HoldRecord:
        """The hold now expires `ttl_ms` from now."""
        assert ttl_ms > 0, "callers validate the ttl"
        self.advance(now_ms)
        hold = self._held(hold_id, "extend", None)
        self._bump()
        extended = replace(hold, expires_at_ms=now_ms + ttl_ms, version=self.version)
        self._keep_hold(extended)
        return extended

    def get_hold(self, now_ms: int, hold_id: str) -> HoldRecord:
        self.advance(now_ms)
        hold = self.hold(hold_id)
        if hold is None:
            raise HoldNotFound("no such hold", hold_id=hold_id)
        return hold

    def list_holds(self, now_ms: int) -> list[HoldRecord]:
        """The unresolved holds, oldest first."""
        self.advance(now_ms)
        return self.open_holds()

    def in_units(self, hold_id: str, amount: float | None) -> int | None:
        """An amount of a resident hold as the API gives it (meter units, or minutes), in the
        hold's own unit (meter units, or ms)."""
        hold = self.hold(hold_id)
        if hold is None:
            raise HoldNotFound("no such hold", hold_id=hold_id)
        return self.units_of(hold, amount)

    @staticmethod
    def units_of(hold: HoldRecord, amount: float | None) -> int | None:
        if amount is None:
            return None
        if hold.meter is None:
            # The API shows minutes to two decimals: an amount it showed (the hold's, or what was
            # captured) means that amount exactly.
            for exact in (hold.amount, hold.captured):
                if exact and amount == to_minutes(exact):
                    return exact
            return minutes_to_ms(amount)
        if amount != int(amount):
            raise InvalidCapture(
                f"meter {hold.meter!r} counts whole units; {amount} is not one", hold_id=hold.hold_id
            )
        return int(amount)

    @staticmethod
    def repeat(hold: HoldRecord, verb: HoldVerb, amount: int | None) -> HoldRecord:
        """The answer to `verb` on a resolved hold: the hold again if it was resolved that way
        (the same capture, or a release), else `HoldResolved`."""
        assert not hold.is_held
        if verb == "capture":
            same = hold.state == "captured" and hold.captured == (hold.amount if amount is None else amount)
        else:
            same = verb == "release" and hold.state == "released"
        if not same:
            raise HoldResolved(f"the hold is already {hold.state}", hold_id=hold.hold_id, state=hold.state)
        return hold

    def _held(self, hold_id: str, verb: HoldVerb, amount: int | None) -> HoldRecord:
        """The hold `verb` acts on: unresolved, or resolved and answered again (`repeat`)."""
        hold = self.hold(hold_id)
        if hold is None:
            raise HoldNotFound("no such hold", hold_id=hold_id)
        return hold if hold.is_held else self.repeat(hold, verb, amount)

    def _running_unbilled_ms(self, now_ms: int) -> int:
        """The time the running session has used since its last heartbeat (not held, not billed):
        a hold never takes it, so the session's limit never falls before now."""
        session = self._session
        return max(0, now_ms - session.last_heartbeat_at_ms) if session is not None else 0
