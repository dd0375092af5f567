"""The `usage-ledger` command.

    usage-ledger serve                      run the server (embedded Postgres and local Ray by default)
    usage-ledger migrate                    apply database migrations and exit
    usage-ledger token USER_ID              print a user JWT the running configuration accepts
    usage-ledger internal plan USER PLAN    make a signed plan-change call to a running server
    usage-ledger internal credits USER MIN  add purchased minutes through a signed call
    usage-ledger internal reconcile USER    compare a user's balances with the credit ledger
    usage-ledger status | user USER_ID      a running server's shards, or one user
    usage-ledger db [--psql]                the embedded database's URL (or open psql on it)

Configuration comes from `LEDGER_*` environment variables (see README). Commands that talk to a
server find the one started from the same directory (`gateway.serverfile`) unless `--url` or the
environment says where. Whatever goes wrong is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog
import typer
from pydantic import ValidationError

from actors.logsetup import whole_lines_on_standard_streams
from actors.routing import SLOTS, initial_owners, moved_fraction, rebalanced
from gateway import serverfile
from gateway.secrets import Secrets, SecretsMissing, resolve_secrets
from gateway.settings import Settings

app = typer.Typer(
    help="A per-user usage ledger server.", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)
internal_app = typer.Typer(
    help="Signed calls to a running server's internal API.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(internal_app, name="internal")
shards_app = typer.Typer(
    help="The shard map: how many shards, which users each serves; change it while serving.",
    no_args_is_help=False,
    invoke_without_command=True,
    rich_markup_mode=None,
)
app.add_typer(shards_app, name="shards")


def _fail(message: str, *, code: int = 1) -> NoReturn:
    """One line on stderr, and exit: what went wrong and what to do."""
    typer.echo(f"usage-ledger: {message}", err=True)
    raise typer.Exit(code)


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
    typer.Option(
        help="Server base URL; default: the server started from this directory (its data dir's "
        "server.json), else LEDGER_HOST and LEDGER_INTERNAL_PORT or LEDGER_PORT."
    ),
]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Overrides LEDGER_HOST.")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65_535, help="Overrides LEDGER_PORT.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error at start.")] = False,
) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM flush every ledger before exit)."""
    from actors.plans import PlansError
    from gateway.app import create_app
    from gateway.runtime import load_plans
    from gateway.serving import server_config

    settings = _settings()
    overrides = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    try:
        load_plans(settings)  # before anything starts: a bad plans file is one line, not a traceback
    except PlansError as exc:
        if debug:
            raise
        _fail(f"invalid plans file: {exc}", code=2)
    if settings.resolved_log_format == "console":
        database = "LEDGER_DATABASE_URL" if settings.database_url else "embedded Postgres"
        typer.echo(
            f"usage-ledger {settings.env}: starting ({database}, Ray {settings.ray_address or 'local'}); "
            "it says when it listens",
            err=True,
        )
    try:
        application = create_app(settings, owns_process=True)
    except (OSError, ValueError) as exc:  # the data dir or its secrets file
        if debug:
            raise
        _fail(f"cannot start: {exc}", code=2)
    config = server_config(
        application, host=settings.host, port=settings.port, read_timeout_s=settings.request_read_timeout_s
    )
    if not debug:  # a failed start is the app's one `startup_failed` line, not uvicorn's traceback too
        config.load()
        config.lifespan_class = _quiet_startup_failure(config.lifespan_class)
    try:
        sockets = [_bound(settings.host, settings.port)]
        if settings.internal_port is not None:
            sockets.append(_bound(settings.internal_host, settings.internal_port))
    except OSError as exc:
        _fail(f"cannot listen: {exc.strerror} ({exc.__class__.__name__})", code=2)
    server = _announcing_server(
        config,
        on_started=lambda: _announce(application, settings, sockets),
        on_stopping=lambda: serverfile.remove(settings.data_dir, os.getpid()),
    )
    try:
        server.run(sockets=sockets)
    finally:  # (after SIGTERM, uvicorn re-raises the signal once drained: `on_stopping` ran before)
        serverfile.remove(settings.data_dir, os.getpid())
    if not server.started:
        sys.exit(3)  # startup failed (the log says why), as `uvicorn.run` exits


