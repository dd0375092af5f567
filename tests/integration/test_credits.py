"""Credits, meters, anchored periods, history, reconciliation and the live stream, end to end.

Periods here are billing-anchored and 16 seconds long (a subscription period
the tests hand in), so rollovers happen in real time inside a test.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from actors.hosting import kill_shards
from tests.harness import (
    RunningServer,
    ServerFactory,
    auth,
    change_plan,
    eventually,
    new_user,
    signed,
    sse_frames,
)
from tests.integration.test_sessions import assert_problem

PERIOD_S = 16


async def buy(
    http: httpx.AsyncClient,
    user: str,
    minutes: float,
    *,
    webhook_id: str | None = None,
    reason: str = "purchase",
) -> httpx.Response:
    content, headers = signed(
        {"minutes": minutes, "reason": reason, "reference": "order-42"}, webhook_id=webhook_id
    )
    return await http.post(f"/internal/v1/users/{user}/credits", content=content, headers=headers)


async def anchor(
    http: httpx.AsyncClient, user: str, plan: str, start: datetime, *, length_s: int = PERIOD_S
) -> dict[str, Any]:
    """Move the user to `plan` with a subscription period [start, start + length_s)."""
    response = await change_plan(
        http,
        user,
        plan,
        period_start=start.isoformat(),
        period_end=(start + timedelta(seconds=length_s)).isoformat(),
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def run_session(http: httpx.AsyncClient, user: str, seconds: float) -> dict[str, Any]:
    session_id = (await http.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        await http.post(f"/v1/sessions/{session_id}/heartbeat", headers=auth(user))
    return (await http.post(f"/v1/sessions/{session_id}/end", headers=auth(user))).json()  # type: ignore[no-any-return]


async def reconcile(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    response = await http.get(f"/internal/v1/users/{user}/reconcile", headers=signed("")[1])
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_allowance_first_then_purchased_minutes_which_carry_into_the_next_period(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    """Issue 3's 10 + 5 scenario, scaled to seconds: 6 s allowance, 3 s purchased, a 7.2 s session."""
    user = new_user()
    await anchor(client, user, "tiny", datetime.now(UTC))
    bought = await buy(client, user, 0.05)
    assert bought.status_code == 200 and bought.json()["purchased_minutes"] == 0.05
    assert bought.json()["usage"]["minutes_remaining"] == 0.15
    ended = await run_session(client, user, 7.2)
    assert ended["end_reason"] == "user_ended", "the session ran on into purchased minutes without a gap"
    used_ms = await database.fetchval(
        "select used_ms from usage_sessions where id = $1", uuid.UUID(ended["session_id"])
    )
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    assert usage["minutes_used"] == ended["session_minutes"] > 0.1
    assert usage["purchased_minutes"] < 0.05
    entries = (await client.get("/v1/credits/history", headers=auth(user))).json()["entries"]
    consumed: dict[str, int] = {}
    for entry in entries:
        if entry["reason"] == "consume":
            consumed[entry["bucket"]] = consumed.get(entry["bucket"], 0) + entry["delta_ms"]
    assert consumed["monthly"] == -6_000, "the allowance went first, all of it"
    assert consumed["purchased"] == -(used_ms - 6_000)
    assert (await client.get("/v1/credits", headers=auth(user))).json()["purchased_minutes"] == round(
        (3_000 + consumed["purchased"]) / 60_000, 2
    )
    assert {e["reason"] for e in entries} >= {"reset", "purchase", "consume"}
    assert next(e for e in entries if e["reason"] == "purchase")["reference"] == "order-42"
    carried = usage["purchased_minutes"]

    period_end = datetime.fromisoformat(usage["period_end"])

    async def rolled_over() -> bool:
        now = (await client.get("/v1/usage", headers=auth(user))).json()
        return datetime.fromisoformat(now["period_start"]) >= period_end

    await eventually(rolled_over, timeout_s=PERIOD_S + 5)
    fresh = (await client.get("/v1/usage", headers=auth(user))).json()
    assert (fresh["minutes_limit"], fresh["minutes_used"]) == (0.1, 0)
    assert fresh["purchased_minutes"] == carried, "purchased minutes carry over"
    assert fresh["minutes_remaining"] == round(0.1 + carried, 2)
    history = (await client.get("/v1/usage/history", params={"periods": 5}, headers=auth(user))).json()[
        "periods"
    ]
    assert [p["archived"] for p in history[:2]] == [False, True]
    assert abs(history[1]["minutes_used"] - used_ms / 60_000) < 0.011
    # API.md: each period has percent_used (here: of its 0.1-minute allowance, all of it used).
    assert history[1]["percent_used"] == 100.0 and history[0]["percent_used"] == 0.0
    assert (await reconcile(client, user))["drift_found"] is False


