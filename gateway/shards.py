"""ShardRouter: sends each call to the shard that owns the user, with a time limit.

Every call is bounded by `call_timeout_s`; a shard that does not answer in
time, has died, or is restarting surfaces as `Unavailable` (503), never as a
hung request. A call that may be repeated without a second effect (reads,
heartbeats, ends, billing deliveries, anything with an Idempotency-Key) is
retried while its shard is dead or restarting, within that same bound; a
session start or meter use without a key is not (the first attempt may have
been applied). Domain errors raised in the shard arrive wrapped by Ray and are
re-raised as themselves.
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

# Shard methods a retry cannot apply twice: reads; heartbeats (they bill server time since the
# previous one); ends (an ended session answers its result again); deliveries (once per webhook-id).
REPEATABLE = frozenset(
    {
        "usage",
        "usage_of",
        "has_credits",
        "current_session",
        "list_sessions",
        "credits",
        "usage_history",
        "credit_history",
        "reconcile",
        "watch",
        "stats",
        "heartbeat",
        "end_session",
        "change_plan",
        "add_credits",
    }
)
# Between attempts on a dead or restarting shard (Ray restarts it in a new process).
RETRY_DELAY_MIN_S = 0.05
RETRY_DELAY_MAX_S = 1.0


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
        repeatable = method in REPEATABLE or kwargs.get("idem") is not None
        return await self._call(handle, method, *args, timeout_s=timeout_s, repeatable=repeatable, **kwargs)

    async def _call(
        self,
        handle: Any,
        method: str,
        *args: Any,
        timeout_s: float | None = None,
        repeatable: bool = False,
        **kwargs: Any,
    ) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout_s if timeout_s is not None else self._timeout_s):
                delay = RETRY_DELAY_MIN_S
                while True:
                    try:
                        return await getattr(handle, method).remote(*args, **kwargs)
                    except ray.exceptions.RayActorError as exc:
                        if not repeatable:
                            raise
                        # Dead or restarting: try again until the bound (then 503).
                        log.info("shard_call_retry", method=method, error=type(exc).__name__, delay_s=delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_DELAY_MAX_S)
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
