"""Real components for integration and reliability tests: Postgres, Ray, servers over real HTTP.

A pytest plugin (registered in tests/conftest.py), so every test directory shares one of each.

- Postgres: `LEDGER_TEST_DATABASE_URL` when set (a fresh database is created
  on that server for the run and dropped after), otherwise an embedded server
  in a temporary directory.
- Ray: one local cluster for the whole run, started here and shut down at the end.
- Servers: `create_app(settings)` served by uvicorn on a free loopback port,
  in this process's event loop, reached with httpx over TCP. Each server gets
  its own Ray namespace, so its shards are its own; they are killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
import ray
import uvicorn

from actors.hosting import kill_shards
from gateway.app import create_app
from gateway.auth import issue_token, signed_headers
from gateway.runtime import LOCAL_RAY_OBJECT_STORE_BYTES
from gateway.serving import server_config
from gateway.settings import Settings
from persistence.embedded import EmbeddedPostgres, ensure_database

PLANS_FILE = Path(__file__).parent / "integration" / "plans.toml"
JWT_SECRET = "integration-test-jwt-secret-" + "x" * 16
INTERNAL_SECRET = "whsec_" + "aW50ZWdyYXRpb24tdGVzdC1pbnRlcm5hbC1zZWNyZXQ="
SYNC_INTERVAL_S = 1.0
POLAR_WEBHOOK_SECRET = "polar_whs_integration_test_secret"
STRIPE_WEBHOOK_SECRET = "whsec_integration_test_stripe_secret"
STALE_SESSION_S = 4.0


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN for an empty database that lives as long as the test run."""
    external = os.environ.get("LEDGER_TEST_DATABASE_URL")
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    embedded: EmbeddedPostgres | None = None
    if external:
        admin_dsn = external
    else:
        embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
        admin_dsn = embedded.start()
    asyncio.run(ensure_database(admin_dsn, name))
    yield with_database(admin_dsn, name) if external else embedded.dsn(name)  # type: ignore[union-attr]
    if embedded is not None:
        embedded.stop()
    else:

        async def drop() -> None:
            connection = await asyncpg.connect(admin_dsn)
            try:
                await connection.execute(f'drop database if exists "{name}" with (force)')
            finally:
                await connection.close()

        asyncio.run(drop())


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole run, sized as `usage-ledger serve` sizes its own; shut down at the end."""
    ray.init(
        address="local",
        num_cpus=0,  # no idle workers prestarted: the shards ask for no CPU, and nothing else runs
        object_store_memory=LOCAL_RAY_OBJECT_STORE_BYTES,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the test runner keeps Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningServer:
    base_url: str
    settings: Settings
    app: Any
    server: QuietServer
    task: asyncio.Task[None]
    internal_url: str | None = None  # the internal listener, when it has one

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=30)

    async def stop(self) -> None:
        """Shut the server down as SIGTERM would: the lifespan flushes every shard."""
        self.server.should_exit = True
        await self.task

    def shard_handles(self) -> list[Any]:
        return self.runtime.router.handles()


ServerFactory = Callable[..., Awaitable[RunningServer]]


def _listening_socket() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    return listener


@pytest_asyncio.fixture(scope="session")
async def start_server(
    postgres_dsn: str, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerFactory]:
    """Start servers on demand; all are stopped and their shards killed at the end of the run."""
    started: list[RunningServer] = []
    namespaces: set[str] = set()

    async def start(
        *, namespace: str | None = None, internal_listener: bool = False, **overrides: Any
    ) -> RunningServer:
        fields: dict[str, Any] = {
            "database_url": postgres_dsn,
            "data_dir": tmp_path_factory.mktemp("data"),
            "ray_namespace": namespace or f"test-{uuid.uuid4().hex[:8]}",
            "shards": 2,
            "plans_file": PLANS_FILE,
            "jwt_secret": JWT_SECRET,
            "internal_secret": INTERNAL_SECRET,
            "polar_webhook_secret": POLAR_WEBHOOK_SECRET,
            "stripe_webhook_secret": STRIPE_WEBHOOK_SECRET,
            "sync_interval_s": SYNC_INTERVAL_S,
            "stale_session_s": STALE_SESSION_S,
            "log_level": "warning",
        }
        sockets = None
        if internal_listener:  # two listeners, as `serve` opens them with LEDGER_INTERNAL_PORT
            sockets = [_listening_socket(), _listening_socket()]
            fields["internal_port"] = sockets[1].getsockname()[1]
        fields.update(overrides)
        settings = Settings(**fields)
        namespaces.add(settings.ray_namespace)
        app = create_app(settings)
        config = server_config(app, host="127.0.0.1", port=0, read_timeout_s=settings.request_read_timeout_s)
        server = QuietServer(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=sockets))
        deadline = time.monotonic() + 120
        while not server.started:
            if task.done():
                try:
                    task.result()  # raises what startup raised
                except SystemExit as exc:  # uvicorn exits when the lifespan's startup fails
                    raise RuntimeError(f"server startup failed (exit {exc.code}); the log says why") from None
                raise RuntimeError("server exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start within 120 s")
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        running = RunningServer(f"http://127.0.0.1:{port}", settings, app, server, task)
        if sockets is not None:
            running.internal_url = f"http://127.0.0.1:{settings.internal_port}"
        started.append(running)
        return running

    yield start

    for running in started:
        if not running.task.done():
            await running.stop()
    for namespace in namespaces:
        handles = [
            ray.get_actor(entry["name"], namespace=namespace)
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == namespace
        ]
        kill_shards(handles)


@pytest_asyncio.fixture(scope="session")
async def server(start_server: ServerFactory) -> RunningServer:
    """The shared server most tests use (each test uses its own user ids)."""
    return await start_server()


@pytest_asyncio.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as http:
        yield http


@pytest_asyncio.fixture(scope="session")
async def database(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection, for checking what the server wrote."""
    connection = await asyncpg.connect(postgres_dsn)
    yield connection
    await connection.close()


