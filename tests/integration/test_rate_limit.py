"""The per-user rate limit, decided in the user's shard: 429 with Retry-After, others unaffected."""

from __future__ import annotations

import asyncio

import httpx

from tests.harness import auth, change_plan, metric, new_user, signed


async def test_a_user_over_their_plans_rate_gets_429_and_others_do_not(client: httpx.AsyncClient) -> None:
    user, neighbour = new_user(), new_user()
    assert (await change_plan(client, user, "limited")).status_code == 200  # 2/s, burst 5
    answers = await asyncio.gather(*(client.get("/v1/usage", headers=auth(user)) for _ in range(12)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) in (5, 6) and statuses.count(429) == 12 - statuses.count(200), statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1
    started = await client.post("/v1/sessions", json={}, headers=auth(user))
    assert started.status_code == 429, "writes share the budget, and are refused before doing anything"
    assert (await client.get("/v1/sessions/current", headers=auth(user))).status_code == 429
    for _ in range(10):
        assert (await client.get("/v1/usage", headers=auth(neighbour))).status_code == 200
        internal = await client.get(f"/internal/v1/users/{user}/usage", headers=signed("")[1])
        assert internal.status_code == 200, "billing and ops reads are not the user's requests"
    await asyncio.sleep(1.1)  # two more tokens
    assert (await client.post("/v1/sessions", json={}, headers=auth(user))).status_code == 201


async def test_the_gateway_refuses_a_limited_user_itself_until_the_shard_said_a_token_returns(
    client: httpx.AsyncClient,
) -> None:
    user, neighbour = new_user(), new_user()
    assert (await change_plan(client, user, "limited")).status_code == 200  # 2/s, burst 5
    before = await metric(client, "ledger_gateway_rate_limited_total")
    answers = [(await client.get("/v1/usage", headers=auth(user))).status_code for _ in range(40)]
    assert answers[:5] == [200] * 5 and 429 in answers[5:], answers
    after = await metric(client, "ledger_gateway_rate_limited_total")
    assert after - before >= 20, "most of the refusals never reached the shard"
    # Billing still reaches the user's ledger, and the neighbour is untouched.
    assert (await change_plan(client, user, "pro")).status_code == 200
    assert (await client.get("/v1/usage", headers=auth(neighbour))).status_code == 200
    await asyncio.sleep(1.1)  # the last wait the shard gave is over; the pro plan's bucket is full
    statuses = [(await client.get("/v1/usage", headers=auth(user))).status_code for _ in range(10)]
    assert statuses == [200] * 10, statuses


async def test_a_plan_change_ends_a_remembered_refusal(client: httpx.AsyncClient) -> None:
    user = new_user()
    assert (await change_plan(client, user, "slow")).status_code == 200  # one request per 5 s
    assert (await client.get("/v1/usage", headers=auth(user))).status_code == 200
    refused = await client.get("/v1/usage", headers=auth(user))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 4
    assert (await change_plan(client, user, "pro")).status_code == 200  # not rate limited
    assert (await client.get("/v1/usage", headers=auth(user))).status_code == 200
