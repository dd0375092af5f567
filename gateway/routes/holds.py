"""/v1/holds: reserve what work may cost, then capture what it did cost (API.md, *Holds*).

A hold is decided in the user's shard from memory and is durable before any of its verbs answers
(creation, capture, release, extension). A hold id that is malformed or belongs to someone else
is 404 `hold_not_found`. Past `LEDGER_MAX_OPEN_HOLDS` unresolved holds a user gets 429
`too_many_holds` (with `Retry-After`: when the soonest of them expires).
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends

from actors.replies import IdempotencyKey
from actors.times import MS_PER_SECOND, minutes_to_ms
from gateway.auth import current_user
from gateway.errors import ApiError
from gateway.routes.common import idempotency_key, problems, request_id, runtime
from gateway.runtime import Runtime
from gateway.schemas import (
    CaptureHoldRequest,
    CreateHoldRequest,
    ExtendHoldRequest,
    Hold,
    Holds,
    ReleaseHoldRequest,
)

router = APIRouter(prefix="/v1/holds", tags=["holds"])

_HOLD_CODES = {
    403: "More than is available (`no_credits`, with `remaining` or `minutes_remaining`)",
    404: "No such hold, or another user's (`hold_not_found`)",
    409: (
        "The hold was resolved otherwise (`hold_resolved`, with its `state`), or a request with "
        "this Idempotency-Key is still running (`idempotency_conflict`, with Retry-After)"
    ),
    422: "Invalid request, or a capture of more than is held (`invalid_request`, `idempotency_conflict`)",
    429: (
        "Too many requests for this user (`rate_limited`), or as many unresolved holds as "
        "LEDGER_MAX_OPEN_HOLDS allows (`too_many_holds`); with Retry-After"
    ),
}
_CREATE_CODES = {**_HOLD_CODES, 404: "The plan has no such meter (`meter_not_found`)"}

_HOLD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


async def hold_id_path(hold_id: str) -> str:
    """A hold id from the path; 404 when it cannot be one (async: no threadpool hop)."""
    if _HOLD_ID.match(hold_id) is None:
        raise ApiError(404, "hold_not_found", "no such hold")
    return hold_id


@router.post(
    "",
    status_code=201,
    response_model=Hold,
    responses=problems(401, 403, 404, 409, 413, 422, 429, 503, said=_CREATE_CODES),
)
async def create_hold(
    body: CreateHoldRequest,
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> Hold:
    """Hold `amount` of a count meter, or `minutes`, for `ttl_s` seconds (default 300)."""
    if body.minutes is not None:
        meter, amount = None, minutes_to_ms(body.minutes)
    else:
        assert body.meter is not None and body.amount is not None  # (the model checks one or the other)
        meter, amount = body.meter, body.amount
    hold = await rt.shards.create_hold(
        user_id,
        meter=meter,
        amount=amount,
        ttl_ms=body.ttl_s * MS_PER_SECOND,
        reference=body.reference,
        request_id=rid,
        idem=idem,
    )
    return Hold.from_view(hold)


@router.get("", response_model=Holds, responses=problems(401, 422, 429, 503, said=_HOLD_CODES))
async def list_holds(user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)) -> Holds:
    """The user's unresolved holds, oldest first."""
    page = await rt.shards.list_holds(user_id)
    return Holds(holds=[Hold.from_view(hold) for hold in page.items], version=page.version)


@router.get("/{hold_id}", response_model=Hold, responses=problems(401, 404, 422, 429, 503, said=_HOLD_CODES))
async def get_hold(
    hold_id: str = Depends(hold_id_path), user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)
) -> Hold:
    return Hold.from_view(await rt.shards.get_hold(user_id, hold_id))


@router.post(
    "/{hold_id}/capture",
    response_model=Hold,
    responses=problems(401, 404, 409, 413, 422, 429, 503, said=_HOLD_CODES),
)
async def capture_hold(
    body: CaptureHoldRequest | None = None,
    hold_id: str = Depends(hold_id_path),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> Hold:
    """Capture `amount` (in the hold's unit) or, with `{}`, the whole hold; the rest is released."""
    amount = body.amount if body is not None else None
    hold = await rt.shards.capture_hold(user_id, hold_id, amount, request_id=rid, idem=idem)
    return Hold.from_view(hold)


@router.post(
    "/{hold_id}/release",
    response_model=Hold,
    responses=problems(401, 404, 409, 413, 422, 429, 503, said=_HOLD_CODES),
)
async def release_hold(
    body: ReleaseHoldRequest | None = None,
    hold_id: str = Depends(hold_id_path),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> Hold:
    return Hold.from_view(await rt.shards.release_hold(user_id, hold_id, request_id=rid, idem=idem))


@router.post(
    "/{hold_id}/extend",
    response_model=Hold,
    responses=problems(401, 404, 409, 413, 422, 429, 503, said=_HOLD_CODES),
)
async def extend_hold(
    body: ExtendHoldRequest,
    hold_id: str = Depends(hold_id_path),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> Hold:
    """The hold now expires `ttl_s` seconds from now."""
    hold = await rt.shards.extend_hold(
        user_id, hold_id, body.ttl_s * MS_PER_SECOND, request_id=rid, idem=idem
    )
    return Hold.from_view(hold)
