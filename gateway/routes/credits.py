"""/v1/credits and /v1/meters: both minute buckets, count meters, the credit ledger's history.

A meter use is decided in the user's shard from memory (no I/O) and written
behind; a use past the limit is refused whole with 403 `no_credits`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from actors.replies import IdempotencyKey
from gateway.auth import current_user
from gateway.routes.common import idempotency_key, problems, runtime
from gateway.runtime import Runtime
from gateway.schemas import (
    CREDIT_HISTORY_DEFAULT,
    CREDIT_HISTORY_MAX,
    CreditHistory,
    CreditHistoryEntry,
    Credits,
    MeterConsumeRequest,
    MeterConsumeResponse,
)

router = APIRouter(tags=["credits"])

MeterPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


@router.get("/v1/credits", response_model=Credits, responses=problems(401, 429, 503))
async def get_credits(user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)) -> Credits:
    return Credits.from_view(await rt.shards.credits(user_id))


@router.get("/v1/credits/history", response_model=CreditHistory, responses=problems(401, 422, 429, 503))
async def credit_history(
    limit: int = Query(default=CREDIT_HISTORY_DEFAULT, ge=1, le=CREDIT_HISTORY_MAX),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
) -> CreditHistory:
    """Newest first. Consumption still open in the ledger is written first, so it is included."""
    page = await rt.shards.credit_history(user_id, limit)
    return CreditHistory(
        entries=[CreditHistoryEntry.from_record(entry) for entry in page.items], version=page.version
    )


@router.post(
    "/v1/meters/{meter}/consume",
    response_model=MeterConsumeResponse,
    responses=problems(401, 403, 404, 409, 413, 422, 429, 503),
)
async def consume_meter(
    meter: MeterPath,
    body: MeterConsumeRequest,
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> MeterConsumeResponse:
    consumed = await rt.shards.consume_meter(user_id, meter, body.amount, idem=idem)
    return MeterConsumeResponse.from_view(consumed)