def _quiet_startup_failure(lifespan_class: Any) -> Any:
    """uvicorn's lifespan, without the traceback the app sends when its start fails."""

    class QuietStartupFailure(lifespan_class):  # type: ignore[misc]
        async def send(self, message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await super().send(message)

    return QuietStartupFailure


def _announcing_server(
    config: Any, *, on_started: Callable[[], None], on_stopping: Callable[[], None]
) -> Any:
    """uvicorn's server, calling `on_started` once its sockets accept connections, and
    `on_stopping` as it begins to stop (uvicorn is imported here, not for every CLI command)."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_started()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            on_stopping()
            await super().shutdown(sockets=sockets)

    return AnnouncingServer(config)


def _announce(application: Any, settings: Settings, sockets: Sequence[socket.socket]) -> None:
    """Record where this server listens (`server.json`, for the CLI) and say so."""
    url = _url_of(sockets[0])
    internal_url = _url_of(sockets[1]) if len(sockets) > 1 else url
    database = application.state.runtime.database
    embedded = database.dsn if database.embedded is not None else None
    try:
        serverfile.write(
            settings.data_dir,
            serverfile.ServerInfo(pid=os.getpid(), url=url, internal_url=internal_url, database=embedded),
        )
    except OSError as exc:  # the server serves all the same; only the CLI's finding it is lost
        structlog.get_logger("gateway.cli").warning(
            "server_file_not_written", path=str(settings.data_dir / serverfile.SERVER_FILE), error=str(exc)
        )
    where = "embedded Postgres (`usage-ledger db` prints its URL)" if embedded else "LEDGER_DATABASE_URL"
    if settings.resolved_log_format == "json":  # every line of the output is a JSON object
        structlog.get_logger("gateway.cli").info(
            "listening",
            url=url,
            internal_url=internal_url,
            data_dir=str(settings.data_dir.resolve()),
            database="embedded" if embedded else "LEDGER_DATABASE_URL",
        )
        return
    typer.echo(
        f"usage-ledger {settings.env}: listening on {url}  "
        f"(data dir {settings.data_dir.resolve()}, ray {settings.ray_address or 'local'})",
        err=True,
    )
    typer.echo(f"  database: {where}", err=True)
    if internal_url != url:
        typer.echo(f"  internal routes only on {internal_url}/internal/", err=True)
    typer.echo(f'  try: curl -H "Authorization: Bearer $(usage-ledger token demo)" {url}/v1/usage', err=True)


def _url_of(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return _http_url(host, port)


def _http_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bound(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port`, not yet listening: uvicorn listens on every socket it is
    given once the app has started, so until then a connection is refused, not left waiting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
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

    if not 0 < len(user_id) <= USER_ID_MAX_LENGTH:
        _fail(f"USER_ID must be 1 to {USER_ID_MAX_LENGTH} characters", code=2)
    settings = _settings()
    secrets = _secrets(settings)
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
    from gateway.auth import signed_headers

    settings = _settings()
    secrets = _secrets(settings)
    content = json.dumps(body) if body is not None else ""
    base = _base_url(settings, url, internal=True)
    try:
        response = httpx.request(
            method,
            f"{base}{path}",
            content=content,
            headers=signed_headers(secrets.internal_secret, content, message_id=delivery_id),
            timeout=30,
        )
    except httpx.TransportError as exc:
        _fail(
            f"no server answers at {base} ({exc.__class__.__name__}): start one with `usage-ledger serve` "
            "in this directory, or pass --url"
        )
    except httpx.InvalidURL as exc:
        _fail(f"{base} is not a URL to call ({exc}); pass --url http://host:port")
    try:
        answer = response.json()
    except ValueError:
        _fail(f"{base} answered {response.status_code} with no JSON: is it a usage-ledger server?")
    return response.status_code, answer if isinstance(answer, dict) else {"answer": answer}


def _secrets(settings: Settings) -> Secrets:
    try:
        return resolve_secrets(settings, create=False)
    except SecretsMissing as exc:
        _fail(
            f"no secrets in {exc.path}: the server makes them when it first starts; run this command in "
            "the directory `usage-ledger serve` runs in (or set LEDGER_DATA_DIR to its data dir, or set "
            "LEDGER_JWT_SECRET and LEDGER_INTERNAL_SECRET)"
        )
    except (OSError, ValueError) as exc:  # not ours to read (another user's server?), or not ours at all
        _fail(f"cannot read the secrets: {exc}")


def _base_url(settings: Settings, url: str | None, *, internal: bool) -> str:
    """--url; else the server started from this directory, unless the environment says where (a
    port of 0 says nothing: the server picked one, and recorded it); else the configured host and
    port."""
    if url:
        return url.rstrip("/")
    said = {"host", "port", "internal_host", "internal_port"} & settings.model_fields_set
    if settings.port == 0:
        said.discard("port")
    if not settings.internal_port:
        said.discard("internal_port")
    if not said:
        running = serverfile.read(settings.data_dir)
        if running is not None:
            return running.internal_url if internal else running.url
    # With a separate internal listener, internal routes answer only there.
    host, port = (
        (settings.internal_host, settings.internal_port)
        if internal and settings.internal_port
        else (settings.host, settings.port)
    )
    return _http_url(host, port)


def _answer_or_exit(method: Literal["GET"], path: str, url: str | None) -> dict[str, object]:
    status_code, answer = _signed_call(method, path, None, url=url, delivery_id=None)
    if status_code >= 400:
        typer.echo(json.dumps(answer, indent=2), err=True)
        raise typer.Exit(1)
    return answer


@app.command()
def db(
    psql: Annotated[bool, typer.Option("--psql", help="Open psql on it (if psql is installed).")] = False,
    dashboard: Annotated[
        bool,
        typer.Option(
            "--dashboard",
            help="The URL of a read-only login for dashboards instead (made on first use): it reads "
            "the views in schema `dashboards` and nothing else. Embedded database only.",
        ),
    ] = False,
) -> None:
    """Print the URL of the server's database (the embedded one while its server runs)."""
    settings = _settings()
    if settings.database_url is not None:
        if dashboard:
            _fail(
                "--dashboard makes a login on the embedded database only; on your own Postgres, grant "
                "role usage_ledger_dashboard to a login of yours (deploy/README.md, Postgres roles)"
            )
        dsn = settings.database_url.get_secret_value()
    else:
        running = serverfile.read(settings.data_dir)
        if running is None or running.database is None:
            _fail(
                f"no server with an embedded database runs from {settings.data_dir.resolve()}: start one "
                "with `usage-ledger serve` in this directory (the embedded Postgres runs while it does)"
            )
        dsn = _dashboard_login(running.database) if dashboard else running.database
    if not psql:
        typer.echo(dsn)
        return
    program = shutil.which("psql")
    if program is None:
        _fail(f"psql is not installed; the database is {dsn}")
    # A password goes to psql in its environment, not its arguments (which other users can read).
    parts = urlsplit(dsn)
    environment = dict(os.environ)
    if parts.password:
        environment["PGPASSWORD"] = parts.password
        user = f"{parts.username}@" if parts.username else ""
        dsn = urlunsplit(parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[-1]))
    os.execve(program, [program, dsn], environment)


