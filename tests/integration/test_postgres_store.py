"""PostgresStore and migrations against a real Postgres."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest
import time_machine

from actors.ledger import LedgerPolicy, UserLedger
from actors.plans import Plan, PlanCatalog
from actors.records import PlanEvent, PlanEventRecord
from actors.replies import REPLY_TTL_MS, IdempotencyKey
from actors.routing import owner_name, slot_of
from actors.store import StoreFenced, StoreMoved, WriteReceipt
from actors.times import MS_PER_MINUTE, from_datetime
from persistence.database import PoolLimits, create_pool
from persistence.errors import DatabaseUnavailable, PersistenceError
from persistence.migrate import discover, migrate
from persistence.shardmap import PostgresShardMaps
from persistence.store import PostgresStore, PostgresStoreFactory
from tests.harness import eventually

POLICY = LedgerPolicy(
    plans=PlanCatalog.builtin(), stale_session_ms=10 * MS_PER_MINUTE, low_balance_ms=MS_PER_MINUTE
)
T0 = from_datetime(datetime(2026, 11, 30, 23, 50, tzinfo=UTC))


@pytest.fixture(scope="module", autouse=True, params=["today", "2031"])
def wall_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test here runs twice: at today's date and with this process's wall clock years ahead.
    The store takes its time from the caller (`now_ms`), so the date the machine has must not matter
    (a store that read the wall clock broke this module on 2026-12-01, the day after T0)."""
    if request.param == "today":
        yield
        return
    with time_machine.travel(datetime(2031, 6, 15, 12, 0, tzinfo=UTC), tick=True):
        yield


@pytest.fixture(scope="module")
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    pool = await create_pool(postgres_dsn, PoolLimits(min_size=1, max_size=2))
    async with pool.acquire() as connection:
        await migrate(connection)
    yield PostgresStore(pool)
    await pool.close()


def user_id() -> str:
    return f"store-{uuid.uuid4().hex[:12]}"


async def test_snapshot_round_trips_through_postgres(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0, plan="basic")
    session_id = str(uuid.uuid4())
    ledger.start_session(T0, session_id, topic="t", difficulty="beginner")
    ledger.heartbeat(T0 + 5 * MS_PER_MINUTE, session_id, seq=3)
    ledger.advance(T0 + 11 * MS_PER_MINUTE)  # crosses the month boundary with the session open
    snapshot = ledger.snapshot()
    await store.save([snapshot])
    loaded = (await store.load([user, "nobody-" + user], now_ms=T0))[user]
    assert loaded.user == snapshot.user
    assert loaded.open_session == next(s for s in snapshot.sessions if s.is_open)
    assert sorted(loaded.periods, key=lambda p: p.start_ms) == sorted(
        snapshot.periods, key=lambda p: p.start_ms
    )
    restored = UserLedger.restore(loaded, POLICY, T0 + 11 * MS_PER_MINUTE)
    after = T0 + 11 * MS_PER_MINUTE
    assert replace(restored.usage(after), version=0) == replace(ledger.usage(after), version=0)
    assert restored.version > ledger.version  # versions never repeat across a restore
    assert user in await store.open_session_users()


async def test_a_held_tail_round_trips_with_the_periods_it_holds_time_in(store: PostgresStore) -> None:
    """A session the limit ended across a month's end: its held time, in both months, survives a
    restart, is shown as held, and is billed to both months once the client is heard from."""
    tiny = LedgerPolicy(
        plans=PlanCatalog(plans={"tiny": Plan("tiny", 6_000)}, default_plan="tiny"),
        stale_session_ms=10 * MS_PER_MINUTE,
        low_balance_ms=0,
    )
    user = user_id()
    month_end = from_datetime(datetime(2026, 12, 1, tzinfo=UTC))
    ledger = UserLedger.new(user, tiny, month_end - 4_000)
    session_id = str(uuid.uuid4())
    ledger.start_session(month_end - 4_000, session_id)
    ledger.advance(month_end + 7_000)  # the limit at month_end + 6 s: 4 s held in Nov, 6 s in Dec
    await store.save([ledger.snapshot()])
    assert user in await store.open_session_users(), "a held tail is re-armed after a restart"
    loaded = (await store.load([user], now_ms=month_end + 8_000))[user]
    assert loaded.open_session is None
    assert [s.session_id for s in loaded.pending_sessions] == [session_id]
    restored = UserLedger.restore(loaded, tiny, month_end + 8_000)
    assert restored.usage(month_end + 8_000).held_ms == 10_000
    ended = restored.end_session(month_end + 9_000, session_id)
    assert (ended.end_reason, ended.session_used_ms) == ("limit_reached", 10_000)
    await store.save([restored.snapshot()])
    record = await store.find_session(user, session_id)
    assert record is not None and (record.used_ms, record.pending) == (10_000, ())
    assert user not in await store.open_session_users()
    periods = {p.start_ms: p for p in await store.list_periods(user, 5)}
    assert periods[month_end].used_ms == 6_000
    assert [p.used_ms for p in periods.values() if p.end_ms == month_end] == [4_000]


