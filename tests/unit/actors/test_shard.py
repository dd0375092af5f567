"""LedgerShard with a real in-memory store and a fake clock: no Ray, no Postgres."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio

from actors.errors import (
    EventConflict,
    LedgerError,
    NoCredits,
    Overloaded,
    RateLimited,
    SessionActive,
    SessionEnded,
    SessionNotFound,
    Unavailable,
)
from actors.ledger import LedgerPolicy
from actors.plans import parse_plans
from actors.records import Delivery, LedgerSnapshot, StoredLedger
from actors.replies import IdempotencyKey
from actors.routing import shard_index
from actors.shard import (
    ACTIVATION_BATCH_USERS,
    USER_WAITERS_MAX,
    LedgerShard,
    PlanEvent,
    Purchase,
    ShardConfig,
    declared,
)
from actors.shard.writebehind import SLICE_USERS
from actors.store import (
    Fence,
    LedgerStore,
    StoreError,
    StoreFenced,
    StoreUnavailable,
    WriteReceipt,
)
from tests.faulty_store import FaultyMemoryStore
from tests.harness import eventually
from tests.unit.actors.support import MIN, POLICY, SEC, STALE_MS, T0, FakeClock

SESSION_IDS = itertools.count(1)

pytestmark = pytest.mark.asyncio(loop_scope="function")


class HeldStore(FaultyMemoryStore):
    """A FaultyMemoryStore whose writes wait until `release` is set (to observe work in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.release.set()
        self.writing = asyncio.Event()

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.writing.set()
        await self.release.wait()
        await super().save(snapshots, delivery=delivery, receipt=receipt, fence=fence)


def make_shard(
    store: LedgerStore,
    clock: FakeClock,
    *,
    index: int = 0,
    count: int = 1,
    max_pending_calls: int = 1000,
    policy: LedgerPolicy = POLICY,
    owner: str | None = None,
    sync_interval_s: float = 3600,
) -> LedgerShard:
    async def factory() -> LedgerStore:
        return store

    config = ShardConfig(
        shard_index=index,
        shard_count=count,
        policy=policy,
        sync_interval_s=sync_interval_s,
        max_pending_calls=max_pending_calls,
        start_wait_s=1,
        owner=owner,
    )
    return LedgerShard(config, factory, clock=clock, new_session_id=lambda: f"s{next(SESSION_IDS)}")


@pytest.fixture
def store() -> FaultyMemoryStore:
    return FaultyMemoryStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture(loop_scope="function")
async def shard(store: FaultyMemoryStore, clock: FakeClock) -> AsyncIterator[LedgerShard]:
    shard = make_shard(store, clock)
    await shard.start()
    yield shard
    await shard.stop()


async def store_calls(shard: LedgerShard) -> dict[str, int]:
    return (await shard.stats()).store_calls


class TestReads:
    async def test_credit_check_on_warm_user_makes_no_store_call(self, shard: LedgerShard) -> None:
        await shard.usage("u1")
        before = await store_calls(shard)
        for _ in range(100):
            assert await shard.has_credits("u1")
            await shard.usage("u1")
        assert await store_calls(shard) == before

    async def test_cold_user_is_loaded_once_however_many_ask(self, shard: LedgerShard) -> None:
        before = (await store_calls(shard)).get("load", 0)
        views = await asyncio.gather(*(shard.usage("u-cold") for _ in range(50)))
        assert {view.user_id for view in views} == {"u-cold"}
        assert (await store_calls(shard))["load"] == before + 1

    async def test_cold_users_asked_for_together_are_loaded_in_one_store_call(
        self, shard: LedgerShard
    ) -> None:
        before = (await store_calls(shard)).get("load", 0)
        users = [f"cold-{i}" for i in range(30)]
        views = await asyncio.gather(*(shard.usage(user) for user in users for _ in range(2)))
        assert [view.user_id for view in views] == [user for user in users for _ in range(2)]
        assert (await store_calls(shard))["load"] == before + 1
        await shard.usage("cold-later")  # a later one starts a load of its own
        assert (await store_calls(shard))["load"] == before + 2

    async def test_more_cold_users_at_once_than_one_load_takes_are_all_loaded(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        shard = make_shard(store, clock, max_pending_calls=10_000)
        await shard.start()
        users = [f"burst-{i}" for i in range(2 * ACTIVATION_BATCH_USERS + 7)]
        views = await asyncio.gather(*(shard.usage_of(user) for user in users))
        assert [view.user_id for view in views] == users
        assert (await store_calls(shard))["load"] == 3
        await shard.stop()

    async def test_unknown_user_gets_default_plan_without_a_write(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        view = await shard.usage("new")
        assert (view.plan, view.limit_ms, view.version) == ("free", 10 * MIN, 0)
        assert "new" not in store.users
        assert await shard.flush() == 0


class TestDurableWrites:
    async def test_session_start_is_durable_before_it_returns(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        started = await shard.start_session("u1", topic="verbs")
        assert store.sessions[started.session_id].is_open
        assert store.users["u1"].version == started.version

    async def test_start_with_store_down_changes_nothing(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        await shard.usage("u1")
        store.available = False
        with pytest.raises(Unavailable):
            await shard.start_session("u1")
        view = await shard.usage("u1")
        assert view.active_session is None
        assert view.version == 0
        store.available = True
        started = await shard.start_session("u1")
        assert started.version == 1

    async def test_an_end_looked_up_in_the_store_does_not_hold_the_user_meanwhile(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        """Ending a session the ledger no longer holds reads the store outside the user's turn:
        the user's other calls are answered meanwhile, and the end is then answered as before."""
        reading, release = asyncio.Event(), asyncio.Event()

        class SlowLookups(FaultyMemoryStore):
            async def find_session(self, user_id: str, session_id: str) -> Any:
                reading.set()
                await release.wait()
                return await super().find_session(user_id, session_id)

        slow = SlowLookups()
        shard = make_shard(slow, clock)
        await shard.start()
        ending = asyncio.create_task(shard.end_session("u1", "never-started"))
        await reading.wait()
        assert (await shard.usage("u1")).user_id == "u1"  # not held behind the lookup
        assert (await shard.stats()).busy_users == 0
        release.set()
        with pytest.raises(SessionNotFound):
            await ending
        await shard.stop()

    async def test_second_start_is_refused(self, shard: LedgerShard) -> None:
        await shard.start_session("u1")
        with pytest.raises(SessionActive):
            await shard.start_session("u1")

    async def test_end_is_durable_and_idempotent(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        started = await shard.start_session("u1")
        clock.now += 30 * SEC
        ended = await shard.end_session("u1", started.session_id)
        assert store.sessions[started.session_id].end_reason == "user_ended"
        assert store.sessions[started.session_id].used_ms == 30 * SEC
        saves = (await store_calls(shard))["save"]
        again = await shard.end_session("u1", started.session_id)
        assert again == ended
        assert (await store_calls(shard))["save"] == saves

    async def test_other_users_session_is_not_found(self, shard: LedgerShard) -> None:
        started = await shard.start_session("u1")
        with pytest.raises(SessionNotFound):
            await shard.heartbeat("u2", started.session_id)
        with pytest.raises(SessionNotFound):
            await shard.end_session("u2", started.session_id)

    async def test_durable_write_holds_that_user_only(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        held = HeldStore()
        shard = make_shard(held, clock)
        await shard.start()
        started = await shard.start_session("u1")
        await shard.usage("u2")
        held.release.clear()
        held.writing.clear()
        ending = asyncio.create_task(shard.end_session("u1", started.session_id))
        await held.writing.wait()
        beat = asyncio.create_task(shard.heartbeat("u1", started.session_id))
        async with asyncio.timeout(1):
            other = await shard.usage("u2")
        assert other.user_id == "u2"
        await asyncio.sleep(0.01)
        assert not beat.done(), "a heartbeat must wait for the user's durable write"
        held.release.set()
        assert (await ending).end_reason == "user_ended"
        with pytest.raises(SessionEnded):
            await beat
        await shard.stop()


class TestWriteBehind:
    async def test_heartbeats_are_written_by_one_batched_flush(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        sessions = {f"u{n}": (await shard.start_session(f"u{n}")).session_id for n in range(20)}
        clock.now += 30 * SEC
        for user_id, session_id in sessions.items():
            await shard.heartbeat(user_id, session_id)
        saves = (await store_calls(shard))["save"]
        assert await shard.flush() == 20
        assert (await store_calls(shard))["save"] == saves + 1
        assert all(store.sessions[s].used_ms == 30 * SEC for s in sessions.values())
        assert (await shard.stats()).dirty_users == 0

    async def test_a_large_flush_gives_the_loop_back_and_keeps_what_changed_meanwhile(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        sessions = {f"u{n}": (await shard.start_session(f"u{n}")).session_id for n in range(8 * SLICE_USERS)}
        await shard.flush()
        clock.now += 30 * SEC
        for user_id, session_id in sessions.items():
            await shard.heartbeat(user_id, session_id)
        flushing = asyncio.create_task(shard.flush())
        await asyncio.sleep(0)  # the flush has taken its first slice of snapshots
        clock.now += 10 * SEC
        await shard.heartbeat("u0", sessions["u0"])
        assert not flushing.done(), "a heartbeat is answered while a large flush is under way"
        assert await flushing == len(sessions)
        # u0's snapshot was taken before its heartbeat (u0 is still dirty) or after it (written).
        written_ms = store.sessions[sessions["u0"]].used_ms
        assert (written_ms, (await shard.stats()).dirty_users) in ((30 * SEC, 1), (40 * SEC, 0))
        await shard.flush()
        assert store.sessions[sessions["u0"]].used_ms == 40 * SEC
        assert (await shard.stats()).dirty_users == 0

    async def test_heartbeats_answer_from_memory_while_store_is_down(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        started = await shard.start_session("u1")
        store.available = False
        clock.now += 30 * SEC
        beat = await shard.heartbeat("u1", started.session_id)
        assert beat.session_used_ms == 30 * SEC
        assert await shard.has_credits("u1")
        with pytest.raises(Exception, match="switched off"):
            await shard.flush()
        assert (await shard.stats()).dirty_users == 1
        store.available = True
        assert await shard.flush() == 1
        assert store.sessions[started.session_id].used_ms == 30 * SEC


class TestAlarms:
    async def test_limit_alarm_ends_session_exactly_at_limit(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        await shard.change_plan("u1", PlanEvent("d1", "tiny", "upgrade", T0))
        started = await shard.start_session("u1")
        clock.now += 9 * SEC
        assert shard.fire_due_alarms() == 1
        await shard.flush()
        record = store.sessions[started.session_id]
        # Ended at the limit; its 6 s since the start are held, not billed, until the client is heard.
        assert (record.end_reason, record.used_ms, record.ended_at_ms) == ("limit_reached", 0, T0 + 6 * SEC)
        assert record.is_pending
        with pytest.raises(NoCredits):
            await shard.start_session("u1")
        ended = await shard.end_session("u1", started.session_id)
        assert (ended.end_reason, ended.session_used_ms) == ("limit_reached", 6 * SEC)
        record = store.sessions[started.session_id]  # the end is durable before its answer
        assert (record.used_ms, record.is_pending) == (6 * SEC, False)

    async def test_a_silent_session_at_the_limit_is_billed_to_its_last_heartbeat_across_a_restart(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        first = make_shard(store, clock)
        await first.start()
        await first.change_plan("u1", PlanEvent("d1", "tiny", "upgrade", T0))
        started = await first.start_session("u1")
        clock.now += 2 * SEC
        await first.heartbeat("u1", started.session_id)
        clock.now += 8 * SEC
        first.fire_due_alarms()
        await first.stop()  # the limit ended it at T0 + 6 s; 4 s are held
        assert store.sessions[started.session_id].is_pending
        assert "u1" in await store.open_session_users(), "a held tail is re-armed after a restart"
        second = make_shard(store, clock)
        await second.start()

        async def reactivated() -> bool:
            return not (await second.stats()).reactivating

        await eventually(reactivated)
        assert (await second.usage("u1")).held_ms == 4 * SEC
        clock.now = T0 + 2 * SEC + STALE_MS
        second.fire_due_alarms()
        await second.flush()
        record = store.sessions[started.session_id]
        assert (record.used_ms, record.last_heartbeat_at_ms, record.is_pending) == (
            2 * SEC,
            T0 + 2 * SEC,
            False,
        )
        usage = await second.usage("u1")
        assert (usage.held_ms, usage.remaining_ms) == (0, 4 * SEC)
        await second.stop()

    async def test_restarted_shard_ends_silent_session_stale(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        first = make_shard(store, clock)
        await first.start()
        await first.change_plan("u1", PlanEvent("d1", "pro", "upgrade", T0))
        started = await first.start_session("u1")
        clock.now += 40 * SEC
        await first.heartbeat("u1", started.session_id)
        await first.flush()
        # The process dies: no stop(), nothing more is written.
        clock.now += STALE_MS + 5 * MIN
        second = make_shard(store, clock)
        await second.start()
        stats = await second.stats()
        assert (stats.resident_users, stats.alarms_fired, stats.active_sessions) == (1, 1, 0)
        await second.flush()
        record = store.sessions[started.session_id]
        assert (record.end_reason, record.ended_at_ms, record.used_ms) == ("stale", T0 + 40 * SEC, 40 * SEC)
        await second.stop()

    async def test_restart_reactivates_only_this_shards_users(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        users = [f"user-{n}" for n in range(12)]
        for user_id in users:
            home = make_shard(store, clock, index=shard_index(user_id, 3), count=3)
            await home.start()
            await home.start_session(user_id)
            await home.stop()
        mine = [u for u in users if shard_index(u, 3) == 1]
        restarted = make_shard(store, clock, index=1, count=3)
        await restarted.start()
        assert (await restarted.stats()).resident_users == len(mine) > 0
        await restarted.stop()


class TestPlanEvents:
    async def test_replayed_delivery_returns_first_answer_without_effect(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        first = await shard.change_plan("u1", PlanEvent("d1", "pro", "upgrade", T0, reset_usage=True))
        again = await shard.change_plan("u1", PlanEvent("d1", "pro", "upgrade", T0, reset_usage=True))
        assert first.applied and again == first
        assert len(store.plan_events) == 1

    async def test_delivery_id_reused_for_another_event_conflicts(self, shard: LedgerShard) -> None:
        await shard.change_plan("u1", PlanEvent("d1", "pro", "upgrade", T0))
        with pytest.raises(EventConflict):
            await shard.change_plan("u1", PlanEvent("d1", "free", "downgrade", T0))

    async def test_late_event_is_recorded_not_applied(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        await shard.change_plan("u1", PlanEvent("d2", "pro", "upgrade", T0))
        late = await shard.change_plan("u1", PlanEvent("d1", "free", "downgrade", T0 - MIN))
        assert not late.applied
        assert late.usage.plan == "pro"
        assert store.plan_events["d1"].applied is False

    async def test_concurrent_duplicates_apply_once(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        results = await asyncio.gather(
            *(shard.change_plan("u1", PlanEvent("d9", "pro", "upgrade", T0)) for _ in range(10))
        )
        assert {r.applied for r in results} == {True}
        assert len({r.usage.version for r in results}) == 1
        assert store.users["u1"].version == results[0].usage.version


class TestBounds:
    async def test_calls_beyond_the_pending_bound_are_refused(self, clock: FakeClock) -> None:
        held = HeldStore()
        shard = make_shard(held, clock, max_pending_calls=1)
        await shard.start()
        await shard.usage("u1")
        held.release.clear()
        starting = asyncio.create_task(shard.start_session("u1"))
        await held.writing.wait()
        with pytest.raises(Overloaded):
            await shard.usage("u2")
        held.release.set()
        await starting
        await shard.stop()

    async def test_stop_flushes_dirty_ledgers(self, store: FaultyMemoryStore, clock: FakeClock) -> None:
        shard = make_shard(store, clock)
        await shard.start()
        started = await shard.start_session("u1")
        clock.now += 20 * SEC
        await shard.heartbeat("u1", started.session_id)
        await shard.stop()
        assert store.sessions[started.session_id].used_ms == 20 * SEC


class TestHeartbeatThatEnds:
    async def test_heartbeat_reporting_an_end_writes_it_first(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        await shard.change_plan("u1", PlanEvent("d1", "tiny", "upgrade", T0))
        started = await shard.start_session("u1")
        clock.now += 7 * SEC
        progress = await shard.heartbeat("u1", started.session_id)
        assert (progress.state, progress.end_reason) == ("ended", "limit_reached")
        assert store.sessions[started.session_id].end_reason == "limit_reached"
        assert (await shard.stats()).dirty_users == 0

    async def test_a_keyed_heartbeat_reporting_an_end_writes_its_reply_with_it(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        """Its retry after a crash must get the same answer: the reply is in the end's write."""
        await shard.change_plan("u1", PlanEvent("d1", "tiny", "upgrade", T0))
        started = await shard.start_session("u1")
        clock.now += 7 * SEC
        progress = await shard.heartbeat("u1", started.session_id, idem=IdempotencyKey("hb-1", "h"))
        assert progress.state == "ended"
        assert ("u1", "hb-1") in store.replies
        assert (await shard.stats()).dirty_users == 0

    async def test_heartbeat_reporting_an_end_is_unavailable_until_the_end_is_written(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        """A client told its session ended is told the final account: that is durable first."""
        await shard.change_plan("u1", PlanEvent("d1", "tiny", "upgrade", T0))
        started = await shard.start_session("u1")
        store.available = False
        clock.now += 7 * SEC
        with pytest.raises(Unavailable):
            await shard.heartbeat("u1", started.session_id)
        assert store.sessions[started.session_id].is_open
        store.available = True
        clock.now += 1 * SEC
        progress = await shard.heartbeat("u1", started.session_id)  # the client's retry
        assert (progress.state, progress.end_reason) == ("ended", "limit_reached")
        assert store.sessions[started.session_id].end_reason == "limit_reached"
        assert store.sessions[started.session_id].used_ms == progress.session_used_ms


class FlakyStore(FaultyMemoryStore):
    """A FaultyMemoryStore whose first `load_failures` loads fail as an outage would."""

    def __init__(self, load_failures: int) -> None:
        super().__init__()
        self.load_failures = load_failures

    async def load(self, user_ids: Sequence[str], *, now_ms: int) -> dict[str, StoredLedger]:
        if self.load_failures > 0:
            self.load_failures -= 1
            raise StoreUnavailable("load failed")
        return await super().load(user_ids, now_ms=now_ms)


class TestFaults:
    async def test_a_user_whose_rows_cannot_make_a_ledger_is_refused_and_the_others_are_served(
        self, clock: FakeClock
    ) -> None:
        """Rows an older version could leave: a held tail in a period the store does not have. That
        user is refused (503) and tried again a minute later; the shard's start and the other
        users, their open sessions re-armed, are not held up."""
        seeded = FaultyMemoryStore()
        first = make_shard(seeded, clock)
        await first.start()
        healthy = await first.start_session("healthy")
        broken = await first.start_session("broken")
        await first.stop()
        row = seeded.sessions[broken.session_id]
        seeded.sessions[broken.session_id] = replace(
            row, ended_at_ms=T0, end_reason="limit_reached", pending=((T0 - 90 * 86_400_000, 1_000, 0),)
        )
        second = make_shard(seeded, clock)
        await second.start()

        async def reactivated() -> bool:
            return not (await second.stats()).reactivating

        await eventually(reactivated)
        assert (await second.stats()).unreadable_users == 1
        with pytest.raises(Unavailable):
            await second.usage("broken")
        assert (await second.usage("healthy")).active_session is not None
        clock.now += STALE_MS + SEC
        second.fire_due_alarms()
        assert seeded.sessions[healthy.session_id].is_open  # written behind: ended in memory first
        await second.flush()
        assert seeded.sessions[healthy.session_id].end_reason == "stale", "re-armed and fired"
        seeded.sessions[broken.session_id] = replace(row, ended_at_ms=T0, end_reason="stale")  # repaired
        clock.now += 60 * SEC
        assert (await second.usage("broken")).user_id == "broken", "tried again after a minute"
        await second.stop()

    async def test_start_survives_a_failed_load_while_reactivating(self, clock: FakeClock) -> None:
        seeded = FaultyMemoryStore()
        first = make_shard(seeded, clock)
        await first.start()
        await first.start_session("u1")
        await first.stop()
        flaky = FlakyStore(load_failures=2)
        flaky.users, flaky.periods, flaky.sessions = seeded.users, seeded.periods, seeded.sessions
        second = make_shard(flaky, clock)
        await second.start()  # it serves at once; the open sessions load in the background
        assert (await second.stats()).state == "running"
        for _ in range(100):
            if not (await second.stats()).reactivating:
                break
            await asyncio.sleep(0.05)
        stats = await second.stats()
        assert (stats.reactivating, stats.active_sessions) == (False, 1)
        await second.stop()

    async def test_lost_commit_reply_is_settled_by_its_transaction(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        await shard.usage("u1")
        store.lose_next_commit_reply = True
        started = await shard.start_session("u1")  # it committed; its transaction says so
        assert store.sessions[started.session_id].is_open
        assert (await shard.current_session("u1")).session_id == started.session_id
        assert (await shard.stats()).users_in_doubt == 0

    async def test_write_cut_off_before_its_commit_changes_nothing(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        await shard.usage("u1")
        store.cut_next_write = True
        with pytest.raises(Unavailable, match="nothing was changed"):
            await shard.start_session("u1")
        assert (await shard.stats()).users_in_doubt == 0
        assert (await shard.usage("u1")).active_session is None
        assert not store.sessions
        assert (await shard.start_session("u1")).session_id in store.sessions  # and a retry works

    async def test_commit_still_in_progress_holds_the_user_until_it_lands(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        await shard.usage("u2")  # another user, to show they are not held
        await shard.usage("u1")
        store.hold_next_commit = True
        with pytest.raises(Unavailable, match="retry shortly"):
            await shard.start_session("u1")
        assert (await shard.stats()).users_in_doubt == 1
        with pytest.raises(Unavailable, match="unresolved"):
            await shard.usage("u1")
        assert (await shard.usage("u2")).user_id == "u2"
        await store.finish_pending_commit()  # the commit outlived the shard's patience, and landed
        usage = await shard.usage("u1")
        assert usage.active_session is not None, "the write committed: the stored state is adopted"
        assert (await shard.stats()).users_in_doubt == 0
        with pytest.raises(SessionActive):
            await shard.start_session("u1")

    async def test_refused_user_does_not_block_the_others(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        class Refusing(FaultyMemoryStore):
            async def save(
                self,
                snapshots: Sequence[LedgerSnapshot],
                *,
                delivery: Delivery | None = None,
                receipt: WriteReceipt | None = None,
                fence: Fence | None = None,
            ) -> None:
                if any(s.user.user_id == "bad" for s in snapshots):
                    raise StoreError("row refused")
                await super().save(snapshots, delivery=delivery, receipt=receipt, fence=fence)

        refusing = Refusing()
        shard2 = make_shard(refusing, FakeClock())
        await shard2.start()
        for user_id in ("a", "b", "bad", "c", "d"):
            await shard2.usage(user_id)
            shard2._residency.ledgers[user_id].advance(T0 + 40 * 24 * 60 * MIN)  # roll the period: dirty
            shard2._residency.dirty.add(user_id)
        assert await shard2.flush() == 4
        assert set(refusing.users) == {"a", "b", "c", "d"}
        stats = await shard2.stats()
        assert (stats.unwritable_users, stats.dirty_users) == (1, 1)
        assert await shard2.flush() == 0  # the refused user is not retried in every flush
        await shard2.stop()

    async def test_nothing_is_admitted_once_draining(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        shard = make_shard(store, clock)
        await shard.start()
        started = await shard.start_session("u1")
        await shard.stop()
        with pytest.raises(Unavailable, match="shutting down"):
            await shard.heartbeat("u1", started.session_id)

    async def test_stop_while_start_is_still_retrying(self, clock: FakeClock) -> None:
        store = FaultyMemoryStore()
        store.available = False
        shard = make_shard(store, clock)
        starting = asyncio.create_task(shard.start())
        await asyncio.sleep(0.05)
        await shard.stop()
        assert starting.done()
        store.available = True
        await asyncio.sleep(0.3)
        assert (await shard.stats()).state == "stopped"

    async def test_end_of_a_session_an_alarm_ended_is_written_before_answering(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        await shard.change_plan("u1", PlanEvent("d1", "tiny", "upgrade", T0))
        started = await shard.start_session("u1")
        clock.now += 7 * SEC
        shard.fire_due_alarms()
        shard._residency.flush_soon.clear()  # keep the background flush out of this test
        assert store.sessions[started.session_id].is_open
        ended = await shard.end_session("u1", started.session_id)
        assert ended.end_reason == "limit_reached"
        assert store.sessions[started.session_id].end_reason == "limit_reached"


class TestWatch:
    async def test_watch_returns_the_next_change_and_cleans_up(self, shard: LedgerShard) -> None:
        first = await shard.usage("u1")
        waiting = asyncio.create_task(shard.watch("u1", first.version, 5))
        await asyncio.sleep(0.01)
        assert (await shard.stats()).watchers == 1
        await shard.start_session("u1")
        changed = await asyncio.wait_for(waiting, 1)
        assert changed is not None and changed.usage.version > first.version
        assert changed.usage.active_session is not None
        assert changed.events == ()
        assert (await shard.stats()).watchers == 0

    async def test_watch_carries_the_events_of_the_change_and_the_flush_writes_them(
        self, shard: LedgerShard, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        started = await shard.start_session("u1")
        waiting = asyncio.create_task(shard.watch("u1", started.version, 5))
        await asyncio.sleep(0.01)
        clock.now += 6 * MIN  # 4 of the free plan's 10 minutes left: under the 5-minute threshold
        await shard.heartbeat("u1", started.session_id)
        changed = await asyncio.wait_for(waiting, 1)
        assert changed is not None
        assert [event.kind for event in changed.events] == ["low_balance"]
        assert changed.usage.warning == "low_balance"
        assert store.events == {}  # a heartbeat is not a durable write: the event waits for the flush
        await shard.flush()
        (written,) = store.events.values()
        assert written == changed.events[0]
        assert store.users["u1"].alert_level == 1

    async def test_watch_times_out_with_none_and_leaves_nothing_behind(self, shard: LedgerShard) -> None:
        first = await shard.usage("u1")
        assert await shard.watch("u1", first.version, 0.05) is None
        assert (await shard.stats()).watchers == 0
        assert "u1" not in shard._watchers._events

    async def test_watch_answers_at_once_when_already_newer(self, shard: LedgerShard) -> None:
        await shard.start_session("u1")
        assert (await shard.watch("u1", 0, 5)) is not None


LIMITED = LedgerPolicy(
    plans=parse_plans(
        """
        default_plan = "free"
        [plans.free]
        minutes = 10
        [plans.free.rate_limit]
        requests_per_s = 2
        burst = 3
        [plans.pro]
        minutes = 500
        """,
        source="rate-limit tests",
    ),
    stale_session_ms=STALE_MS,
    low_balance_ms=5 * MIN,
)


class TestRateLimit:
    async def test_the_methods_named_rate_limited_are_those_that_take_a_token(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        """Gateways refuse the operations declared `rate_limited` for a user their shard just
        limited; the set must be exactly the methods that take a token, or a gateway would refuse
        billing's calls. Each user method is called, once its user's tokens are spent, to see
        whether it is refused."""
        shard = make_shard(store, clock, policy=LIMITED)
        await shard.start()
        calls: dict[str, Any] = {
            "usage": lambda user, sid: shard.usage(user),
            "usage_of": lambda user, sid: shard.usage_of(user),
            "has_credits": lambda user, sid: shard.has_credits(user),
            "current_session": lambda user, sid: shard.current_session(user),
            "list_sessions": lambda user, sid: shard.list_sessions(user, 5),
            "start_session": lambda user, sid: shard.start_session(user),
            "heartbeat": lambda user, sid: shard.heartbeat(user, sid),
            "end_session": lambda user, sid: shard.end_session(user, sid),
            "consume_meter": lambda user, sid: shard.consume_meter(user, "generations", 1),
            "credits": lambda user, sid: shard.credits(user),
            "usage_history": lambda user, sid: shard.usage_history(user, 3),
            "credit_history": lambda user, sid: shard.credit_history(user, 5),
            "change_plan": lambda user, sid: shard.change_plan(
                user, PlanEvent(f"d-{user}", "free", "upgrade", T0)
            ),
            "add_credits": lambda user, sid: shard.add_credits(user, Purchase(f"p-{user}", MIN, "grant")),
            "reconcile": lambda user, sid: shard.reconcile(user),
            "watch": lambda user, sid: shard.watch(user, -1, 1.0),
            "create_hold": lambda user, sid: shard.create_hold(user, meter=None, amount=1000, ttl_ms=60_000),
            "capture_hold": lambda user, sid: shard.capture_hold(user, "hold-unknown"),
            "release_hold": lambda user, sid: shard.release_hold(user, "hold-unknown"),
            "extend_hold": lambda user, sid: shard.extend_hold(user, "hold-unknown", 60_000),
            "get_hold": lambda user, sid: shard.get_hold(user, "hold-unknown"),
            "list_holds": lambda user, sid: shard.list_holds(user),
        }
        infrastructure = {
            *("start", "stop", "flush", "stats", "ready", "batch", "collect", "answer"),
            *("release", "refresh_slots"),  # the shard map's
        }
        public = {
            name
            for name, _ in inspect.getmembers(LedgerShard, inspect.iscoroutinefunction)
            if not name.startswith("_")
        }
        assert public - infrastructure == set(calls), "a new user method must say whether it takes a token"
        taking = set()
        for index, (name, call) in enumerate(calls.items()):
            user = f"limited-{index}"
            started = await shard.start_session(user)
            while True:  # spend the user's tokens
                try:
                    await shard.usage(user)
                except RateLimited:
                    break
            try:
                await call(user, started.session_id)
            except RateLimited:
                taking.add(name)
            except LedgerError:
                pass  # refused for another reason, after the token (or without one)
        assert taking == {name for name, spec in declared(LedgerShard).items() if spec.rate_limited}
        await shard.stop()

    async def test_a_burst_then_the_refill_rate_and_other_users_unaffected(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        shard = make_shard(store, clock, policy=LIMITED)
        await shard.start()
        for _ in range(3):
            await shard.usage("u1")
        with pytest.raises(RateLimited) as refused:
            await shard.has_credits("u1")
        assert refused.value.fields == {"retry_after_s": 1, "wait_ms": 500}
        assert (await shard.usage("u2")).user_id == "u2", "another user has their own bucket"
        clock.now += 500  # half a second at 2 per second: one more request
        await shard.credits("u1")
        with pytest.raises(RateLimited):
            await shard.credits("u1")
        for _ in range(10):  # billing and ops are not the user's requests
            await shard.usage_of("u1")
        await shard.stop()

    async def test_a_refused_keyed_request_runs_when_retried_later(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        shard = make_shard(store, clock, policy=LIMITED)
        await shard.start()
        for _ in range(3):
            await shard.usage("u1")
        key = IdempotencyKey("k-1", "h")
        with pytest.raises(RateLimited):
            await shard.start_session("u1", idem=key)
        assert not store.sessions, "nothing was done"
        clock.now += 1000
        started = await shard.start_session("u1", idem=key)
        assert started.session_id in store.sessions
        await shard.stop()

    async def test_a_plan_without_a_limit_is_not_limited(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        shard = make_shard(store, clock, policy=LIMITED)
        await shard.start()
        event = PlanEvent(delivery_id="d-1", plan="pro", action="upgrade", occurred_at_ms=clock.now)
        for _ in range(5):
            await shard.change_plan("u1", event)  # internal calls are not limited either
        for _ in range(50):
            await shard.usage("u1")
        await shard.stop()


OWNER = "test/ledger-shard-0-of-1"


class TestFencing:
    async def test_a_newer_activation_fences_the_old_one_which_then_writes_nothing(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        old = make_shard(store, clock, owner=OWNER)
        await old.start()
        started = await old.start_session("u1")
        clock.now += MIN
        await old.heartbeat("u1", started.session_id)  # in memory only, until a flush
        assert store.epochs == {OWNER: 1}

        new = make_shard(store, clock, owner=OWNER)  # Ray restarted the shard; the old one lives on
        await new.start()
        assert store.epochs == {OWNER: 2}
        with pytest.raises(StoreFenced):
            await old.flush()
        assert store.sessions[started.session_id].last_heartbeat_at_ms == started.started_at_ms
        assert (await old.stats()).state == "fenced"
        with pytest.raises(Unavailable):
            await old.end_session("u1", started.session_id)
        with pytest.raises(Unavailable):
            await old.usage("u1")
        assert store.sessions[started.session_id].is_open, "the old activation's end was not written"

        ended = await new.end_session("u1", started.session_id)  # the new one serves the stored state
        assert ended.state == "ended"
        await old.stop()  # drains without writing
        await new.stop()
        assert store.sessions[started.session_id].end_reason == "user_ended"

    async def test_a_durable_write_of_a_replaced_activation_is_refused_whole(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        old = make_shard(store, clock, owner=OWNER)
        await old.start()
        await store.claim(OWNER)  # what a newer activation's start does
        with pytest.raises(Unavailable):
            await old.start_session("u1")
        assert store.users == {} and store.sessions == {}
        assert (await old.stats()).state == "fenced"
        await old.stop()

    async def test_a_shard_with_no_owner_claims_nothing(
        self, shard: LedgerShard, store: FaultyMemoryStore
    ) -> None:
        await shard.start_session("u1")
        assert store.epochs == {}

    async def test_a_replaced_shard_that_only_serves_reads_learns_of_it_within_a_sync_interval(
        self, store: FaultyMemoryStore, clock: FakeClock
    ) -> None:
        old = make_shard(store, clock, owner=OWNER, sync_interval_s=0.05)
        await old.start()
        await old.usage("u1")
        await store.claim(OWNER)  # a newer activation; the old one has nothing to write

        async def fenced() -> bool:
            return (await old.stats()).state == "fenced"

        await eventually(fenced, timeout_s=5, every_s=0.02)
        with pytest.raises(Unavailable):
            await old.usage("u1")
        await old.stop()


class GatedStore(HeldStore):
    """A HeldStore whose dedupe reads (`find_purchase`) wait too."""

    async def find_purchase(self, delivery_id: str) -> Any:
        self.writing.set()
        await self.release.wait()
        return await super().find_purchase(delivery_id)


class TestAlarmsOfBusyUsers:
    """Found by review: alarms popped for users whose turn was held could be lost."""

    async def test_a_full_line_costs_no_user_its_alarm(self, clock: FakeClock) -> None:
        store = GatedStore()
        shard = make_shard(store, clock)
        await shard.start()
        await shard.start_session("a")
        clock.now += SEC
        other = await shard.start_session("b")  # b's stale deadline is a second after a's
        store.release.clear()
        store.writing.clear()
        buying = asyncio.create_task(shard.add_credits("a", Purchase("d1", MIN, "purchase")))
        await store.writing.wait()
        readers = [asyncio.create_task(shard.usage_of("a")) for _ in range(USER_WAITERS_MAX)]
        await asyncio.sleep(0.01)
        clock.now = T0 + STALE_MS + 2 * SEC
        shard.fire_due_alarms()  # a's alarm joins a's full line; b's fires
        store.release.set()
        await buying
        await asyncio.gather(*readers)
        await shard.flush()
        assert store.sessions[other.session_id].end_reason == "stale"
        assert (await shard.usage("a")).active_session is None, "a's alarm fired in its turn"
        await shard.stop()

    async def test_an_alarm_behind_a_write_left_in_doubt_fires_once_the_doubt_is_settled(
        self, clock: FakeClock
    ) -> None:
        store = GatedStore()
        shard = make_shard(store, clock)
        await shard.start()
        started = await shard.start_session("u1")
        store.release.clear()
        store.writing.clear()
        store.hold_next_commit = True  # the write ends with its outcome unknown
        buying = asyncio.create_task(shard.add_credits("u1", Purchase("d1", MIN, "purchase")))
        await store.writing.wait()
        clock.now = T0 + STALE_MS + 1
        shard.fire_due_alarms()  # queued in u1's line, behind the purchase
        store.release.set()
        with pytest.raises(Unavailable):
            await buying
        assert (await shard.stats()).users_in_doubt == 1
        assert store.pending_commit is not None
        store.abort_pending_commit()  # the commit failed after all
        clock.now += 2 * SEC
        await shard.flush()  # the flush loop's round: settles the doubt
        await shard._durable.resolve_idle(shard._turns)
        clock.now += 2 * SEC
        shard.fire_due_alarms()
        await shard.flush()
        assert store.sessions[started.session_id].end_reason == "stale"
        await shard.stop()

    async def test_stop_waits_for_the_operations_under_way_before_the_final_flush(
        self, clock: FakeClock
    ) -> None:
        store = GatedStore()
        shard = make_shard(store, clock)
        await shard.start()
        started = await shard.start_session("u1")
        await shard.add_credits("u1", Purchase("d1", MIN, "purchase"))
        clock.now += 3 * MIN
        await shard.heartbeat("u1", started.session_id)  # written behind
        store.release.clear()
        store.writing.clear()
        retry = asyncio.create_task(shard.add_credits("u1", Purchase("d1", MIN, "purchase")))
        await store.writing.wait()  # billing's retry holds u1's turn, reading its dedupe row
        stopping = asyncio.create_task(shard.stop())
        await asyncio.sleep(0.05)
        store.release.set()
        await retry
        await stopping
        assert store.sessions[started.session_id].used_ms == 3 * MIN
