"""The servers a benchmark runs: a real `usage-ledger serve`, the postgres-direct baseline and the
floor, each in its own process group (a local Ray dies with its server) on a free port with fresh
secrets, stopped with SIGTERM, then SIGKILL; and the Postgres both use."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.auth import issue_token
from persistence.embedded import EmbeddedPostgres, ensure_database

BIN = Path(sys.executable).parent / "usage-ledger"
# The built-in plans and the `hold` scenario's meter (see the file); every benchmark server uses it.
PLANS_FILE = Path(__file__).resolve().parent / "plans.toml"


@dataclass
class BenchServer:
    base_url: str
    jwt_secret: str
    process: subprocess.Popen[bytes]
    log_path: Path
    database_url: str

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def token(self, user_id: str, *, ttl_s: int = 3_600) -> str:
        return issue_token(secret=self.jwt_secret, user_id=user_id, ttl_s=ttl_s)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """`LEDGER_BENCH_DATABASE_URL` when set, else an embedded Postgres of the benchmark's own (so it
    can read the database's statistics, and the baseline can use the same server)."""
    if os.environ.get("LEDGER_BENCH_DATABASE_URL"):
        yield os.environ["LEDGER_BENCH_DATABASE_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="ledger-bench-pg-") as workdir:
        embedded = EmbeddedPostgres(Path(workdir) / "pg")
        embedded.start()
        try:
            asyncio.run(ensure_database(embedded.dsn("postgres"), "ledger_bench"))
            yield embedded.dsn("ledger_bench")
        finally:
            embedded.stop()


@contextlib.contextmanager
def bench_server(database_url: str, **settings: str) -> Iterator[BenchServer]:
    """`usage-ledger serve` on `database_url` with the benchmark's plans (`PLANS_FILE`), and
    `LEDGER_<NAME>=value` for each setting; yields once `/readyz` is 200."""
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as workdir:
        port = _free_port()
        jwt_secret = secrets.token_hex(32)
        env = _clean_env()
        env.update(
            LEDGER_PORT=str(port),
            LEDGER_DATA_DIR=str(Path(workdir) / "data"),
            LEDGER_DATABASE_URL=database_url,
            LEDGER_JWT_SECRET=jwt_secret,
            LEDGER_INTERNAL_SECRET="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            LEDGER_LOG_LEVEL="warning",
            LEDGER_PLANS_FILE=str(PLANS_FILE),
        )
        env.update({f"LEDGER_{name.upper()}": value for name, value in settings.items()})
        server = _start([str(BIN), "serve"], env, Path(workdir), port, jwt_secret, database_url)
        try:
            _wait_ready(server, "/readyz", 200)
            yield server
        finally:
            _stop(server.process)


@contextlib.contextmanager
def baseline_server(database_url: str) -> Iterator[BenchServer]:
    """The postgres-direct baseline (`bench/baseline.py`) on `database_url`, once it asks for a token."""
    jwt_secret = secrets.token_hex(32)
    arguments = ["--dsn", database_url, "--jwt-secret", jwt_secret]
    with _module_server(
        "bench.baseline", arguments, database_url, jwt_secret, ready=("/v1/usage", 401)
    ) as server:
        yield server


@contextlib.contextmanager
def floor_server(database_url: str) -> Iterator[BenchServer]:
    """The floor (`bench/floor.py`): uvicorn configured as `serve` runs it, and an app that does no
    work (it checks no token: the scenarios' tokens are sent and ignored). It never touches
    `database_url`; the harness counts that database's write transactions during each run, as it
    does for every server (on the floor: none of its own, only Postgres' autovacuum's)."""
    jwt_secret = secrets.token_hex(32)
    with _module_server("bench.floor", [], database_url, jwt_secret, ready=("/v1/usage", 200)) as server:
        yield server


@contextlib.contextmanager
def _module_server(
    module: str, arguments: list[str], database_url: str, jwt_secret: str, *, ready: tuple[str, int]
) -> Iterator[BenchServer]:
    """`python -m <module> --port <a free port> <arguments>`, yielded once `ready` (a path, and the
    status it answers when the server is up) is."""
    with tempfile.TemporaryDirectory(prefix=f"ledger-{module.rpartition('.')[2]}-") as workdir:
        port = _free_port()
        command = [sys.executable, "-m", module, "--port", str(port), *arguments]
        env = {**_clean_env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        server = _start(command, env, Path(workdir), port, jwt_secret, database_url)
        try:
            _wait_ready(server, *ready)
            yield server
        finally:
            _stop(server.process)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "RAY_"))}


def _start(
    command: list[str], env: dict[str, str], workdir: Path, port: int, jwt_secret: str, database_url: str
) -> BenchServer:
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return BenchServer(f"http://127.0.0.1:{port}", jwt_secret, process, log_path, database_url)


def _wait_ready(server: BenchServer, path: str, status: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.base_url}{path}", timeout=2).status_code == status:
                return
        time.sleep(0.5)
    raise TimeoutError("serve was not ready in time")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
