"""ShardRouter: sends each call to the shard that owns the user, with a time limit.

Routes call shards through `ShardClient`, one typed method per shard
operation (`await shards.usage(user_id) -> UsageView`); it names each
operation by the shard's method itself (`LedgerShard.usage`), so mypy checks
the arguments and the result against the shard, and the router reads what it
needs to know of the call from the operation's declaration
(`actors.shard.operations`): its batch lane, whether it may be retried,
whether it takes a rate-limit token, whether it changes the plan.

Hot calls (the operations declared with a lane: checks, heartbeats, meter
uses, session starts and ends, hold verbs) travel over the data plane
(`gateway.channel`): one persistent, pipelined connection from this process
to each shard, beside Ray. With `LEDGER_DATA_PLANE=ray` they travel in Ray
batches instead: while `MAX_BATCHES_IN_FLIGHT` batch calls to a shard are
under way, the calls that arrive for it wait and leave together in the next
one, as one Ray call. Under load Ray's per-call cost (about a millisecond of
CPU on each side) is paid once per batch instead of once per request; when
idle, a call leaves at once, alone. Each call in a batch keeps its own
timeout, retries and errors. Calls of lane "write" (durable before they
answer) are batched the same way in batches of their own, so a read never
waits for a write's transaction.

A user the shard refused with `RateLimited` is refused here for the same
wait, without a call, for the methods that take a rate token: the shard said
when a token comes back, and until then it would only say no again. An abusive
client then costs this process a token check, and its shard nothing.

A call that the shard could not answer within its batch (its user's turn is
held by a durable write, say) is answered by a `collect` call of its own, so
it never holds up the others (`LedgerShard.batch`).

Every call is bounded by `call_timeout_s`; a shard that does not answer in
time, has died, or is restarting surfaces as `Unavailable` (503), never as a
hung request. A call that may be repeated without a second effect (reads,
heartbeats, ends, billing deliveries, anything with an Idempotency-Key) is
retried while its shard is dead or restarting, within that same bound; a
session start or meter use without a key is not (the first attempt may have
been applied), unless it never left this process (the channel could not
connect). Domain errors raised in the shard arrive wrapped by Ray and are
re-raised as themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import ray.exceptions
import structlog

from actors import views
from actors.errors import DomainError, RateLimited, Unavailable, UserMoved, UserMoving
from actors.records import CreditEntry, Difficulty, PlanEvent
from actors.replies import IdempotencyKey
from actors.routing import ShardMap
from actors.shard import Handoff, LedgerShard, Operation, Purchase, ShardStats, operation_of
from gateway.channel import ShardChannel, ShardUnreachable
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.shards")

P = ParamSpec("P")
R = TypeVar("R")
# A shard operation as the class holds it: `LedgerShard.usage`, say (the first parameter is the shard).
ShardMethod = Callable[Concatenate[LedgerShard, P], Awaitable[R]]

# Batch calls under way to one shard from this process; calls arriving meanwhile wait for the next.
MAX_BATCHES_IN_FLIGHT = 2
# Past this many remembered refusals, the expired ones are dropped.
REFUSALS_SWEEP_AT = 4_096
# Between attempts on a dead or restarting shard (Ray restarts it in a new process).
RETRY_DELAY_MIN_S = 0.05
RETRY_DELAY_MAX_S = 1.0


class ShardUnknown(Unavailable):
    """No shard of that index runs (yet, or any more): this gateway's map is behind the cluster's."""


class ShardBatcher:
    """The hot calls from this process to one shard, sent in batches (see the module's docstring)."""

    def __init__(self, handle: Any, metrics: Metrics) -> None:
        self._handle = handle
        self._metrics = metrics
        self._waiting: list[tuple[str, tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._senders: set[asyncio.Task[None]] = set()  # strong references while they run

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call's result; raises what the shard raised for it, or what the batch call raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((method, args, kwargs, future))
        if self._in_flight < MAX_BATCHES_IN_FLIGHT:
            self._in_flight += 1
            sender = asyncio.get_running_loop().create_task(self._send())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                self._metrics.shard_batch_size.observe(len(batch))
                try:
                    outcomes = await self._handle.batch.remote([(m, a, k) for m, a, k, _ in batch])
                except Exception as exc:  # the batch call itself failed: so did each call in it
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (*_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue  # its caller stopped waiting (timeout)
                    if ok is None:  # still running on the shard: fetched by a call of its own
                        self._collect(value, future)
                    elif ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._in_flight -= 1

    def _collect(self, ticket: int, future: asyncio.Future[Any]) -> None:
        """Answer `future` with the shard's answer to a deferred call (see `LedgerShard.batch`)."""

        async def fetch() -> None:
            try:
                ok, value = await self._handle.collect.remote(ticket)
            except Exception as exc:
                ok, value = False, exc
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        collector = asyncio.get_running_loop().create_task(fetch())
        self._senders.add(collector)
        collector.add_done_callback(self._senders.discard)


class ShardRouter:
    def __init__(
        self,
        handles: Sequence[Any],
        *,
        call_timeout_s: float,
        metrics: Metrics,
        channels: bool = False,
        node_id: str | None = None,
        shard_map: ShardMap | None = None,
        load_map: Callable[[], Awaitable[ShardMap]] | None = None,
        connect: Callable[[int], Awaitable[Any]] | None = None,
    ) -> None:
        """`handles`: the shards by index (those of `shard_map`, default: a brand-new map of as
        many). `channels`: hot calls over the data plane (`node_id`: this process's Ray node), else
        in Ray batches. `load_map` reads the current map (after a shard said a user moved);
        `connect` finds a shard this router has no handle of yet (one a resize created), or raises
        `ShardUnknown`."""
        assert handles, "at least one shard"
        self.map = shard_map or ShardMap.initial(len(handles))
        self._load_map = load_map
        self._connect = connect
        self._use_channels = channels
        self._node_id = node_id
        self._handles: dict[int, Any] = {}
        self._batchers: dict[int, ShardBatcher] = {}
        self._write_batchers: dict[int, ShardBatcher] = {}
        self.channels: dict[int, ShardChannel] | None = {} if channels else None
        self._timeout_s = call_timeout_s
        self._metrics = metrics
        for index, handle in enumerate(handles):
            self.add_shard(index, handle)
        self._refused_until: dict[str, float] = {}  # user id -> monotonic time their tokens return
        self._sweep_at = REFUSALS_SWEEP_AT
        self._map_reading: asyncio.Task[ShardMap] | None = None

    def add_shard(self, index: int, handle: Any) -> None:
        """Route to `handle` as shard `index` from now on (a shard a resize created)."""
        if index in self._handles:
            return
        self._handles[index] = handle
        self._batchers[index] = ShardBatcher(handle, self._metrics)
        self._write_batchers[index] = ShardBatcher(handle, self._metrics)
        if self.channels is not None:
            self.channels[index] = ShardChannel(handle.channel.remote, self._metrics, node_id=self._node_id)

    def drop_shard(self, index: int) -> None:
        """Stop routing to shard `index` (a resize retired it)."""
        self._handles.pop(index, None)
        self._batchers.pop(index, None)
        self._write_batchers.pop(index, None)
        if self.channels is not None and (channel := self.channels.pop(index, None)) is not None:
            channel.close()

    def handle(self, index: int) -> Any:
        return self._handles[index]

    def handles(self) -> list[Any]:
        """The handles of the shards this router knows, by index."""
        return [self._handles[index] for index in sorted(self._handles)]

    @property
    def shard_count(self) -> int:
        return self.map.shards

    async def read_map(self) -> ShardMap:
        """Read the current map (one read at a time: callers meanwhile share it) and route by it."""
        if self._load_map is None:
            return self.map
        if self._map_reading is None:
            self._map_reading = asyncio.get_running_loop().create_task(self._read_map(self._load_map))
        return await asyncio.shield(self._map_reading)

    async def _read_map(self, load: Callable[[], Awaitable[ShardMap]]) -> ShardMap:
        try:
            found = await load()
            if found.epoch != self.map.epoch:
                log.info("shard_map_changed", epoch=found.epoch, count=found.count, target=found.target)
            self.map = found
            for index in [index for index in self._handles if index >= found.shards]:
                self.drop_shard(index)  # retired by a resize
            return found
        finally:
            self._map_reading = None

    async def _shard(self, index: int) -> int:
        """`index`, once this router has a handle of that shard (found through `connect`)."""
        if index not in self._handles:
            if self._connect is None:
                raise ShardUnknown(f"shard {index} is unknown to this gateway")
            self.add_shard(index, await self._connect(index))
        return index

    def close(self) -> None:
        """Close the data plane's connections (the shards keep running)."""
        for channel in (self.channels or {}).values():
            channel.close()

    @property
    def call_timeout_s(self) -> float:
        return self._timeout_s

    async def call(self, user_id: str, method: ShardMethod[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call `method` (a declared `LedgerShard` operation) on the shard that owns `user_id`."""
        return await self.call_within(self._timeout_s, user_id, method, *args, **kwargs)

    async def call_within(
        self, timeout_s: float, user_id: str, method: ShardMethod[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """`call`, bounded by `timeout_s` instead of the router's `call_timeout_s`."""
        operation = operation_of(method)
        if operation.rate_limited:
            self._refuse_if_still_limited(user_id)
        repeatable = operation.repeatable or kwargs.get("idem") is not None
        try:
            result: R = await self._call(user_id, operation, args, kwargs, timeout_s, repeatable=repeatable)
        except RateLimited as refused:
            if operation.rate_limited:
                self._remember_refusal(user_id, refused.fields.get("wait_ms", 0) / 1000)
            raise
        if operation.changes_plan:
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
        raise RateLimited.waiting(wait_s)

    def _remember_refusal(self, user_id: str, wait_s: float) -> None:
        now = time.monotonic()
        if len(self._refused_until) >= self._sweep_at:
            self._refused_until = {user: t for user, t in self._refused_until.items() if t > now}
            self._sweep_at = max(REFUSALS_SWEEP_AT, 2 * len(self._refused_until))
        self._refused_until[user_id] = now + wait_s

    async def _call(
        self,
        to: int | str,
        operation: Operation,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout_s: float,
        *,
        repeatable: bool,
    ) -> Any:
        """Call shard `to` (an index), or the shard that owns user `to` (a user id: routed by the
        map, and again, by a map read anew, when that shard says the user moved)."""
        method = operation.name
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout_s):
                delay = RETRY_DELAY_MIN_S
                while True:
                    index = to if isinstance(to, int) else self.map.shard_of(to)
                    try:
                        return await self._send(await self._shard(index), operation, args, kwargs)
                    except (ray.exceptions.RayActorError, ShardUnreachable) as exc:
                        if isinstance(exc, ray.exceptions.ActorDiedError) and self._connect is not None:
                            # Dead for good (a resize retired it; one may since have been made anew
                            # under its name): the next attempt looks the shard up again.
                            self.drop_shard(index)
                        if not repeatable and getattr(exc, "sent", True):
                            raise
                        # Dead or restarting (or retired by a resize): try again until the bound (then 503).
                        log.info("shard_call_retry", method=method, error=type(exc).__name__, delay_s=delay)
                        wait = True
                    except (UserMoved, UserMoving, ShardUnknown) as exc:
                        if isinstance(to, int):
                            raise
                        # Refused before anything was done (or never sent: a shard this gateway cannot
                        # find, its map behind), so any call may be sent again: at once to a new owner
                        # the map names, else after a wait (a handoff under way).
                        wait = not isinstance(exc, UserMoved)
                    if isinstance(to, str):
                        await self._read_map_quietly()
                        wait = wait or self.map.shard_of(to) == index
                    if wait:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_DELAY_MAX_S)
        except TimeoutError:
            outcome = "timeout"
            raise Unavailable("the user's shard did not answer in time") from None
        except ray.exceptions.RayTaskError as exc:
            # Before `DomainError`: Ray's wrapper of a domain error is an instance of both.
            cause = exc.cause
            if isinstance(cause, DomainError):
                outcome = cause.code
                raise cause from None
            outcome = "error"
            raise
        except DomainError as exc:  # a batched call's own error arrives as itself
            outcome = exc.code
            raise
        except (ray.exceptions.RayActorError, ShardUnreachable) as exc:
            outcome = "unavailable"
            log.warning("shard_unreachable", method=method, error=type(exc).__name__, detail=str(exc))
            raise Unavailable("the user's shard is restarting") from None
        finally:
            self._metrics.shard_calls.labels(method, outcome).observe(time.perf_counter() - started)

    async def _send(
        self, index: int, operation: Operation, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        method = operation.name
        if operation.lane is not None and self.channels is not None:
            return await self.channels[index].call(method, args, kwargs)
        if operation.lane == "read":
            return await self._batchers[index].call(method, args, kwargs)
        if operation.lane == "write":
            return await self._write_batchers[index].call(method, args, kwargs)
        return await getattr(self._handles[index], method).remote(*args, **kwargs)

    async def _read_map_quietly(self) -> None:
        """Read the map again; a failure leaves the one known (the caller retries, bounded)."""
        try:
            await self.read_map()
        except Exception as exc:
            log.warning("shard_map_read_failed", error=repr(exc))

    async def call_shard(
        self,
        index: int,
        method: Callable[Concatenate[LedgerShard, P], Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Call a declared shard-wide `method` on shard `index` (a resize's steps)."""
        operation = operation_of(method)
        result: R = await self._call(
            index, operation, args, kwargs, self._timeout_s, repeatable=operation.repeatable
        )
        return result

    async def each(
        self, method: Callable[[LedgerShard], Awaitable[R]], *, timeout_s: float | None = None
    ) -> list[R | BaseException]:
        """Call `method` (a declared shard-wide call) on every shard, each within `timeout_s`
        (default: `call_timeout_s`); each result is the value or the exception it raised."""
        bound_s = timeout_s if timeout_s is not None else self._timeout_s
        operation = operation_of(method)

        async def ask_every_shard() -> list[R | BaseException]:
            return list(
                await asyncio.gather(
                    *(
                        # Not retried: a status asked of every shard reports a dead one at once.
                        self._call(index, operation, (), {}, bound_s, repeatable=False)
                        for index in range(self.map.shards)
                    ),
                    return_exceptions=True,
                )
            )

        results = await ask_every_shard()
        if any(isinstance(result, BaseException) for result in results):
            # A shard a resize retired since this process last read the map is not a failure.
            epoch = self.map.epoch
            await self._read_map_quietly()
            if self.map.epoch != epoch:
                results = await ask_every_shard()
        return results


class ShardClient:
    """The gateway's typed view of the shards: one method per shard operation (see the module's
    docstring). Adding an operation to the shard means adding its method here."""

    def __init__(self, router: ShardRouter) -> None:
        self.router = router

    # Reads

    async def usage(self, user_id: str) -> views.UsageView:
        return await self.router.call(user_id, LedgerShard.usage, user_id)

    async def usage_of(self, user_id: str) -> views.UsageView:
        """`usage` for billing and ops: not counted against the user's rate limit."""
        return await self.router.call(user_id, LedgerShard.usage_of, user_id)

    async def has_credits(self, user_id: str) -> bool:
        return await self.router.call(user_id, LedgerShard.has_credits, user_id)

    async def current_session(self, user_id: str) -> views.CurrentSession:
        return await self.router.call(user_id, LedgerShard.current_session, user_id)

    async def credits(self, user_id: str) -> views.CreditsView:
        return await self.router.call(user_id, LedgerShard.credits, user_id)

    async def list_sessions(self, user_id: str, limit: int) -> views.Page[views.SessionSummary]:
        return await self.router.call(user_id, LedgerShard.list_sessions, user_id, limit)

    async def usage_history(self, user_id: str, periods: int) -> views.Page[views.PeriodSummary]:
        return await self.router.call(user_id, LedgerShard.usage_history, user_id, periods)

    async def credit_history(self, user_id: str, limit: int) -> views.Page[CreditEntry]:
        return await self.router.call(user_id, LedgerShard.credit_history, user_id, limit)

    async def reconcile(self, user_id: str) -> views.Reconciliation:
        return await self.router.call(user_id, LedgerShard.reconcile, user_id)

    async def watch(self, user_id: str, after_version: int, wait_s: float) -> views.UsageChange | None:
        """The user's next change after `after_version`, or None after `wait_s` without one."""
        timeout_s = wait_s + self.router.call_timeout_s
        return await self.router.call_within(
            timeout_s, user_id, LedgerShard.watch, user_id, after_version, wait_s
        )

    # Writes

    async def start_session(
        self,
        user_id: str,
        *,
        topic: str | None,
        difficulty: Difficulty | None,
        request_id: str | None,
        idem: IdempotencyKey | None,
    ) -> views.SessionStarted:
        return await self.router.call(
            user_id,
            LedgerShard.start_session,
            user_id,
            topic=topic,
            difficulty=difficulty,
            request_id=request_id,
            idem=idem,
        )

    async def heartbeat(
        self,
        user_id: str,
        session_id: str,
        *,
        seq: int | None,
        request_id: str | None,
        idem: IdempotencyKey | None,
    ) -> views.SessionProgress:
        return await self.router.call(
            user_id, LedgerShard.heartbeat, user_id, session_id, seq=seq, request_id=request_id, idem=idem
        )

    async def end_session(
        self, user_id: str, session_id: str, *, request_id: str | None, idem: IdempotencyKey | None
    ) -> views.SessionProgress:
        return await self.router.call(
            user_id, LedgerShard.end_session, user_id, session_id, request_id=request_id, idem=idem
        )

    async def consume_meter(
        self, user_id: str, meter: str, amount: int, *, idem: IdempotencyKey | None
    ) -> views.MeterConsumed:
        return await self.router.call(user_id, LedgerShard.consume_meter, user_id, meter, amount, idem=idem)

    async def change_plan(
        self, user_id: str, event: PlanEvent, *, request_id: str | None, idem: IdempotencyKey | None = None
    ) -> views.PlanChangeResult:
        return await self.router.call(
            user_id, LedgerShard.change_plan, user_id, event, request_id=request_id, idem=idem
        )

    async def add_credits(
        self, user_id: str, purchase: Purchase, *, request_id: str | None, idem: IdempotencyKey | None = None
    ) -> views.CreditsAdded:
        return await self.router.call(
            user_id, LedgerShard.add_credits, user_id, purchase, request_id=request_id, idem=idem
        )

    # Holds

    async def create_hold(
        self,
        user_id: str,
        *,
        meter: str | None,
        amount: int,
        ttl_ms: int,
        reference: str | None,
        request_id: str | None,
        idem: IdempotencyKey | None,
    ) -> views.HoldView:
        return await self.router.call(
            user_id,
            LedgerShard.create_hold,
            user_id,
            meter=meter,
            amount=amount,
            ttl_ms=ttl_ms,
            reference=reference,
            request_id=request_id,
            idem=idem,
        )

    async def capture_hold(
        self,
        user_id: str,
        hold_id: str,
        amount: float | None,
        *,
        request_id: str | None,
        idem: IdempotencyKey | None,
    ) -> views.HoldView:
        return await self.router.call(
            user_id, LedgerShard.capture_hold, user_id, hold_id, amount, request_id=request_id, idem=idem
        )

    async def release_hold(
        self, user_id: str, hold_id: str, *, request_id: str | None, idem: IdempotencyKey | None
    ) -> views.HoldView:
        return await self.router.call(
            user_id, LedgerShard.release_hold, user_id, hold_id, request_id=request_id, idem=idem
        )

    async def extend_hold(
        self, user_id: str, hold_id: str, ttl_ms: int, *, request_id: str | None, idem: IdempotencyKey | None
    ) -> views.HoldView:
        return await self.router.call(
            user_id, LedgerShard.extend_hold, user_id, hold_id, ttl_ms, request_id=request_id, idem=idem
        )

    async def get_hold(self, user_id: str, hold_id: str) -> views.HoldView:
        return await self.router.call(user_id, LedgerShard.get_hold, user_id, hold_id)

    async def list_holds(self, user_id: str) -> views.Page[views.HoldView]:
        return await self.router.call(user_id, LedgerShard.list_holds, user_id)

    # The shard map (a resize's steps, by shard)

    async def read_map(self) -> ShardMap:
        return await self.router.read_map()

    async def release(self, shard: int, slots: list[int], to_shard: int) -> Handoff:
        return await self.router.call_shard(shard, LedgerShard.release, slots, to_shard)

    async def refresh_slots(self, shard: int, alarmed: list[str] | None = None) -> list[int]:
        return await self.router.call_shard(shard, LedgerShard.refresh_slots, alarmed)

    # Every shard

    async def stats(self) -> list[ShardStats | BaseException]:
        return await self.router.each(LedgerShard.stats)

    async def ready(self, *, timeout_s: float | None = None) -> list[ShardStats | BaseException]:
        return await self.router.each(LedgerShard.ready, timeout_s=timeout_s)

    async def flush(self) -> list[int | BaseException]:
        return await self.router.each(LedgerShard.flush)

    async def stop(self) -> list[BaseException | None]:
        return await self.router.each(LedgerShard.stop)
