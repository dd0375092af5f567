"""`LiveHold`: a hold that stays alive while the work runs and is never left behind.

    async with client.hold(meter="tokens", amount=4000, ttl_s=120) as hold:
        used = await do_the_work()
        await hold.capture(used)

- On entry it creates the hold (`NoCredits`, `MeterNotFound`, `TooManyHolds` are raised there).
  `client.hold(minutes=2.5, ttl_s=60)` holds minutes instead; then `capture` takes minutes.
- While the body runs, a background task extends the hold every `ttl_s / 2` seconds, by `ttl_s`
  (sooner again after a failed try), so a body that runs past its TTL keeps it. It stops when
  the hold is resolved, and is cancelled on the way out.
- `await hold.capture(amount)` captures that much (`None`: all of it); the rest goes back at once.
  The same capture again returns the same hold without asking the server; a different one, or a
  hold that expired or was resolved under it, raises `HoldResolved` (its `state` says how).
  `await hold.release()` gives it all back.
- On the way out, if the body neither captured nor released it, the hold is released: whether
  the body raised (its exception is what propagates), was cancelled, or just ended. It never
  captures what it was not told to. One exception: a `capture()` whose answer was lost
  (`Unavailable`, after every retry) is tried again, with the same key, instead of a release:
  the work was done. A hold that had expired meanwhile has nothing to release (no error).
- Every POST carries an `Idempotency-Key` made once per logical call (uuid4) and kept across the
  client's retries (503, 429 `rate_limited`, no answer: backoff, up to `max_attempts` tries), so
  a retried create makes one hold and a retried capture bills once.
- `hold.hold_id`, `hold.expires_at` and `hold.state` are as the server last answered
  (`hold.current` is that whole `Hold`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from types import TracebackType
from typing import TYPE_CHECKING

from usage_ledger_client.errors import HoldNotFound, HoldResolved, LedgerError, Unavailable
from usage_ledger_client.models import Hold, HoldState

if TYPE_CHECKING:
    from datetime import datetime

    from usage_ledger_client.client import LedgerClient

log = logging.getLogger("usage_ledger_client")

# After a failed extension the next try comes sooner than half the TTL, but never closer than this.
MIN_EXTEND_S = 0.25


class LiveHold:
    """One hold, extended in the background while the `async with` body runs, released on the way
    out unless the body captured (or released) it. See the module's docstring for every promise."""

    def __init__(
        self,
        client: LedgerClient,
        *,
        meter: str | None,
        amount: int | None,
        minutes: float | None,
        ttl_s: int,
        reference: str | None,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1")
        self._client = client
        self._meter = meter
        self._amount = amount
        self._minutes = minutes
        self._ttl_s = ttl_s
        self._reference = reference
        self.current: Hold | None = None  # the server's newest answer about the hold
        self._resolved_by: tuple[str, float | None, Hold] | None = None  # ("capture", amount, answer)
        self._lost_capture: tuple[float | None, str] | None = None  # (amount, key) of an unanswered one
        self._gone = False  # the server said it was resolved, not by this object (expired, most likely)
        self._extender: asyncio.Task[None] | None = None

    @property
    def hold_id(self) -> str:
        return self._hold.hold_id

    @property
    def expires_at(self) -> datetime:
        return self._hold.expires_at

    @property
    def state(self) -> HoldState:
        return self._hold.state

    @property
    def _hold(self) -> Hold:
        assert self.current is not None, "the hold is made when the `async with` is entered"
        return self.current

    async def __aenter__(self) -> LiveHold:
        self.current = await self._client.create_hold(
            meter=self._meter,
            amount=self._amount,
            minutes=self._minutes,
            ttl_s=self._ttl_s,
            reference=self._reference,
            idempotency_key=uuid.uuid4().hex,
        )
        self._extender = asyncio.create_task(self._extend(), name=f"hold-extender-{self.hold_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop_extending()
        if self._resolved_by is not None or self._gone:
            return
        try:
            if self._lost_capture is not None:  # it was told to capture: that, not a release
                await self.capture(self._lost_capture[0])
            else:
                await self.release()
        except HoldResolved:  # it expired (or was resolved elsewhere): nothing left to give back
            pass
        except LedgerError as failed:  # the server releases it at `expires_at` all the same
            if exc is None:
                raise
            exc.add_note(f"and the hold {self.hold_id} could not be resolved: {failed!r}")
            log.warning("hold_resolve_failed", extra={"hold_id": self.hold_id, "error": repr(failed)})

    async def capture(self, amount: float | None = None) -> Hold:
        """Capture `amount` in the hold's unit (meter units, or minutes), or with None all of it;
        the rest is released at once. Again with the same amount: the same hold, no request."""
        if self._resolved_by is not None and self._resolved_by[:2] == ("capture", amount):
            return self._resolved_by[2]
        lost = self._lost_capture
        key = lost[1] if lost is not None and lost[0] == amount else uuid.uuid4().hex
        try:
            captured = await self._client.capture_hold(self.hold_id, amount, idempotency_key=key)
        except Unavailable:  # maybe done, maybe not: the same key says which, if tried again
            self._lost_capture = (amount, key)
            raise
        except HoldResolved as exc:
            await self._lost(exc)
            raise
        self._lost_capture = None
        await self._resolved("capture", amount, captured)
        return captured

    async def release(self) -> Hold:
        """Give the whole hold back. Again: the same hold, no request."""
        if self._resolved_by is not None and self._resolved_by[0] == "release":
            return self._resolved_by[2]
        try:
            released = await self._client.release_hold(self.hold_id, idempotency_key=uuid.uuid4().hex)
        except HoldResolved as exc:
            await self._lost(exc)
            raise
        await self._resolved("release", None, released)
        return released

    async def _resolved(self, how: str, amount: float | None, hold: Hold) -> None:
        self._resolved_by = (how, amount, hold)  # first, so an extension answering late is ignored
        self.current = hold
        await self._stop_extending()

    async def _stop_extending(self) -> None:
        extender = self._extender
        if extender is None or extender is asyncio.current_task():
            return
        extender.cancel()
        await asyncio.gather(extender, return_exceptions=True)

    async def _extend(self) -> None:
        every_s = self._ttl_s / 2
        wait_s = every_s
        while True:
            await asyncio.sleep(wait_s)
            wait_s = every_s
            try:
                extended = await self._client.extend_hold(
                    self.hold_id, self._ttl_s, idempotency_key=uuid.uuid4().hex
                )
            except Unavailable as exc:  # the hold still runs to its `expires_at`: try again sooner
                log.warning("hold_extend_failed", extra={"hold_id": self.hold_id, "error": repr(exc)})
                wait_s = max(MIN_EXTEND_S, every_s / 4)
                continue
            except (HoldResolved, HoldNotFound) as exc:  # expired, or resolved, under the body
                await self._lost(exc)
                return
            except LedgerError as exc:
                log.warning("hold_extend_refused", extra={"hold_id": self.hold_id, "error": repr(exc)})
                continue
            if self._resolved_by is None:
                self.current = extended

    async def _lost(self, exc: LedgerError) -> None:
        """The server resolved the hold without this object (it expired): note it, and show it."""
        if self._gone or self._resolved_by is not None:
            return
        self._gone = True
        log.warning("hold_lost", extra={"hold_id": self.hold_id, "error": repr(exc)})
        await self._stop_extending()
        with contextlib.suppress(LedgerError):  # the hold as the server has it now, if it answers
            self.current = await self._client.get_hold(self.hold_id)
