"""A real `usage-ledger serve` for benchmarks: its own process group (its local Ray and embedded
Postgres die with it), on a free port, with fresh secrets; stopped with SIGTERM, then SIGKILL."""

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
def bench_server(**settings: str) -> Iterator[BenchServer]:
    """Start the server with `LEDGER_<NAME>=value` for each setting; yield once `/readyz` is 200.

    The database is `LEDGER_BENCH_DATABASE_URL` when set, else an embedded Postgres of its own."""
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as workdir:
        port = _free_port()
        jwt_secret = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "RAY_"))}
        env.update(
            LEDGER_PORT=str(port),
            LEDGER_DATA_DIR=str(Path(workdir) / "data"),
            LEDGER_JWT_SECRET=jwt_secret,
            LEDGER_INTERNAL_SECRET="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            LEDGER_LOG_LEVEL="warning",
        )
        embedded: EmbeddedPostgres | None = None
        if os.environ.get("LEDGER_BENCH_DATABASE_URL"):
            database_url = os.environ["LEDGER_BENCH_DATABASE_URL"]
        else:  # our own embedded Postgres, so that the bench can read its statistics too
            embedded = EmbeddedPostgres(Path(workdir) / "pg")
            embedded.start()
            asyncio.run(ensure_database(embedded.dsn("postgres"), "ledger_bench"))
            database_url = embedded.dsn("ledger_bench")
        env["LEDGER_DATABASE_URL"] = database_url
        env.update({f"LEDGER_{name.upper()}": value for name, value in settings.items()})
        log_path = Path(workdir) / "serve.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [str(BIN), "serve"],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = BenchServer(f"http://127.0.0.1:{port}", jwt_secret, process, log_path, database_url)
        try:
            _wait_ready(server)
            yield server
        finally:
            _stop(process)
            if embedded is not None:
                embedded.stop()


def _wait_ready(server: BenchServer, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"serve exited: {server.log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200:
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