# ----------------------------------------------------------------- helpers


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def auth(user_id: str, *, ttl_s: int = 600) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(secret=JWT_SECRET, user_id=user_id, ttl_s=ttl_s)}"}


def signed(
    body: dict[str, Any] | str,
    *,
    webhook_id: str | None = None,
    secret: str = INTERNAL_SECRET,
    timestamp: datetime | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A body and the Standard Webhooks headers that sign it."""
    text = body if isinstance(body, str) else json.dumps(body)
    return text.encode(), signed_headers(secret, text, message_id=webhook_id, timestamp=timestamp)


async def change_plan(
    http: httpx.AsyncClient, user_id: str, plan: str, *, webhook_id: str | None = None, **fields: Any
) -> httpx.Response:
    body = {
        "plan": plan,
        "action": fields.pop("action", "upgrade"),
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    body.update(fields)
    content, headers = signed(body, webhook_id=webhook_id)
    return await http.post(f"/internal/v1/users/{user_id}/plan", content=content, headers=headers)


async def samples(http: httpx.AsyncClient) -> dict[str, float]:
    """Every sample in the server's /metrics, by its name with labels."""
    found: dict[str, float] = {}
    for line in (await http.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def total(found: dict[str, float], prefix: str) -> float:
    """The sum over every label set of the series `prefix` (`name{` for all of a name's, e.g. over shards)."""
    return sum(value for name, value in found.items() if name.startswith(prefix))


async def metric(http: httpx.AsyncClient, name: str, *, default: float | None = None) -> float:
    """The value of the sample `name` (with its labels, if any) in the server's /metrics;
    `default` when it is absent and one is given."""
    value = (await samples(http)).get(name, default)
    if value is None:
        raise AssertionError(f"{name} is not in /metrics")
    return value


async def sse_frames(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The frames of a Server-Sent Events stream: {"event", "id", "data" (parsed JSON)}; comments skipped."""
    frame: dict[str, str] = {}
    async for line in lines:
        if line.startswith(("event:", "id:", "data:")):
            key, _, value = line.partition(":")
            frame[key] = value.strip()
        elif line == "" and frame:
            data = json.loads(frame["data"])
            yield {"event": frame.get("event", "message"), "id": frame.get("id"), "data": data}
            frame = {}


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 15.0, every_s: float = 0.2
) -> None:
    """Poll `check` until it holds; fail with a clear message after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(every_s)
