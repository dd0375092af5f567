"""/webhooks/polar and /webhooks/stripe: billing events received directly from the providers.

Each delivery is verified (`gateway.billing`), turned into a plan change or a purchase, and
applied on the user's shard, durably, before it is answered 200: a provider retries anything
else, so nothing is lost while a shard or Postgres is down (503). The provider's event id
deduplicates redeliveries; an event this server does not act on (another event type, a product
the plans file does not name, no user id) is answered 200 with `handled: false` and the reason,
so the provider does not retry it forever. A route whose secret is not configured is 404.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from actors.plans import BillingProvider
from actors.shard import Purchase
from actors.times import minutes_to_ms
from gateway.auth import is_user_id
from gateway.billing import (
    BillingAction,
    Ignored,
    PlanChangeAction,
    PurchaseAction,
    identifier,
    polar_action,
    stripe_action,
    verify_polar,
    verify_stripe,
)
from gateway.errors import ApiError
from gateway.routes.common import plan_event, problems, request_id, runtime
from gateway.runtime import Runtime
from gateway.schemas import Problem
from gateway.settings import Settings

log = structlog.get_logger("gateway.webhooks")

router = APIRouter(prefix="/webhooks", tags=["billing webhooks"])


_RESPONSES: dict[int | str, dict[str, Any]] = {
    **problems(401, 413, 422, 503),
    404: {"model": Problem, "description": "This provider's webhooks are not configured here (`not_found`)"},
}


class WebhookAnswer(BaseModel):
    handled: bool
    reason: str | None = None
    user_id: str | None = None
    applied: bool | None = None  # a plan change older than the last applied one is not applied
    purchased_minutes: float | None = None


def _secret(request: Request, provider: BillingProvider) -> str:
    settings: Settings = request.app.state.settings
    value = settings.polar_webhook_secret if provider == "polar" else settings.stripe_webhook_secret
    if value is None:
        raise ApiError(404, "not_found", f"{provider} webhooks are not configured on this server")
    return value.get_secret_value()


@router.post("/polar", response_model=WebhookAnswer, responses=_RESPONSES)
async def polar(
    request: Request, rt: Runtime = Depends(runtime), rid: str | None = Depends(request_id)
) -> WebhookAnswer:
    """A Polar delivery (Standard Webhooks signature); see `gateway.billing` for what each event does."""
    secret = _secret(request, "polar")
    body = await request.body()
    event = verify_polar(secret, body, dict(request.headers))
    delivery = f"polar:{request.headers['webhook-id']}"
    return await _apply(rt, polar_action(event, rt.plans.billing), event["type"], delivery, rid)


@router.post("/stripe", response_model=WebhookAnswer, responses=_RESPONSES)
async def stripe(
    request: Request, rt: Runtime = Depends(runtime), rid: str | None = Depends(request_id)
) -> WebhookAnswer:
    """A Stripe delivery (`Stripe-Signature`); see `gateway.billing` for what each event does."""
    secret = _secret(request, "stripe")
    body = await request.body()
    event = verify_stripe(secret, body, request.headers.get("stripe-signature"), now_s=time.time())
    delivery = f"stripe:{identifier(event.get('id'), 'id')}"
    return await _apply(rt, stripe_action(event, rt.plans.billing), event["type"], delivery, rid)


async def _apply(
    rt: Runtime, action: BillingAction, kind: str, delivery: str, rid: str | None
) -> WebhookAnswer:
    if not isinstance(action, Ignored) and not is_user_id(action.user_id):
        action = Ignored("unknown_user")
    if isinstance(action, Ignored):
        log.warning("billing_event_ignored", event_type=kind, delivery=delivery, reason=action.reason)
        return WebhookAnswer(handled=False, reason=action.reason)
    if isinstance(action, PlanChangeAction):
        event = plan_event(
            delivery,
            plan=rt.plans.default_plan if action.action == "cancel" else action.plan,
            action=action.action,
            occurred_at=action.occurred_at,
            period_start=action.period_start,  # whole or none: `gateway.billing` sees to it
            period_end=action.period_end,
        )
        result = await rt.shards.change_plan(action.user_id, event, request_id=rid)
        log.info(
            "billing_plan_event",
            event_type=kind,
            delivery=delivery,
            user_id=action.user_id,
            applied=result.applied,
        )
        return WebhookAnswer(handled=True, user_id=action.user_id, applied=result.applied)
    assert isinstance(action, PurchaseAction)
    purchase = Purchase(
        # Deduplicated by the order (or checkout session), not the event: a provider may tell of
        # one payment in two events (Stripe: completed, then async_payment_succeeded).
        delivery_id=action.reference,
        minutes_ms=minutes_to_ms(action.minutes),
        reason="purchase",
        reference=action.reference,
    )
    await rt.shards.add_credits(action.user_id, purchase, request_id=rid)
    log.info(
        "billing_purchase", event_type=kind, delivery=delivery, user_id=action.user_id, minutes=action.minutes
    )
    return WebhookAnswer(handled=True, user_id=action.user_id, purchased_minutes=action.minutes)
