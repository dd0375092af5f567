"""Per-user turns: at most one operation per user at a time, the others in arrival order.

This is the actor model's mailbox, for the many users one shard hosts: a user's
operations run one at a time, each to its end, in the order they arrived, and
an operation that waits (for a durable write, say) keeps its turn until it is
done. Users do not wait for each other.

The uncontended path allocates nothing and never suspends: `try_take` marks the
user busy, `release` unmarks it. A user's queue exists only while someone
waits, and goes as soon as the last waiter has had its turn.

A waiter is either a task (`take`, bounded by a deadline: when it passes, the
waiter leaves the queue and `TimeoutError` is raised; nothing ran) or a plain
callback (`call_when_free`, used by the shard's timer), which runs within the
turn, synchronously, when its turn comes. The turn is always handed straight
to the next waiter (FIFO), never put up for grabs, so no two waiters can
starve each other (no livelock), and a waiter that gives up while the turn is
being handed to it passes the turn on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog

log = structlog.get_logger("actors.turns")

# A waiter: the future a task awaits, or a callback run in the turn.
_Waiter = asyncio.Future[None] | Callable[[], None]


class TooManyWaiters(Exception):
    """The user already has `waiters_max` operations waiting for their turn."""


class UserTurns:
    __slots__ = ("_idle", "_queues", "waiters_max")

    def __init__(self, *, waiters_max: int) -> None:
        assert waiters_max > 0, "waiters_max must be positive"
        self.waiters_max = waiters_max
        # A user present here is busy (an operation has its turn); the value is its queue of
        # waiters, None while nobody waits.
        self._queues: dict[str, deque[_Waiter] | None] = {}
        self._idle: asyncio.Event | None = None  # set when no user is busy (`wait_idle`)

    def busy(self, user_id: str) -> bool:
        return user_id in self._queues

    def __len__(self) -> int:
        """How many users are busy."""
        return len(self._queues)

    def waiting(self, user_id: str) -> int:
        queue = self._queues.get(user_id)
        return len(queue) if queue is not None else 0

    async def wait_idle(self) -> None:
        """Return once no user is busy (at that instant)."""
        if not self._queues:
            return
        if self._idle is None:
            self._idle = asyncio.Event()
        await self._idle.wait()

    def try_take(self, user_id: str) -> bool:
        """Take the user's turn if it is free (no await, no allocation)."""
        if user_id in self._queues:
            return False
        self._queues[user_id] = None
        return True

    async def take(self, user_id: str, *, deadline: float) -> None:
        """Take the user's turn, waiting in line until `deadline` (loop time) at most.

        Raises `TimeoutError` (having left the line; the turn was not taken) or `TooManyWaiters`."""
        if self.try_take(user_id):
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(user_id, turn)
        try:
            async with asyncio.timeout_at(deadline):
                await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.release(user_id)  # handed the turn as we gave up: pass it on
            else:
                turn.cancel()
                self._forget(user_id, turn)
            raise

    def call_when_free(self, user_id: str, callback: Callable[[], None]) -> None:
        """Run `callback` in the user's turn: now if it is free, else when it comes (in line).

        Not counted against `waiters_max` (the caller keeps at most one per user in line: the
        shard's timer), so it is always taken."""
        if self.try_take(user_id):
            try:
                callback()
            finally:
                self.release(user_id)
            return
        self._enqueue(user_id, callback, bounded=False)

    def release(self, user_id: str) -> None:
        """End the current turn: hand it to the next waiter, or mark the user free."""
        queue = self._queues[user_id]
        while queue:
            waiter = queue.popleft()
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_result(None)  # the turn is theirs now
                    return
                continue  # gave up meanwhile
            try:
                waiter()
            except Exception:  # a callback's failure is its own: logged, and the line goes on
                log.exception("turn_callback_failed", user_id=user_id)
        del self._queues[user_id]
        if not self._queues and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _enqueue(self, user_id: str, waiter: _Waiter, *, bounded: bool = True) -> None:
        queue = self._queues[user_id]
        if queue is None:
            queue = self._queues[user_id] = deque()
        elif bounded and len(queue) >= self.waiters_max:
            raise TooManyWaiters(user_id)
        queue.append(waiter)

    def _forget(self, user_id: str, turn: asyncio.Future[None]) -> None:
        queue = self._queues.get(user_id)
        if queue is not None:
            with contextlib.suppress(ValueError):  # already popped
                queue.remove(turn)
