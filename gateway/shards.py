"""ShardRouter: sends each call to the shard that owns the user, with a time limit.

Every call is bounded by `call_timeout_s`; a shard that does not answer in
time, has died, or is restarting surfaces as `Unavailable` (503), never as a
hung request. Calls are not retried here: whether a call may be repeated is
the caller's decision. Domain errors raised in the shard arrive wrapped by Ray
and are re-raised as themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import ray.exceptions
import structlog

from actors.errors import DomainError, Unavailable
from actors.routing import shard_index
from actors.shard import ShardStats
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.shards")


class ShardRouter:
    def __init__(self, handles: Sequence[Any], *, call_timeout_s: float, metrics: Metrics) -> None:
        assert handles, "at least one shard"
        self._handles = list(handles)
        self._timeout_s = call_timeout_s
        self._metrics = metrics

    @property
    def shard_count(self) -> int:
        return len(self._handles)

    @property
    def call_timeout_s(self) -> float:
        return self._timeout_s

    async def call(
        self, user_id: str, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> Any:
        """Call `method` on the shard that owns `user_id` (within `timeout_s`, default the router's)."""
        handle = self._handles[shard_index(user_id, len(self._handles))]
        return await self._call(handle, method, *args, timeout_s=timeout_s, **kwargs)

    async def _call(
        self, handle: Any, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout_s if timeout_s is not None else self._timeout_s):
                return await getattr(handle, method).remote(*args, **kwargs)
        except TimeoutError:
            outcome = "timeout"
            raise Unavailable("the user's shard did not answer in time") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, DomainError):
                outcome = cause.code
                raise cause from None
            outcome = "error"
            raise
        except ray.exceptions.RayActorError as exc:
            outcome = "unavailable"
            log.warning("shard_unreachable", method=method, error=type(exc).__name__)
            raise Unavailable("the user's shard is restarting") from None
        finally:
            self._metrics.shard_calls.labels(method, outcome).observe(time.perf_counter() - started)

    async def each(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every shard; each result is the value or the exception it raised."""
        return list(
            await asyncio.gather(
                *(self._call(handle, method, *args, **kwargs) for handle in self._handles),
                return_exceptions=True,
            )
        )

    async def stats(self) -> list[ShardStats | BaseException]:
        return await self.each("stats")
