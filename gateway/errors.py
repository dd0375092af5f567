"""HTTP errors: the one place that maps errors to statuses and problem+json bodies (RFC 9457).

Every error answer is `application/problem+json` with
`{"type", "title", "status", "detail", "code"}`; `code` is the stable,
machine-readable part. Domain errors arrive from the shards carrying their
`code`; this module decides their status.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from actors.errors import DomainError, IdempotencyInFlight
from actors.times import MS_PER_MINUTE, rfc3339, to_datetime

log = structlog.get_logger("gateway.errors")

PROBLEM_CONTENT_TYPE = "application/problem+json"
# A 503 tells the client when to retry: the shard or database is usually back within seconds.
RETRY_AFTER_S = 1

STATUS_BY_CODE: dict[str, int] = {
    "no_credits": 403,
    "session_active": 409,
    "session_not_found": 404,
    "meter_not_found": 404,
    "hold_not_found": 404,
    "hold_resolved": 409,
    "too_many_holds": 429,
    "session_ended": 409,
    "invalid_request": 422,
    "idempotency_conflict": 422,
    "rate_limited": 429,
    "unavailable": 503,
}
# Errors whose status is not their code's: one `idempotency_conflict` is "wait", not "wrong".
STATUS_BY_ERROR: dict[type[DomainError], int] = {IdempotencyInFlight: 409}


class ApiError(Exception):
    """An error the gateway itself answers (authentication, limits, malformed paths)."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, detail={self.detail!r})"


class Unauthorized(ApiError):
    def __init__(self, detail: str, *, bearer: bool = True) -> None:
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if bearer else {}
        super().__init__(401, "unauthorized", detail, headers=headers)


def problem(
    status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": f"urn:usage-ledger:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


def problem_bytes(status: int, code: str, detail: str, **extra: Any) -> bytes:
    """The body of `problem(...)`, for ASGI middleware that answers before the app runs."""
    return bytes(problem(status, code, detail, **extra).body)


def _domain_extra(exc: DomainError) -> dict[str, Any]:
    """Extension members a client can act on (never anything about another user)."""
    extra: dict[str, Any] = {}
    fields = exc.fields
    if "session_id" in fields:
        extra["session_id"] = fields["session_id"]
    if "end_reason" in fields:
        extra["end_reason"] = fields["end_reason"]
    if "session_used_ms" in fields:
        extra["session_minutes"] = round(fields["session_used_ms"] / MS_PER_MINUTE, 2)
    if "meter" in fields:
        extra["meter"] = fields["meter"]
    if "remaining" in fields:
        extra["remaining"] = fields["remaining"]
    if "remaining_ms" in fields:
        extra["minutes_remaining"] = round(fields["remaining_ms"] / MS_PER_MINUTE, 2)
    if "hold_id" in fields:
        extra["hold_id"] = fields["hold_id"]
    if "state" in fields:
        extra["state"] = fields["state"]
    if "resets_at_ms" in fields:
        extra["resets_at"] = rfc3339(to_datetime(fields["resets_at_ms"]))
    return extra


def domain_problem(exc: DomainError) -> JSONResponse:
    """The answer to a domain error from a shard."""
    status = STATUS_BY_ERROR.get(type(exc)) or STATUS_BY_CODE.get(exc.code, 500)
    headers = None
    if "retry_after_s" in exc.fields:
        headers = {"Retry-After": str(exc.fields["retry_after_s"])}
    elif status == 503 or isinstance(exc, IdempotencyInFlight):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    if status >= 500:
        log.warning("request_unavailable", error=repr(exc))
    return problem(status, exc.code, exc.detail, headers=headers, **_domain_extra(exc))


def error_problem(exc: Exception) -> JSONResponse:
    """The answer to an error raised while a route ran: a domain error, the gateway's own, or a bug."""
    if isinstance(exc, DomainError):
        return domain_problem(exc)
    if isinstance(exc, ApiError):
        return problem(exc.status, exc.code, exc.detail, headers=exc.headers)
    log.exception("request_failed", error=repr(exc))
    return problem(500, "internal", "an unexpected error occurred; it has been logged")


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    return error_problem(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # The offending input is not echoed back: it may be large or sensitive.
    errors = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in exc.errors()
    ]
    return problem(422, "invalid_request", "the request is not valid", errors=errors)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode (bytes that are not UTF-8 JSON): the same
        # `invalid_request` as any other malformed request.
        return problem(422, "invalid_request", "the request body is not valid JSON")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of the first route that matched the path only; a path
        # several routes share (GET and POST /v1/sessions) answers for all of them.
        allowed = ", ".join(sorted(_methods_for(request)))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allowed})
        headers["Allow"] = allowed
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return problem(exc.status_code, code, str(exc.detail), headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _methods_for(request: Request) -> set[str]:
    """Every method some route of the app answers on the request's path, and OPTIONS."""
    routes = request.app.router.routes
    return {"OPTIONS"} | {
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    }


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _on_error)
    app.add_exception_handler(ApiError, _on_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_error)
