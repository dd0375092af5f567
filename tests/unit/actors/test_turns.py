"""UserTurns: one operation per user at a time, the rest in arrival order, bounded waits."""

from __future__ import annotations

import asyncio

import pytest

from actors.turns import TooManyWaiters, UserTurns

pytestmark = pytest.mark.asyncio(loop_scope="function")


def far() -> float:
    return asyncio.get_running_loop().time() + 60


async def test_an_uncontended_turn_is_taken_and_given_back_without_waiting() -> None:
    turns = UserTurns(waiters_max=4)
    assert turns.try_take("u1")
    assert turns.busy("u1") and not turns.busy("u2")
    assert not turns.try_take("u1")
    assert turns.try_take("u2"), "users do not wait for each other"
    turns.release("u1")
    turns.release("u2")
    assert len(turns) == 0


async def test_waiters_get_the_turn_in_arrival_order_one_at_a_time() -> None:
    turns = UserTurns(waiters_max=8)
    assert turns.try_take("u1")
    order: list[int] = []
    running = 0

    async def operation(index: int) -> None:
        nonlocal running
        await turns.take("u1", deadline=far())
        running += 1
        assert running == 1, "two operations of one user ran at once"
        order.append(index)
        await asyncio.sleep(0)  # an operation that waits keeps its turn
        running -= 1
        turns.release("u1")

    waiters = [asyncio.create_task(operation(index)) for index in range(5)]
    await asyncio.sleep(0)
    assert turns.waiting("u1") == 5
    turns.release("u1")
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]
    assert not turns.busy("u1"), "the user's line is gone once idle"


async def test_two_waiters_behind_a_long_operation_never_livelock() -> None:
    """The shape of the livelock a gate re-entered in a loop made: a holder and two waiters."""
    turns = UserTurns(waiters_max=8)
    assert turns.try_take("u1")
    done: list[str] = []

    async def read(name: str) -> None:
        await turns.take("u1", deadline=far())
        done.append(name)
        turns.release("u1")

    readers = [asyncio.create_task(read("a")), asyncio.create_task(read("b"))]
    await asyncio.sleep(0.01)  # the durable write of the holder
    turns.release("u1")
    await asyncio.wait_for(asyncio.gather(*readers), timeout=1)
    assert done == ["a", "b"] and len(turns) == 0


async def test_a_waiter_past_its_deadline_leaves_the_line_and_changes_nothing() -> None:
    turns = UserTurns(waiters_max=8)
    assert turns.try_take("u1")
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await turns.take("u1", deadline=loop.time() + 0.01)
    assert turns.waiting("u1") == 0
    turns.release("u1")
    assert not turns.busy("u1")


async def test_a_waiter_cancelled_as_the_turn_reaches_it_passes_the_turn_on() -> None:
    turns = UserTurns(waiters_max=8)
    assert turns.try_take("u1")
    first = asyncio.create_task(turns.take("u1", deadline=far()))
    second = asyncio.create_task(turns.take("u1", deadline=far()))
    await asyncio.sleep(0)
    turns.release("u1")  # hands the turn to `first`...
    first.cancel()  # ...which gives up before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, timeout=1)  # the turn went on to `second`
    turns.release("u1")
    assert not turns.busy("u1")


async def test_a_callback_runs_in_its_turn_in_line() -> None:
    turns = UserTurns(waiters_max=8)
    seen: list[str] = []
    turns.call_when_free("u1", lambda: seen.append("now"))
    assert seen == ["now"] and not turns.busy("u1"), "free: it runs at once"
    assert turns.try_take("u1")
    waiter = asyncio.create_task(turns.take("u1", deadline=far()))
    await asyncio.sleep(0)
    turns.call_when_free("u1", lambda: seen.append(f"busy={turns.busy('u1')}"))
    turns.release("u1")
    await waiter  # the waiter that came first has its turn first
    assert seen == ["now"]
    turns.release("u1")  # then the callback, within the turn
    assert seen == ["now", "busy=True"]
    assert not turns.busy("u1")


async def test_a_users_line_is_bounded() -> None:
    turns = UserTurns(waiters_max=2)
    assert turns.try_take("u1")
    waiters = [asyncio.create_task(turns.take("u1", deadline=far())) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(TooManyWaiters):
        await turns.take("u1", deadline=far())
    assert turns.try_take("u2"), "another user is not affected"
    for _ in waiters:
        turns.release("u1")
        await asyncio.sleep(0)
    turns.release("u1")
    await asyncio.gather(*waiters)
    assert not turns.busy("u1")
