"""/internal/v1: signed calls from billing and ops (Standard Webhooks; see `gateway.auth`).

A plan change is durable before it answers and is applied at most once per
`webhook-id`; a replayed delivery gets its first answer again.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Security

from actors.errors import Unavailable
from actors.replies import IdempotencyKey
from actors.shard import Purchase, ShardStats
from actors.store import StoreError
from actors.times import minutes_to_ms, to_datetime, to_minutes
from gateway.auth import USER_ID_MAX_LENGTH, USER_ID_PATTERN, delivery_id, webhook_signature_scheme
from gateway.errors import ApiError
from gateway.routes.common import idempotency_key, plan_event, problems, request_id, runtime
from gateway.runtime import ResizeUnderWay, Runtime
from gateway.schemas import (
    SESSIONS_PAGE_DEFAULT,
    SESSIONS_PAGE_MAX,
    CreditsRequest,
    CreditsResponse,
    MapShard,
    PlanChangeRequest,
    PlanChangeResponse,
    ReconciliationReport,
    ResizeRequest,
    SessionItem,
    SessionList,
    ShardMapStatus,
    ShardStatus,
    Status,
    Usage,
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
    event = plan_event(
        delivery,
        plan=body.plan,
        action=body.action,
        occurred_at=body.occurred_at,
        period_start=body.period_start,
        period_end=body.period_end,
        reset_usage=body.reset_usage,
    )
    result = await rt.shards.change_plan(user_id, event, request_id=rid, idem=idem)
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
    added = await rt.shards.add_credits(user_id, purchase, request_id=rid, idem=idem)
    return CreditsResponse(
        purchased_minutes=to_minutes(added.purchased_ms), usage=Usage.from_view(added.usage)
    )


@router.get(
    "/users/{user_id}/reconcile", response_model=ReconciliationReport, responses=problems(401, 422, 503)
)
async def reconcile(user_id: UserIdPath, rt: Runtime = Depends(runtime)) -> ReconciliationReport:
    """Compare the user's live balances with what the credit ledger's entries add up to."""
    return ReconciliationReport.from_view(await rt.shards.reconcile(user_id))


@router.get("/users/{user_id}/usage", response_model=Usage, responses=problems(401, 422, 503))
async def get_user_usage(user_id: UserIdPath, rt: Runtime = Depends(runtime)) -> Usage:
    return Usage.from_view(await rt.shards.usage_of(user_id))


@router.get("/users/{user_id}/sessions", response_model=SessionList, responses=problems(401, 422, 503))
async def list_user_sessions(
    user_id: UserIdPath,
    limit: int = Query(default=SESSIONS_PAGE_DEFAULT, ge=1, le=SESSIONS_PAGE_MAX),
    rt: Runtime = Depends(runtime),
) -> SessionList:
    """Any user's recent sessions, newest first (`usage-ledger user`)."""
    page = await rt.shards.list_sessions(user_id, limit)
    return SessionList(sessions=[SessionItem.from_view(item) for item in page.items], version=page.version)


@router.get("/status", response_model=Status, responses=problems(401))
async def status(rt: Runtime = Depends(runtime)) -> Status:
    """Every shard: where it runs, its users and sessions, its write-behind (`usage-ledger status`).
    A shard that did not answer is listed with the error's name."""
    shards = []
    for index, result in enumerate(await rt.shards.stats()):
        if not isinstance(result, ShardStats):
            shards.append(ShardStatus(shard=index, state="unreachable", error=type(result).__name__))
            continue
        shards.append(
            ShardStatus(
                shard=result.shard_index,
                state=result.state,
                host=result.host,
                pid=result.pid,
                resident_users=result.resident_users,
                active_sessions=result.active_sessions,
                dirty_users=result.dirty_users,
                pending_calls=result.pending_calls,
                reactivating=result.reactivating,
                last_flush_at=to_datetime(result.last_flush_at_ms) if result.last_flush_at_ms else None,
                flushes=result.flushes,
                flush_failures=result.flush_failures,
            )
        )
    return Status(shards=shards)


@router.get("/shards", response_model=ShardMapStatus, responses=problems(401, 503))
async def shard_map(rt: Runtime = Depends(runtime)) -> ShardMapStatus:
    """The shard map (count, epoch, whether a resize is under way) and each shard's part of it
    (`usage-ledger shards`)."""
    return await _map_status(rt)


@router.post(
    "/shards",
    status_code=202,
    response_model=ShardMapStatus,
    responses=problems(401, 409, 413, 422, 503),
)
async def resize_shards(body: ResizeRequest, rt: Runtime = Depends(runtime)) -> ShardMapStatus:
    """Begin changing the shard count to `count` while serving (`usage-ledger shards resize N`):
    202 at once, then `GET` says `moving` until it is done. Asking again for the same count
    resumes an interrupted resize; asking for the old count rolls it back."""
    if body.count > rt.settings.shards_max:
        raise ApiError(
            422,
            "invalid_request",
            f"{body.count} shards is more than LEDGER_SHARDS_MAX ({rt.settings.shards_max}); raise it first "
            "if this cluster has the memory for them (each shard is a process)",
        )
    before = await _map_status(rt)  # (503 with the database down: nothing is begun)
    try:
        rt.resize(body.count)
    except ResizeUnderWay as exc:
        raise ApiError(409, "resize_in_progress", f"{exc}; wait for it, then ask again") from None
    return before.model_copy(update={"moving": True, "target": body.count, "error": None})


async def _map_status(rt: Runtime) -> ShardMapStatus:
    """The map as the database holds it, and what each shard says of itself."""
    try:
        found = await rt.router.read_map()
    except StoreError as exc:
        raise Unavailable.of_store("the database") from exc
    stats = await rt.shards.stats()
    shards = []
    for index, result in enumerate(stats):
        slots = found.owners.count(index)
        if not isinstance(result, ShardStats):
            shards.append(
                MapShard(shard=index, slots=slots, state="unreachable", error=type(result).__name__)
            )
            continue
        shards.append(
            MapShard(
                shard=index,
                slots=slots,
                state=result.state,
                resident_users=result.resident_users,
                active_sessions=result.active_sessions,
                slots_leaving=result.slots_leaving,
                users_handed_off=result.users_handed_off,
            )
        )
    return ShardMapStatus(
        count=found.count,
        epoch=found.epoch,
        moving=found.moving,
        target=found.target,
        error=rt.resize_error,
        shards=shards,
    )
