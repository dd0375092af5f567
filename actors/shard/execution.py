"""Per-user execution: the one pipeline every user operation runs through.

    Idempotency-Key claim → admit → the user's turn (activation, doubt,
    remembered reply, rate-limit token) → body → record the change → give the
    turn back

Each resident user has at most one operation running at a time; the others
wait in arrival order (`actors.turns`), bounded (`wait_budget_s`, then
`Unavailable`; `USER_WAITERS_MAX`, then `Overloaded`). Uncontended and
resident, taking the turn neither awaits nor allocates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from actors.errors import (
    IdempotencyInFlight,
    IdempotencyMismatch,
    LedgerError,
    Overloaded,
    RateLimited,
    Unavailable,
)
from actors.ledger import UserLedger
from actors.ratelimit import TokenBucket
from actors.records import ReplyRecord
from actors.replies import IdempotencyKey, encode_outcome, encode_result, replay
from actors.shard.config import USER_WAITERS_MAX
from actors.shard.operations import Operation, Turn
from actors.shard.parts import ShardPart
from actors.turns import TooManyWaiters, UserTurns

if TYPE_CHECKING:
    from actors.shard.placement import Placement

T = TypeVar("T")
R = TypeVar("R")


class AfterTurn(Exception):
    """Raised by a body that needs a store read it must not make holding the user's turn (the
    user's other operations would wait for it): the pipeline gives the turn back, awaits `read()`,
    then answers `then(value, ledger, now)` in a new turn."""

    def __init__(
        self, read: Callable[[], Awaitable[Any]], then: Callable[[Any, UserLedger, int], Any]
    ) -> None:
        super().__init__("continued after the turn")
        self.read = read
        self.then = then


# What `in_turn` runs as: a part of an operation, which took its rate-limit token already.
_IN_TURN = Operation("in_turn")


class _Known(Exception):
    """A keyed request's outcome is already in the ledger (raised by `begin`, caught by `_once`)."""

    def __init__(self, record: ReplyRecord) -> None:
        super().__init__(record.key)
        self.record = record


