"""Billing webhooks received directly from Polar and Stripe, against a real server (Ray, Postgres).

The events are recorded-shape fixtures (`tests/integration/billing/*.json`), filled in per test
and signed as each provider signs. Each provider's suite: valid, duplicated, out of order, bad
signature, unknown product; plus purchases and cancellations."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.harness import POLAR_WEBHOOK_SECRET, STRIPE_WEBHOOK_SECRET, ServerFactory, auth, new_user

FIXTURES = Path(__file__).parent / "billing"
NOW = datetime.now(UTC).replace(microsecond=0)
PERIOD_START = NOW - timedelta(days=2)
PERIOD_END = PERIOD_START + timedelta(days=30)


def fixture(name: str, **values: Any) -> bytes:
    text = (FIXTURES / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    assert "{{" not in text, f"{name}: a placeholder was left unfilled"
    return text.encode()


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def polar_subscription(user: str, kind: str, product: str, *, at: datetime = NOW, **fields: Any) -> bytes:
    return fixture(
        "polar_subscription.json",
        type=kind,
        occurred_at=iso(at),
        status=fields.get("status", "active"),
        cancel_at_period_end=fields.get("cancel_at_period_end", "false"),
        period_start=iso(PERIOD_START),
        period_end=iso(PERIOD_END),
        product_id=product,
        user_id=user,
    )


async def send_polar(
    http: httpx.AsyncClient, body: bytes, *, webhook_id: str | None = None, secret: str = POLAR_WEBHOOK_SECRET
) -> httpx.Response:
    message_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    key = base64.b64encode(secret.encode()).decode()  # as Polar's SDK keys Standard Webhooks
    moment = datetime.now(UTC)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(key).sign(message_id, moment, body.decode()),
        "content-type": "application/json",
    }
    return await http.post("/webhooks/polar", content=body, headers=headers)


def stripe_subscription(
    user: str, kind: str, price: str, *, created: datetime = NOW, status: str = "active"
) -> bytes:
    return fixture(
        "stripe_subscription.json",
        event_id=f"evt_{uuid.uuid4().hex[:24]}",
        created=int(created.timestamp()),
        type=kind,
        period_start=int(PERIOD_START.timestamp()),
        period_end=int(PERIOD_END.timestamp()),
        price_id=price,
        user_id=user,
        status=status,
    )


def stripe_signature(body: bytes, *, secret: str = STRIPE_WEBHOOK_SECRET, at_s: int | None = None) -> str:
    timestamp = at_s if at_s is not None else int(time.time())
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


async def send_stripe(
    http: httpx.AsyncClient, body: bytes, *, signature: str | None = None
) -> httpx.Response:
    headers = {"Stripe-Signature": signature or stripe_signature(body), "content-type": "application/json"}
    return await http.post("/webhooks/stripe", content=body, headers=headers)


async def usage(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    answer = await http.get("/v1/usage", headers=auth(user))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def handled(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    body = dict(answer.json())
    return body


# ------------------------------------------------------------------ Polar


async def test_polar_subscription_sets_the_plan_and_its_period_once_per_delivery(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    body = polar_subscription(user, "subscription.created", "prod-polar-basic")
    first = handled(await send_polar(client, body, webhook_id="msg_polar_dup_" + user))
    assert first == {
        "handled": True,
        "reason": None,
        "user_id": user,
        "applied": True,
        "purchased_minutes": None,
    }
    now = await usage(client, user)
    assert (now["plan"], now["minutes_limit"]) == ("basic", 100)
    assert now["period_end"] == iso(PERIOD_END), "periods follow the subscription's anchor"

    again = handled(await send_polar(client, body, webhook_id="msg_polar_dup_" + user))
    assert again == first
    rows = await database.fetchval("select count(*) from plan_events where user_id = $1", user)
    assert rows == 1
    assert (await usage(client, user))["version"] == now["version"], "a redelivery changes nothing"


async def test_a_renewal_of_the_plan_in_force_with_its_period_changes_nothing(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    """A subscription.updated that says what is already in force (another event, the same plan and
    period): no version, no plan_changed event; and an older event arriving after it is still late."""
    user = new_user()
    first = polar_subscription(
        user, "subscription.created", "prod-polar-basic", at=NOW - timedelta(minutes=2)
    )
    assert handled(await send_polar(client, first))["applied"] is True
    before = await usage(client, user)
    renewal = polar_subscription(user, "subscription.updated", "prod-polar-basic", at=NOW)
    assert handled(await send_polar(client, renewal))["applied"] is True
    after = await usage(client, user)
    assert after == before, "nothing changed, not even the version"
    events = await database.fetchval(
        "select count(*) from usage_events where user_id = $1 and kind = 'plan_changed'", user
    )
    assert events == 1, "only the first event changed the plan"
    late = polar_subscription(user, "subscription.updated", "prod-polar-pro", at=NOW - timedelta(minutes=1))
    assert handled(await send_polar(client, late))["applied"] is False
    assert (await usage(client, user))["plan"] == "basic"


async def test_polar_events_out_of_order_leave_the_newest_plan(client: httpx.AsyncClient) -> None:
    user = new_user()
    newer = polar_subscription(user, "subscription.updated", "prod-polar-pro", at=NOW + timedelta(minutes=5))
    older = polar_subscription(user, "subscription.created", "prod-polar-basic", at=NOW)
    assert handled(await send_polar(client, newer))["applied"] is True
    late = handled(await send_polar(client, older))
    assert (late["handled"], late["applied"]) == (True, False)
    assert (await usage(client, user))["plan"] == "pro"


@pytest.mark.parametrize(
    "tamper",
    ["wrong secret", "body changed", "no signature"],
)
async def test_polar_bad_signatures_are_401_and_change_nothing(
    client: httpx.AsyncClient, tamper: str
) -> None:
    user = new_user()
    body = polar_subscription(user, "subscription.created", "prod-polar-pro")
    if tamper == "wrong secret":
        answer = await send_polar(client, body, secret="polar_whs_someone_elses_secret")
    elif tamper == "body changed":
        message_id = f"msg_{uuid.uuid4().hex}"
        moment = datetime.now(UTC)
        key = base64.b64encode(POLAR_WEBHOOK_SECRET.encode()).decode()
        headers = {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": Webhook(key).sign(message_id, moment, body.decode()),
        }
        answer = await client.post(
            "/webhooks/polar", content=body.replace(b"prod-polar-pro", b"prod-polar-basic"), headers=headers
        )
    else:
        answer = await client.post(
            "/webhooks/polar", content=body, headers={"content-type": "application/json"}
        )
    assert answer.status_code == 401, answer.text
    assert answer.json()["code"] == "unauthorized"
    assert (await usage(client, user))["plan"] == "free"


async def test_polar_unknown_product_is_acknowledged_and_ignored(client: httpx.AsyncClient) -> None:
    user = new_user()
    answer = handled(
        await send_polar(client, polar_subscription(user, "subscription.created", "prod-someone-else"))
    )
    assert (answer["handled"], answer["reason"]) == (False, "unknown_product")
    assert (await usage(client, user))["plan"] == "free"


async def test_polar_credit_pack_order_adds_minutes_once(client: httpx.AsyncClient) -> None:
    user = new_user()
    order = fixture(
        "polar_order.json",
        occurred_at=iso(NOW),
        order_id=str(uuid.uuid4()),
        product_id="prod-polar-pack-60",
        user_id=user,
    )
    webhook_id = f"msg_{uuid.uuid4().hex}"
    first = handled(await send_polar(client, order, webhook_id=webhook_id))
    assert (first["handled"], first["purchased_minutes"]) == (True, 60)
    assert handled(await send_polar(client, order, webhook_id=webhook_id)) == first
    assert (await usage(client, user))["purchased_minutes"] == 60


async def test_polar_cancel_at_period_end_keeps_the_plan_until_revoked(client: httpx.AsyncClient) -> None:
    user = new_user()
    handled(await send_polar(client, polar_subscription(user, "subscription.created", "prod-polar-pro")))
    canceled = polar_subscription(
        user,
        "subscription.canceled",
        "prod-polar-pro",
        at=NOW + timedelta(minutes=1),
        cancel_at_period_end="true",
    )
    answer = handled(await send_polar(client, canceled))
    assert (answer["handled"], answer["reason"]) == (False, "ends_at_period_end")
    assert (await usage(client, user))["plan"] == "pro"
    revoked = polar_subscription(
        user, "subscription.revoked", "prod-polar-pro", at=NOW + timedelta(minutes=2), status="canceled"
    )
    assert handled(await send_polar(client, revoked))["applied"] is True
    assert (await usage(client, user))["plan"] == "free"


# ------------------------------------------------------------------ Stripe


async def test_stripe_subscription_sets_the_plan_and_its_period_once_per_event(
    client: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    body = stripe_subscription(user, "customer.subscription.created", "price_basic_monthly")
    first = handled(await send_stripe(client, body))
    assert (first["handled"], first["applied"], first["user_id"]) == (True, True, user)
    now = await usage(client, user)
    assert (now["plan"], now["period_end"]) == ("basic", iso(PERIOD_END)), "the subscription's anchor"
    assert handled(await send_stripe(client, body)) == first  # Stripe retried the same event
    assert await database.fetchval("select count(*) from plan_events where user_id = $1", user) == 1
    assert (await usage(client, user))["version"] == now["version"]


async def test_stripe_events_out_of_order_leave_the_newest_plan(client: httpx.AsyncClient) -> None:
    user = new_user()
    newer = stripe_subscription(
        user, "customer.subscription.updated", "price_pro_monthly", created=NOW + timedelta(minutes=5)
    )
    older = stripe_subscription(user, "customer.subscription.created", "price_basic_monthly", created=NOW)
    assert handled(await send_stripe(client, newer))["applied"] is True
    assert handled(await send_stripe(client, older))["applied"] is False
    assert (await usage(client, user))["plan"] == "pro"


async def test_stripe_signature_rules(client: httpx.AsyncClient) -> None:
    """Wrong secret, a timestamp outside the tolerance, no header: 401, nothing changed; several
    v1 signatures (a secret being rolled) pass when one of them matches."""
    user = new_user()
    body = stripe_subscription(user, "customer.subscription.created", "price_pro_monthly")
    refused = [
        stripe_signature(body, secret="whsec_someone_elses_secret"),
        stripe_signature(body, at_s=int(time.time()) - 301),
        "t=1700000000",
        "garbage",
    ]
    for signature in refused:
        answer = await send_stripe(client, body, signature=signature)
        assert answer.status_code == 401, (signature, answer.text)
        assert answer.json()["code"] == "unauthorized"
    missing = await client.post(
        "/webhooks/stripe", content=body, headers={"content-type": "application/json"}
    )
    assert missing.status_code == 401
    assert (await usage(client, user))["plan"] == "free"

    good = stripe_signature(body)
    rolled = good.replace("v1=", "v1=" + "0" * 64 + ",v1=")
    assert handled(await send_stripe(client, body, signature=rolled))["applied"] is True
    assert (await usage(client, user))["plan"] == "pro"


async def test_stripe_unknown_price_is_acknowledged_and_ignored(client: httpx.AsyncClient) -> None:
    user = new_user()
    body = stripe_subscription(user, "customer.subscription.created", "price_someone_else")
    answer = handled(await send_stripe(client, body))
    assert (answer["handled"], answer["reason"]) == (False, "unknown_product")
    assert (await usage(client, user))["plan"] == "free"


async def test_stripe_paid_checkout_adds_minutes_once_and_an_unpaid_one_none(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()

    def checkout(status: str) -> bytes:
        return fixture(
            "stripe_checkout.json",
            event_id=f"evt_{uuid.uuid4().hex[:24]}",
            created=int(NOW.timestamp()),
            session_id=f"cs_test_{uuid.uuid4().hex}",
            user_id=user,
            price_id="price_pack_60",
            payment_status=status,
        )

    unpaid = handled(await send_stripe(client, checkout("unpaid")))
    assert (unpaid["handled"], unpaid["reason"]) == (False, "not_paid")
    paid = checkout("paid")
    first = handled(await send_stripe(client, paid))
    assert (first["handled"], first["purchased_minutes"]) == (True, 60)
    assert handled(await send_stripe(client, paid)) == first
    assert (await usage(client, user))["purchased_minutes"] == 60


async def test_stripe_deleted_subscription_cancels(client: httpx.AsyncClient) -> None:
    user = new_user()
    handled(
        await send_stripe(
            client, stripe_subscription(user, "customer.subscription.created", "price_pro_monthly")
        )
    )
    deleted = stripe_subscription(
        user,
        "customer.subscription.deleted",
        "price_pro_monthly",
        created=NOW + timedelta(minutes=1),
        status="canceled",
    )
    assert handled(await send_stripe(client, deleted))["applied"] is True
    assert (await usage(client, user))["plan"] == "free"


async def test_a_large_event_is_accepted_up_to_the_webhook_bound(client: httpx.AsyncClient) -> None:
    """Provider events are larger than API requests (16 KiB): up to 256 KiB is read."""
    user = new_user()
    body = stripe_subscription(user, "customer.subscription.created", "price_basic_monthly")
    padded = body.replace(
        b'"livemode": false,', b'"livemode": false, "padding": "' + b"x" * 40_000 + b'",', 1
    )
    assert len(padded) > 40_000
    assert handled(await send_stripe(client, padded))["applied"] is True
    # Past the head's raw-byte bound in one read (head and body together), under the body bound.
    user = new_user()
    body = stripe_subscription(user, "customer.subscription.created", "price_basic_monthly")
    padded = body.replace(
        b'"livemode": false,', b'"livemode": false, "padding": "' + b"x" * 200_000 + b'",', 1
    )
    assert handled(await send_stripe(client, padded))["applied"] is True
    huge = body.replace(b'"livemode": false,', b'"livemode": false, "padding": "' + b"x" * 300_000 + b'",', 1)
    too_large = await send_stripe(client, huge)
    assert too_large.status_code == 413 and too_large.json()["code"] == "payload_too_large"


async def test_webhooks_whose_secret_is_not_configured_are_404(start_server: ServerFactory) -> None:
    server = await start_server(polar_webhook_secret=None, stripe_webhook_secret=None)
    async with server.client() as http:
        user = new_user()
        polar = await send_polar(http, polar_subscription(user, "subscription.created", "prod-polar-pro"))
        stripe = await send_stripe(
            http, stripe_subscription(user, "customer.subscription.created", "price_pro_monthly")
        )
        assert (polar.status_code, stripe.status_code) == (404, 404)
        assert polar.json()["code"] == stripe.json()["code"] == "not_found"
        assert (await usage(http, user))["plan"] == "free"


async def test_junk_signatures_and_bodies_are_401_not_500(client: httpx.AsyncClient) -> None:
    user = new_user()
    body = stripe_subscription(user, "customer.subscription.created", "price_pro_monthly")
    now = int(time.time())
    for signature in ("t=²,v1=00", f"t={now},v1=é", f"t={now},v1=", "t=,v1=,,,"):
        headers = {"Stripe-Signature": signature.encode("latin-1")}  # as a client may send bytes
        answer = await client.post("/webhooks/stripe", content=body, headers=headers)
        assert answer.status_code == 401, (signature, answer.text)
    polar = polar_subscription(user, "subscription.created", "prod-polar-pro")
    junk_headers = [
        {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": "garbage"},
        {"webhook-id": "msg_1", "webhook-timestamp": "soon", "webhook-signature": "v1,AAAA"},
        {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": "v1,not base64!"},
    ]
    for headers in junk_headers:
        answer = await client.post("/webhooks/polar", content=polar, headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
    key = base64.b64encode(POLAR_WEBHOOK_SECRET.encode()).decode()
    signed = {
        "webhook-id": "msg_2",
        "webhook-timestamp": str(now),
        "webhook-signature": Webhook(key).sign("msg_2", datetime.fromtimestamp(now, UTC), polar.decode()),
    }
    not_utf8 = await client.post("/webhooks/polar", content=b"\xff\xfe" + polar, headers=signed)
    assert (not_utf8.status_code, not_utf8.json()["code"]) == (422, "invalid_request"), not_utf8.text
    assert (await usage(client, user))["plan"] == "free"


async def test_a_delayed_stripe_payment_credits_once_when_it_succeeds(client: httpx.AsyncClient) -> None:
    user = new_user()
    session_id = f"cs_test_{uuid.uuid4().hex}"

    def event(kind: str, status: str) -> bytes:
        body = fixture(
            "stripe_checkout.json",
            event_id=f"evt_{uuid.uuid4().hex[:24]}",
            created=int(NOW.timestamp()),
            session_id=session_id,
            user_id=user,
            price_id="price_pack_60",
            payment_status=status,
        )
        return body.replace(b'"type": "checkout.session.completed"', f'"type": "{kind}"'.encode())

    completed = handled(await send_stripe(client, event("checkout.session.completed", "unpaid")))
    assert (completed["handled"], completed["reason"]) == (False, "not_paid")
    succeeded = handled(await send_stripe(client, event("checkout.session.async_payment_succeeded", "paid")))
    assert (succeeded["handled"], succeeded["purchased_minutes"]) == (True, 60)
    # The same payment told of again in another event (another event id): no second credit.
    again = handled(await send_stripe(client, event("checkout.session.completed", "paid")))
    assert again["handled"] is True
    assert (await usage(client, user))["purchased_minutes"] == 60


# ------------------------------------------------------------------ times and ids at the edge


def _item(event: dict[str, Any]) -> dict[str, Any]:
    """The first item of a Stripe subscription event (where newer API versions keep the period)."""
    item: dict[str, Any] = event["data"]["object"]["items"]["data"][0]
    return item


def _edited(body: bytes, edit: Any) -> bytes:
    event = json.loads(body)
    edit(event)
    return json.dumps(event).encode()


async def test_stripe_events_with_times_or_ids_it_cannot_take_are_422_and_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    """A time outside 2000-2200 (or not a whole number of seconds), or no event id to deduplicate
    by: refused, never 500, never applied, never deduplicated under `None`."""
    user = new_user()
    good = stripe_subscription(user, "customer.subscription.updated", "price_pro_monthly")
    edits = {
        "created 10^20": lambda e: e.update(created=10**20),
        "created 1e20": lambda e: e.update(created=1e20),
        "created true": lambda e: e.update(created=True),
        "period in the year 1": lambda e: _item(e).update(current_period_start=-62135596800),
        "period ending as it starts": lambda e: _item(e).update(
            current_period_end=_item(e)["current_period_start"]
        ),
        "no event id": lambda e: e.pop("id"),
    }
    for name, edit in edits.items():
        answer = await send_stripe(client, _edited(good, edit))
        assert answer.status_code == 422, (name, answer.text)
        assert answer.json()["code"] == "invalid_request", name
    assert (await usage(client, user))["plan"] == "free"
    checkout = fixture(
        "stripe_checkout.json",
        event_id=f"evt_{uuid.uuid4().hex[:24]}",
        created=int(NOW.timestamp()),
        session_id="cs_test",
        user_id=user,
        price_id="price_pack_60",
        payment_status="paid",
    )
    answer = await send_stripe(client, _edited(checkout, lambda e: e["data"]["object"].pop("id")))
    assert answer.status_code == 422, answer.text
    assert (await usage(client, user))["purchased_minutes"] == 0


async def test_polar_events_with_times_or_ids_it_cannot_take_are_422_and_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    subscription = polar_subscription(user, "subscription.updated", "prod-polar-pro")
    edits = {
        "timestamp in the year 1": lambda e: e.update(timestamp="0001-01-01T00:00:00+14:00"),
        "period in 9999": lambda e: e["data"].update(current_period_end="9999-12-31T23:59:59.999Z"),
        "period ending as it starts": lambda e: e["data"].update(
            current_period_end=e["data"]["current_period_start"]
        ),
        "timestamp not a time": lambda e: e.update(timestamp=12),
    }
    for name, edit in edits.items():
        answer = await send_polar(client, _edited(subscription, edit))
        assert answer.status_code == 422, (name, answer.text)
    assert (await usage(client, user))["plan"] == "free"
    order = fixture(
        "polar_order.json",
        occurred_at=iso(NOW),
        order_id="o-1",
        product_id="prod-polar-pack-60",
        user_id=user,
    )
    answer = await send_polar(client, _edited(order, lambda e: e["data"].pop("id")))
    assert answer.status_code == 422, answer.text
    surrogate = _edited(order, lambda e: e["data"]["customer"].update(external_id="x\ud800"))
    answer = await send_polar(client, surrogate)
    assert (answer.status_code, answer.json()["reason"]) == (200, "unknown_user"), answer.text
    assert (await usage(client, user))["purchased_minutes"] == 0
