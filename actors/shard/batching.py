"""Several calls that arrived together at a gateway, run as one Ray call (`LedgerShard.batch`).

Ray's per-call cost is paid once per batch. Each call is exactly the call it
would have been alone, run concurrently; each answer is `(True, result)` or
`(False, the exception it raised)`, in order.

A batch answers once its calls are done or `BATCH_WAIT_MAX_S` has passed,
whichever comes first: a call still running then (waiting for its user's turn
behind a durable write, or for a slow store) is answered `(None, ticket)`, and
the caller fetches its answer with `collect(ticket)`. So one user's wait never
holds up the other calls of its batch, nor the gateway's next batch.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from actors.errors import Unavailable
from actors.shard.config import BATCH_WAIT_MAX_S, DEFERRED_KEPT_S

Call = tuple[str, tuple[Any, ...], dict[str, Any]]
Answer = tuple[bool, Any]


class Batches:
    def __init__(self, operations: Callable[[str], Callable[..., Awaitable[Any]] | None]) -> None:
        self._operations = operations  # a batchable operation by name; None if it is not one
        # Calls still running when their batch answered, by ticket.
        self._deferred: dict[int, asyncio.Task[Answer]] = {}
        self._tickets = itertools.count(1)

    async def run(self, calls: list[Call]) -> list[tuple[bool | None, Any]]:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self.one(*call)) for call in calls]
        if not tasks:
            return []
        await asyncio.wait(tasks, timeout=BATCH_WAIT_MAX_S)
        answers: list[tuple[bool | None, Any]] = []
        for task in tasks:
            if task.done():
                answers.append(task.result())
                continue
            ticket = next(self._tickets)
            self._deferred[ticket] = task
            # Kept for its caller a while after it is done; a caller that never comes (its gateway
            # died) leaves nothing behind for long.
            task.add_done_callback(functools.partial(self._forget_later, ticket))
            answers.append((None, ticket))
        return answers

    async def one(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Answer:
        """One call, as a batch runs it: `(True, result)` or `(False, the exception it raised)`."""
        operation = self._operations(method)
        if operation is None:
            return False, ValueError(f"{method!r} cannot be batched")
        try:
            return True, await operation(*args, **kwargs)
        except Exception as exc:  # handed back to the caller that made this call
            return False, exc

    def _forget_later(self, ticket: int, _: asyncio.Task[Answer]) -> None:
        asyncio.get_running_loop().call_later(DEFERRED_KEPT_S, self._deferred.pop, ticket, None)

    async def collect(self, ticket: int) -> Answer:
        task = self._deferred.pop(ticket, None)
        if task is None:
            return False, Unavailable("this call's answer is no longer kept; retry it")
        return await asyncio.shield(task)
