"""ShardRouter: sends each call to the shard that owns the user, with a time limit.

A user the shard refused with `RateLimited` is refused here for the same
wait, without a call, for the methods that take a rate token: the shard said
when a token comes back, and until then it would only say no again. An abusive
client then costs this process a token check, and its shard nothing.

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
import math
import time
from collections.abc import Sequence
from typing import Any

import ray.exceptions
import structlog

from actors.errors import DomainError, RateLimited, Unavailable
from actors.routing import shard_index
from actors.shard import RATE_LIMITED_METHODS, ShardStats
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
# Calls after which a remembered refusal no longer holds.
PLAN_CHANGES = frozenset({"change_plan"})
# Past this many remembered refusals, the expired ones are dropped.
REFUSALS_SWEEP_AT = 4_096
# Between attempts on a dead or restarting shard (Ray restarts it in a new process).
RETRY_DELAY_MIN_S = 0.05
RETRY_DELAY_MAX_S = 1.0


class ShardRouter:
    def __init__(self, handles: Sequence[Any], *, call_timeout_s: float, metrics: Metrics) -> None:
        assert handles, "at least one shard"
        self._handles = list(handles)
        self._timeout_s = call_timeout_s
        self._metrics = metrics
        self._refused_until: dict[str, float] = {}  # user id -> monotonic time their tokens return
        self._sweep_at = REFUSALS_SWEEP_AT

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
        rate_limited = method in RATE_LIMITED_METHODS
        if rate_limited:
            self._refuse_if_still_limited(user_id)
        handle = self._handles[shard_index(user_id, len(self._handles))]
        repeatable = method in REPEATABLE or kwargs.get("idem") is not None
        try:
            result = await self._call(
                handle, method, *args, timeout_s=timeout_s, repeatable=repeatable, **kwargs
            )
        except RateLimited as refused:
            if rate_limited:
                self._remember_refusal(user_id, refused.fields.get("wait_ms", 0) / 1000)
            raise
        if method in PLAN_CHANGES:
            self._refused_until.pop(user_id, None)  # a new plan, a new rate: the shard decides again
        return result

    def _refuse_if_still_limited(self, user_id: str) -> None:
        until = self._refused_until.get(user_id)
        if until is None:
            return
        wait_s = until - time.monotonic()
        if wait_s <= 0:
            del self._refused_until[user_id]
            return
        self._metrics.rate_limited_at_gateway.inc()
        raise RateLimited(
            "too many requests for this user; retry later", retry_after_s=max(1, math.ceil(wait_s))
        )

    def _remember_refusal(self, user_id: str, wait_s: float) -> None:
        now = time.monotonic()
        if len(self._refused_until) >= self._sweep_at:
            self._refused_until = {user: t for user, t in self._refused_until.items() if t > now}
            self._sweep_at = max(REFUSALS_SWEEP_AT, 2 * len(self._refused_until))
        self._refused_until[user_id] = now + wait_s

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
