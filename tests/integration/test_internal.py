"""Signed internal calls from billing: plan changes, replays, late events, signatures."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

import persistence.migrations
from tests.harness import auth, change_plan, new_user, signed
from tests.integration.test_sessions import assert_problem


async def test_signed_plan_change_is_visible_on_next_request(client: httpx.AsyncClient) -> None:
    user = new_user()
    session_id = (await client.post("/v1/sessions", headers=auth(user))).json()["session_id"]
    response = await change_plan(client, user, "pro")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["applied"] is True
    assert (body["usage"]["plan"], body["usage"]["minutes_limit"]) == ("pro", 500)
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    assert (usage["plan"], usage["minutes_limit"], usage["version"]) == ("pro", 500, body["usage"]["version"])
    current = (await client.get("/v1/sessions/current", headers=auth(user))).json()
    assert current["session_id"] == session_id
    assert current["minutes_remaining"] == 500


async def test_replayed_delivery_returns_first_answer_with_no_new_effect(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    delivery = f"msg_{uuid.uuid4().hex}"
    occurred = datetime.now(UTC).isoformat()
    first = await change_plan(
        client, user, "basic", webhook_id=delivery, occurred_at=occurred, reset_usage=True
    )
    await client.post("/v1/sessions", headers=auth(user))  # a change after the first delivery
    replay = await change_plan(
        client, user, "basic", webhook_id=delivery, occurred_at=occurred, reset_usage=True
    )
    assert replay.status_code == 200
    assert replay.json() == first.json()
    usage = (await client.get("/v1/usage", headers=auth(user))).json()
    assert usage["active_session"] is not None, "the replay must not have reset anything"
    assert usage["version"] == first.json()["usage"]["version"] + 1
    count = await database.fetchval("select count(*) from plan_events where delivery_id = $1", delivery)
    assert count == 1


async def test_delivery_id_reused_with_another_body_is_a_conflict(client: httpx.AsyncClient) -> None:
    user = new_user()
    delivery = f"msg_{uuid.uuid4().hex}"
    await change_plan(client, user, "basic", webhook_id=delivery)
    response = await change_plan(client, user, "pro", webhook_id=delivery)
    assert_problem(response, 422, "idempotency_conflict")
    assert (await client.get("/v1/usage", headers=auth(user))).json()["plan"] == "basic"


async def test_older_event_arriving_late_is_recorded_not_applied(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    now = datetime.now(UTC)
    newer = await change_plan(client, user, "pro", occurred_at=now.isoformat())
    late_id = f"msg_{uuid.uuid4().hex}"
    late = await change_plan(
        client,
        user,
        "basic",
        action="downgrade",
        webhook_id=late_id,
        occurred_at=(now - timedelta(hours=1)).isoformat(),
    )
    assert late.status_code == 200
    assert late.json()["applied"] is False
    assert late.json()["usage"]["plan"] == "pro"
    assert late.json()["usage"]["version"] == newer.json()["usage"]["version"]
    row = await database.fetchrow("select plan, applied from plan_events where delivery_id = $1", late_id)
    assert row is not None and (row["plan"], row["applied"]) == ("basic", False)


async def test_cancel_moves_to_free_and_unknown_user_is_created(client: httpx.AsyncClient) -> None:
    user = new_user()
    created = await change_plan(client, user, "pro")
    assert created.json()["usage"]["plan"] == "pro"
    cancelled = await change_plan(client, user, "pro", action="cancel")
    assert cancelled.json()["usage"]["plan"] == "free"
    signed_get = signed("")
    usage = await client.get(f"/internal/v1/users/{user}/usage", headers=signed_get[1])
    assert usage.status_code == 200 and usage.json()["plan"] == "free"


async def test_unknown_plan_and_bad_bodies_are_422_and_change_nothing(client: httpx.AsyncClient) -> None:
    user = new_user()
    assert_problem(await change_plan(client, user, "platinum"), 422, "invalid_request")
    for body in (
        {"plan": "pro", "action": "upgrade"},
        {"plan": "pro", "action": "promote", "occurred_at": datetime.now(UTC).isoformat()},
        {"plan": "pro", "action": "upgrade", "occurred_at": "2026-11-01T00:00:00"},
        {"plan": "pro", "action": "upgrade", "occurred_at": datetime.now(UTC).isoformat(), "minutes": 9999},
        # Stamped years ahead, it would be newer than every real change to come.
        {
            "plan": "pro",
            "action": "upgrade",
            "occurred_at": (datetime.now(UTC) + timedelta(days=1800)).isoformat(),
        },
        {
            "plan": "pro",
            "action": "upgrade",
            "occurred_at": datetime.now(UTC).isoformat(),
            "period_start": "2026-12-01T00:00:00Z",
            "period_end": "2026-11-01T00:00:00Z",
        },
        {
            "plan": "pro",
            "action": "upgrade",
            "occurred_at": datetime.now(UTC).isoformat(),
            "period_start": "2026-12-01T00:00:00.0001Z",
            "period_end": "2026-12-01T00:00:00.0009Z",
        },
    ):
        content, headers = signed(body)
        response = await client.post(f"/internal/v1/users/{user}/plan", content=content, headers=headers)
        assert_problem(response, 422, "invalid_request")
    assert (await client.get("/v1/usage", headers=auth(user))).json()["version"] == 0
    content, headers = signed(
        {"plan": "pro", "action": "upgrade", "occurred_at": datetime.now(UTC).isoformat()}
    )
    response = await client.post("/internal/v1/users/bad%00id/plan", content=content, headers=headers)
    assert_problem(response, 422, "invalid_request")


async def test_bad_or_old_signatures_are_401(client: httpx.AsyncClient) -> None:
    user = new_user()
    body = {"plan": "pro", "action": "upgrade", "occurred_at": datetime.now(UTC).isoformat()}
    path = f"/internal/v1/users/{user}/plan"
    content, good = signed(body)
    cases = {
        "wrong secret": signed(body, secret="whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==")[1],
        "old timestamp": signed(body, timestamp=datetime.now(UTC) - timedelta(minutes=6))[1],
        "future timestamp": signed(body, timestamp=datetime.now(UTC) + timedelta(minutes=6))[1],
        "no signature": {k: v for k, v in good.items() if k != "webhook-signature"},
        "malformed signature": {**good, "webhook-signature": "garbage"},
        "bad base64": {**good, "webhook-signature": "v1,@@@"},
    }
    for name, headers in cases.items():
        response = await client.post(path, content=content, headers=headers)
        assert response.status_code == 401, name
        assert response.json()["code"] == "unauthorized", name
    tampered = content.replace(b'"pro"', b'"bro"')  # one byte
    assert (await client.post(path, content=tampered, headers=good)).status_code == 401
    assert (await client.get("/v1/usage", headers=auth(user))).json()["plan"] == "free", "nothing changed"
    # During a rotation the sender signs with the old and the new secret; either one verifies.
    new_secret = "whsec_" + "bmV3LXNlY3JldC1hZnRlci10aGUtcm90YXRpb24="
    timestamp = datetime.fromtimestamp(int(good["webhook-timestamp"]), UTC)
    by_new_secret = signed(body, secret=new_secret, webhook_id=good["webhook-id"], timestamp=timestamp)[1]
    rotated = {
        **good,
        "webhook-signature": f"{by_new_secret['webhook-signature']} {good['webhook-signature']}",
    }
    assert (await client.post(path, content=content, headers=rotated)).status_code == 200
    assert (await client.get("/v1/usage", headers=auth(user))).json()["plan"] == "pro"
    # Within the window is fine: a delivery signed four minutes ago.
    later = {**body, "plan": "basic", "occurred_at": datetime.now(UTC).isoformat()}
    recent, recent_headers = signed(later, timestamp=datetime.now(UTC) - timedelta(minutes=4))
    assert (await client.post(path, content=recent, headers=recent_headers)).status_code == 200
    assert (await client.get("/v1/usage", headers=auth(user))).json()["plan"] == "basic"


async def test_unsigned_call_learns_nothing_about_its_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"/internal/v1/users/{new_user()}/plan",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 401, "unauthorized")


async def test_a_delivery_recorded_by_an_older_version_replays_its_first_answer(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    """Before 0009 a delivery's first answer was kept as {"applied"|"purchased_ms", "usage"} with the
    usage flat; the migration converts such rows to the form every remembered answer takes, and a
    row of the old form is read too, so a retry of an old delivery still gets its first answer.
    (The rows are turned back into the old form here, as an older version wrote them.)"""
    user = new_user()
    plan_id, purchase_id = f"msg_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    occurred = datetime.now(UTC).isoformat()
    first_plan = await change_plan(client, user, "basic", webhook_id=plan_id, occurred_at=occurred)
    await client.post("/v1/sessions", headers=auth(user))  # an active session inside the usage
    body, headers = signed({"minutes": 5, "reason": "purchase"}, webhook_id=purchase_id)
    first_purchase = await client.post(f"/internal/v1/users/{user}/credits", content=body, headers=headers)
    assert (first_plan.status_code, first_purchase.status_code) == (200, 200)
    usage = "response->'result'->'fields'->'usage'->'fields'"
    flat_usage = f"""({usage}) || jsonb_build_object('active_session',
        coalesce({usage}->'active_session'->'fields', 'null'::jsonb))"""
    await database.execute(
        f"""update plan_events set response = jsonb_build_object(
            'applied', response->'result'->'fields'->'applied', 'usage', {flat_usage})
        where delivery_id = $1""",
        plan_id,
    )
    await database.execute(
        f"""update credit_purchases set response = jsonb_build_object(
            'purchased_ms', response->'result'->'fields'->'purchased_ms', 'usage', {flat_usage})
        where delivery_id = $1""",
        purchase_id,
    )
    old = await database.fetchval("select response from credit_purchases where delivery_id = $1", purchase_id)
    assert '"purchased_ms"' in old and '"result"' not in old, old
    # Read as they are (a shard of an older version still running could write them so)...
    body, headers = signed({"minutes": 5, "reason": "purchase"}, webhook_id=purchase_id)
    legacy_purchase = await client.post(f"/internal/v1/users/{user}/credits", content=body, headers=headers)
    assert legacy_purchase.json() == first_purchase.json()
    legacy_plan = await change_plan(client, user, "basic", webhook_id=plan_id, occurred_at=occurred)
    assert legacy_plan.json() == first_plan.json()
    # ...and once the migration has converted them.
    migration = Path(persistence.migrations.__file__).parent / "0009_replayable_responses.sql"
    await database.execute(migration.read_text())
    converted = await database.fetchval("select response from plan_events where delivery_id = $1", plan_id)
    assert '"result"' in converted, converted
    again_plan = await change_plan(client, user, "basic", webhook_id=plan_id, occurred_at=occurred)
    body, headers = signed({"minutes": 5, "reason": "purchase"}, webhook_id=purchase_id)
    again_purchase = await client.post(f"/internal/v1/users/{user}/credits", content=body, headers=headers)
    assert again_plan.json() == first_plan.json()
    assert again_purchase.json() == first_purchase.json()
