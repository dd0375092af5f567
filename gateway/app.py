"""create_app(settings): the FastAPI application and its lifespan.

Outermost, before anything else of the app: the hot path, which answers
well-formed credit checks and heartbeats itself (`gateway.hotpath`), with the
same bound, log line and metrics as the rest. Then the middleware, outermost
first: request id and canonical log line; the bound on requests in flight; the
16 KiB body bound; the listener check; the internal-call signature check. Then
routing, with every error answered as problem+json by `gateway.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp

from actors.logsetup import configure_logging
from actors.processes import freeze_long_lived
from gateway.auth import InternalSignatureMiddleware, JwksKeys, TokenVerifier
from gateway.errors import PROBLEM_CONTENT_TYPE, install_error_handlers
from gateway.hotpath import HotPathMiddleware
from gateway.metrics import Metrics
from gateway.middleware import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InFlight,
    ListenerMiddleware,
    RequestLogMiddleware,
)
from gateway.routes import credits, docs, holds, internal, ops, sessions, usage, webhooks
from gateway.routes.common import no_unknown_query
from gateway.runtime import Runtime, describe_error
from gateway.secrets import resolve_secrets
from gateway.settings import Settings

log = structlog.get_logger("gateway.app")

DESCRIPTION = """\
A per-user usage ledger: one live ledger per user holds their minutes in
memory, answers "may this user go on?" with no I/O, runs their heartbeat and
stale-session alarms, and writes to Postgres in batches.

User endpoints take a bearer JWT whose `sub` is the user id. Internal
endpoints are signed with Standard Webhooks. Every error is
`application/problem+json` with a stable `code`.
"""


class LedgerApp(FastAPI):
    """FastAPI, with the hot path outside its whole middleware stack (`outermost`)."""

    outermost: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.outermost is None else self.outermost(stack)


def _package_version() -> str:
    try:
        return version("usage-ledger")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(settings: Settings | None = None, *, owns_process: bool = False) -> FastAPI:
    """`owns_process`: this app is what the process serves (`usage-ledger serve`), so once started
    its long-lived objects are frozen out of the collector's sight (`freeze_long_lived`)."""
    settings = settings if settings is not None else Settings()
    configure_logging(log_format=settings.resolved_log_format, level=settings.log_level)
    for problem in settings.contradictions():  # (production refuses them: see Settings)
        log.warning("settings_contradict", problem=problem)
    secrets = resolve_secrets(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            runtime = await Runtime.start(settings, metrics=metrics)
        except Exception as exc:
            # One line that says what failed (`serve --debug` shows the traceback as well).
            hint = (
                "a connection failed: is the database (LEDGER_DATABASE_URL) or Ray (LEDGER_RAY_ADDRESS) "
                "reachable?"
                if isinstance(exc, OSError)
                else None
            )
            log.error("startup_failed", error=describe_error(exc), hint=hint)
            raise
        app.state.runtime = runtime
        if owns_process:
            freeze_long_lived()
        try:
            yield
        finally:
            await runtime.stop()

    app = LedgerApp(
        title="usage-ledger",
        version=_package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url=None,  # all three declared in gateway.routes.docs (the pages from a package)
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    jwks = (
        JwksKeys(settings.jwt_jwks_url, refetch_min_s=settings.jwt_jwks_refetch_s)
        if settings.jwt_jwks_url
        else None
    )
    app.state.token_verifier = TokenVerifier(
        secret=None if jwks is not None else secrets.jwt_secret,
        jwks=jwks,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway_s=settings.jwt_leeway_s,
    )
    install_error_handlers(app)
    for module in (usage, sessions, credits, holds, internal):
        app.include_router(module.router, dependencies=[Depends(no_unknown_query)])
    app.include_router(ops.router)
    docs.install(app)
    app.include_router(webhooks.router, dependencies=[Depends(no_unknown_query)])
    in_flight = InFlight(max_requests=settings.max_requests_in_flight, metrics=metrics)
    app.add_middleware(InternalSignatureMiddleware, secret=secrets.internal_secret)
    if settings.internal_port is not None:
        app.add_middleware(ListenerMiddleware, internal_port=settings.internal_port)
    app.add_middleware(BodyLimitMiddleware, read_timeout_s=settings.request_read_timeout_s)
    app.add_middleware(ConcurrencyLimitMiddleware, in_flight=in_flight)
    app.add_middleware(RequestLogMiddleware, metrics=metrics)
    app.outermost = lambda stack: HotPathMiddleware(
        stack,
        fastapi=app,
        in_flight=in_flight,
        metrics=metrics,
        read_timeout_s=settings.request_read_timeout_s,
        internal_port=settings.internal_port,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _problems_as_problem_json(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _problems_as_problem_json(schema: dict[str, Any]) -> None:
    """Error answers are application/problem+json, not application/json; say so in the document."""
    problem_ref = "#/components/schemas/Problem"
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                json_body = content.get("application/json")
                if json_body and json_body.get("schema", {}).get("$ref") == problem_ref:
                    content[PROBLEM_CONTENT_TYPE] = content.pop("application/json")
            # FastAPI's own 422 entry describes its default body; ours is a Problem.
            validation = operation.get("responses", {}).get("422")
            if validation is not None:
                validation["content"] = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": problem_ref}}}
    schemas = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


__all__ = ["Runtime", "create_app"]
