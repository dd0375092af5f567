"""Holds end to end, as an AI app uses them: through real HTTP, a real Ray and Postgres.

The plans (tests/integration/plans.toml): the free plan has 10 minutes and `generations`, 5 a day.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import httpx

from actors.hosting import kill_shards
from tests.harness import ServerFactory, auth, eventually, new_user, sse_frames
from tests.integration.test_credits import reconcile
from tests.integration.test_sessions import assert_problem


async def hold(http: httpx.AsyncClient, user: str, **body: Any) -> httpx.Response:
    return await http.post("/v1/holds", json=body, headers=auth(user))


async def generations(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    return (await http.get("/v1/credits", headers=auth(user))).json()["meters"]["generations"]  # type: ignore[no-any-return]


async def test_reserve_then_capture_part_releases_the_rest_at_once_and_resolves_once(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    created = await hold(client, user, meter="generations", amount=4, ttl_s=60, reference="completion-1")
    assert created.status_code == 201, created.text
    held = created.json()
    assert held["state"] == "held" and held["amount"] == 4 and held["meter"] == "generations"
    assert held["minutes"] is None and held["captured"] == held["released"] == 0
    assert await generations(client, user) | {"resets_at": None} == {
        "limit": 5,
        "used": 0,
        "remaining": 1,
        "window": "day",
        "resets_at": None,
        "held": 4,
    }
    # What is held is unavailable to another hold and to a use.
    assert_problem(await hold(client, user, meter="generations", amount=2), 403, "no_credits")
    refused = await client.post("/v1/meters/generations/consume", json={"amount": 2}, headers=auth(user))
    assert assert_problem(refused, 403, "no_credits")["remaining"] == 1

    hold_id = held["hold_id"]
    too_much = await client.post(f"/v1/holds/{hold_id}/capture", json={"amount": 5}, headers=auth(user))
    assert_problem(too_much, 422, "invalid_request")
    assert (await client.get(f"/v1/holds/{hold_id}", headers=auth(user))).json() == held, "untouched"

    captured = await client.post(f"/v1/holds/{hold_id}/capture", json={"amount": 3}, headers=auth(user))
    assert captured.status_code == 200, captured.text
    body = captured.json()
    assert (body["state"], body["captured"], body["released"]) == ("captured", 3, 1)
    assert body["resolved_at"] is not None and body["version"] > held["version"]
    meter = await generations(client, user)
    assert (meter["used"], meter["held"], meter["remaining"]) == (3, 0, 2), "the rest released at once"

    again = await client.post(f"/v1/holds/{hold_id}/capture", json={"amount": 3}, headers=auth(user))
    assert again.status_code == 200 and again.json() == body, "a capture repeated answers the same"
    other = assert_problem(
        await client.post(f"/v1/holds/{hold_id}/capture", json={"amount": 2}, headers=auth(user)),
        409,
        "hold_resolved",
    )
    assert other["state"] == "captured"
    released = await client.post(f"/v1/holds/{hold_id}/release", json={}, headers=auth(user))
    assert assert_problem(released, 409, "hold_resolved")["state"] == "captured"
    extended = await client.post(f"/v1/holds/{hold_id}/extend", json={"ttl_s": 60}, headers=auth(user))
    assert_problem(extended, 409, "hold_resolved")
    assert (await client.get("/v1/holds", headers=auth(user))).json()["holds"] == []

    # Durable before the answer: the row and the consume entry are there now, not a flush later.
    row = await database.fetchrow(
        "select state, amount, captured, released, reference from usage_holds where hold_id = $1", hold_id
    )
    assert row is not None and dict(row) == {
        "state": "captured",
        "amount": 4,
        "captured": 3,
        "released": 1,
        "reference": "completion-1",
    }
    entry = await database.fetchrow(
        "select delta, reason from credit_ledger where user_id = $1 and reference = 'completion-1'", user
    )
    assert entry is not None and (entry["delta"], entry["reason"]) == (-3, "consume")
    assert (await reconcile(client, user))["drift_found"] is False


async def test_forty_concurrent_reserves_of_one_against_five_grant_exactly_five(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    answers = await asyncio.gather(*(hold(client, user, meter="generations", amount=1) for _ in range(40)))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) == 5 and statuses.count(403) == 35, statuses
    listed = (await client.get("/v1/holds", headers=auth(user))).json()["holds"]
    assert sorted(h["hold_id"] for h in listed) == sorted(
        a.json()["hold_id"] for a in answers if a.status_code == 201
    )
    created = [h["created_at"] for h in listed]
    assert created == sorted(created), "oldest first"


async def test_another_users_hold_is_not_found_and_malformed_ids_too(client: httpx.AsyncClient) -> None:
    owner, other = new_user(), new_user()
    hold_id = (await hold(client, owner, meter="generations", amount=1)).json()["hold_id"]
    for path in (f"/v1/holds/{hold_id}", f"/v1/holds/{uuid.uuid4().hex}", "/v1/holds/%20bad"):
        assert_problem(await client.get(path, headers=auth(other)), 404, "hold_not_found")
    for verb, body in (("capture", {}), ("release", {}), ("extend", {"ttl_s": 5})):
        response = await client.post(f"/v1/holds/{hold_id}/{verb}", json=body, headers=auth(other))
        assert_problem(response, 404, "hold_not_found")
    assert (await client.get(f"/v1/holds/{hold_id}", headers=auth(owner))).json()["state"] == "held"


async def test_bad_hold_requests_are_422_and_change_nothing(client: httpx.AsyncClient) -> None:
    user = new_user()
    for body in (
        {},
        {"meter": "generations"},
        {"amount": 1},
        {"meter": "generations", "amount": 1, "minutes": 1},
        {"meter": "generations", "amount": 0},
        {"meter": "generations", "amount": "1"},
        {"meter": "generations", "amount": 1, "ttl_s": 0},
        {"meter": "generations", "amount": 1, "ttl_s": 3601},
        {"minutes": 0},
        {"minutes": -1},
        {"minutes": 1, "color": "red"},
        {"meter": "generations", "amount": 1, "reference": "x" * 256},
    ):
        assert_problem(await hold(client, user, **body), 422, "invalid_request")
    assert_problem(await hold(client, user, meter="videos", amount=1), 404, "meter_not_found")
    assert (await client.get("/v1/holds", headers=auth(user))).json()["holds"] == []
    meter_hold = (await hold(client, user, meter="generations", amount=2)).json()["hold_id"]
    for body in ({"amount": 1.5}, {"amount": None}, {"amount": -1}, {"amount": "1"}, {"all": True}):
        bad = await client.post(f"/v1/holds/{meter_hold}/capture", json=body, headers=auth(user))
        assert_problem(bad, 422, "invalid_request")
    assert (await generations(client, user))["held"] == 2
    minute_hold = (await hold(client, user, minutes=1)).json()["hold_id"]
    over = await client.post(f"/v1/holds/{minute_hold}/capture", json={"amount": 1.005}, headers=auth(user))
    assert_problem(over, 422, "invalid_request")
    spec = (await client.get("/openapi.json")).json()["paths"]
    assert "hold_resolved" in spec["/v1/holds/{hold_id}/capture"]["post"]["responses"]["409"]["description"]
    assert "hold_not_found" in spec["/v1/holds/{hold_id}"]["get"]["responses"]["404"]["description"]
    assert "too_many_holds" in spec["/v1/holds"]["post"]["responses"]["429"]["description"]


async def test_an_idempotency_key_makes_one_hold_however_often_it_is_sent(client: httpx.AsyncClient) -> None:
    user = new_user()
    headers = {**auth(user), "Idempotency-Key": "reserve-1"}
    body = {"meter": "generations", "amount": 2}
    answers = [await client.post("/v1/holds", json=body, headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert len({a.json()["hold_id"] for a in answers}) == 1
    assert (await generations(client, user))["held"] == 2


async def test_an_unresolved_hold_expires_whole_at_its_ttl(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    held = (await hold(client, user, meter="generations", amount=3, ttl_s=1)).json()
    extended = await client.post(f"/v1/holds/{held['hold_id']}/extend", json={"ttl_s": 2}, headers=auth(user))
    assert extended.status_code == 200
    assert datetime.fromisoformat(extended.json()["expires_at"]) > datetime.fromisoformat(held["expires_at"])

    async def expired() -> bool:  # by the shard's own alarm, with no request for the user
        row = await database.fetchrow("select state from usage_holds where hold_id = $1", held["hold_id"])
        return row is not None and row["state"] == "expired"

    await eventually(expired, timeout_s=10)
    shown = (await client.get(f"/v1/holds/{held['hold_id']}", headers=auth(user))).json()
    assert (shown["state"], shown["captured"], shown["released"]) == ("expired", 0, 3)
    assert (await generations(client, user))["held"] == 0
    late = await client.post(f"/v1/holds/{held['hold_id']}/capture", json={}, headers=auth(user))
    assert assert_problem(late, 409, "hold_resolved")["state"] == "expired"


async def test_minute_holds_shorten_a_running_sessions_ends_at_and_capture_bills_them(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    started = (await client.post("/v1/sessions", headers=auth(user))).json()
    ends_at = datetime.fromisoformat(started["ends_at"])
    held = await hold(client, user, minutes=4, ttl_s=60)
    assert held.status_code == 201, held.text
    assert (held.json()["minutes"], held.json()["amount"], held.json()["meter"]) == (4, 4, None)
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    assert usage["minutes_held"] == 4
    beat = await client.post(f"/v1/sessions/{started['session_id']}/heartbeat", headers=auth(user))
    shortened = datetime.fromisoformat(beat.json()["ends_at"])
    assert abs((ends_at - shortened).total_seconds() - 240) < 1
    # More minutes than are left is refused whole.
    assert_problem(await hold(client, user, minutes=6.5), 403, "no_credits")

    captured = await client.post(
        f"/v1/holds/{held.json()['hold_id']}/capture", json={"amount": 1.5}, headers=auth(user)
    )
    assert captured.status_code == 200, captured.text
    assert (captured.json()["captured"], captured.json()["released"]) == (1.5, 2.5)
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    assert usage["minutes_held"] == 0 and usage["minutes_used"] >= 1.5
    await client.post(f"/v1/sessions/{started['session_id']}/end", headers=auth(user))
    assert (await reconcile(client, user))["drift_found"] is False


async def test_a_hold_expires_at_its_ttl_across_a_shard_restart(
    start_server: ServerFactory, database: asyncpg.Connection
) -> None:
    namespace = f"holds-{uuid.uuid4().hex[:8]}"
    user = new_user()
    first = await start_server(namespace=namespace, shards=1)
    async with first.client() as http:
        held = (await hold(http, user, meter="generations", amount=5, ttl_s=4)).json()
    handles = first.shard_handles()
    await asyncio.to_thread(kill_shards, handles)  # the shard dies: nothing is flushed on the way out
    await first.stop()
    await asyncio.sleep(1)

    second = await start_server(namespace=namespace, shards=1)

    async def expired() -> bool:  # the restarted shard loads the user and fires the expiry itself
        row = await database.fetchrow(
            "select state, released from usage_holds where hold_id = $1", held["hold_id"]
        )
        return row is not None and (row["state"], row["released"]) == ("expired", 5)

    await eventually(expired, timeout_s=20)
    async with second.client() as http:
        assert (await generations(http, user))["remaining"] == 5
        assert (await reconcile(http, user))["drift_found"] is False
    await second.stop()


async def test_the_stream_shows_a_holds_changes(client: httpx.AsyncClient) -> None:
    user = new_user()
    frames: list[dict[str, Any]] = []

    async def read() -> None:
        async with client.stream("GET", "/v1/usage/stream", headers=auth(user)) as response:
            async for frame in sse_frames(response.aiter_lines()):
                if frame["event"] == "usage":
                    frames.append(frame["data"])

    reader = asyncio.create_task(read())

    def shown(minutes_held: float) -> Any:
        async def check() -> bool:
            return bool(frames) and frames[-1]["minutes_held"] == minutes_held

        return check

    try:
        await eventually(shown(0), timeout_s=10, every_s=0.05)
        held = (await hold(client, user, minutes=2)).json()
        await eventually(shown(2), timeout_s=5, every_s=0.05)
        assert frames[-1]["version"] == held["version"] and frames[-1]["minutes_remaining"] == 8
        await client.post(f"/v1/holds/{held['hold_id']}/release", json={}, headers=auth(user))
        await eventually(shown(0), timeout_s=5, every_s=0.05)
    finally:
        reader.cancel()
