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
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

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


# Options several commands share.
DeliveryIdOption = Annotated[
    str | None, typer.Option(help="The webhook id (deduplicates retries); default a new one.")
]
UrlOption = Annotated[
    str | None,
    typer.Option(help="Server base URL; default from LEDGER_HOST and LEDGER_INTERNAL_PORT or LEDGER_PORT."),
]


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
    application = create_app(settings, owns_process=True)
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
    from rich.progress import Progress

    from actors.logsetup import configure_logging
    from gateway.runtime import migrate_database, open_database
    from persistence.migrate import Migration

    settings = _settings()
    configure_logging(log_format=settings.resolved_log_format, level=settings.log_level)

    class Bar:
        """A progress bar over the pending migrations (drawn only on a terminal)."""

        def __init__(self, progress: Progress) -> None:
            self._progress = progress
            self._task: Any = None

        def pending(self, migrations: Sequence[Migration]) -> None:
            self._task = self._progress.add_task("migrating", total=len(migrations))

        def applied(self, migration: Migration) -> None:
            self._progress.update(
                self._task, advance=1, description=f"applied {migration.version:04d}_{migration.name}"
            )

    async def run(bar: Bar) -> list[int]:
        database = await open_database(settings)
        try:
            return await migrate_database(settings.migration_dsn(database.dsn), settings, progress=bar)
        finally:
            if database.embedded is not None:
                await asyncio.to_thread(database.embedded.stop)

    with Progress(transient=True) as progress:
        applied = asyncio.run(run(Bar(progress)))
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
    delivery_id: DeliveryIdOption = None,
    url: UrlOption = None,
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
    delivery_id: DeliveryIdOption = None,
    url: UrlOption = None,
) -> None:
    """Add purchased minutes through the signed internal API, and print the answer."""
    body: dict[str, object] = {"minutes": minutes, "reason": reason}
    if reference is not None:
        body["reference"] = reference
    _signed("POST", f"/internal/v1/users/{user_id}/credits", body, url=url, delivery_id=delivery_id)


@internal_app.command("reconcile")
def internal_reconcile(
    user_id: Annotated[str, typer.Argument(help="The user to check.")],
    url: UrlOption = None,
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
    status_code, answer = _signed_call(method, path, body, url=url, delivery_id=delivery_id)
    typer.echo(json.dumps(answer, indent=2))
    if status_code >= 400:
        raise typer.Exit(1)
    return answer


def _signed_call(
    method: Literal["GET", "POST"],
    path: str,
    body: dict[str, object] | None,
    *,
    url: str | None,
    delivery_id: str | None,
) -> tuple[int, dict[str, object]]:
    """A Standard Webhooks-signed call to the running server: (status, JSON answer)."""
    from gateway.secrets import resolve_secrets

    settings = _settings()
    secrets = resolve_secrets(settings)
    content = json.dumps(body) if body is not None else ""
    message_id = delivery_id or f"msg_{uuid.uuid4().hex}"
    timestamp = datetime.fromtimestamp(int(time.time()), tz=UTC)
    signature = Webhook(secrets.internal_secret).sign(message_id, timestamp, content)
    # With a separate internal listener, internal routes answer only there.
    host, port = (
        (settings.internal_host, settings.internal_port)
        if settings.internal_port
        else (settings.host, settings.port)
    )
    base = url or f"http://{host}:{port}"
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
    return response.status_code, response.json()


def _answer_or_exit(method: Literal["GET"], path: str, url: str | None) -> dict[str, object]:
    status_code, answer = _signed_call(method, path, None, url=url, delivery_id=None)
    if status_code >= 400:
        typer.echo(json.dumps(answer, indent=2), err=True)
        raise typer.Exit(1)
    return answer


@app.command()
def status(url: UrlOption = None) -> None:
    """The shards of a running server: where they run, resident users, sessions, the write-behind."""
    from rich.console import Console
    from rich.table import Table

    answer = _answer_or_exit("GET", "/internal/v1/status", url)
    table = Table(title="usage-ledger shards")
    for column in (
        "shard",
        "state",
        "where",
        "resident users",
        "active sessions",
        "dirty users",
        "pending calls",
        "last flush",
        "flush failures",
    ):
        table.add_column(
            column, justify="right" if column not in ("state", "where", "last flush") else "left"
        )
    shards = answer.get("shards")
    for shard in shards if isinstance(shards, list) else []:
        state = str(shard["state"]) + (" (loading open sessions)" if shard.get("reactivating") else "")
        where = f"{shard['host']} pid {shard['pid']}" if shard.get("host") else str(shard.get("error") or "")
        table.add_row(
            str(shard["shard"]),
            state,
            where,
            *(
                _cell(shard.get(name))
                for name in ("resident_users", "active_sessions", "dirty_users", "pending_calls")
            ),
            _cell(shard.get("last_flush_at")) if shard.get("last_flush_at") else "not yet",
            _cell(shard.get("flush_failures")),
        )
    Console().print(table)


@app.command()
def user(
    user_id: Annotated[str, typer.Argument(help="The user to show.")],
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many recent sessions.")] = 10,
    url: UrlOption = None,
) -> None:
    """One user's usage (plan, period, minutes) and recent sessions."""
    from rich.console import Console
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    usage = _answer_or_exit("GET", f"/internal/v1/users/{user_id}/usage", url)
    page = _answer_or_exit("GET", f"/internal/v1/users/{user_id}/sessions?limit={limit}", url)
    console = Console()
    summary = Table.grid(padding=(0, 2))
    summary.add_row("user", str(usage["user_id"]))
    summary.add_row("plan", str(usage["plan"]))
    summary.add_row("period", f"{usage['period_start']} to {usage['period_end']}")
    limit_minutes = float(str(usage["minutes_limit"]))
    used = float(str(usage["minutes_used"]))
    bar = ProgressBar(total=max(limit_minutes, 0.01), completed=min(used, limit_minutes), width=30)
    used_cell = Table.grid()
    used_cell.add_row(bar, f"  {used:g} of {limit_minutes:g} minutes ({usage['percent_used']}%)")
    summary.add_row("used", used_cell)
    summary.add_row(
        "remaining", f"{usage['minutes_remaining']} minutes ({usage['purchased_minutes']} purchased)"
    )
    if usage.get("warning"):
        summary.add_row("warning", str(usage["warning"]))
    active = usage.get("active_session")
    summary.add_row(
        "in a session", f"yes, since {active['started_at']}" if isinstance(active, dict) else "no"
    )
    console.print(summary)
    sessions = Table(title=f"recent sessions of {user_id}")
    for column in ("started", "ended", "minutes", "end reason", "topic"):
        sessions.add_column(column)
    items = page.get("sessions")
    for item in items if isinstance(items, list) else []:
        sessions.add_row(
            str(item["started_at"]),
            _cell(item.get("ended_at")) if item.get("ended_at") else "running",
            _cell(item.get("minutes_used")),
            _cell(item.get("end_reason")),
            _cell(item.get("topic")),
        )
    console.print(sessions)


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def main() -> None:
    # Ray's C++ failure-signal handler would catch SIGTERM, run uvicorn's handler,
    # then kill the process before the lifespan has flushed the shards. It must
    # be switched off before Ray is first imported; nothing above imports Ray.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    sys.exit(app())
