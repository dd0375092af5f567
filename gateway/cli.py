"""The `usage-ledger` command.

    usage-ledger serve                      run the server (embedded Postgres and local Ray by default)
    usage-ledger migrate                    apply database migrations and exit
    usage-ledger token USER_ID              print a user JWT the running configuration accepts
    usage-ledger internal plan USER PLAN    make a signed plan-change call to a running server
    usage-ledger internal credits USER MIN  add purchased minutes through a signed call
    usage-ledger internal reconcile USER    compare a user's balances with the credit ledger

Configuration comes from `LEDGER_*` environment variables (see README).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

import httpx
import typer
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from gateway.settings import Settings

app = typer.Typer(help="A per-user usage ledger server.", no_args_is_help=True, add_completion=False)
internal_app = typer.Typer(help="Signed calls to a running server's internal API.", no_args_is_help=True)
app.add_typer(internal_app, name="internal")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # Name each bad setting and why, never its value: it may be a secret.
        for error in exc.errors(include_input=False, include_url=False):
            where = "_".join(str(part) for part in error["loc"]).upper()
            name = f"LEDGER_{where}: " if where else ""
            reason = error["msg"].removeprefix("Value error, ")
            typer.echo(f"usage-ledger: invalid configuration: {name}{reason}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Overrides LEDGER_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides LEDGER_PORT.")] = None,
) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM flush every ledger before exit)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.serving import BACKLOG, server_config

    settings = _settings()
    overrides = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    application = create_app(settings)
    where = f"http://{settings.host}:{settings.port}"
    typer.echo(
        f"usage-ledger {settings.env}: listening on {where}  "
        f"(data dir {settings.data_dir.resolve()}, "
        f"database {'from LEDGER_DATABASE_URL' if settings.database_url else 'embedded'}, "
        f"ray {settings.ray_address or 'local'})",
        err=True,
    )
    typer.echo(
        f'  try: curl -H "Authorization: Bearer $(usage-ledger token demo)" {where}/v1/usage', err=True
    )
    if settings.internal_port is not None:
        typer.echo(
            f"  internal routes only on http://{settings.internal_host}:{settings.internal_port}/internal/",
            err=True,
        )
    config = server_config(
        application, host=settings.host, port=settings.port, read_timeout_s=settings.request_read_timeout_s
    )
    sockets = [config.bind_socket()]
    if settings.internal_port is not None:
        sockets.append(_listen(settings.internal_host, settings.internal_port, backlog=BACKLOG))
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)  # startup failed (the log says why), as `uvicorn.run` exits


def _listen(host: str, port: int, *, backlog: int) -> socket.socket:
    """A listening TCP socket for the internal routes (uvicorn serves every socket it is given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    listener.set_inheritable(True)
    return listener


@app.command()
def migrate() -> None:
    """Apply the database migrations (the embedded database when LEDGER_DATABASE_URL is unset)."""
    from actors.logsetup import configure_logging
    from gateway.runtime import migrate_database, open_database

    settings = _settings()
    configure_logging(log_format=settings.resolved_log_format, level=settings.log_level)

    async def run() -> list[int]:
        database = await open_database(settings)
        try:
            return await migrate_database(settings.migration_dsn(database.dsn), settings)
        finally:
            if database.embedded is not None:
                await asyncio.to_thread(database.embedded.stop)

    applied = asyncio.run(run())
    typer.echo(f"applied migrations: {applied}" if applied else "database is up to date")


@app.command()
def token(
    user_id: Annotated[str, typer.Argument(help="The user id (the token's `sub`).")],
    ttl_s: Annotated[int, typer.Option("--ttl-s", min=1, help="Lifetime in seconds.")] = 24 * 3600,
) -> None:
    """Print a user JWT that the server with this configuration accepts."""
    from gateway.auth import USER_ID_MAX_LENGTH, issue_token
    from gateway.secrets import resolve_secrets

    if not 0 < len(user_id) <= USER_ID_MAX_LENGTH:
        typer.echo(f"usage-ledger: USER_ID must be 1 to {USER_ID_MAX_LENGTH} characters", err=True)
        raise typer.Exit(2)
    settings = _settings()
    secrets = resolve_secrets(settings)
    typer.echo(
        issue_token(
            secret=secrets.jwt_secret,
            user_id=user_id,
            ttl_s=ttl_s,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )


@internal_app.command("plan")
def internal_plan(
    user_id: Annotated[str, typer.Argument(help="The user whose plan changes.")],
    plan: Annotated[str, typer.Argument(help="A plan from the plans file.")],
    action: Annotated[
        Literal["upgrade", "downgrade", "cancel"], typer.Option(help="What billing did.")
    ] = "upgrade",
    reset_usage: Annotated[bool, typer.Option("--reset-usage", help="Zero this period's usage.")] = False,
    occurred_at: Annotated[
        str | None, typer.Option(help="When billing made the change (RFC 3339); default now.")
    ] = None,
    period_start: Annotated[
        str | None, typer.Option(help="The subscription's period start (RFC 3339).")
    ] = None,
    period_end: Annotated[str | None, typer.Option(help="The subscription's period end (RFC 3339).")] = None,
    delivery_id: Annotated[
        str | None, typer.Option(help="The webhook id (deduplicates retries); default a new one.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Server base URL; default from LEDGER_HOST/LEDGER_PORT.")
    ] = None,
) -> None:
    """Change a user's plan through the signed internal API, and print the answer."""
    body: dict[str, object] = {
        "plan": plan,
        "action": action,
        "occurred_at": occurred_at or datetime.now(UTC).isoformat(),
        "reset_usage": reset_usage,
    }
    if period_start is not None or period_end is not None:
        body.update(period_start=period_start, period_end=period_end)
    _signed("POST", f"/internal/v1/users/{user_id}/plan", body, url=url, delivery_id=delivery_id)


@internal_app.command("credits")
def internal_credits(
    user_id: Annotated[str, typer.Argument(help="The user who gets the minutes.")],
    minutes: Annotated[float, typer.Argument(help="Minutes to add (they never expire).")],
    reason: Annotated[Literal["purchase", "grant", "refund"], typer.Option(help="Why.")] = "purchase",
    reference: Annotated[str | None, typer.Option(help="Your reference, e.g. an order id.")] = None,
    delivery_id: Annotated[
        str | None, typer.Option(help="The webhook id (deduplicates retries); default a new one.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Server base URL; default from LEDGER_HOST/LEDGER_PORT.")
    ] = None,
) -> None:
    """Add purchased minutes through the signed internal API, and print the answer."""
    body: dict[str, object] = {"minutes": minutes, "reason": reason}
    if reference is not None:
        body["reference"] = reference
    _signed("POST", f"/internal/v1/users/{user_id}/credits", body, url=url, delivery_id=delivery_id)


@internal_app.command("reconcile")
def internal_reconcile(
    user_id: Annotated[str, typer.Argument(help="The user to check.")],
    url: Annotated[
        str | None, typer.Option(help="Server base URL; default from LEDGER_HOST/LEDGER_PORT.")
    ] = None,
) -> None:
    """Compare a user's live balances with the credit ledger; exit 1 when they drift."""
    answer = _signed("GET", f"/internal/v1/users/{user_id}/reconcile", None, url=url, delivery_id=None)
    if answer.get("drift_found"):
        raise typer.Exit(1)


def _signed(
    method: Literal["GET", "POST"],
    path: str,
    body: dict[str, object] | None,
    *,
    url: str | None,
    delivery_id: str | None,
) -> dict[str, object]:
    """Make a Standard Webhooks-signed call, print the JSON answer, exit 1 on an error status."""
    from gateway.secrets import resolve_secrets

    settings = _settings()
    secrets = resolve_secrets(settings)
    content = json.dumps(body) if body is not None else ""
    message_id = delivery_id or f"msg_{uuid.uuid4().hex}"
    timestamp = datetime.fromtimestamp(int(time.time()), tz=UTC)
    signature = Webhook(secrets.internal_secret).sign(message_id, timestamp, content)
    base = url or f"http://{settings.host}:{settings.port}"
    response = httpx.request(
        method,
        f"{base}{path}",
        content=content,
        headers={
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": signature,
        },
        timeout=30,
    )
    answer = response.json()
    typer.echo(json.dumps(answer, indent=2))
    if response.status_code >= 400:
        raise typer.Exit(1)
    return answer  # type: ignore[no-any-return]


def main() -> None:
    # Ray's C++ failure-signal handler would catch SIGTERM, run uvicorn's handler,
    # then kill the process before the lifespan has flushed the shards. It must
    # be switched off before Ray is first imported; nothing above imports Ray.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    sys.exit(app())
