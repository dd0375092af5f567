"""Billing webhooks received directly from Polar and Stripe: signatures, and what each event means.

Pure functions, no I/O: `verify_polar` / `verify_stripe` check a delivery's signature and return
the parsed event; `polar_action` / `stripe_action` turn an event into the `BillingAction` the
route applies on the user's shard (a plan change, or purchased minutes), or into `Ignored` with
the reason. The products are mapped through the plans file (`[billing.<provider>]`).

- Polar signs with Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
  Polar's secret is used as its SDK uses it: base64-encoded into the Standard Webhooks key.
- Stripe signs with `Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]`: HMAC-SHA256 of
  `"{t}.{body}"` keyed with the endpoint secret; any `v1` may match (secret rotation), and `t`
  must be within `STRIPE_TOLERANCE_S` of now.

What each event does (the user is `customer.external_id`, or `metadata.user_id`; for a Stripe
Checkout purchase, `client_reference_id`):

- Polar `subscription.created` / `.active` / `.updated` / `.uncanceled` while active or trialing:
  the product's plan, with the subscription's period.
- Polar `subscription.revoked`, or a `subscription.canceled` that ends it now: cancel (free plan).
- Polar `subscription.canceled` with `cancel_at_period_end` (still active): nothing yet; the plan
  runs to the end of the paid period, and the `subscription.revoked` then sent cancels it.
- Polar `order.paid` for a credit-pack product: purchased minutes.
- Stripe `customer.subscription.created` / `.updated` while active or trialing: the price's plan,
  with the subscription's period.
- Stripe `customer.subscription.deleted`, or a status of canceled, unpaid or incomplete_expired:
  cancel.
- Stripe `checkout.session.completed` (or, for a delayed payment method,
  `checkout.session.async_payment_succeeded`) in payment mode, paid, with `metadata.price_id`
  naming a credit pack: purchased minutes.

The event id (`webhook-id` for Polar, `id` for Stripe) deduplicates plan changes, and the order
or Checkout session id purchases (one payment may be told of in two events): a redelivery is
answered as the first delivery was, with no new effect. The event's own time (`timestamp`, `created`)
orders plan changes: an older change that arrives late is recorded but not applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from actors.plans import BillingCatalog, BillingProvider
from actors.times import MS_PER_SECOND, checked_instant, checked_ms, from_datetime
from gateway.auth import is_user_id
from gateway.errors import ApiError

STRIPE_TOLERANCE_S = 300
_ACTIVE = frozenset({"active", "trialing"})
_ENDED_STRIPE = frozenset({"canceled", "unpaid", "incomplete_expired"})
_POLAR_SUBSCRIBED = frozenset(
    {"subscription.created", "subscription.active", "subscription.updated", "subscription.uncanceled"}
)


class BadSignature(ApiError):
    def __init__(self, detail: str) -> None:
        super().__init__(401, "unauthorized", detail)


@dataclass(frozen=True, slots=True)
class PlanChangeAction:
    user_id: str
    plan: str
    action: Literal["upgrade", "cancel"]
    occurred_at: datetime
    period_start: datetime | None
    period_end: datetime | None


@dataclass(frozen=True, slots=True)
class PurchaseAction:
    user_id: str
    minutes: float
    reference: str


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str  # "event_type", "unknown_product", "unknown_user", "not_paid", "ends_at_period_end"


BillingAction = PlanChangeAction | PurchaseAction | Ignored


# ------------------------------------------------------------------ signatures


def verify_polar(secret: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    key = base64.b64encode(secret.encode()).decode()  # whatever the secret looks like, as Polar's SDK
    try:
        event = Webhook(key).verify(body, headers)
    except (WebhookVerificationError, ValueError, TypeError) as exc:  # junk headers or body too
        raise BadSignature(f"the Polar signature does not verify: {type(exc).__name__}") from None
    return _event_object(event)


def verify_stripe(secret: str, body: bytes, header: str | None, *, now_s: float) -> dict[str, Any]:
    if not header:
        raise BadSignature("missing Stripe-Signature")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise BadSignature("Stripe-Signature has no timestamp or no v1 signature")
    if abs(now_s - timestamp) > STRIPE_TOLERANCE_S:
        raise BadSignature("the Stripe signature's timestamp is outside the tolerance")
    signed = f"{timestamp}.".encode() + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    if not any(
        hmac.compare_digest(expected.encode(), candidate.encode("latin-1")) for candidate in signatures
    ):
        raise BadSignature("no Stripe v1 signature matches")
    try:
        return _event_object(json.loads(body))
    except ValueError:
        raise BadSignature("the signed body is not JSON") from None


def _event_object(event: Any) -> dict[str, Any]:
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ApiError(422, "invalid_request", "a billing event is a JSON object with a type")
    return event


# ------------------------------------------------------------------ Polar


def polar_action(event: dict[str, Any], catalog: BillingCatalog) -> BillingAction:
    kind = event["type"]
    data = _object(event.get("data"))
    occurred_at = _iso(event.get("timestamp"), "timestamp") or datetime.now(UTC)
    user_id = _user(data)
    if kind.startswith("subscription."):
        if user_id is None:
            return Ignored("unknown_user")
        status = data.get("status")
        ended_now = kind == "subscription.revoked" or (
            kind == "subscription.canceled" and status not in _ACTIVE
        )
        if ended_now:
            return _cancel(user_id, occurred_at)
        if kind == "subscription.canceled":
            return Ignored("ends_at_period_end")
        if kind not in (
            "subscription.created",
            "subscription.active",
            "subscription.updated",
            "subscription.uncanceled",
        ):
            return Ignored("event_type")
        if status not in _ACTIVE:
            return Ignored("not_active")
        plan = catalog.plan_for("polar", _product_id(data))
        start = _iso(data.get("current_period_start"), "data.current_period_start")
        end = _iso(data.get("current_period_end"), "data.current_period_end")
        return _subscribed(user_id, plan, occurred_at, start, end)
    if kind == "order.paid":
        if user_id is None:
            return Ignored("unknown_user")
        order = identifier(data.get("id"), "data.id")
        return _purchase("polar", catalog, user_id, _product_id(data), f"polar:order:{order}")
    return Ignored("event_type")


def _product_id(data: dict[str, Any]) -> str:
    product = data.get("product_id") or _object(data.get("product")).get("id")
    return str(product or "")


# ------------------------------------------------------------------ Stripe


def stripe_action(event: dict[str, Any], catalog: BillingCatalog) -> BillingAction:
    kind = event["type"]
    data = _object(_object(event.get("data")).get("object"))
    occurred_at = _unix(event.get("created"), "created") or datetime.now(UTC)
    if kind.startswith("customer.subscription."):
        user_id = _user(data)
        if user_id is None:
            return Ignored("unknown_user")
        status = data.get("status")
        if kind == "customer.subscription.deleted" or status in _ENDED_STRIPE:
            return _cancel(user_id, occurred_at)
        if kind not in ("customer.subscription.created", "customer.subscription.updated"):
            return Ignored("event_type")
        if status not in _ACTIVE:
            return Ignored("not_active")
        item = _first_item(data)
        price = _object(item.get("price"))
        plan = catalog.plan_for("stripe", str(price.get("id") or ""))
        # Newer API versions keep the period on the subscription item, older on the subscription.
        start = data.get("current_period_start", item.get("current_period_start"))
        end = data.get("current_period_end", item.get("current_period_end"))
        return _subscribed(
            user_id,
            plan,
            occurred_at,
            _unix(start, "current_period_start"),
            _unix(end, "current_period_end"),
        )
    # A delayed payment method (SEPA, ACH) completes unpaid, then succeeds later.
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        user_id = data.get("client_reference_id") or _user(data)
        if not isinstance(user_id, str) or not user_id:
            return Ignored("unknown_user")
        if data.get("mode") != "payment":
            return Ignored("event_type")  # subscriptions arrive as customer.subscription.*
        if data.get("payment_status") != "paid":
            return Ignored("not_paid")
        price_id = str(_object(data.get("metadata")).get("price_id") or "")
        checkout = identifier(data.get("id"), "data.object.id")
        return _purchase("stripe", catalog, user_id, price_id, f"stripe:checkout:{checkout}")
    return Ignored("event_type")


def _first_item(subscription: dict[str, Any]) -> dict[str, Any]:
    items = _object(subscription.get("items")).get("data")
    return _object(items[0]) if isinstance(items, list) and items else {}


# ------------------------------------------------------------------ shared


def _subscribed(
    user_id: str, plan: str | None, occurred_at: datetime, start: datetime | None, end: datetime | None
) -> BillingAction:
    """An active subscription to `plan` (None: a product the plans file does not name), with its
    period as the plan change takes it: whole, or not at all."""
    if plan is None:
        return Ignored("unknown_product")
    whole = start is not None and end is not None
    if start is not None and end is not None and from_datetime(start) >= from_datetime(end):
        raise _invalid("the subscription's period must start before it ends")
    return PlanChangeAction(
        user_id, plan, "upgrade", occurred_at, start if whole else None, end if whole else None
    )


def _cancel(user_id: str, occurred_at: datetime) -> PlanChangeAction:
    return PlanChangeAction(user_id, "", "cancel", occurred_at, None, None)


def _purchase(
    provider: BillingProvider, catalog: BillingCatalog, user_id: str, product_id: str, reference: str
) -> BillingAction:
    minutes = catalog.pack_minutes(provider, product_id)
    if minutes is None:
        return Ignored("unknown_product")
    return PurchaseAction(user_id=user_id, minutes=minutes, reference=reference)


def _user(data: dict[str, Any]) -> str | None:
    external = _object(data.get("customer")).get("external_id")
    user_id = external or _object(data.get("metadata")).get("user_id")
    return user_id if isinstance(user_id, str) and user_id else None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _invalid(detail: str) -> ApiError:
    """An event this server cannot take as it is: 422, nothing changed (the provider shows it)."""
    return ApiError(422, "invalid_request", detail)


def _unix(value: Any, name: str) -> datetime | None:
    """A Stripe time (whole seconds since the epoch); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be a whole number of seconds since the epoch")
    try:
        checked_ms(value * MS_PER_SECOND)
    except ValueError as exc:
        raise _invalid(f"{name}: {exc}") from None
    return datetime.fromtimestamp(value, UTC)


def _iso(value: Any, name: str) -> datetime | None:
    """A Polar time (ISO 8601; a time without a timezone is UTC); None when absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value)
        moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        checked_instant(moment)
    except ValueError as exc:
        raise _invalid(f"{name}: {exc}") from None
    return moment


def identifier(value: Any, name: str) -> str:
    """The id of what a delivery is about (an event, an order, a Checkout session): what
    deduplicates it. Text of 1-255 characters that UTF-8 can hold, no control characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise _invalid(f"{name} is missing: without it the delivery cannot be told apart from others")
    if not is_user_id(value):  # the same rules as a user id's
        raise _invalid(f"{name} must be 1-255 characters of text without control characters")
    return value
