"""Streams waiting for a user's next change (`GET /v1/usage/stream`), per shard."""

from __future__ import annotations

import asyncio
from collections import Counter

from actors.errors import Overloaded

# Streams waiting for a change, per shard (each holds one pending `watch` call).
MAX_WATCHERS = 10_000


class Watchers:
    """One event per watched user, with the version its waiters have seen (only a newer one wakes
    them), replaced when it fires; and how many streams wait on each user (the last one out removes
    a quiet user's event)."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, int]] = {}
        self._waiting: Counter[str] = Counter()

    def __len__(self) -> int:
        """Streams waiting now."""
        return self._waiting.total()

    def admit(self) -> None:
        if self._waiting.total() >= MAX_WATCHERS:
            raise Overloaded("too many streams on this shard", limit=MAX_WATCHERS)

    async def wait(self, user_id: str, seen: int, timeout_s: float) -> bool:
        """Wait until the user's version moves past `seen`; False if `timeout_s` passes first."""
        event, _ = self._events.setdefault(user_id, (asyncio.Event(), seen))
        self._waiting[user_id] += 1
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        finally:
            self._waiting[user_id] -= 1
            if self._waiting[user_id] == 0:
                del self._waiting[user_id]
                if user_id in self._events and self._events[user_id][0] is event:
                    del self._events[user_id]
        return True

    def wake(self, user_id: str, version: int) -> None:
        """The user is now at `version`: wake its streams if that is news to them (reads that
        change nothing do not)."""
        watched = self._events.get(user_id)
        if watched is not None and version > watched[1]:
            del self._events[user_id]
            watched[0].set()
