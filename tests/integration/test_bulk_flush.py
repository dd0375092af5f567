"""A flush-sized save (rows by COPY through temporary tables) against a real Postgres: every column
round-trips exactly, and the conditional writes hold as they do for a one-user save (arrays)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from actors.records import (
    CreditEntry,
    HoldRecord,
    LedgerEvent,
    LedgerSnapshot,
    MeterRecord,
    PeriodRecord,
    ReplyRecord,
    SessionRecord,
    StoredLedger,
    UserRecord,
)
from actors.times import from_datetime
from persistence.batch import STAGED_ROWS_MIN
from persistence.database import PoolLimits, create_pool
from persistence.errors import PersistenceError
from persistence.events import event_payload
from persistence.holds import hold_from_row
from persistence.meters import meter_from_row
from persistence.migrate import migrate
from persistence.replies import reply_from_row
from persistence.sessions import session_from_row
from persistence.store import PostgresStore
from persistence.users import period_from_row, user_from_row

T0 = from_datetime(datetime(2026, 11, 30, 23, 50, 0, 123_000, tzinfo=UTC))
# The ends of the range the ledger takes (actors.times), to the millisecond.
EARLIEST = from_datetime(datetime(2000, 1, 1, 0, 0, 0, 1_000, tzinfo=UTC))
LATEST = from_datetime(datetime(2199, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC))
# One size per way the rows travel: arrays (a durable write of one user), COPY (a flush).
ONE_USER = 1
FLUSH_USERS = STAGED_ROWS_MIN + 7
# The tables a flush-sized save of `_snapshot`s stages (every one of them).
STAGED = ("users", "periods", "sessions", "meters", "holds", "entries", "replies", "events")


@pytest.fixture(scope="module")
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    # One connection: the test can look at the temporary tables the store's saves made on it.
    pool = await create_pool(postgres_dsn, PoolLimits(min_size=1, max_size=1))
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def store(pool: asyncpg.Pool[asyncpg.Record]) -> PostgresStore:
    return PostgresStore(pool)


def _snapshot(user_id: str, n: int, *, version: int, shift: int = 0) -> LedgerSnapshot:
    """A user with one record of each kind, every optional column set or not by `n`, times to the
    millisecond; `shift` changes every value a later version may change."""
    odd = n % 2 == 1
    at = T0 + n * 1_001 + shift
    period_start = from_datetime(datetime(2026, 11, 1, tzinfo=UTC))
    month_end = from_datetime(datetime(2026, 12, 1, tzinfo=UTC))
    draws = ((period_start, 1_000 + n, 7 * n),) if odd else ()
    return LedgerSnapshot(
        user=UserRecord(
            user_id=user_id,
            plan="basic" if odd else "pro",
            version=version,
            plan_event_at_ms=at - 5 if odd else None,
            plan_event_id=f"delivery-{n}" if odd else None,
            purchased_ms=n * 60_000 + shift,
            anchor_start_ms=(EARLIEST if n % 4 == 1 else at - 86_400_000) if odd else None,
            anchor_months=n % 13,
            anchor_duration_ms=n * 3 + shift,
            next_entry_seq=n + 2,
            alert_level=(n % 3) if odd else None,
        ),
        periods=(
            PeriodRecord(user_id, month_end, LATEST, "pro", 4_000 + n + shift, 600_000, False, version, n),
            PeriodRecord(user_id, period_start, month_end, "basic", 9_000 + shift, 60_000, True, version, 0),
        ),
        sessions=(
            SessionRecord(
                session_id=str(uuid.uuid5(uuid.NAMESPACE_URL, user_id)),
                user_id=user_id,
                started_at_ms=at - 60_000,
                last_heartbeat_at_ms=at,
                used_ms=59_000 + shift,
                topic=f"topic {n}" if odd else None,
                difficulty="advanced" if odd else None,
                version=version,
                ended_at_ms=at + 1 if odd else None,
                end_reason="limit_reached" if odd else None,
                last_seq=n + shift if odd else None,
                pending=draws,
            ),
        ),
        meters=(MeterRecord(user_id, "tokens", at - 999, at + 3_600_001, n + shift, version),),
        entries=(
            CreditEntry(
                user_id=user_id,
                seq=n + 1,
                occurred_at_ms=at,
                bucket="monthly" if odd else "purchased",
                window_start_ms=period_start if odd else None,
                delta=-n,
                balance_after=10_000 - n,
                reason="consume",
                reference=f"ref-{n}" if odd else None,
                version=version,
            ),
        ),
        replies=(
            ReplyRecord(user_id, f"key-{n}", f"hash-{n}", json.dumps({"n": n}), at, at + 86_400_000, version),
        ),
        events=(
            LedgerEvent(
                user_id=user_id,
                kind="low_balance",
                version=version,
                occurred_at_ms=at,
                plan="pro",
                period_start_ms=month_end,
                period_end_ms=LATEST,
                limit_ms=600_000,
                used_ms=4_000 + n,
                remaining_ms=596_000 - n,
            ),
        ),
        holds=(
            HoldRecord(
                hold_id=f"hold-{user_id}",
                user_id=user_id,
                meter=None if odd else "tokens",
                amount=100 + n,
                state="captured" if shift else "held",
                reference=f"hold-ref-{n}" if odd else None,
                created_at_ms=at - 10,
                expires_at_ms=at + 600_000 + shift,
                version=version,
                captured=100 + n if shift else 0,
                resolved_at_ms=at + shift if shift else None,
                draws=draws,
                window_start_ms=None if odd else at - 999,
            ),
        ),
    )


def _users(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:10]}-{n}" for n in range(count)]


# A user's rows, per table, each table's in a fixed order.
Tables = dict[str, tuple[object, ...]]


def _tables(
    *,
    user: UserRecord,
    periods: Iterable[PeriodRecord],
    sessions: Iterable[SessionRecord],
    meters: Iterable[MeterRecord],
    entries: Iterable[tuple[object, ...]],
    replies: Iterable[ReplyRecord],
    events: Iterable[tuple[object, ...]],
    holds: Iterable[HoldRecord],
) -> Tables:
    return {
        "user": (user,),
        "periods": tuple(sorted(periods, key=lambda p: p.start_ms)),
        "sessions": tuple(sorted(sessions, key=lambda s: s.session_id)),
        "meters": tuple(sorted(meters, key=lambda m: m.meter)),
        "entries": tuple(sorted(entries, key=repr)),
        "replies": tuple(sorted(replies, key=lambda r: r.key)),
        "events": tuple(sorted(events, key=repr)),
        "holds": tuple(sorted(holds, key=lambda h: h.hold_id)),
    }


def _entry(entry: CreditEntry) -> tuple[object, ...]:
    return (
        entry.seq,
        entry.occurred_at_ms,
        entry.bucket,
        entry.window_start_ms,
        entry.delta,
        entry.balance_after,
        entry.reason,
        entry.reference,
    )


def _event(event: LedgerEvent) -> tuple[object, ...]:
    return (event.event_id, event.kind, event.version, event.occurred_at_ms, event_payload(event))


def _as_stored(snapshot: LedgerSnapshot) -> Tables:
    """What reading a written snapshot back gives (replies at version 0: they are written once)."""
    return _tables(
        user=snapshot.user,
        periods=snapshot.periods,
        sessions=snapshot.sessions,
        meters=snapshot.meters,
        entries=[_entry(e) for e in snapshot.entries],
        replies=[replace(r, version=0) for r in snapshot.replies],
        events=[_event(e) for e in snapshot.events],
        holds=snapshot.holds,
    )


async def _stored(pool: asyncpg.Pool[asyncpg.Record], user_ids: Sequence[str]) -> dict[str, Tables]:
    """Every row of these users, in every table a save writes, read back as records."""
    async with pool.acquire() as connection:

        async def rows(table: str) -> dict[str, list[asyncpg.Record]]:
            found: dict[str, list[asyncpg.Record]] = defaultdict(list)
            for row in await connection.fetch(
                f"select * from {table} where user_id = any($1)", list(user_ids)
            ):
                found[row["user_id"]].append(row)
            return found

        users, periods, sessions = (
            await rows("usage_users"),
            await rows("usage_periods"),
            await rows("usage_sessions"),
        )
        meters, replies, holds = (
            await rows("usage_meters"),
            await rows("idempotency_keys"),
            await rows("usage_holds"),
        )
        entries, events = await rows("credit_ledger"), await rows("usage_events")
    return {
        user_id: _tables(
            user=user_from_row(user_row),
            periods=[period_from_row(r) for r in periods[user_id]],
            sessions=[session_from_row(r) for r in sessions[user_id]],
            meters=[meter_from_row(r) for r in meters[user_id]],
            entries=[
                (
                    r["seq"],
                    from_datetime(r["occurred_at"]),
                    r["bucket"],
                    from_datetime(r["window_start"]) if r["window_start"] is not None else None,
                    r["delta"],
                    r["balance_after"],
                    r["reason"],
                    r["reference"],
                )
                for r in entries[user_id]
            ],
            replies=[reply_from_row(r) for r in replies[user_id]],
            events=[
                (
                    r["event_id"],
                    r["kind"],
                    r["version"],
                    from_datetime(r["occurred_at"]),
                    json.loads(r["payload"]),
                )
                for r in events[user_id]
            ],
            holds=[hold_from_row(r) for r in holds[user_id]],
        )
        for user_id, (user_row,) in users.items()
    }


async def _staged_tables(pool: asyncpg.Pool[asyncpg.Record]) -> list[str]:
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            "select relname from pg_class where relnamespace = pg_my_temp_schema() and relkind = 'r'"
        )
    return [row["relname"] for row in rows]


@pytest.mark.parametrize("count", [ONE_USER, FLUSH_USERS], ids=["arrays", "copy"])
async def test_every_column_round_trips(
    store: PostgresStore, pool: asyncpg.Pool[asyncpg.Record], count: int
) -> None:
    users = _users(f"columns{count}", count)
    snapshots = [_snapshot(user, n, version=3) for n, user in enumerate(users)]
    await store.save(snapshots)
    stored = await _stored(pool, users)
    assert stored == {s.user.user_id: _as_stored(s) for s in snapshots}
    if count >= STAGED_ROWS_MIN:
        assert {f"staged_{name}" for name in STAGED} <= set(await _staged_tables(pool))
    # Read back as a shard activates them: the records the save was given.
    loaded = await store.load(users, now_ms=T0)
    for n, snapshot in enumerate(snapshots):
        ledger = loaded[snapshot.user.user_id]
        assert isinstance(ledger, StoredLedger)
        assert ledger.user == snapshot.user
        assert ledger.meters == snapshot.meters
        assert ledger.replies == tuple(replace(r, version=0) for r in snapshot.replies)
        assert ledger.holds == snapshot.holds
        session = snapshot.sessions[0]
        assert ledger.open_session == (None if n % 2 else session)
        assert ledger.pending_sessions == ((session,) if n % 2 else ())
        # The current period, then the archived one: it holds the open session's last heartbeat,
        # or the held time of the ended session and of the minute hold.
        assert ledger.periods == snapshot.periods


@pytest.mark.parametrize("count", [ONE_USER, FLUSH_USERS], ids=["arrays", "copy"])
async def test_rows_are_replaced_only_by_newer_versions_of_themselves(
    store: PostgresStore, pool: asyncpg.Pool[asyncpg.Record], count: int
) -> None:
    """Every versioned row is replaced only by a newer version (and only the columns a later
    version may change); a reply before it expired, an entry and an event never."""
    users = _users(f"versions{count}", count)
    first = [_snapshot(user, n, version=5) for n, user in enumerate(users)]
    await store.save(first)
    # Odd users come again newer, even ones older; every value a later version may change differs.
    again = [_snapshot(user, n, version=6 if n % 2 else 4, shift=17) for n, user in enumerate(users)]
    await store.save(again)
    stored = await _stored(pool, users)
    for n, (old, new) in enumerate(zip(first, again, strict=True)):
        kept, written = _as_stored(old), _as_stored(new)
        # An event is another row at another version (its id is made of the version).
        expected = dict(kept, events=tuple(sorted(kept["events"] + written["events"], key=repr)))
        if n % 2:
            (old_session,), (new_session,) = old.sessions, new.sessions
            (old_hold,), (new_hold,) = old.holds, new.holds
            expected |= {
                "user": written["user"],
                "periods": written["periods"],
                "meters": written["meters"],
                # A session's start, topic and difficulty, a hold's amount, meter, reference,
                # creation and draws are written once.
                "sessions": (replace(new_session, started_at_ms=old_session.started_at_ms),),
                "holds": (replace(new_hold, created_at_ms=old_hold.created_at_ms),),
            }
        assert stored[old.user.user_id] == expected


@pytest.mark.parametrize("count", [ONE_USER, FLUSH_USERS], ids=["arrays", "copy"])
async def test_another_users_session_or_hold_id_changes_nothing(
    store: PostgresStore, pool: asyncpg.Pool[asyncpg.Record], count: int
) -> None:
    users = _users(f"ids{count}", count + 1)
    victim, thief = _snapshot(users[0], 1, version=5), users[1]
    await store.save([victim])
    taken = _snapshot(thief, 1, version=99, shift=5)
    taken = replace(
        taken,
        sessions=tuple(replace(s, user_id=thief) for s in victim.sessions),
        holds=tuple(replace(h, user_id=thief) for h in victim.holds),
    )
    others = [_snapshot(user, n, version=2) for n, user in enumerate(users[2:], start=2)]
    await store.save([taken, *others])
    stored = await _stored(pool, users[:2])
    assert stored[victim.user.user_id] == _as_stored(victim)
    assert stored[thief]["sessions"] == stored[thief]["holds"] == ()


@pytest.mark.parametrize("count", [ONE_USER, FLUSH_USERS], ids=["arrays", "copy"])
async def test_a_reply_is_replaced_only_once_expired(
    store: PostgresStore, pool: asyncpg.Pool[asyncpg.Record], count: int
) -> None:
    users = _users(f"replies{count}", count)
    snapshots = [_snapshot(user, n, version=2) for n, user in enumerate(users)]
    await store.save(snapshots)
    (reply,) = snapshots[0].replies
    for version, again, expected in [
        (3, replace(reply, request_hash="early", created_at_ms=reply.expires_at_ms - 1), reply),
        (4, replace(reply, request_hash="later", created_at_ms=reply.expires_at_ms), None),
    ]:
        newer = [replace(s, user=replace(s.user, version=version)) for s in snapshots]
        newer[0] = replace(newer[0], replies=(again,))
        await store.save(newer)
        stored = await _stored(pool, users[:1])
        assert stored[users[0]]["replies"] == (replace(expected or again, version=0),)


@pytest.mark.parametrize("count", [ONE_USER, FLUSH_USERS], ids=["arrays", "copy"])
async def test_an_entry_written_again_must_be_the_same(
    store: PostgresStore, pool: asyncpg.Pool[asyncpg.Record], count: int
) -> None:
    """A repeated write of the same entries adds nothing; one entry with other content refuses the
    whole save (nothing of it is written) and names the entry."""
    users = _users(f"entries{count}", count)
    snapshots = [_snapshot(user, n, version=2) for n, user in enumerate(users)]
    await store.save(snapshots)
    await store.save(snapshots)
    stored = await _stored(pool, users)
    assert stored == {s.user.user_id: _as_stored(s) for s in snapshots}
    newer = [replace(s, user=replace(s.user, version=9)) for s in snapshots]
    (entry,) = newer[-1].entries
    newer[-1] = replace(newer[-1], entries=(replace(entry, delta=-12_345),))
    with pytest.raises(PersistenceError, match=f"credit entry {entry.user_id}#{entry.seq} exists"):
        await store.save(newer)
    assert await _stored(pool, users) == stored


async def test_a_flush_after_a_refused_one_on_the_same_connection_is_written(
    store: PostgresStore, pool: asyncpg.Pool[asyncpg.Record]
) -> None:
    """A rolled-back COPY leaves nothing behind for the next save on the connection to read."""
    users = _users("after-refusal", FLUSH_USERS + 1)
    snapshots = [_snapshot(user, n, version=2) for n, user in enumerate(users)]
    await store.save(snapshots[:1])
    (entry,) = snapshots[0].entries
    clash = replace(snapshots[1], entries=(*snapshots[1].entries, replace(entry, delta=1)))
    with pytest.raises(PersistenceError):
        await store.save([clash, *snapshots[2:]])
    await store.save(snapshots[1:])
    assert await _stored(pool, users) == {s.user.user_id: _as_stored(s) for s in snapshots}


APP_LOGIN = "ledger_test_app"  # as tests/integration/test_postgres_roles.py names it


async def test_the_servers_role_can_make_a_flush_sized_save(
    postgres_dsn: str, pool: asyncpg.Pool[asyncpg.Record]
) -> None:
    """The role the server runs as owns nothing (`usage_ledger_app`); its COPY goes to temporary
    tables, which every role may make unless an administrator revoked `TEMPORARY`."""
    async with pool.acquire() as admin:
        exists = await admin.fetchval("select exists (select from pg_roles where rolname = $1)", APP_LOGIN)
        if not exists:
            # Roles belong to the whole cluster: another run may make it at the same moment.
            with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                await admin.execute(f"create role {APP_LOGIN} login in role usage_ledger_app")
    parts = urlsplit(postgres_dsn)
    app_dsn = urlunsplit(parts._replace(netloc=f"{APP_LOGIN}@{parts.netloc.rsplit('@', 1)[-1]}"))
    app_pool = await create_pool(app_dsn, PoolLimits(min_size=1, max_size=1))
    try:
        users = _users("app-role", FLUSH_USERS)
        snapshots = [_snapshot(user, n, version=2) for n, user in enumerate(users)]
        await PostgresStore(app_pool).save(snapshots)
    finally:
        await app_pool.close()
    assert await _stored(pool, users) == {s.user.user_id: _as_stored(s) for s in snapshots}


def test_the_sizes_cover_both_ways() -> None:
    assert ONE_USER < STAGED_ROWS_MIN <= FLUSH_USERS