async def test_holds_round_trip_with_the_month_they_hold_minutes_in(store: PostgresStore) -> None:
    """A minute hold made in November survives a restart after the month ended; its capture is
    billed to November, the hold is found only by its user, and a resolved hold is not loaded again."""
    policy = POLICY
    user = user_id()
    month_end = from_datetime(datetime(2026, 12, 1, tzinfo=UTC))
    ledger = UserLedger.new(user, policy, month_end - 60_000, plan="basic")
    minutes = ledger.create_hold(
        month_end - 60_000, f"hold_{user}_m", meter=None, amount=90_000, ttl_ms=600_000
    )
    ledger.advance(month_end + 1_000)  # November ends with the hold open
    await store.save([ledger.snapshot()])
    assert user in await store.open_session_users(), "a user with a hold is re-armed after a restart"
    loaded = (await store.load([user], now_ms=month_end + 2_000))[user]
    assert loaded.holds == (minutes,)
    restored = UserLedger.restore(loaded, policy, month_end + 2_000)
    assert restored.usage(month_end + 2_000).held_ms == 90_000
    captured = restored.capture_hold(month_end + 3_000, minutes.hold_id, 30_000)
    assert (captured.state, captured.captured, captured.released) == ("captured", 30_000, 60_000)
    await store.save([restored.snapshot()])
    assert (await store.find_hold(user, minutes.hold_id)) == captured
    assert await store.find_hold("someone-else", minutes.hold_id) is None
    assert (await store.load([user], now_ms=month_end + 4_000))[user].holds == ()
    assert user not in await store.open_session_users()
    periods = {p.start_ms: p for p in await store.list_periods(user, 5)}
    assert [p.used_ms for p in periods.values() if p.end_ms == month_end] == [30_000], "billed to November"


