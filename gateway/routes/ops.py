"""Operations: liveness, readiness (Ray shards and Postgres), Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import get_args

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from actors.ledger import AlarmKind
from actors.shard import ShardStats
from actors.times import wall_clock_ms
from gateway.metrics import Metrics
from gateway.routes.common import runtime
from gateway.runtime import Runtime
from gateway.schemas import Health, Readiness, ShardReadiness

router = APIRouter(tags=["operations"])

# Readiness answers within this (Postgres and the shards asked at once): a probe with a short
# timeout sees 503, not a hang, when a dependency does not answer.
READY_WAIT_S = 2.0


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (says nothing about its dependencies)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(rt: Runtime = Depends(runtime)) -> JSONResponse:
    """Ready when Postgres answers and every shard has started (each asked for `READY_WAIT_S`)."""
    database, answers = await asyncio.gather(
        rt.database_ok(timeout_s=READY_WAIT_S), rt.shards.ready(timeout_s=READY_WAIT_S)
    )
    shards = []
    for index, result in enumerate(answers):
        if isinstance(result, ShardStats):
            shards.append(
                ShardReadiness(
                    shard=index,
                    ready=result.state == "running",
                    resident_users=result.resident_users,
                    active_sessions=result.active_sessions,
                    dirty_users=result.dirty_users,
                )
            )
        else:
            shards.append(ShardReadiness(shard=index, ready=False, error=type(result).__name__))
    # The shards that own slots must be ready; one a resize is starting, or retiring, need not be.
    owning = set(rt.router.map.owners)
    ready = database and all(s.ready for s in shards if s.shard in owning) and rt.state == "running"
    body = Readiness(status="ready" if ready else "unavailable", database=database, shards=shards)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


HOLD_OUTCOMES = ("created", "captured", "released", "extended", "expired")


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request, rt: Runtime = Depends(runtime)) -> Response:
    registry: Metrics = request.app.state.metrics
    now_ms = wall_clock_ms()
    for result in await rt.shards.stats():
        if isinstance(result, ShardStats):
            shard = str(result.shard_index)
            for name, gauge in registry.shard_gauges.items():
                gauge.labels(shard).set(getattr(result, name))
            # Every kind, those this shard has not fired too: a restarted shard starts from 0, and a
            # kind only its previous process fired must not keep that process's count.
            for kind in get_args(AlarmKind):
                registry.shard_alarms.labels(shard, kind).set(result.alarms_by_kind.get(kind, 0))
            for outcome in HOLD_OUTCOMES:
                registry.shard_holds.labels(shard, outcome).set(result.holds_by_outcome.get(outcome, 0))
            if result.last_flush_duration_ms is not None:
                registry.shard_flush_duration.labels(shard).set(result.last_flush_duration_ms / 1000)
            if result.last_flush_at_ms is not None:
                registry.shard_flush_lag.labels(shard).set(max(0, now_ms - result.last_flush_at_ms) / 1000)
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
