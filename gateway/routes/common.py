"""What every route module needs: the runtime, the request id, documented problem responses."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from gateway.runtime import Runtime
from gateway.schemas import Problem

_DESCRIPTIONS = {
    401: "Missing or invalid credentials (`unauthorized`)",
    403: "Nothing left to spend (`no_credits`)",
    404: "Not found (`session_not_found`)",
    409: "Conflicts with the current state (`session_active`, `session_ended`)",
    413: "Body over 16 KiB (`payload_too_large`)",
    422: "Invalid request (`invalid_request`, `idempotency_conflict`)",
    503: "A dependency is unavailable; nothing was changed (`unavailable`, with Retry-After)",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for problem+json answers (the app's openapi() fixes their media type)."""
    return {status: {"model": Problem, "description": _DESCRIPTIONS[status]} for status in statuses}


def runtime(request: Request) -> Runtime:
    value = request.app.state.runtime
    assert isinstance(value, Runtime), "the lifespan sets app.state.runtime"
    return value


def request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None
