"""Handing a user's slot from one shard to another (a resize's step), over the in-memory store.

Two shards of one map (`sim/ledger-shard-0`, `-1`) share a `FaultyMemoryStore`: the giving shard
writes the users through, moves the slots, and can never write them again; the receiving shard
serves them from the store, alarms and all; a failure part way leaves every user one owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from actors.errors import Unavailable, UserMoved, UserMoving
from actors.routing import SLOTS, owner_name, slot_of
from actors.shard import Handoff, LedgerShard
from actors.store import Fence, Ownership, StoreMoved
from tests.faulty_store import FaultyMemoryStore
from tests.unit.actors.support import MIN, SEC, STALE_MS, FakeClock
from tests.unit.actors.test_shard import HeldStore, make_shard

pytestmark = pytest.mark.asyncio(loop_scope="function")

NAMESPACE = "sim"
USER = "user-handoff"


@pytest_asyncio.fixture(loop_scope="function")
async def pair(store: FaultyMemoryStore, clock: FakeClock) -> AsyncIterator[tuple[LedgerShard, LedgerShard]]:
    """Shard 0 owns every slot (a map of one shard); shard 1 exists and owns none yet."""
    await store.create_map(NAMESPACE, 1)
    giving = make_shard(store, clock, index=0, count=1, owner=owner_name(NAMESPACE, 0))
    taking = make_shard(store, clock, index=1, count=2, owner=owner_name(NAMESPACE, 1))
    await giving.start()
    await taking.start()
    yield giving, taking
    for shard in (giving, taking):
        await shard.stop()


@pytest.fixture
def store() -> FaultyMemoryStore:
    return HeldStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_a_user_handed_off_is_served_by_the_new_owner_with_their_session_and_hold(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore, clock: FakeClock
) -> None:
    giving, taking = pair
    started = await giving.start_session(USER)
    hold = await giving.create_hold(USER, meter=None, amount=MIN, ttl_ms=10 * MIN)
    clock.now += 30 * SEC
    await giving.heartbeat(USER, started.session_id)  # written behind: only in the giving shard's memory
    assert await taking.refresh_slots() == []

    handed = await giving.release([slot_of(USER)], 1)

    assert handed == Handoff(users=1, alarmed=(USER,))  # its session and hold have alarms
    assert slot_of(USER) in store.owned[owner_name(NAMESPACE, 1)]
    assert slot_of(USER) not in store.owned[owner_name(NAMESPACE, 0)]
    with pytest.raises(UserMoved):
        await giving.usage(USER)
    # The new owner learns of the slot when asked for one of its users, and has the heartbeat.
    usage = await taking.usage(USER)
    assert usage.active_session is not None and usage.active_session.session_id == started.session_id
    assert usage.used_ms == 30 * SEC
    clock.now += 30 * SEC
    beat = await taking.heartbeat(USER, started.session_id)
    assert beat.state == "active" and beat.session_used_ms == 60 * SEC
    captured = await taking.capture_hold(USER, hold.hold_id)
    assert captured.state == "captured"


async def test_the_giving_shard_can_never_write_a_user_it_handed_off(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore
) -> None:
    giving, _ = pair
    await giving.start_session(USER)
    stale = giving._residency.ledgers[USER].snapshot()
    await giving.release([slot_of(USER)], 1)
    with pytest.raises(StoreMoved):
        await giving._fencing.save([stale])
    # Its other users are its own still.
    other = next(f"other-{n}" for n in range(1000) if slot_of(f"other-{n}") != slot_of(USER))
    await giving.start_session(other)
    assert store.users[other].version >= 1


async def test_the_receiving_shard_runs_the_alarms_of_what_it_was_given(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore, clock: FakeClock
) -> None:
    giving, taking = pair
    started = await giving.start_session(USER)
    clock.now += 20 * SEC
    await giving.heartbeat(USER, started.session_id)
    handoff = await giving.release([slot_of(USER)], 1)
    # Asked to refresh (as a resize does), it loads the users the handoff named, whose alarms run.
    assert handoff.alarmed is not None
    assert slot_of(USER) in await taking.refresh_slots(list(handoff.alarmed))
    await asyncio.sleep(0.05)
    assert USER in taking._residency.ledgers
    clock.now += STALE_MS + SEC
    taking.fire_due_alarms()
    await taking.flush()
    session = store.sessions[started.session_id]
    # Ended by the new owner's alarm (the plan's 10 minutes ran out first), billed to its last heartbeat.
    assert session.end_reason == "limit_reached" and session.used_ms == 20 * SEC


async def test_a_handoff_waits_for_the_operation_under_way_and_refuses_what_comes_meanwhile(
    pair: tuple[LedgerShard, LedgerShard], store: HeldStore, clock: FakeClock
) -> None:
    giving, taking = pair
    store.release.clear()  # writes wait
    starting = asyncio.create_task(giving.start_session(USER))
    await store.writing.wait()
    handing = asyncio.create_task(giving.release([slot_of(USER)], 1))
    await asyncio.sleep(0.01)
    with pytest.raises(UserMoving):  # the slot is leaving: a new call is refused at once
        await giving.usage(USER)
    assert not handing.done()
    store.release.set()
    started = await starting  # the write under way finished first, and is in the store
    assert (await handing).users == 1
    assert store.sessions[started.session_id].is_open
    usage = await taking.usage(USER)
    assert usage.active_session is not None and usage.active_session.session_id == started.session_id


async def test_a_handoff_the_store_refuses_changes_nothing(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore
) -> None:
    giving, taking = pair
    await giving.start_session(USER)
    store.available = False
    with pytest.raises(Unavailable):
        await giving.release([slot_of(USER)], 1)
    store.available = True
    assert slot_of(USER) in store.owned[owner_name(NAMESPACE, 0)]
    assert (await giving.usage(USER)).active_session is not None  # still served where it was
    with pytest.raises(UserMoved):
        await taking.usage(USER)


async def test_a_handoff_whose_answer_was_lost_is_settled_by_asking_the_store(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore
) -> None:
    giving, taking = pair
    await giving.start_session(USER)
    store.lose_next_commit_reply = True  # the slots move, the answer is lost
    with pytest.raises(Unavailable):
        await giving.release([slot_of(USER)], 1)
    # Until the store has been asked again, the user is neither served nor given up here...
    await asyncio.sleep(0.05)  # ...which the giving shard does by itself
    with pytest.raises(UserMoved):
        await giving.usage(USER)
    assert (await taking.usage(USER)).active_session is not None
    assert USER not in giving._residency.ledgers


async def test_a_handoff_cut_before_it_committed_leaves_the_user_where_it_was(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore
) -> None:
    giving, taking = pair
    await giving.start_session(USER)
    store.cut_next_write = True  # the connection drops: the move never committed, unknown to the shard
    with pytest.raises(Unavailable):
        await giving.release([slot_of(USER)], 1)
    await asyncio.sleep(0.05)
    assert (await giving.usage(USER)).active_session is not None
    with pytest.raises(UserMoved):
        await taking.usage(USER)
    assert (await giving.release([slot_of(USER)], 1)).users == 1  # asked again, it goes
    assert (await taking.usage(USER)).active_session is not None


async def test_releasing_slots_already_given_is_a_no_op(pair: tuple[LedgerShard, LedgerShard]) -> None:
    giving, taking = pair
    await giving.start_session(USER)
    assert (await giving.release([slot_of(USER)], 1)).users == 1
    assert await giving.release([slot_of(USER)], 1) == Handoff(0, ())
    assert len(await taking.refresh_slots()) == 1
    assert len(await giving.refresh_slots()) == SLOTS - 1


async def test_a_receiver_not_told_which_users_have_alarms_finds_them_in_the_store(
    pair: tuple[LedgerShard, LedgerShard], store: FaultyMemoryStore, clock: FakeClock
) -> None:
    """A resize cut short after a handoff: the receiver hears of its slots at its next sync (or a
    call), with no list of users, and still runs their alarms."""
    giving, taking = pair
    started = await giving.start_session(USER)
    await giving.release([slot_of(USER)], 1)
    await taking._placement.refresh()  # what its write-behind loop does every sync
    await asyncio.sleep(0.05)
    assert USER in taking._residency.ledgers
    clock.now += STALE_MS + SEC
    taking.fire_due_alarms()
    await taking.flush()
    assert not store.sessions[started.session_id].is_open


class SlowOwnershipStore(HeldStore):
    """A store whose answer about ownership is read at once but arrives only when `answer` is set:
    an answer overtaken by a handoff that commits meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.answer.set()

    async def ownership(self, fence: Fence) -> Ownership:
        found = await super().ownership(fence)
        await self.answer.wait()
        return found


async def test_an_answer_about_slots_read_before_a_handoff_committed_changes_nothing_after_it(
    clock: FakeClock,
) -> None:
    store = SlowOwnershipStore()
    await store.create_map(NAMESPACE, 1)
    giving = make_shard(store, clock, index=0, count=1, owner=owner_name(NAMESPACE, 0))
    taking = make_shard(store, clock, index=1, count=2, owner=owner_name(NAMESPACE, 1))
    await giving.start()
    await taking.start()
    await giving.start_session(USER)
    store.answer.clear()
    stale = asyncio.create_task(giving._placement.refresh())  # reads: the slot is still its own
    await asyncio.sleep(0.01)
    await giving.release([slot_of(USER)], 1)  # commits meanwhile
    store.answer.set()
    assert await stale == []  # the answer arrives after the handoff: it gains nothing back
    assert not giving._placement.owns(USER)
    with pytest.raises(UserMoved):
        await giving.usage(USER)
    assert (await taking.usage(USER)).active_session is not None
    for shard in (giving, taking):
        await shard.stop()
