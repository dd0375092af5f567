"""Idempotency-Key replies: the codec, and a shard answering a keyed retry with its first outcome."""

from __future__ import annotations

import asyncio

import pytest

from actors.errors import IdempotencyInFlight, IdempotencyMismatch, NoCredits, SessionActive
from actors.records import ReplyRecord
from actors.replies import (
    REPLIES_PER_USER_MAX,
    REPLY_TTL_MS,
    IdempotencyKey,
    ReplyBook,
    encode_refusal,
    encode_result,
    replay,
)
from actors.shard import PlanEvent
from actors.store import MemoryStore
from actors.views import ActiveSessionView, PlanChangeResult, SessionStarted, UsageView
from tests.unit.actors.support import MIN, SEC, T0, FakeClock
from tests.unit.actors.test_shard import HeldStore, make_shard

KEY = IdempotencyKey(key="k-1", request_hash="hash-a")


def reply(outcome: str) -> ReplyRecord:
    return ReplyRecord("u1", KEY.key, KEY.request_hash, outcome, T0, T0 + REPLY_TTL_MS, 1)


class TestBounds:
    def test_past_the_bound_the_oldest_replies_expire_early(self) -> None:
        book = ReplyBook("u1")
        for index in range(REPLIES_PER_USER_MAX + 3):
            book.remember(IdempotencyKey(f"k{index}", "h"), "{}", T0 + index, version=index + 1)
        assert len(book) == REPLIES_PER_USER_MAX
        assert [book.get(f"k{index}", T0) for index in range(3)] == [None, None, None]
        assert book.get(f"k{REPLIES_PER_USER_MAX + 2}", T0) is not None
        assert book.get("k3", T0) is not None

    def test_a_restored_book_keeps_the_newest_within_the_bound(self) -> None:
        stored = tuple(
            ReplyRecord("u1", f"k{index}", "h", "{}", T0 + index, T0 + index + REPLY_TTL_MS, 0)
            for index in range(REPLIES_PER_USER_MAX + 5)
        )
        book = ReplyBook("u1", stored)
        assert len(book) == REPLIES_PER_USER_MAX
        assert book.get("k4", T0) is None and book.get("k5", T0) is not None


class TestCodec:
    def test_a_nested_result_comes_back_equal(self) -> None:
        usage = UsageView(
            user_id="u1",
            plan="pro",
            period_start_ms=T0,
            period_end_ms=T0 + 30 * 24 * 60 * MIN,
            limit_ms=500 * MIN,
            used_ms=12,
            allowance_remaining_ms=500 * MIN - 12,
            purchased_ms=0,
            remaining_ms=500 * MIN - 12,
            warning=None,
            active_session=ActiveSessionView("s1", T0, T0 + 5, 5, T0 + 500 * MIN),
            version=7,
        )
        result = PlanChangeResult(applied=True, usage=usage)
        assert replay(reply(encode_result(result)), KEY) == result

    def test_a_refusal_is_raised_again_with_its_fields(self) -> None:
        refused = NoCredits("nothing left", remaining_ms=0)
        with pytest.raises(NoCredits) as raised:
            replay(reply(encode_refusal(refused)), KEY)
        assert (raised.value.detail, raised.value.fields) == ("nothing left", {"remaining_ms": 0})

    def test_another_request_under_the_same_key_is_a_mismatch(self) -> None:
        started = SessionStarted("s1", T0, MIN, T0 + MIN, 1)
        with pytest.raises(IdempotencyMismatch):
            replay(reply(encode_result(started)), IdempotencyKey(KEY.key, "hash-b"))


