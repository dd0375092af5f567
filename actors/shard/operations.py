"""Shard operations, declared once: what each is, where it is defined.

An operation is a `LedgerShard` method decorated with `@operation(...)`; the
decorator records its properties (an `Operation`) and runs its body through
the one pipeline every user operation takes (`Execution.run`):

    Idempotency-Key claim → admit → the user's turn (activation, doubt,
    remembered reply, rate-limit token) → body → record the change → give the
    turn back

The body receives a `Turn` (the user's live ledger, for it alone) in place of
the user id its callers pass. `@operation(..., in_turn=False)` is for the few
that read the store before they take the turn (histories): their body receives
the user id, with the rate-limit token already taken. A body that finds it needs
such a read (an end of a session the ledger no longer holds) raises
`execution.AfterTurn`: the turn is given back for the read, and the answer is
made in a new turn.

What the gateway needs to know of an operation (which batch lane it travels
in, whether a retry may repeat it, whether it takes a rate-limit token, whether
it changes the plan) is read from the same declaration (`operation_of`), so a
new operation is one declared method plus its typed client method
(`gateway.shards.ShardClient`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar

from actors.ledger import UserLedger
from actors.replies import IdempotencyKey

if TYPE_CHECKING:
    from actors.shard.execution import Execution

P = ParamSpec("P")
R = TypeVar("R")

# A gateway sends the calls of these lanes together, one Ray call per batch (`LedgerShard.batch`):
# "read" calls are answered from memory; "write" calls are durable before they answer, so they
# travel in batches of their own and never hold up a read.
Lane = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class Operation:
    """What callers may rely on about one shard method."""

    name: str
    # Takes one of the user's rate-limit tokens (a refused caller may refuse the user's next calls
    # of the same kind without calling, until the wait is over).
    rate_limited: bool = False
    lane: Lane | None = None  # None: a call of its own
    # A retry cannot apply it twice (reads; heartbeats; ends; deliveries, once per delivery id).
    # Anything sent with an Idempotency-Key is repeatable too.
    repeatable: bool = False
    changes_plan: bool = False  # after it, a remembered rate-limit refusal no longer holds
    in_turn: bool = True  # the body runs in the user's turn (else: it takes it itself, later)


@dataclass(slots=True)
class Turn:
    """The user's turn, as an operation's body sees it: `ledger` is the live ledger, for this body
    alone until it returns (a durable write may replace it: see `Durable.commit`)."""

    user_id: str
    ledger: UserLedger
    idem: IdempotencyKey | None
    deadline: float  # loop time by which the body's own store reads must be done


class _Shard(Protocol):
    @property
    def execution(self) -> Execution: ...


S = TypeVar("S", bound=_Shard)


def operation(
    *,
    rate_limited: bool = False,
    lane: Lane | None = None,
    repeatable: bool = False,
    changes_plan: bool = False,
    in_turn: bool = True,
) -> Callable[
    [Callable[Concatenate[S, Any, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]],
]:
    """Declare a user operation: its callers pass the user id where the body takes its `Turn`
    (or, with `in_turn=False`, the user id again)."""

    def declare(
        body: Callable[Concatenate[S, Any, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, str, P], Coroutine[Any, Any, R]]:
        spec = Operation(
            body.__name__,
            rate_limited=rate_limited,
            lane=lane,
            repeatable=repeatable,
            changes_plan=changes_plan,
            in_turn=in_turn,
        )

        @functools.wraps(body)
        async def run(shard: S, user_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
            idem = kwargs.get("idem")
            assert idem is None or isinstance(idem, IdempotencyKey)
            return await shard.execution.run(
                spec, user_id, idem, lambda first: body(shard, first, *args, **kwargs)
            )

        run.operation = spec  # type: ignore[attr-defined]
        return run

    return declare


def shard_call(
    *, repeatable: bool = False
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Declare a method callers may call that does not run through the pipeline (stats, streams)."""

    def declare(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        method.operation = Operation(method.__name__, repeatable=repeatable)  # type: ignore[attr-defined]
        return method

    return declare


def operation_of(method: Callable[..., Any]) -> Operation:
    """The declaration of a shard method (`LedgerShard.usage`, say); `TypeError` if it has none."""
    spec = getattr(method, "operation", None)
    if not isinstance(spec, Operation):
        raise TypeError(f"{getattr(method, '__name__', method)!r} is not a declared shard operation")
    return spec


def declared(cls: type) -> dict[str, Operation]:
    """Every operation `cls` declares, by name."""
    found: dict[str, Operation] = {}
    for name in dir(cls):
        spec = getattr(getattr(cls, name), "operation", None)
        if isinstance(spec, Operation):
            assert spec.name == name, f"{name} declared as {spec.name}"
            found[name] = spec
    return found
