"""`LiveSession`: a session that heartbeats itself and always ends.

    async with client.session(topic="spanish", on_low_balance=warn) as s:
        await run_the_call(s.session_id)

- On entry it starts the session (`NoCredits`, `SessionActive` and the like are raised there).
- While the body runs, a background task heartbeats every `heartbeat_interval_s`, and also just
  after the session's `ends_at`, so the end of the balance is noticed when it happens.
- The first answer with `warning == "low_balance"` calls `on_low_balance` (again only after the
  warning has cleared, with a top-up, and come back).
- If the server ends the session (the balance ran out, or it went stale, or it was ended
  elsewhere), `on_limit_reached` is called for a `limit_reached` end, the body is cancelled, the
  way `asyncio.timeout()` cancels it, and the `async with` raises `LimitReached` (or
  `SessionEnded` for other reasons) with the final account in `.result`.
- If the heartbeats cannot authenticate any more (an expired token), the body is cancelled the
  same way and the `Unauthorized` is raised.
- On the way out, whatever happened in the body, the session is ended (with retries); the final
  account is in `s.result`. If the body raised, its exception is what propagates.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from usage_ledger_client.errors import LedgerError, LimitReached, SessionEnded, Unauthorized, Unavailable
from usage_ledger_client.models import SessionProgress, SessionStarted

if TYPE_CHECKING:
    from usage_ledger_client.client import Difficulty, LedgerClient

log = logging.getLogger("usage_ledger_client")

# A heartbeat aimed at `ends_at` goes this much after it, so the server has ended the session.
AFTER_ENDS_AT_S = 0.05
# Never closer together than this (a client clock ahead of the server's would otherwise spin).
MIN_BEAT_S = 0.25

Callback = Callable[[SessionProgress], Awaitable[None] | None]


class LiveSession:
    """One session, heartbeated in the background while the `async with` body runs."""

    def __init__(
        self,
        client: LedgerClient,
        *,
        topic: str | None,
        difficulty: Difficulty | None,
        heartbeat_interval_s: float,
        on_low_balance: Callback | None,
        on_limit_reached: Callback | None,
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        self._client = client
        self._topic = topic
        self._difficulty = difficulty
        self._interval_s = heartbeat_interval_s
        self._on_low_balance = on_low_balance
        self._on_limit_reached = on_limit_reached
        self.started: SessionStarted | None = None
        self.last: SessionProgress | None = None  # the newest heartbeat answer
        self.result: SessionProgress | None = None  # the final account, once ended
        self._stopped_by: LedgerError | None = None  # why the body was cancelled
        self._body: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._heartbeats: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def session_id(self) -> str:
        assert self.started is not None, "the session starts when the `async with` is entered"
        return self.started.session_id

    async def __aenter__(self) -> LiveSession:
        self.started = await self._client.start_session(topic=self._topic, difficulty=self._difficulty)
        self._body = asyncio.current_task()
        assert self._body is not None, "use it inside a task"
        self._cancelling = self._body.cancelling()
        self._heartbeats = asyncio.create_task(self._beat(), name=f"heartbeats-{self.session_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._heartbeats is not None and self._body is not None
        self._heartbeats.cancel()
        await asyncio.gather(self._heartbeats, return_exceptions=True)
        if self.result is None:
            try:
                self.result = await self._client.end_session(self.session_id)
            except LedgerError as end_failed:
                if exc is None:
                    raise
                exc.add_note(f"and the session {self.session_id} could not be ended: {end_failed!r}")
                log.warning(
                    "session_end_failed", extra={"session_id": self.session_id, "error": repr(end_failed)}
                )
        stopped = self._stopped_by
        # Like asyncio.timeout(): the CancelledError is replaced only if the cancellation was ours alone.
        if (
            stopped is not None
            and exc_type is asyncio.CancelledError
            and self._body.uncancel() <= self._cancelling
        ):
            raise stopped from None

    async def _beat(self) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self._next_beat_s())
            seq += 1
            try:
                progress = await self._client.heartbeat(self.session_id, seq=seq)
            except Unavailable as exc:  # the server keeps the session; the next beat may get through
                log.warning("heartbeat_failed", extra={"session_id": self.session_id, "error": repr(exc)})
                continue
            except LedgerError as exc:
                if exc.code == "session_ended":
                    await self._ended(await self._client.end_session(self.session_id))
                elif isinstance(exc, Unauthorized):
                    self._stop(exc)
                else:
                    log.warning(
                        "heartbeat_refused", extra={"session_id": self.session_id, "error": repr(exc)}
                    )
                    continue
                return
            self.last = progress
            if progress.state == "ended":
                await self._ended(progress)
                return
            await self._warn_if_low(progress)

    def _next_beat_s(self) -> float:
        """The interval, or just past `ends_at` if the balance runs out sooner."""
        ends_at = (
            self.last.ends_at if self.last is not None else self.started.ends_at if self.started else None
        )
        if ends_at is None:
            return self._interval_s
        until_end_s = (ends_at - datetime.now(UTC)).total_seconds() + AFTER_ENDS_AT_S
        return max(MIN_BEAT_S, min(self._interval_s, until_end_s))

    async def _warn_if_low(self, progress: SessionProgress) -> None:
        low = progress.warning == "low_balance"
        if low and not self._warned:
            await _call(self._on_low_balance, progress)
        self._warned = low

    async def _ended(self, result: SessionProgress) -> None:
        self.result = result
        if result.end_reason == "limit_reached":
            await _call(self._on_limit_reached, result)
            self._stop(LimitReached(result))
        else:
            self._stop(SessionEnded(result))

    def _stop(self, reason: LedgerError) -> None:
        """Cancel the body; `__aexit__` raises `reason` in its place."""
        assert self._body is not None
        self._stopped_by = reason
        self._body.cancel()


async def _call(callback: Callback | None, progress: SessionProgress) -> None:
    if callback is None:
        return
    try:
        outcome = callback(progress)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:  # a bug in the caller's callback must not stop the heartbeats
        log.exception("session_callback_failed")
