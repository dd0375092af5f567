"""The whole server (the gateway and its local Ray) killed with SIGKILL, then started again.

Runs `usage-ledger serve` as a process group on the test's Postgres, kills the
group between one flush and the next, and starts it again: nothing a client
was told is lost, and the open sessions' alarms are re-armed (those whose
clients went away end `stale`, billed to their last written heartbeat)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.harness import INTERNAL_SECRET, JWT_SECRET, PLANS_FILE, auth, eventually, new_user
from tests.reliability.load import SessionLoad
from tests.reliability.truth import assert_nothing_lost

BIN = Path(sys.executable).parent / "usage-ledger"
SYNC_INTERVAL_S = 2.0
STALE_SESSION_S = 4.0
USERS = 8


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """`usage-ledger serve` in its own process group (so its local Ray dies with it)."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.log_path = cwd / f"serve-{time.monotonic_ns()}.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [str(BIN), "serve"],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{env['LEDGER_PORT']}"

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.process.poll() is None, f"serve exited early: {self.log_path.read_text()[-2000:]}"
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{self.base}/readyz", timeout=2)).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(answers, timeout_s=120, every_s=0.5)

    def kill_group(self) -> None:
        """SIGKILL the server and every process of its group (its Ray included)."""
        with_suppressed = self.process.poll() is None
        if with_suppressed:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        if self.process.poll() is None or _group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


async def test_whole_server_killed_between_flushes_loses_nothing(
    postgres_dsn: str, database: asyncpg.Connection, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "RAY_"))}
    env.update(
        LEDGER_DATABASE_URL=postgres_dsn,
        LEDGER_JWT_SECRET=JWT_SECRET,
        LEDGER_INTERNAL_SECRET=INTERNAL_SECRET,
        LEDGER_PLANS_FILE=str(PLANS_FILE),
        LEDGER_SYNC_INTERVAL_S=str(SYNC_INTERVAL_S),
        LEDGER_STALE_SESSION_S=str(STALE_SESSION_S),
        LEDGER_SHARDS="2",
        LEDGER_PORT=str(free_port()),
        LEDGER_RAY_NAMESPACE=f"kill-all-{uuid.uuid4().hex[:8]}",
        LEDGER_DATA_DIR=str(tmp_path / "data"),
        LEDGER_LOG_LEVEL="warning",
    )
    first = ServerProcess(env, tmp_path)
    servers.append(first)
    await first.ready()
    async with httpx.AsyncClient(base_url=first.base, timeout=30) as http:
        load = SessionLoad(http, [new_user() for _ in range(USERS)])
        await load.begin()
        # Let a flush write the heartbeats so far, then kill right after the next one is answered.
        started_at = await database.fetchval("select now()")

        async def flushed() -> bool:
            written = await database.fetchval(
                "select count(*) from usage_sessions where user_id = any($1::text[]) and updated_at > $2",
                load.users,
                started_at,
            )
            return bool(written == USERS)

        await eventually(flushed, timeout_s=30, every_s=0.05)
        await asyncio.sleep(SYNC_INTERVAL_S / 2)  # heartbeats answered after the flush, not yet written
        load.stop.set()
        first.kill_group()
        load.truth.faults.append(f"SIGKILL of the server's process group (pid {first.process.pid})")
        await asyncio.gather(*load._tasks, return_exceptions=True)

    async def group_gone() -> bool:
        return not _group_alive(first.process.pid)

    await eventually(group_gone, timeout_s=30)  # no process of the killed server is left

    second = ServerProcess(env, tmp_path)
    servers.append(second)
    restarted_at = time.monotonic()
    await second.ready()
    ready_after_s = round(time.monotonic() - restarted_at, 2)
    async with httpx.AsyncClient(base_url=second.base, timeout=30) as http:
        # Half the clients come back and end their sessions; the others are gone for good.
        returning = load.users[: USERS // 2]
        for user in returning:
            session_id = next(s.session_id for s in load.truth.sessions.values() if s.user_id == user)
            ended = await http.post(f"/v1/sessions/{session_id}/end", headers=auth(user))
            assert ended.status_code == 200, ended.text
            load.truth.answered(session_id, ended.json())

        async def stale_ended() -> bool:
            rows = await database.fetch(
                "select end_reason from usage_sessions where user_id = any($1::text[])",
                load.users[USERS // 2 :],
            )
            return all(row["end_reason"] == "stale" for row in rows)

        await eventually(stale_ended, timeout_s=STALE_SESSION_S + 20)
        for session in load.truth.sessions.values():
            session.ended = True  # every session is over now: the check demands it of Postgres
        figures = await assert_nothing_lost(database, http, load.truth, sync_interval_s=SYNC_INTERVAL_S)
    second.stop()
    print(f"server SIGKILL: restarted and ready in {ready_after_s} s; {figures}")
