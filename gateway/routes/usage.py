"""GET /v1/usage: the caller's usage object, answered from the shard's memory."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.auth import current_user
from gateway.routes.common import problems, runtime
from gateway.runtime import Runtime
from gateway.schemas import Usage

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", response_model=Usage, responses=problems(401, 503))
async def get_usage(user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)) -> Usage:
    return Usage.from_view(await rt.router.call(user_id, "usage", user_id))
