"""/internal/v1: signed calls from billing and ops (Standard Webhooks; see `gateway.auth`).

A plan change is durable before it answers and is applied at most once per
`webhook-id`; a replayed delivery gets its first answer again.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Security

from actors.replies import IdempotencyKey
from actors.shard import PlanEvent, Purchase
from actors.times import from_datetime, minutes_to_ms
from gateway.auth import USER_ID_MAX_LENGTH, USER_ID_PATTERN, delivery_id, webhook_signature_scheme
from gateway.routes.common import idempotency_key, problems, request_id, runtime
from gateway.runtime import Runtime
from gateway.schemas import (
    CreditsRequest,
    CreditsResponse,
    PlanChangeRequest,
    PlanChangeResponse,
    ReconciliationReport,
    Usage,
    minutes,
)

router = APIRouter(
    prefix="/internal/v1", tags=["internal"], dependencies=[Security(webhook_signature_scheme)]
)

UserIdPath = Annotated[str, Path(min_length=1, max_length=USER_ID_MAX_LENGTH, pattern=USER_ID_PATTERN)]


@router.post(
    "/users/{user_id}/plan", response_model=PlanChangeResponse, responses=problems(401, 409, 413, 422, 503)
)
async def change_plan(
    user_id: UserIdPath,
    body: PlanChangeRequest,
    delivery: str = Depends(delivery_id),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> PlanChangeResponse:
    event = PlanEvent(
        delivery_id=delivery,
        plan=body.plan,
        action=body.action,
        occurred_at_ms=from_datetime(body.occurred_at),
        reset_usage=body.reset_usage,
        period_start_ms=from_datetime(body.period_start) if body.period_start else None,
        period_end_ms=from_datetime(body.period_end) if body.period_end else None,
    )
    result = await rt.router.call(user_id, "change_plan", user_id, event, request_id=rid, idem=idem)
    return PlanChangeResponse(applied=result.applied, usage=Usage.from_view(result.usage))


@router.post(
    "/users/{user_id}/credits", response_model=CreditsResponse, responses=problems(401, 409, 413, 422, 503)
)
async def add_credits(
    user_id: UserIdPath,
    body: CreditsRequest,
    delivery: str = Depends(delivery_id),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> CreditsResponse:
    """Add purchased minutes (they never expire), once per `webhook-id`, durably before answering."""
    purchase = Purchase(
        delivery_id=delivery,
        minutes_ms=minutes_to_ms(body.minutes),
        reason=body.reason,
        reference=body.reference,
    )
    added = await rt.router.call(user_id, "add_credits", user_id, purchase, request_id=rid, idem=idem)
    return CreditsResponse(purchased_minutes=minutes(added.purchased_ms), usage=Usage.from_view(added.usage))


@router.get(
    "/users/{user_id}/reconcile", response_model=ReconciliationReport, responses=problems(401, 422, 503)
)
async def reconcile(user_id: UserIdPath, rt: Runtime = Depends(runtime)) -> ReconciliationReport:
    """Compare the user's live balances with what the credit ledger's entries add up to."""
    return ReconciliationReport.from_view(await rt.router.call(user_id, "reconcile", user_id))


@router.get("/users/{user_id}/usage", response_model=Usage, responses=problems(401, 422, 503))
async def get_user_usage(user_id: UserIdPath, rt: Runtime = Depends(runtime)) -> Usage:
    return Usage.from_view(await rt.router.call(user_id, "usage_of", user_id))
