"""Retries never double-charge: Idempotency-Key on every POST, shuffled plan events, double spend.

Real Ray, real Postgres, real HTTP (see tests/harness.py)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from tests.harness import ServerFactory, auth, new_user, signed
from tests.reliability.truth import GroundTruth, assert_nothing_lost

COPIES = 50


def same(responses: list[httpx.Response]) -> str:
    """The one (status, body) all responses share; fails if they differ."""
    shapes = {(r.status_code, json.dumps(r.json(), sort_keys=True)) for r in responses}
    assert len(shapes) == 1, f"responses differ: {sorted(shapes)[:3]}"
    return next(iter(shapes))[1]


async def fifty_times(send: Callable[[], Awaitable[httpx.Response]]) -> tuple[dict[str, Any], Counter[int]]:
    """Send one request 50 times at once, then 50 times in a row. Returns the answer and the
    statuses of the concurrent burst (409 only while the first was still running)."""
    burst = await asyncio.gather(*(send() for _ in range(COPIES)))
    statuses = Counter(r.status_code for r in burst)
    assert set(statuses) <= {200, 201, 409}, statuses
    for waiting in (r for r in burst if r.status_code == 409):
        assert waiting.json()["code"] == "idempotency_conflict" and "retry-after" in waiting.headers
    answered = [r for r in burst if r.status_code != 409]
    assert answered, "at least one of the burst is answered"
    body = same(answered + [await send() for _ in range(COPIES)])
    return json.loads(body), statuses


async def test_the_same_idempotency_key_fifty_times_on_every_post(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    figures: dict[str, Any] = {}

    def keyed(key: str) -> dict[str, str]:
        return {**auth(user), "Idempotency-Key": key}

    # Internal POSTs: each copy is a new delivery (its own webhook-id), the same request and key.
    async def post_signed(path: str, body: dict[str, Any], key: str) -> httpx.Response:
        content, headers = signed(body)
        return await client.post(path, content=content, headers={**headers, "Idempotency-Key": key})

    plan = {"plan": "basic", "action": "upgrade", "occurred_at": datetime.now(UTC).isoformat()}
    changed, figures["plan"] = await fifty_times(
        lambda: post_signed(f"/internal/v1/users/{user}/plan", plan, "plan-1")
    )
    assert changed["applied"] is True and changed["usage"]["plan"] == "basic"
    purchase = {"minutes": 5, "reason": "purchase", "reference": "order-1"}
    bought, figures["credits"] = await fifty_times(
        lambda: post_signed(f"/internal/v1/users/{user}/credits", purchase, "buy-1")
    )
    assert bought["purchased_minutes"] == 5

    started, figures["start"] = await fifty_times(
        lambda: client.post("/v1/sessions", json={"topic": "verbs"}, headers=keyed("start-1"))
    )
    session = started["session_id"]
    await asyncio.sleep(1.0)
    beat, figures["heartbeat"] = await fifty_times(
        lambda: client.post(f"/v1/sessions/{session}/heartbeat", json={}, headers=keyed("beat-1"))
    )
    used, figures["consume"] = await fifty_times(
        lambda: client.post("/v1/meters/generations/consume", json={"amount": 3}, headers=keyed("use-1"))
    )
    # The consume burst can outlast the 4-s stale timeout on a loaded machine; a session already
    # ended stale would make the end a no-change reply, written by the next flush, not with it.
    kept = await client.post(f"/v1/sessions/{session}/heartbeat", json={}, headers=auth(user))
    assert kept.status_code == 200 and kept.json()["state"] == "active", kept.text
    ended, figures["end"] = await fifty_times(
        lambda: client.post(f"/v1/sessions/{session}/end", json={}, headers=keyed("end-1"))
    )
    assert ended["state"] == "ended" and ended["session_minutes"] >= beat["session_minutes"]
    assert ended["end_reason"] == "user_ended"

    # Another request under a key already used: 422, and nothing changes.
    other = await client.post("/v1/meters/generations/consume", json={"amount": 1}, headers=keyed("use-1"))
    assert other.status_code == 422 and other.json()["code"] == "idempotency_conflict"
    reused = await post_signed(f"/internal/v1/users/{user}/credits", {**purchase, "minutes": 6}, "buy-1")
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_conflict"

    for bad_key in ("k" * 256, "with space"):
        refused = await client.post(
            "/v1/meters/generations/consume", json={"amount": 1}, headers=keyed(bad_key)
        )
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_request"

    credits = (await client.get("/v1/credits", headers=auth(user))).json()
    assert credits["purchased_minutes"] == 5, "bought once"
    assert credits["meters"]["generations"]["used"] == 3 == 50 - used["remaining"], "used once"
    assert await database.fetchval("select count(*) from usage_sessions where user_id = $1", user) == 1
    assert await database.fetchval("select count(*) from plan_events where user_id = $1", user) == 1
    assert await database.fetchval("select count(*) from credit_purchases where user_id = $1", user) == 1
    assert (
        await database.fetchval(
            "select count(*) from idempotency_keys where user_id = $1 and key = any($2::text[])",
            user,
            ["plan-1", "buy-1", "start-1", "end-1"],
        )
        == 4
    ), "the durable operations' replies are written with them"
    print(f"idempotency x{COPIES} concurrent + x{COPIES} sequential; burst statuses: {figures}")


async def test_plan_events_duplicated_and_shuffled_settle_on_the_latest(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    rng = random.Random(20261123)
    figures = []
    for _ in range(3):
        user = new_user()
        base = datetime.now(UTC) - timedelta(hours=1)
        plans = [rng.choice(["basic", "pro", "free"]) for _ in range(6)]
        events = [
            (
                f"msg_{uuid.uuid4().hex}",
                {"plan": plan, "action": "upgrade", "occurred_at": (base + timedelta(minutes=i)).isoformat()},
            )
            for i, plan in enumerate(plans)
        ]
        deliveries = [event for event in events for _ in range(3)]
        rng.shuffle(deliveries)
        half = len(deliveries) // 2
        answers = [
            await client.post(f"/internal/v1/users/{user}/plan", content=content, headers=headers)
            for content, headers in (signed(body, webhook_id=wid) for wid, body in deliveries[:half])
        ]
        answers += await asyncio.gather(
            *(
                client.post(f"/internal/v1/users/{user}/plan", content=content, headers=headers)
                for content, headers in (signed(body, webhook_id=wid) for wid, body in deliveries[half:])
            )
        )
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers if a.status_code != 200]
        by_delivery: dict[str, set[str]] = {}
        for (wid, _), answer in zip(deliveries, answers, strict=True):
            by_delivery.setdefault(wid, set()).add(json.dumps(answer.json(), sort_keys=True))
        assert all(len(bodies) == 1 for bodies in by_delivery.values()), "each delivery answers alike"
        usage = (await client.get("/v1/usage", headers=auth(user))).json()
        assert usage["plan"] == plans[-1], (plans, usage["plan"])
        rows = await database.fetch("select delivery_id from plan_events where user_id = $1", user)
        assert sorted(r["delivery_id"] for r in rows) == sorted(wid for wid, _ in events)
        figures.append((plans, len(deliveries)))
    print(f"plan events x3 shuffled: {figures}")


async def test_double_spend_across_two_gateways(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    """One user with 6 s left sends 20 concurrent starts through two gateway processes' worth of
    servers on the same shards: one session starts, and no more than the balance is billed."""
    namespace = f"spend-{uuid.uuid4().hex[:8]}"
    first = await start_server(namespace=namespace)
    second = await start_server(namespace=namespace)
    user = new_user()
    truth = GroundTruth()
    async with first.client() as one, second.client() as two:
        content, headers = signed(
            {"plan": "tiny", "action": "downgrade", "occurred_at": datetime.now(UTC).isoformat()}
        )
        changed = await one.post(f"/internal/v1/users/{user}/plan", content=content, headers=headers)
        assert changed.status_code == 200
        truth.plan_changes[headers["webhook-id"]] = user
        starts = await asyncio.gather(
            *(
                (one if i % 2 else two).post("/v1/sessions", json={"topic": f"t{i}"}, headers=auth(user))
                for i in range(20)
            )
        )
        statuses = Counter(r.status_code for r in starts)
        assert statuses == Counter({201: 1, 409: 19}), statuses
        assert {r.json()["code"] for r in starts if r.status_code == 409} == {"session_active"}
        won = next(r.json() for r in starts if r.status_code == 201)
        truth.started(user, won)
        for attempt in range(40):
            beat = await (one if attempt % 2 else two).post(
                f"/v1/sessions/{won['session_id']}/heartbeat", json={}, headers=auth(user)
            )
            assert beat.status_code == 200, beat.text
            truth.answered(won["session_id"], beat.json())
            if beat.json()["state"] == "ended":
                break
            await asyncio.sleep(0.25)
        assert truth.sessions[won["session_id"]].ended, "the 6 s allowance ran out"
        again = await one.post("/v1/sessions", json={}, headers=auth(user))
        assert again.status_code == 403 and again.json()["code"] == "no_credits"
        limit_ms = 6_000
        used = await database.fetchval("select used_ms from usage_sessions where user_id = $1", user)
        assert used == limit_ms, "billed exactly the balance, never more"
        figures = await assert_nothing_lost(
            database, one, truth, sync_interval_s=first.settings.sync_interval_s
        )
    await first.stop()
    await second.stop()
    print(f"double spend: 20 starts -> {dict(statuses)}; billed {used} ms of {limit_ms}; {figures}")