async def test_purchase_retried_with_the_same_delivery_id_adds_once(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    delivery = f"msg_{uuid.uuid4().hex}"
    answers = [await buy(client, user, 5, webhook_id=delivery) for _ in range(3)]
    answers += await asyncio.gather(*(buy(client, user, 5, webhook_id=delivery) for _ in range(5)))
    assert {a.status_code for a in answers} == {200}
    assert {json.dumps(a.json(), sort_keys=True) for a in answers} == {
        json.dumps(answers[0].json(), sort_keys=True)
    }
    credits = (await client.get("/v1/credits", headers=auth(user))).json()
    assert (
        credits["purchased_minutes"],
        credits["monthly_remaining_minutes"],
        credits["total_remaining_minutes"],
    ) == (
        5,
        10,
        15,
    )
    assert (
        await database.fetchval("select count(*) from credit_purchases where delivery_id = $1", delivery) == 1
    )
    other_body = await buy(client, user, 6, webhook_id=delivery)
    assert_problem(other_body, 422, "idempotency_conflict")
    for bad in (
        {"minutes": 0, "reason": "purchase"},
        {"minutes": 0.000001, "reason": "purchase"},
        {"minutes": 1, "reason": "gift"},
        {"minutes": "1", "reason": "grant"},
        {"minutes": 1, "reason": "grant", "extra": True},
    ):
        content, headers = signed(bad)
        response = await client.post(f"/internal/v1/users/{user}/credits", content=content, headers=headers)
        assert_problem(response, 422, "invalid_request")
    assert (await client.get("/v1/credits", headers=auth(user))).json()["purchased_minutes"] == 5


async def test_two_hundred_concurrent_consumes_of_a_five_a_day_meter_allow_exactly_five(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    answers = await asyncio.gather(
        *(
            client.post("/v1/meters/generations/consume", json={"amount": 1}, headers=auth(user))
            for _ in range(200)
        )
    )
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 5 and statuses.count(403) == 195
    refused = next(a for a in answers if a.status_code == 403).json()
    assert (refused["code"], refused["remaining"], refused["meter"]) == ("no_credits", 0, "generations")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert refused["resets_at"] == f"{tomorrow}T00:00:00Z"
    credits = (await client.get("/v1/credits", headers=auth(user))).json()
    assert credits["meters"]["generations"] == {
        "limit": 5,
        "used": 5,
        "remaining": 0,
        "window": "day",
        "resets_at": f"{tomorrow}T00:00:00Z",
        "held": 0,
    }
    assert_problem(
        await client.post("/v1/meters/videos/consume", json={"amount": 1}, headers=auth(user)),
        404,
        "meter_not_found",
    )
    assert_problem(
        await client.post("/v1/meters/generations/consume", json={"amount": 0}, headers=auth(user)),
        422,
        "invalid_request",
    )


async def test_session_across_a_period_boundary_is_split_at_the_boundary(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    # An anchored period that ends 3 seconds from now (the next ones last 30 s).
    boundary = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    await anchor(client, user, "basic", boundary - timedelta(seconds=PERIOD_S))
    ended = await run_session(client, user, 5)
    rows = await database.fetch(
        "select period_start, period_end, used_ms, archived from usage_periods"
        " where user_id = $1 order by period_start",
        user,
    )
    session = await database.fetchrow(
        "select started_at, ended_at, used_ms from usage_sessions where id = $1",
        uuid.UUID(ended["session_id"]),
    )
    assert session is not None
    before, after = rows[-2], rows[-1]
    assert before["period_end"] == after["period_start"] == boundary
    assert before["archived"] and not after["archived"]
    assert before["used_ms"] == round((boundary - session["started_at"]).total_seconds() * 1000)
    assert after["used_ms"] == round((session["ended_at"] - boundary).total_seconds() * 1000)
    assert before["used_ms"] + after["used_ms"] == session["used_ms"]
    assert (await reconcile(client, user))["drift_found"] is False


async def test_boundary_passed_while_stopped_is_rolled_over_on_restart(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    namespace = f"rollover-{uuid.uuid4().hex[:8]}"
    user = new_user()
    first = await start_server(namespace=namespace, shards=1)
    async with first.client() as http:
        usage = (await anchor(http, user, "basic", datetime.now(UTC)))["usage"]
        await run_session(http, user, 1.5)
        await http.post("/v1/meters/generations/consume", json={"amount": 2}, headers=auth(user))
        used_before = (await http.get("/v1/usage", headers=auth(user))).json()["minutes_used"]
    handles = first.shard_handles()
    await first.stop()
    await asyncio.to_thread(kill_shards, handles)
    period_end = datetime.fromisoformat(usage["period_end"])
    await asyncio.sleep(max(0.0, (period_end - datetime.now(UTC)).total_seconds()) + 1)

    second = await start_server(namespace=namespace, shards=1)
    async with second.client() as http:
        usage_after = (await http.get("/v1/usage", headers=auth(user))).json()
        assert datetime.fromisoformat(usage_after["period_start"]) == period_end
        assert usage_after["minutes_used"] == 0
        query = (
            "select period_start, minutes_used, archived from usage_periods"
            " where user_id = $1 order by period_start"
        )

        async def written() -> bool:  # the rollover is written behind, within a sync interval
            return bool((await database.fetch(query, user))[-1]["period_start"] == period_end)

        await eventually(written, timeout_s=10)
        rows = await database.fetch(query, user)
        assert [(float(r["minutes_used"]), r["archived"]) for r in rows[-2:]] == [
            (used_before, True),
            (0.0, False),
        ]
        total_consumed = await database.fetchval(
            "select -sum(delta) from credit_ledger where user_id = $1 and reason = 'consume' and unit = 'ms'",
            user,
        )
        total_used = await database.fetchval(
            "select sum(used_ms + purchased_used_ms) from usage_periods where user_id = $1", user
        )
        assert total_consumed == total_used, "nothing double-counted"
        report = await reconcile(http, user)
        assert report["drift_found"] is False
    await second.stop()


async def test_stream_sees_a_plan_upgrade_within_a_second_with_growing_versions(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    events: list[dict[str, Any]] = []
    upgraded_at: float | None = None
    seen_at: float | None = None

    async def read() -> None:
        nonlocal seen_at
        async with client.stream("GET", "/v1/usage/stream", headers=auth(user)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for frame in sse_frames(response.aiter_lines()):
                if frame["event"] != "usage":
                    continue  # the upgrade's plan_changed event (tests/integration/test_events.py)
                data = frame["data"]
                assert int(frame["id"]) == data["version"]
                events.append(data)
                if data["plan"] == "pro":
                    seen_at = time.monotonic()
                    return

    reader = asyncio.create_task(read())
    await eventually(lambda: _ready(events), timeout_s=10, every_s=0.05)
    assert events[0]["plan"] == "free"
    await client.post("/v1/meters/generations/consume", json={"amount": 1}, headers=auth(user))
    upgraded_at = time.monotonic()
    assert (await change_plan(client, user, "pro")).status_code == 200
    await asyncio.wait_for(reader, timeout=10)
    assert seen_at is not None and seen_at - upgraded_at < 1.0
    assert events[-1]["minutes_limit"] == 500
    versions = [e["version"] for e in events]
    assert versions == sorted(set(versions)), "every event's version is greater than the last"


async def _ready(events: list[dict[str, Any]]) -> bool:
    return bool(events)


async def test_reconciliation_finds_no_drift_after_a_random_mix_and_finds_a_tampered_row(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    rng = random.Random(20261123)
    users = [new_user() for _ in range(4)]
    for step in range(40):
        user = rng.choice(users)
        action = rng.choice(["session", "purchase", "consume", "plan"])
        if action == "session":
            await run_session(client, user, rng.uniform(0.2, 1.2))
        elif action == "purchase":
            await buy(
                client,
                user,
                round(rng.uniform(0.01, 2), 2),
                reason=rng.choice(["purchase", "grant", "refund"]),
            )
        elif action == "consume":
            await client.post(
                "/v1/meters/generations/consume", json={"amount": rng.randint(1, 3)}, headers=auth(user)
            )
        else:
            await change_plan(
                client, user, rng.choice(["free", "basic", "pro", "tiny"]), webhook_id=f"mix-{step}"
            )
    for user in users:
        report = await reconcile(client, user)
        assert report["drift_found"] is False, report
        assert {c["bucket"] for c in report["checks"]} >= {"monthly", "purchased"}

    victim = users[0]
    await database.execute(
        "update credit_ledger set delta = delta - 60000 where user_id = $1"
        " and seq = (select max(seq) from credit_ledger where user_id = $1 and bucket = 'monthly')",
        victim,
    )
    report = await reconcile(client, victim)
    assert report["drift_found"] is True
    drifting = [c for c in report["checks"] if not c["consistent"]]
    assert [c["bucket"] for c in drifting] == ["monthly"]
    assert drifting[0]["drift"] == 60000


async def test_stream_through_another_gateway_sees_changes_made_through_the_first(
    client: httpx.AsyncClient, server: RunningServer, start_server: ServerFactory
) -> None:
    """Two gateway processes on the same shards: the stream lives on the shard, not the gateway."""
    second = await start_server(namespace=server.settings.ray_namespace, shards=server.settings.shards)
    user = new_user()
    async with (
        second.client() as other,
        other.stream("GET", "/v1/usage/stream", headers=auth(user)) as response,
    ):
        lines = sse_frames(response.aiter_lines())
        first = await _next_event(lines)
        bought = await buy(client, user, 2)  # through the first gateway
        assert bought.status_code == 200
        changed = await asyncio.wait_for(_next_event(lines), timeout=5)
    assert changed["purchased_minutes"] == 2 and changed["version"] > first["version"]
    await second.stop()


async def _next_event(frames: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The next usage object on the stream."""
    async for frame in frames:
        if frame["event"] == "usage":
            return frame["data"]  # type: ignore[no-any-return]
    raise AssertionError("the stream ended")


async def test_rollover_happens_at_the_boundary_for_a_user_who_makes_no_request(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    """Only Postgres is watched after the boundary: the shard's timer rolls the period over and writes it."""
    user = new_user()
    boundary = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    await anchor(client, user, "basic", boundary - timedelta(seconds=PERIOD_S))
    await client.post("/v1/meters/generations/consume", json={"amount": 1}, headers=auth(user))

    async def rolled_in_postgres() -> bool:
        rows = await database.fetch(
            "select period_start, archived from usage_periods where user_id = $1 order by period_start", user
        )
        return [(r["period_start"], r["archived"]) for r in rows[-2:]] == [
            (rows[-2]["period_start"], True),
            (boundary, False),
        ]

    await eventually(rolled_in_postgres, timeout_s=15)
    assert (
        await database.fetchval(
            "select count(*) from credit_ledger"
            " where user_id = $1 and reason = 'reset' and window_start = $2",
            user,
            boundary,
        )
        == 1
    ), "the new period's allowance is in the credit ledger"
