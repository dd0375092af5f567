"""/v1/usage: the usage object, the history of periods, and a live stream of changes.

The stream is Server-Sent Events: the usage object on connect and after every
change to the user (session ticks included), `id:` = version, with comment
lines to keep idle connections open. A change that made threshold events
(`low_balance`, `exhausted`, `plan_changed`, `period_rolled`) sends each first,
as `event: <type>` with the webhook body as `data:`. It long-polls the user's shard, so it
works through any gateway process. A client that reconnects gets the current
state first and can drop buffered events whose version is not newer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from actors.errors import ShardError
from actors.records import LedgerEvent
from actors.views import UsageView
from gateway.auth import current_user
from gateway.routes.common import problems, runtime
from gateway.runtime import Runtime
from gateway.schemas import HISTORY_PERIODS_DEFAULT, HISTORY_PERIODS_MAX, PeriodItem, Usage, UsageHistory
from persistence.events import event_payload

router = APIRouter(tags=["usage"])

# A comment line goes out at least this often on an idle stream.
STREAM_KEEPALIVE_S = 15.0
# After the shard was unreachable, the stream tries again this much later.
STREAM_RETRY_S = 1.0


@router.get("/v1/usage", response_model=Usage, responses=problems(401, 429, 503))
async def get_usage(user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)) -> Usage:
    return Usage.from_view(await rt.shards.usage(user_id))


@router.get("/v1/usage/history", response_model=UsageHistory, responses=problems(401, 422, 429, 503))
async def usage_history(
    periods: int = Query(default=HISTORY_PERIODS_DEFAULT, ge=1, le=HISTORY_PERIODS_MAX),
    user_id: str = Depends(current_user),
    rt: Runtime = Depends(runtime),
) -> UsageHistory:
    """Newest first, the current period included."""
    page = await rt.shards.usage_history(user_id, periods)
    return UsageHistory(
        periods=[PeriodItem.from_view(summary) for summary in page.items], version=page.version
    )


@router.get(
    "/v1/usage/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": (
                "Server-Sent Events: `event: usage`, `id: <version>`, `data: <usage object>`; "
                "before it, any threshold events of the change: `event: low_balance|exhausted|"
                "plan_changed|period_rolled`, `data: <webhook body>`. With `Last-Event-ID: v` "
                "(a reconnect) nothing is repeated: the first frame is a change after version v, "
                "preceded by the threshold events after v the ledger still holds"
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **problems(401, 429, 503),
    },
)
async def usage_stream(
    request: Request, user_id: str = Depends(current_user), rt: Runtime = Depends(runtime)
) -> StreamingResponse:
    first: UsageView = await rt.shards.usage(user_id)  # errors answer before streaming
    seen = _last_event_id(request, first.version)

    async def events() -> AsyncIterator[str]:
        if seen is None:
            version = first.version
            yield _frame(first)
        else:  # a reconnect: nothing is repeated; the first frame is a change after `seen`
            version = seen
        while not await request.is_disconnected():
            try:
                changed = await rt.shards.watch(user_id, version, STREAM_KEEPALIVE_S)
            except ShardError:
                yield ": shard unavailable; retrying\n\n"
                await asyncio.sleep(STREAM_RETRY_S)
                continue
            if changed is None:
                yield ": keep-alive\n\n"
            else:
                version = changed.usage.version
                for event in changed.events:
                    yield _event_frame(event)
                yield _frame(changed.usage)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _last_event_id(request: Request, current: int) -> int | None:
    """The version a reconnecting client last saw (`Last-Event-ID`), if it can be one: a number no
    newer than the user's version now. Anything else is a first connect: the current state first."""
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.isascii() or not raw.isdigit():
        return None
    seen = int(raw)
    return seen if seen <= current else None


def _frame(view: UsageView) -> str:
    data = json.dumps(Usage.from_view(view).model_dump(mode="json"), separators=(",", ":"))
    return f"event: usage\nid: {view.version}\ndata: {data}\n\n"


def _event_frame(event: LedgerEvent) -> str:
    # No `id:`: the usage frame that follows carries the change's version, and a client that
    # drops frames whose version is not newer must not drop that one.
    data = json.dumps(event_payload(event), separators=(",", ":"))
    return f"event: {event.kind}\ndata: {data}\n\n"
