"""What every route module needs: the runtime, the request id, documented problem responses."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from actors.records import PlanAction
from actors.replies import MAX_KEY_LENGTH, IdempotencyKey
from actors.shard import PlanEvent
from actors.times import from_datetime
from gateway.runtime import Runtime
from gateway.schemas import Problem

_DESCRIPTIONS = {
    401: "Missing or invalid credentials (`unauthorized`)",
    403: "Nothing left to spend (`no_credits`)",
    404: "Not found (`session_not_found`)",
    409: (
        "Conflicts with the current state (`session_active`, `session_ended`), or a request with "
        "this Idempotency-Key is still running (`idempotency_conflict`, with Retry-After)"
    ),
    413: "Body over 16 KiB (`payload_too_large`)",
    422: "Invalid request (`invalid_request`, `idempotency_conflict`)",
    429: "Too many requests for this user (`rate_limited`, with Retry-After)",
    503: "A dependency is unavailable; nothing was changed (`unavailable`, with Retry-After)",
}


def problems(*statuses: int, said: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for problem+json answers (the app's openapi() fixes their media type);
    `said` words a status for a route whose codes differ from the usual ones."""
    described = {**_DESCRIPTIONS, **(said or {})}
    return {status: {"model": Problem, "description": described[status]} for status in statuses}


# EventSource polyfills that can send an Authorization header add their own query parameters on
# reconnect (`lastEventId`, cache busters); the stream takes none and starts with the current state.
QUERY_IGNORED_ON = frozenset({"/v1/usage/stream"})


async def no_unknown_query(request: Request) -> None:
    """Router dependency: a query parameter the route does not declare is 422 `invalid_request`,
    as an unknown body field is (a misspelt `?limt=5` is an error, not a silent default)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.path in QUERY_IGNORED_ON:
        return
    declared: frozenset[str] | None = getattr(route, _DECLARED_QUERY, None)
    if declared is None:  # worked out once per route, and kept on it
        declared = frozenset(_query_names(route.dependant))
        setattr(route, _DECLARED_QUERY, declared)
    repeated = sorted(
        name for name in set(request.query_params.keys()) if len(request.query_params.getlist(name)) > 1
    )
    if repeated:  # `?limit=1&limit=2`: which one would the client mean?
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("query", name), "msg": "given more than once"}
                for name in repeated
            ]
        )
    unknown = sorted(set(request.query_params.keys()) - declared)
    if unknown:
        raise RequestValidationError(
            [
                {"type": "extra_forbidden", "loc": ("query", name), "msg": "Extra inputs are not permitted"}
                for name in unknown
            ]
        )


# The attribute a route keeps its declared query parameters in (routes compare by value, so they
# cannot key a dict; an id could be reused once a route is gone).
_DECLARED_QUERY = "_ledger_declared_query"


def _query_names(dependant: Dependant) -> list[str]:
    names = [field.alias for field in dependant.query_params]
    for sub in dependant.dependencies:
        names.extend(_query_names(sub))
    return names


def plan_event(
    delivery_id: str,
    *,
    plan: str,
    action: PlanAction,
    occurred_at: datetime,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
    reset_usage: bool = False,
) -> PlanEvent:
    """A plan change as the shard takes it, from a signed internal call or a billing webhook."""
    return PlanEvent(
        delivery_id=delivery_id,
        plan=plan,
        action=action,
        occurred_at_ms=from_datetime(occurred_at),
        reset_usage=reset_usage,
        period_start_ms=from_datetime(period_start) if period_start else None,
        period_end_ms=from_datetime(period_end) if period_end else None,
    )


async def runtime(request: Request) -> Runtime:
    value = request.app.state.runtime
    assert isinstance(value, Runtime), "the lifespan sets app.state.runtime"
    return value


async def request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


async def idempotency_key(
    request: Request,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_KEY_LENGTH,
            pattern=r"^[\x21-\x7e]+$",
            description=(
                "Retries with the same key and body within 24 h get the first response again, with "
                "no new effect; another body is 422 `idempotency_conflict`; while the first is still "
                "running, 409 `idempotency_conflict`."
            ),
        ),
    ] = None,
) -> IdempotencyKey | None:
    """The request's `Idempotency-Key` with the hash of what it asks (method, path and body), in
    canonical form: the same request hashes the same however it is written."""
    if key is None:
        return None
    if len(request.headers.getlist("idempotency-key")) > 1:  # which one would the client mean?
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("header", "Idempotency-Key"), "msg": "more than one key sent"}]
        )
    body = await request.body()
    try:
        canonical = _canonical(json.loads(body, parse_float=Decimal, parse_int=Decimal)) if body else ""
    except (ValueError, RecursionError, ArithmeticError):  # ArithmeticError: Decimal's, at 1e10**20
        canonical = body.hex()  # not JSON: validation answers it, byte for byte is the best we can do
    digest = hashlib.sha256(f"{request.method} {_canonical_path(request)}\n{canonical}".encode())
    return IdempotencyKey(key=key, request_hash=digest.hexdigest())


def _canonical(value: Any) -> str:
    """JSON in one form: keys sorted, no spaces, numbers by value (`1`, `1.0` and `1e0` are one
    number), strings as `json` escapes them."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_canonical(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_canonical(item) for item in value) + "]"
    if isinstance(value, Decimal):
        if value.is_zero():
            return "0"
        # Exact (as many digits as the number has), whatever its exponent.
        exact = Context(prec=max(1, len(value.as_tuple().digits)), Emax=MAX_EMAX, Emin=MIN_EMIN)
        return str(value.normalize(exact))
    return json.dumps(value)


def _canonical_path(request: Request) -> str:
    """The path with its session id in canonical form (a UUID in any case or spelling is one id)."""
    session_id = request.path_params.get("session_id")
    if not isinstance(session_id, str):
        return request.url.path
    try:
        canonical = str(uuid.UUID(session_id))
    except ValueError:
        return request.url.path
    return request.url.path.replace(session_id, canonical, 1)
