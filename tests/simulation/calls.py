"""How the simulation's calls reach the shard: as through Ray, and through the gateway's batcher.

`RemoteHandle` is what the gateway's `ShardBatcher` uses of a Ray actor handle
(`batch.remote`, `collect.remote`), calling a `LedgerShard` on this loop with
Ray's semantics: the shard's work is a task of its own, which a caller giving
up does not cancel; when the shard dies under a call (the simulation cancels
the calls of a shard it kills), the caller gets `ShardDied`, as Ray's callers
get `RayActorError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from actors.shard import LedgerShard


class ShardDied(Exception):
    """The shard's process died under this call (Ray's `RayActorError`)."""


class RemoteMethod:
    def __init__(
        self, method: Callable[..., Awaitable[Any]], in_flight: dict[asyncio.Task[Any], None]
    ) -> None:
        self._method = method
        self._in_flight = in_flight  # the shard generation's calls under way

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.get_running_loop().create_task(self._method(*args, **kwargs))
        self._in_flight[task] = None
        task.add_done_callback(lambda done: self._in_flight.pop(done, None))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise ShardDied("the shard's process died under this call") from None
            raise


class RemoteHandle:
    def __init__(self, shard: LedgerShard, in_flight: dict[asyncio.Task[Any], None]) -> None:
        self.batch = RemoteMethod(shard.batch, in_flight)
        self.collect = RemoteMethod(shard.collect, in_flight)
