"""A fake shard handle: it stands where a Ray actor handle stands (`handle.<method>.remote(...)`
returns an awaitable; a failure is what Ray would raise), and records every call that reached it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Answer = Callable[[str, tuple[Any, ...], dict[str, Any]], Any]


class _Remote:
    def __init__(self, handle: FakeShard, name: str) -> None:
        self._handle, self._name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self._handle.receive(self._name, args, kwargs))


class FakeShard:
    """Answers calls with `answer(method, args, kwargs)` (raise to fail); records every Ray call."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.ray_calls: list[tuple[str, Any]] = []  # (Ray method, its argument)
        self.gate: asyncio.Event | None = None  # set: batch calls wait for it
        self.deferred: dict[int, Any] = {}

    def __getattr__(self, name: str) -> _Remote:
        return _Remote(self, name)

    async def receive(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "batch":
            calls = args[0]
            self.ray_calls.append(("batch", [method for method, _, _ in calls]))
            if self.gate is not None:
                await self.gate.wait()
            return [self._one(*call) for call in calls]
        if name == "collect":
            self.ray_calls.append(("collect", args[0]))
            return self.deferred.pop(args[0])
        self.ray_calls.append((name, args))
        return self.answer(name, args, kwargs)

    def _one(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool | None, Any]:
        try:
            return True, self.answer(method, args, kwargs)
        except Defer as defer:
            ticket = len(self.deferred) + 1
            self.deferred[ticket] = (True, defer.value)
            return None, ticket
        except Exception as exc:
            return False, exc


class Defer(Exception):
    """Raised by an answer to have the batch answer `(None, ticket)` (the call still runs)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value