async def test_older_versions_never_overwrite_newer(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    session_id = str(uuid.uuid4())
    ledger.start_session(T0, session_id)
    older = ledger.snapshot()
    ledger.end_session(T0 + MS_PER_MINUTE, session_id)
    newer = ledger.snapshot()
    await store.save([newer])
    await store.save([older])  # a late, replayed flush
    record = await store.find_session(user, session_id)
    assert record is not None and record.end_reason == "user_ended" and record.used_ms == MS_PER_MINUTE
    assert (await store.load([user], now_ms=T0))[user].user.version == newer.version


async def test_one_open_session_per_user_is_enforced(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    ledger.start_session(T0, str(uuid.uuid4()))
    await store.save([ledger.snapshot()])
    rogue = UserLedger.new(user, POLICY, T0)
    rogue.version = 100
    rogue.start_session(T0, str(uuid.uuid4()))
    with pytest.raises(PersistenceError, match="ExclusionViolation"):
        await store.save([rogue.snapshot()])


async def test_closing_one_session_and_opening_the_next_in_one_batch(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    ledger.start_session(T0, first)
    await store.save([ledger.snapshot()])
    ledger.end_session(T0 + 1000, first)
    ledger.start_session(T0 + 2000, second)
    snapshot = ledger.snapshot()
    # Put the open session first: the deferred constraint must not care about row order.
    await store.save([replace(snapshot, sessions=tuple(reversed(snapshot.sessions)))])
    assert [s.session_id for s in await store.list_sessions(user, 10)] == [second, first]


async def test_plan_event_is_recorded_once(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    ledger.version = 1
    event = PlanEventRecord(
        user_id=user,
        event=PlanEvent(
            delivery_id=f"msg_{uuid.uuid4().hex}", plan="pro", action="upgrade", occurred_at_ms=T0
        ),
        applied=True,
        response={"applied": True, "usage": {"plan": "pro"}},
    )
    await store.save([ledger.snapshot()], delivery=event)
    assert await store.find_plan_event(event.delivery_id) == event
    with pytest.raises(PersistenceError, match="already recorded"):
        await store.save([ledger.snapshot()], delivery=event)


async def test_malformed_session_id_is_simply_not_found(store: PostgresStore) -> None:
    assert await store.find_session(user_id(), "not-a-uuid") is None


async def test_unreachable_database_is_database_unavailable() -> None:
    factory = PostgresStoreFactory(
        dsn="postgresql://nobody@127.0.0.1:1/none", limits=PoolLimits(connect_timeout_s=2)
    )
    with pytest.raises(DatabaseUnavailable):
        await factory()
    assert "nobody" not in repr(factory)


async def test_concurrent_migrations_apply_once(postgres_dsn: str) -> None:
    connections = [await asyncpg.connect(postgres_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(connection) for connection in connections))
        assert all(result == [] for result in results)  # the module fixture migrated already
        versions = await connections[0].fetch("select version from schema_migrations order by version")
        assert [row["version"] for row in versions] == [m.version for m in discover()]
    finally:
        for connection in connections:
            await connection.close()


async def test_fresh_database_migrates_once_under_concurrency(postgres_dsn: str) -> None:
    name = f"migrate_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f'create database "{name}"')
    try:
        dsn = postgres_dsn.rsplit("/", 1)[0] + f"/{name}" if "?" not in postgres_dsn else None
        if dsn is None:  # a Unix-socket DSN keeps its query string
            base, query = postgres_dsn.split("?", 1)
            dsn = base.rsplit("/", 1)[0] + f"/{name}?{query}"
        connections = [await asyncpg.connect(dsn) for _ in range(3)]
        try:
            results = await asyncio.gather(*(migrate(connection) for connection in connections))
            assert sorted(len(r) for r in results) == [0, 0, len(discover())]
        finally:
            for connection in connections:
                await connection.close()
    finally:
        await admin.execute(f'drop database "{name}" with (force)')
        await admin.close()


async def test_credit_entries_written_twice_are_kept_once(store: PostgresStore, postgres_dsn: str) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    ledger.add_credits(T0, 5 * MS_PER_MINUTE, reason="purchase", reference="o-1")
    snapshot = ledger.snapshot()
    await store.save([snapshot])
    await store.save([snapshot])  # a replayed write
    history = await store.credit_history(user, 10)
    assert [(e.seq, e.reason, e.delta) for e in history] == [
        (2, "purchase", 5 * MS_PER_MINUTE),
        (1, "reset", 10 * MS_PER_MINUTE),
    ]
    balances = await store.credit_balances(user)
    assert balances[("purchased", None)] == (5 * MS_PER_MINUTE, 5 * MS_PER_MINUTE)


async def test_one_current_period_per_user_is_enforced(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    ledger.add_credits(T0, MS_PER_MINUTE, reason="grant", reference=None)
    snapshot = ledger.snapshot()
    await store.save([snapshot])
    current = next(p for p in snapshot.periods if not p.archived)
    rogue = replace(current, start_ms=current.start_ms - 86_400_000, version=current.version + 1)
    with pytest.raises(PersistenceError, match="ExclusionViolation"):
        await store.save([replace(snapshot, periods=(rogue,), entries=())])


async def test_credit_entry_written_again_with_other_content_is_refused(store: PostgresStore) -> None:
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    ledger.add_credits(T0, 5 * MS_PER_MINUTE, reason="purchase", reference="o-1")
    snapshot = ledger.snapshot()
    await store.save([snapshot])
    purchase = next(e for e in snapshot.entries if e.reason == "purchase")
    forged = replace(purchase, delta=purchase.delta + 1, version=purchase.version + 1)
    with pytest.raises(PersistenceError, match="other content"):
        await store.save([replace(snapshot, entries=(forged,))])
    history = await store.credit_history(user, 10)
    assert [e.delta for e in history if e.reason == "purchase"] == [5 * MS_PER_MINUTE]


async def test_write_outcome_tells_committed_from_aborted(store: PostgresStore) -> None:
    snapshot = UserLedger.new(user_id(), POLICY, T0).snapshot()
    committed = WriteReceipt()
    await store.save([snapshot], receipt=committed)
    assert committed.transaction_id is not None
    assert await store.write_outcome(committed) == "committed"

    current = next(p for p in snapshot.periods if not p.archived)
    rogue = replace(current, start_ms=current.start_ms - 86_400_000, version=current.version + 1)
    aborted = WriteReceipt()
    with pytest.raises(PersistenceError):
        await store.save([replace(snapshot, periods=(rogue,), entries=())], receipt=aborted)
    assert aborted.transaction_id is not None
    assert await store.write_outcome(aborted) == "aborted"
    assert await store.write_outcome(WriteReceipt()) == "aborted"  # it never began


async def test_write_outcome_waits_for_a_commit_in_progress(store: PostgresStore, postgres_dsn: str) -> None:
    snapshot = UserLedger.new(user_id(), POLICY, T0).snapshot()
    await store.save([snapshot])
    # Another transaction holds the user's row, so the next write begins and then waits.
    blocker = await asyncpg.connect(postgres_dsn)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute(
            "select 1 from usage_users where user_id = $1 for update", snapshot.user.user_id
        )
        receipt = WriteReceipt()
        newer = replace(snapshot, user=replace(snapshot.user, version=snapshot.user.version + 1))
        write = asyncio.create_task(store.save([newer], receipt=receipt))

        async def write_waits() -> bool:
            return receipt.transaction_id is not None

        await eventually(write_waits, every_s=0.01)
        outcome = asyncio.create_task(store.write_outcome(receipt))
        await asyncio.sleep(0.3)
        assert not outcome.done(), "the write's transaction is still in progress"
        await blocking.commit()
        await write
        assert await outcome == "committed"
    finally:
        await blocker.close()


async def test_a_reply_is_written_once_unless_its_key_had_expired(store: PostgresStore) -> None:
    ledger = UserLedger.new(user_id(), POLICY, T0)
    key = IdempotencyKey("k-1", "hash-a")
    ledger.remember_reply(key, '{"result":1}', T0)
    first = ledger.snapshot()
    await store.save([first])
    ledger.remember_reply(IdempotencyKey("k-1", "hash-b"), '{"result":2}', T0 + 1)
    await store.save([ledger.snapshot()])  # not expired: the first reply stays
    loaded = (await store.load([ledger.user_id], now_ms=T0 + 1))[ledger.user_id]
    assert [(r.request_hash, r.outcome) for r in loaded.replies] == [("hash-a", '{"result": 1}')]
    expired = (await store.load([ledger.user_id], now_ms=T0 + REPLY_TTL_MS))[ledger.user_id]
    assert expired.replies == (), "a reply is not loaded once it has expired by the shard's clock"
    later = T0 + REPLY_TTL_MS
    ledger.remember_reply(IdempotencyKey("k-1", "hash-c"), '{"result":3}', later)
    await store.save([ledger.snapshot()])  # expired: the key's new reply replaces it
    rows = await store.load([ledger.user_id], now_ms=later)
    assert [r.request_hash for r in rows[ledger.user_id].replies] == ["hash-c"]


async def test_migrating_a_new_database_reports_each_migration_to_its_progress(postgres_dsn: str) -> None:
    """`usage-ledger migrate` draws its progress bar from these calls."""
    from urllib.parse import urlsplit, urlunsplit

    from persistence.embedded import ensure_database
    from persistence.migrate import Migration

    name = f"migrate_{uuid.uuid4().hex[:8]}"
    await ensure_database(postgres_dsn, name)
    dsn = urlunsplit(urlsplit(postgres_dsn)._replace(path=f"/{name}"))

    class Progress:
        def __init__(self) -> None:
            self.pending_versions: list[int] = []
            self.applied_versions: list[int] = []

        def pending(self, migrations: Sequence[Migration]) -> None:
            self.pending_versions = [m.version for m in migrations]

        def applied(self, migration: Migration) -> None:
            self.applied_versions.append(migration.version)

    connection = await asyncpg.connect(dsn)
    try:
        first, second = Progress(), Progress()
        applied = await migrate(connection, progress=first)
        assert applied == first.pending_versions == first.applied_versions == [m.version for m in discover()]
        assert await migrate(connection, progress=second) == []
        assert (second.pending_versions, second.applied_versions) == ([], []), "nothing pending: no bar"
    finally:
        await connection.close()


async def test_a_newer_claim_fences_the_older_one_whose_writes_then_land_nowhere(
    store: PostgresStore, postgres_dsn: str
) -> None:
    owner = f"test-{uuid.uuid4().hex[:8]}/ledger-shard-0-of-1"
    old = await store.claim(owner)
    assert old.epoch == 1
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    ledger.start_session(T0, str(uuid.uuid4()))
    await store.save([ledger.snapshot()], fence=old)  # the owner's newest claim: written
    new = await store.claim(owner)
    assert new.epoch == 2
    assert (await store.ownership(new)).current and not (await store.ownership(old)).current
    ledger.heartbeat(T0 + MS_PER_MINUTE, ledger.active_session_id or "")
    receipt = WriteReceipt()
    with pytest.raises(StoreFenced):
        await store.save([ledger.snapshot()], fence=old, receipt=receipt)
    stored = (await store.load([user], now_ms=T0))[user]
    assert stored.open_session is not None and stored.open_session.last_heartbeat_at_ms == T0
    await store.save([ledger.snapshot()], fence=new)
    stored = (await store.load([user], now_ms=T0))[user]
    assert stored.open_session is not None and stored.open_session.last_heartbeat_at_ms == T0 + MS_PER_MINUTE


async def test_a_claim_waits_for_a_write_of_the_older_epoch_in_progress(
    store: PostgresStore, postgres_dsn: str
) -> None:
    owner = f"test-{uuid.uuid4().hex[:8]}/ledger-shard-0-of-1"
    await store.claim(owner)
    writer = await asyncpg.connect(postgres_dsn)
    try:
        in_progress = writer.transaction()
        await in_progress.start()
        # What a save of epoch 1 holds until it commits.
        await writer.execute("select epoch from shard_activations where owner = $1 for share", owner)
        claiming = asyncio.create_task(store.claim(owner))
        await asyncio.sleep(0.5)
        assert not claiming.done(), "the claim must not pass a write of the older epoch in progress"
        await in_progress.commit()
        assert (await asyncio.wait_for(claiming, 10)).epoch == 2
    finally:
        await writer.close()


async def test_a_handoff_moves_slots_in_postgres_and_the_giver_can_never_write_those_users_again(
    store: PostgresStore,
) -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    maps = PostgresShardMaps(store._pool)
    start = await maps.create_map(namespace, 1)
    assert start.count == 1 and set(start.owners) == {0}
    giver = await store.claim(owner_name(namespace, 0))
    taker = await store.claim(owner_name(namespace, 1))
    assert (await store.ownership(taker)).slots == frozenset()  # new to the map: owns nothing yet
    user = user_id()
    ledger = UserLedger.new(user, POLICY, T0)
    await store.save([ledger.snapshot()], fence=giver)
    before = await store.ownership(giver)

    version = await store.move_slots(giver, [slot_of(user)], 1)

    after = await store.ownership(giver)
    assert version == after.version > before.version and slot_of(user) not in (after.slots or ())
    assert (await store.ownership(taker)).slots == frozenset({slot_of(user)})
    ledger.start_session(T0, str(uuid.uuid4()))
    with pytest.raises(StoreMoved):
        await store.save([ledger.snapshot()], fence=giver)
    await store.save([ledger.snapshot()], fence=taker)  # the new owner writes them
    assert await store.move_slots(giver, [slot_of(user)], 1) == after.version  # again: nothing more moves
    moved = await maps.read_map(namespace)
    assert moved is not None and moved.owners[slot_of(user)] == 1 and moved.epoch > start.epoch
    assert (await maps.set_target(namespace, None)).count == 2