@pytest.mark.asyncio(loop_scope="function")
class TestKeyedShard:
    async def test_a_retried_start_gets_the_same_session_and_starts_nothing(self) -> None:
        store, clock = MemoryStore(), FakeClock()
        shard = make_shard(store, clock)
        await shard.start()
        first = await shard.start_session("u1", topic="verbs", idem=KEY)
        clock.now += 5 * SEC
        again = await shard.start_session("u1", topic="verbs", idem=KEY)
        assert again == first
        assert len(store.sessions) == 1
        assert store.replies[("u1", KEY.key)].outcome == encode_result(first)  # written with the start
        with pytest.raises(SessionActive):
            await shard.start_session("u1", topic="verbs", idem=IdempotencyKey("k-2", KEY.request_hash))
        with pytest.raises(IdempotencyMismatch):
            await shard.start_session("u1", topic="nouns", idem=IdempotencyKey(KEY.key, "hash-b"))
        await shard.stop()

    async def test_a_retried_heartbeat_bills_once_and_answers_the_same(self) -> None:
        store, clock = MemoryStore(), FakeClock()
        shard = make_shard(store, clock)
        await shard.start()
        started = await shard.start_session("u1")
        clock.now += 30 * SEC
        first = await shard.heartbeat("u1", started.session_id, idem=KEY)
        clock.now += 30 * SEC
        again = await shard.heartbeat("u1", started.session_id, idem=KEY)
        assert again == first
        assert (await shard.usage("u1")).used_ms == 30 * SEC
        await shard.stop()

    async def test_a_refusal_is_the_answer_for_the_whole_key_lifetime(self) -> None:
        store, clock = MemoryStore(), FakeClock()
        shard = make_shard(store, clock)
        await shard.start()
        started = await shard.start_session("u1")
        with pytest.raises(SessionActive):
            await shard.start_session("u1", idem=KEY)
        await shard.end_session("u1", started.session_id)
        with pytest.raises(SessionActive):  # the first answer, though a start would succeed now
            await shard.start_session("u1", idem=KEY)
        clock.now += REPLY_TTL_MS
        again = await shard.start_session("u1", idem=KEY)  # expired: the key is new again
        assert again.session_id != started.session_id
        await shard.stop()
        restarted = make_shard(store, clock)
        await restarted.start()
        assert await restarted.start_session("u1", idem=KEY) == again, "the new reply was written"
        await restarted.stop()

    async def test_a_retry_while_the_first_runs_is_told_to_wait(self) -> None:
        store, clock = HeldStore(), FakeClock()
        shard = make_shard(store, clock)
        await shard.start()
        await shard.usage("u1")
        store.release.clear()
        first = asyncio.create_task(shard.start_session("u1", idem=KEY))
        await store.writing.wait()
        with pytest.raises(IdempotencyInFlight):
            await shard.start_session("u1", idem=KEY)
        with pytest.raises(IdempotencyMismatch):
            await shard.start_session("u1", idem=IdempotencyKey(KEY.key, "hash-b"))
        store.release.set()
        started = await first
        assert await shard.start_session("u1", idem=KEY) == started
        await shard.stop()

    async def test_replies_outlive_a_restart(self) -> None:
        store, clock = MemoryStore(), FakeClock()
        first_shard = make_shard(store, clock)
        await first_shard.start()
        event = PlanEvent(delivery_id="d-1", plan="pro", action="upgrade", occurred_at_ms=T0)
        changed = await first_shard.change_plan("u1", event, idem=KEY)
        started = await first_shard.start_session("u1", idem=IdempotencyKey("k-start", "h"))
        await first_shard.stop()
        second_shard = make_shard(store, clock)
        await second_shard.start()
        assert await second_shard.change_plan("u1", event, idem=KEY) == changed
        assert await second_shard.start_session("u1", idem=IdempotencyKey("k-start", "h")) == started
        await second_shard.stop()

    async def test_expired_replies_are_pruned_from_the_store(self) -> None:
        store, clock = MemoryStore(), FakeClock()
        shard = make_shard(store, clock)
        await shard.start()
        await shard.start_session("u1", idem=KEY)
        assert await store.prune_replies(T0 + REPLY_TTL_MS - 1) == 0
        assert await store.prune_replies(T0 + REPLY_TTL_MS) == 1
        assert not store.replies
        await shard.stop()