DASHBOARD_LOGIN = "usage_ledger_dashboard_login"


def _dashboard_login(dsn: str) -> str:
    """Make (once) a login that is a member of the read-only `usage_ledger_dashboard` role, looking
    in schema `dashboards` first; its URL: the embedded server's, as that login (the embedded
    server trusts its own socket, which only this machine's user can reach)."""
    import asyncpg

    async def make() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            await connection.execute(
                f"""
                do $$ begin
                    if not exists (select from pg_roles where rolname = '{DASHBOARD_LOGIN}') then
                        create role {DASHBOARD_LOGIN} login in role usage_ledger_dashboard;
                    end if;
                end $$;
                alter role {DASHBOARD_LOGIN} set search_path = dashboards;
                """
            )
        finally:
            await connection.close()

    try:
        asyncio.run(make())
    except (OSError, asyncpg.PostgresError) as exc:
        _fail(f"cannot make the dashboard login: {exc}")
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{DASHBOARD_LOGIN}@{host}"))


@app.command()
def status(url: UrlOption = None) -> None:
    """The shards of a running server: where they run, resident users, sessions, the write-behind."""
    from rich.console import Console

    answer = _answer_or_exit("GET", "/internal/v1/status", url)
    shards = answer.get("shards")
    Console().print(status_table(shards if isinstance(shards, list) else [], now=datetime.now(UTC)))


