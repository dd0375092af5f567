"""/v1/sessions: start, heartbeat, end, the current session, history.

Start and end are durable before they answer; heartbeats are billed in memory
and written within one sync interval. A session id that is malformed or
belongs to someone else is 404 `session_not_found`, never 403.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query

from actors.replies import IdempotencyKey
from gateway.auth import current_user
from gateway.errors import ApiError
from gateway.routes.common import idempotency_key, problems, request_id, runtime
from gateway.runtime import Runtime
from gateway.schemas import (
    SESSIONS_PAGE_DEFAULT,
    SESSIONS_PAGE_MAX,
    CurrentSessionResponse,
    EndSessionRequest,
    EndSessionResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    SessionItem,
    SessionList,
    SessionStartedResponse,
    StartSessionRequest,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def canonical_session_id(raw: str) -> str | None:
    """A session id in its one form (lower-case, hyphenated); None when `raw` cannot be one."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


async def session_id_path(session_id: str) -> str:
    """The canonical form of a session id from the path; 404 when it cannot be one. (Async: FastAPI
    runs a plain function dependency in its threadpool, a thread hop on every heartbeat.)"""
    canonical = canonical_session_id(session_id)
    if canonical is None:
        raise ApiError(404, "session_not_found", "no such session")
    return canonical


@router.post(
    "",
    status_code=201,
    response_model=SessionStartedResponse,
    responses=problems(401, 403, 409, 413, 422, 429, 503),
)
async def start_session(
    body: StartSessionRequest | None = None,
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> SessionStartedResponse:
    request = body or StartSessionRequest()
    started = await rt.shards.start_session(
        user_id, topic=request.topic, difficulty=request.difficulty, request_id=rid, idem=idem
    )
    return SessionStartedResponse.from_view(started)


@router.post(
    "/{session_id}/heartbeat",
    response_model=HeartbeatResponse,
    responses=problems(401, 404, 409, 413, 422, 429, 503),
)
async def heartbeat(
    body: HeartbeatRequest | None = None,
    session_id: str = Depends(session_id_path),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> HeartbeatResponse:
    seq = body.seq if body is not None else None
    progress = await rt.shards.heartbeat(user_id, session_id, seq=seq, request_id=rid, idem=idem)
    return HeartbeatResponse.from_view(progress)


@router.post(
    "/{session_id}/end",
    response_model=EndSessionResponse,
    responses=problems(401, 404, 409, 413, 422, 429, 503),
)
async def end_session(
    body: EndSessionRequest | None = None,
    session_id: str = Depends(session_id_path),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
    rid: str | None = Depends(request_id),
    idem: IdempotencyKey | None = Depends(idempotency_key),
) -> EndSessionResponse:
    ended = await rt.shards.end_session(user_id, session_id, request_id=rid, idem=idem)
    return EndSessionResponse.from_view(ended)


@router.get("/current", response_model=CurrentSessionResponse, responses=problems(401, 404, 429, 503))
async def current_session(
    user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)
) -> CurrentSessionResponse:
    return CurrentSessionResponse.from_view(await rt.shards.current_session(user_id))


@router.get("", response_model=SessionList, responses=problems(401, 422, 429, 503))
async def list_sessions(
    limit: int = Query(default=SESSIONS_PAGE_DEFAULT, ge=1, le=SESSIONS_PAGE_MAX),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
) -> SessionList:
    page = await rt.shards.list_sessions(user_id, limit)
    return SessionList(
        sessions=[SessionItem.from_view(summary) for summary in page.items], version=page.version
    )