@dataclass(eq=False)
class Execution(ShardPart):
    refusal: Callable[[], Unavailable | None]  # why the shard takes no new call now (None: it does)
    running: Callable[[], Awaitable[object]]  # waits (bounded) until the shard serves
    turns: UserTurns = field(default_factory=lambda: UserTurns(waiters_max=USER_WAITERS_MAX), init=False)
    pending_calls: int = field(default=0, init=False)
    # Keyed requests still running: (user, Idempotency-Key) -> the request's hash.
    _claims: dict[tuple[str, str], str] = field(default_factory=dict, init=False)
    # Each resident user's request budget (see `actors.ratelimit`).
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False)
    # Which users this shard serves (set by the shard once made; see `placement`).
    placement: Placement | None = field(default=None, init=False)

    async def run(
        self,
        spec: Operation,
        user_id: str,
        idem: IdempotencyKey | None,
        body: Callable[[Any], Awaitable[R]],
    ) -> R:
        """Run one declared operation's `body` through the pipeline (see the module docstring)."""
        if not spec.in_turn:
            assert idem is None, f"{spec.name} takes no Idempotency-Key"
            async with self.admitted():
                if spec.rate_limited:
                    await self._limit_rate(user_id, deadline=self.begin_by())
                return await body(user_id)
        return await self._once(user_id, idem, lambda: self._in_turn(spec, user_id, idem, body))

    async def _in_turn(
        self, spec: Operation, user_id: str, idem: IdempotencyKey | None, body: Callable[[Turn], Awaitable[R]]
    ) -> R:
        async with self.admitted():
            deadline = self.begin_by()
            ledger = await self.begin(user_id, deadline=deadline, idem=idem, rate_limited=spec.rate_limited)
            try:
                return await body(Turn(user_id, ledger, idem, deadline))
            except AfterTurn as after:
                resume = after
            finally:
                try:
                    if user_id in self.residency.ledgers:
                        self.residency.changed(user_id, self.residency.ledgers[user_id])
                finally:
                    self.turns.release(user_id)
        # The body needs a store read it must not make in the user's turn: the turn is given back
        # for it, and the answer is made in a new turn.
        value = await resume.read()
        answer: R = await self.in_turn(user_id, lambda ledger, now: resume.then(value, ledger, now))
        return answer

    async def in_turn(self, user_id: str, operate: Callable[[UserLedger, int], T]) -> T:
        """Run `operate` on the user's live ledger in the user's turn, with no await inside: it is
        answered from memory (a change it makes is written behind). For what is not an operation
        of its own (a stream's read, a history's merge): no key, no rate-limit token."""

        async def body(turn: Turn) -> T:
            return operate(turn.ledger, self.clock())

        return await self._in_turn(_IN_TURN, user_id, None, body)

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        if self.pending_calls >= self.config.max_pending_calls:
            raise Overloaded("shard has too many pending calls", limit=self.config.max_pending_calls)
        self.pending_calls += 1
        try:
            yield
        finally:
            self.pending_calls -= 1

    def begin_by(self) -> float:
        """The loop time by which an operation starting now must have begun (`wait_budget_s`)."""
        return asyncio.get_running_loop().time() + self.config.wait_budget_s

    async def begin(
        self,
        user_id: str,
        *,
        deadline: float | None = None,
        idem: IdempotencyKey | None = None,
        rate_limited: bool = False,
    ) -> UserLedger:
        """Take the user's turn: returns the user's live ledger, for the caller alone until it calls
        `self.turns.release(user_id)` (always, in a `finally`).

        Uncontended and resident, this neither awaits nor allocates. Otherwise it loads the user,
        waits in the user's line and settles a write in doubt, all by `deadline` (default: within
        `wait_budget_s`): past it, `Unavailable` (nothing was done). A keyed request whose outcome
        the ledger already holds ends here with `_Known` (see `_once`); a `rate_limited` one takes
        a token of the user's rate limit here (`RateLimited`); either way the turn is given back."""
        ledgers = self.residency.ledgers
        if self.placement is not None and self.placement.leaving:
            self.placement.check(user_id)  # its slot may be leaving (a handoff under way)
        if user_id not in ledgers or user_id in self.durable.in_doubt or not self.turns.try_take(user_id):
            await self._wait_for_turn(user_id, deadline if deadline is not None else self.begin_by())
        ledger = ledgers[user_id]
        if idem is not None and (known := ledger.reply(idem.key, self.clock())) is not None:
            self.turns.release(user_id)
            raise _Known(known)
        if rate_limited:
            try:
                self._take_token(user_id, ledger)
            except RateLimited:
                self.turns.release(user_id)
                raise
        return ledger

    async def _wait_for_turn(self, user_id: str, deadline: float) -> None:
        """`begin`'s slow path: on return the caller holds the user's turn, and no write is in doubt."""
        took = False
        try:
            async with asyncio.timeout_at(deadline):
                await self.running()
                await self._served_here(user_id)
                await self.residency.activate(user_id)
                if not self.turns.try_take(user_id):
                    await self.turns.take(user_id, deadline=deadline)
                took = True
                await self._still_resident(user_id)  # (handed to another shard while it waited?)
                if self.placement is not None:
                    self.placement.check(user_id)  # its slot may have begun to leave while it waited
                if user_id in self.durable.in_doubt:
                    await self.durable.resolve(user_id)
        except TimeoutError:
            if took:
                self.turns.release(user_id)
            if user_id not in self.residency.ledgers:
                raise _not_loaded() from None
            raise _too_busy() from None
        except TooManyWaiters:
            raise Overloaded(
                "too many calls are waiting for this user; nothing was changed", limit=USER_WAITERS_MAX
            ) from None
        except BaseException:
            if took:
                self.turns.release(user_id)
            raise

    async def _limit_rate(self, user_id: str, *, deadline: float) -> None:
        """Take a rate-limit token before a read that goes to the store ahead of its turn (the
        others take theirs in `begin`); the user is loaded first, by `deadline`."""
        try:
            async with asyncio.timeout_at(deadline):
                await self.running()
                await self._served_here(user_id)
                await self.residency.activate(user_id)
                await self._still_resident(user_id)  # (handed to another shard as it loaded?)
        except TimeoutError:
            raise _not_loaded() from None
        self._take_token(user_id, self.residency.ledgers[user_id])

    async def _served_here(self, user_id: str) -> None:
        """`UserMoving` or `UserMoved` unless this shard serves the user (see `placement`)."""
        if self.placement is not None:
            await self.placement.confirm(user_id)

    async def _still_resident(self, user_id: str) -> None:
        """After a wait: the user is resident, or the call is refused (`UserMoved`/`UserMoving` if
        the user's slot left meanwhile, else `Unavailable`)."""
        if user_id not in self.residency.ledgers:
            await self._served_here(user_id)
            raise _not_loaded()

    def forget(self, user_id: str) -> None:
        """The user was handed to another shard: their request budget goes with them."""
        self._buckets.pop(user_id, None)

    def _take_token(self, user_id: str, ledger: UserLedger) -> None:
        """Take one of the user's tokens (their plan's `rate_limit`); `RateLimited` when none is left.
        Decided in the call that does the work, with no I/O."""
        plan = self.config.policy.plans.get(ledger.plan)
        limit = plan.rate_limit if plan is not None else None
        if limit is None:
            return
        now = self.clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = TokenBucket(float(limit.burst), now)
        wait_s = bucket.take(limit, now)
        if wait_s > 0:
            raise RateLimited.waiting(wait_s)

    async def _once(self, user_id: str, idem: IdempotencyKey | None, run: Callable[[], Awaitable[R]]) -> R:
        """Run a request at most once per `Idempotency-Key`: a retry gets the first outcome again.

        The operation looks the key up in the user's turn (`begin`), after any write in doubt is
        settled, so what it finds is the truth. Durable operations remember their reply in the
        write they make; any other outcome is remembered here, on the live ledger (still in the
        operation's turn: nothing runs between its end and this), and written with its next write."""
        if idem is None:
            return await run()
        slot = (user_id, idem.key)
        running = self._claims.get(slot)
        if running is not None:
            if running != idem.request_hash:
                raise IdempotencyMismatch(
                    "this Idempotency-Key was used for a different request", idempotency_key=idem.key
                )
            raise IdempotencyInFlight(
                "a request with this Idempotency-Key is still running; retry shortly",
                idempotency_key=idem.key,
            )
        self._claims[slot] = idem.request_hash
        ledgers = self.residency.ledgers
        try:
            try:
                result = await run()
            except _Known as known:
                replayed: R = replay(known.record, idem)
                return replayed
            except LedgerError as exc:
                if (reply := encode_outcome(exc)) is not None and user_id in ledgers:
                    ledgers[user_id].remember_reply(idem, reply, self.clock())
                raise
            ledger = ledgers[user_id]
            if ledger.reply(idem.key, self.clock()) is None:
                ledger.remember_reply(idem, encode_result(result), self.clock())
            return result
        finally:
            del self._claims[slot]


def _too_busy() -> Unavailable:
    return Unavailable("the shard is too busy to begin this operation; nothing was changed")


def _not_loaded() -> Unavailable:
    return Unavailable("this user could not be loaded in time (is storage reachable?); nothing was changed")