def status_table(shards: Sequence[dict[str, Any]], *, now: datetime) -> Any:
    """`status`'s table: short headers and values, so that it fits 80 columns with room to spare."""
    from rich import box
    from rich.table import Table

    table = Table(title="usage-ledger shards", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column, left in STATUS_COLUMNS:
        # Only the process's place may wrap (a long host name); numbers never do.
        wraps = column == "pid@host"
        table.add_column(
            column,
            justify="left" if left else "right",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
        )
    for shard in shards:
        state = "loading" if shard.get("reactivating") else str(shard["state"])  # its open sessions
        place = f"{shard['pid']}@{shard['host']}" if shard.get("host") else str(shard.get("error") or "")
        table.add_row(
            str(shard["shard"]),
            state,
            place,
            *(_cell(shard.get(name)) for name in ("resident_users", "active_sessions", "dirty_users")),
            _ago(shard.get("last_flush_at"), now),
            _cell(shard.get("flush_failures")),
        )
    return table


# (header, left-aligned): the shard, its state, pid@host, resident users, active sessions, dirty users, the
# last flush, flushes failed. (Calls pending are in the metrics: `ledger_shard_pending_calls`.)
STATUS_COLUMNS = (
    ("#", False),
    ("state", True),
    ("pid@host", True),
    ("users", False),
    ("sessions", False),
    ("dirty", False),
    ("flushed", False),
    ("failed", False),
)


def _ago(moment: object, now: datetime) -> str:
    """'12 s ago' from an RFC 3339 time; 'not yet' for none."""
    if not moment:
        return "not yet"
    try:
        seconds = (now - datetime.fromisoformat(str(moment))).total_seconds()
    except ValueError:
        return str(moment)
    if seconds < 120:
        return f"{max(0, round(seconds))} s ago"
    if seconds < 7200:
        return f"{round(seconds / 60)} min ago"
    return f"{round(seconds / 3600)} h ago"


@app.command()
def user(
    user_id: Annotated[str, typer.Argument(help="The user to show.")],
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many recent sessions.")] = 10,
    url: UrlOption = None,
) -> None:
    """One user's usage (plan, period, minutes) and recent sessions."""
    from rich import box
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
    sessions = Table(
        title=f"recent sessions of {user_id}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    for column in ("started (UTC)", "ended", "minutes", "end reason", "topic"):
        sessions.add_column(column, overflow="fold")
    items = page.get("sessions")
    for item in items if isinstance(items, list) else []:
        sessions.add_row(
            _minute(item["started_at"]),
            _minute(item.get("ended_at")) if item.get("ended_at") else "running",
            _cell(item.get("minutes_used")),
            _cell(item.get("end_reason")),
            _cell(item.get("topic")),
        )
    console.print(sessions)


def _minute(moment: object) -> str:
    """An RFC 3339 time to the minute, in UTC (`2026-12-06 13:51`), so a table row fits 80 columns."""
    try:
        return datetime.fromisoformat(str(moment)).astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(moment)


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def main() -> None:
    # Ray's C++ failure-signal handler would catch SIGTERM, run uvicorn's handler,
    # then kill the process before the lifespan has flushed the shards. It must
    # be switched off before Ray is first imported; nothing above imports Ray.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # The shards' lines reach this process's output through Ray: as they are (our renderer made
    # them: console lines, or JSON lines that must stay JSON), without Ray's "(actor pid=...)"
    # prefix, and each one (Ray's de-duplication would fold repeats into notices of its own).
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    whole_lines_on_standard_streams()  # Ray prints them from a thread of its own (see WholeLines)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not os.environ.get("LEDGER_RAY_ADDRESS"):
        # The local Ray `serve` starts authenticates its callers with a token: Ray's default for a
        # new local cluster, said here (Ray reads it at import) so that Ray does not announce it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    sys.exit(app())


# ------------------------------------------------------------------ the shard map

# `shards resize` asks for the map this often until the resize is done.
RESIZE_POLL_S = 0.5


@shards_app.callback()
def shards_status(ctx: typer.Context, url: UrlOption = None) -> None:
    """The shard map of a running server: count, epoch, whether a resize is under way, and each
    shard's slots and users."""
    if ctx.invoked_subcommand is not None:
        return
    _print_map(_answer_or_exit("GET", "/internal/v1/shards", url))


@shards_app.command("resize")
def shards_resize(
    count: Annotated[int, typer.Argument(help="The shard count to go to.", min=1, max=SLOTS)],
    wait: Annotated[bool, typer.Option(help="Wait until the resize is done, showing its progress.")] = True,
    url: UrlOption = None,
) -> None:
    """Change the shard count while serving: only the users of the slots that move wait (briefly).
    Run it again to resume an interrupted resize, or with the old count to roll it back."""
    status_code, answer = _signed_call(
        "POST", "/internal/v1/shards", {"count": count}, url=url, delivery_id=None
    )
    if status_code >= 400:
        _fail(str(answer.get("detail", answer)))
    typer.echo(f"resizing to {count} shards…", err=True)
    while wait:
        time.sleep(RESIZE_POLL_S)
        answer = _answer_or_exit("GET", "/internal/v1/shards", url)
        if answer.get("error"):
            _fail(f"the resize stopped: {answer['error']}; run the same command again to resume it")
        if not answer.get("moving"):
            break
    _print_map(answer)


@shards_app.command("plan")
def shards_plan(
    from_count: Annotated[int, typer.Option("--from", help="Shards before.", min=1, max=SLOTS)],
    to_count: Annotated[int, typer.Option("--to", help="Shards after.", min=1, max=SLOTS)],
    users: Annotated[int, typer.Option(help="User ids to count (user-0, user-1, ...).", min=1)] = 100_000,
) -> None:
    """How many users a resize moves, from a brand-new map of --from shards to --to shards (no
    server needed): slots and users moved, against the least possible."""
    before = initial_owners(from_count)
    after = rebalanced(before, to_count)
    slots = sum(1 for old, new in zip(before, after, strict=True) if old != new)
    moved, total = moved_fraction((f"user-{index}" for index in range(users)), before, after)
    ideal = abs(to_count - from_count) / max(to_count, from_count)
    typer.echo(
        f"{from_count} -> {to_count} shards: {slots} of {SLOTS} slots move ({slots / SLOTS:.1%}); "
        f"{moved:,} of {total:,} users ({moved / total:.1%}); least possible {ideal:.1%}"
    )


def _print_map(answer: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    moving = f", resizing to {answer['target']}" if answer.get("moving") else ""
    table = Table(title=f"{answer.get('count')} shards, map epoch {answer.get('epoch')}{moving}")
    for column in ("shard", "slots", "state", "users", "sessions", "handed off"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for shard in answer.get("shards") or []:
        table.add_row(
            *(
                str(value) if value is not None else "-"
                for value in (
                    shard.get("shard"),
                    shard.get("slots"),
                    shard.get("error") or shard.get("state"),
                    shard.get("resident_users"),
                    shard.get("active_sessions"),
                    shard.get("users_handed_off"),
                )
            )
        )
    Console().print(table)
    if answer.get("moving"):
        count, target = answer.get("count"), answer.get("target")
        stopped = f"it stopped: {answer['error']}; " if answer.get("error") else ""
        typer.echo(
            f"a resize to {target} shards is under way or was cut short; {stopped}`usage-ledger shards "
            f"resize {target}` resumes it, `usage-ledger shards resize {count}` rolls it back",
            err=True,
        )
