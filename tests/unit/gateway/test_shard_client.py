"""The gateway's shard client and router against a fake shard handle (no Ray process).

Batching, the refusal memory, retries and time limits are the router's; the
fake (`fake_shard.py`) only records what reached it and answers as a shard
would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import ray.exceptions

from actors.errors import RateLimited, SessionNotFound, Unavailable, UserMoved, UserMoving
from actors.records import PlanEvent
from actors.replies import IdempotencyKey
from actors.routing import SLOTS, ShardMap, slot_of
from actors.shard import LedgerShard, declared
from gateway.metrics import Metrics
from gateway.shards import MAX_BATCHES_IN_FLIGHT, ShardClient, ShardRouter
from tests.unit.gateway.fake_shard import Answer, Defer, FakeShard


def client_of(shard: FakeShard, *, timeout_s: float = 2.0) -> ShardClient:
    return ShardClient(ShardRouter([shard], call_timeout_s=timeout_s, metrics=Metrics()))


def echo(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return (method, args)


async def test_hot_calls_arriving_while_batches_are_under_way_leave_together() -> None:
    shard = FakeShard(echo)
    shard.gate = asyncio.Event()
    client = client_of(shard)
    first = []
    for i in range(MAX_BATCHES_IN_FLIGHT):
        first.append(asyncio.ensure_future(client.usage(f"u{i}")))
        await asyncio.sleep(0.01)  # leaves alone: fewer batches than the bound were under way
    later = [asyncio.ensure_future(client.has_credits(f"v{i}")) for i in range(5)]
    await asyncio.sleep(0.01)
    assert [len(calls) for _, calls in shard.ray_calls] == [1] * MAX_BATCHES_IN_FLIGHT
    shard.gate.set()
    answers = await asyncio.gather(*first, *later)
    assert [len(calls) for _, calls in shard.ray_calls] == [1] * MAX_BATCHES_IN_FLIGHT + [5]
    assert answers[-1] == ("has_credits", ("v4",))


async def test_writes_travel_in_batches_of_their_own() -> None:
    shard = FakeShard(echo)
    client = client_of(shard)
    await asyncio.gather(
        client.usage("u1"),
        client.start_session("u1", topic=None, difficulty=None, request_id=None, idem=None),
    )
    assert sorted(tuple(calls) for _, calls in shard.ray_calls) == [("start_session",), ("usage",)]


async def test_a_call_still_running_when_its_batch_answered_is_collected() -> None:
    def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise Defer("late")

    shard = FakeShard(answer)
    assert await client_of(shard).usage("u1") == "late"
    assert shard.ray_calls == [("batch", ["usage"]), ("collect", 1)]


async def test_a_rate_limited_user_is_refused_here_for_the_calls_that_take_a_token() -> None:
    limited = {"on": True}

    def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if limited["on"] and method == "usage" and args == ("u1",):
            raise RateLimited.waiting(30.0)
        return method

    shard = FakeShard(answer)
    client = client_of(shard)
    with pytest.raises(RateLimited):
        await client.usage("u1")
    with pytest.raises(RateLimited):
        await client.credits("u1")  # refused without a call: it takes a token too
    assert len(shard.ray_calls) == 1
    assert await client.usage_of("u1") == "usage_of"  # billing's read takes no token
    assert await client.usage("u2") == "usage"  # another user is not refused
    event = PlanEvent("d1", "pro", "upgrade", 0)
    assert await client.change_plan("u1", event, request_id=None) == "change_plan"
    limited["on"] = False
    assert await client.usage("u1") == "usage"  # a new plan: the shard decides again


def restarting(times: int, then: Any) -> Answer:
    """A shard that is dead (restarting) for its first `times` calls, then answers `then`."""
    failures = {"left": times}

    def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise ray.exceptions.RayActorError()
        return then

    return answer


async def test_a_repeatable_call_is_retried_while_its_shard_restarts() -> None:
    shard = FakeShard(restarting(2, "listed"))
    assert await client_of(shard).list_sessions("u1", 5) == "listed"
    assert [name for name, _ in shard.ray_calls] == ["list_sessions"] * 3


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_meter_use_is_retried_only_with_an_idempotency_key(keyed: bool) -> None:
    shard = FakeShard(restarting(1, "used"))
    idem = IdempotencyKey("k1", "hash") if keyed else None
    call = client_of(shard).consume_meter("u1", "generations", 1, idem=idem)
    if keyed:
        assert await call == "used"
    else:
        with pytest.raises(Unavailable, match="restarting"):
            await call  # the first attempt may have been applied


async def test_a_shard_that_does_not_answer_in_time_is_unavailable() -> None:
    shard = FakeShard(echo)
    shard.gate = asyncio.Event()  # never set
    with pytest.raises(Unavailable, match="in time"):
        await client_of(shard, timeout_s=0.05).usage("u1")


async def test_a_domain_error_wrapped_by_ray_arrives_as_itself() -> None:
    def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        cause = SessionNotFound("no such session")
        raise ray.exceptions.RayTaskError(method, "traceback", cause).as_instanceof_cause()

    with pytest.raises(SessionNotFound):
        await client_of(FakeShard(answer)).reconcile("u1")


async def test_every_shard_is_asked_and_a_dead_one_is_reported_not_retried() -> None:
    def dead(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise ray.exceptions.RayActorError()

    router = ShardRouter([FakeShard(echo), FakeShard(dead)], call_timeout_s=1.0, metrics=Metrics())
    first, second = await ShardClient(router).stats()
    assert first == ("stats", ())
    assert isinstance(second, Unavailable)


def test_the_client_has_a_method_for_every_declared_operation() -> None:
    """Adding a shard operation means adding its typed method to the client."""
    internal = {"stop", "flush"}  # the runtime's, at shutdown: `ShardClient.stop`/`flush` cover them
    assert set(declared(LedgerShard)) - internal <= {
        name for name in dir(ShardClient) if not name.startswith("_")
    }


def test_a_method_that_is_not_a_declared_operation_cannot_be_called() -> None:
    router = ShardRouter([FakeShard(echo)], call_timeout_s=1.0, metrics=Metrics())
    with pytest.raises(TypeError, match="not a declared shard operation"):
        asyncio.run(router.call("u1", LedgerShard.batch, []))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the shard map


def _moved_to_one(user: str) -> tuple[ShardMap, ShardMap]:
    """A map of two shards where `user` is on shard 0, and the same once its slot went to shard 1."""
    before = ShardMap(epoch=1, count=2, owners=tuple(0 for _ in range(SLOTS)))
    owners = list(before.owners)
    owners[slot_of(user)] = 1
    return before, ShardMap(epoch=2, count=2, owners=tuple(owners))


async def test_a_call_a_shard_says_moved_is_sent_again_where_the_map_now_says() -> None:
    before, after = _moved_to_one("u1")

    def moved(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise UserMoved("served by another shard", slot=slot_of("u1"))

    async def load() -> ShardMap:
        return after

    old, new = FakeShard(moved), FakeShard(echo)
    router = ShardRouter([old, new], call_timeout_s=2.0, metrics=Metrics(), shard_map=before, load_map=load)
    client = ShardClient(router)
    # Even a start without a key: the old owner refused it before doing anything.
    started = await client.start_session("u1", topic=None, difficulty=None, request_id=None, idem=None)
    assert started == ("start_session", ("u1",))
    assert router.map is after
    assert await client.usage("u1") == ("usage", ("u1",))  # straight to the new owner now
    assert sum(len(calls) for _, calls in old.ray_calls) == 1


async def test_a_call_for_a_user_being_moved_waits_for_the_handoff_within_its_bound() -> None:
    before, after = _moved_to_one("u1")
    maps = [before, before, after]

    def moving(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise UserMoving("moving", retry_after_s=1)

    async def load() -> ShardMap:
        return maps.pop(0) if len(maps) > 1 else maps[0]

    router = ShardRouter(
        [FakeShard(moving), FakeShard(echo)],
        call_timeout_s=2.0,
        metrics=Metrics(),
        shard_map=before,
        load_map=load,
    )
    assert await ShardClient(router).usage("u1") == ("usage", ("u1",))

    stuck = ShardRouter([FakeShard(moving)], call_timeout_s=0.3, metrics=Metrics())
    with pytest.raises(Unavailable):  # a handoff that outlasts the bound is a 503, not a hang
        await ShardClient(stuck).usage("u1")


async def test_asking_every_shard_follows_a_map_that_shrank() -> None:
    def dead(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise ray.exceptions.RayActorError()

    shrunk = ShardMap(epoch=5, count=1, owners=tuple(0 for _ in range(SLOTS)))

    async def load() -> ShardMap:
        return shrunk

    router = ShardRouter(
        [FakeShard(echo), FakeShard(dead)], call_timeout_s=1.0, metrics=Metrics(), load_map=load
    )
    assert await ShardClient(router).stats() == [("stats", ())]  # the retired shard is not a failure


async def test_a_call_routed_to_a_shard_this_gateway_cannot_find_follows_the_map_anew() -> None:
    """A map naming a shard retired since (or not made yet) is behind: the call goes where the map
    read anew says, not to a 503."""
    before, after = _moved_to_one("u1")  # `after` routes u1 to shard 1, which no longer runs
    maps = [before]

    async def load() -> ShardMap:
        return maps[0]

    router = ShardRouter(
        [FakeShard(echo)], call_timeout_s=2.0, metrics=Metrics(), shard_map=after, load_map=load
    )
    assert await ShardClient(router).usage("u1") == ("usage", ("u1",))
    assert router.map is before
