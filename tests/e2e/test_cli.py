"""The `usage-ledger` command as a new user runs it: nothing configured, embedded Postgres, local Ray."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from persistence.migrate import discover

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent / "usage-ledger"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any LEDGER_* or RAY_* setting: nothing configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "RAY_"))}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"usage-ledger {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.strip()


class Serve:
    def __init__(self, cwd: Path, env: dict[str, str], port: int) -> None:
        self.log = (cwd / f"serve-{time.monotonic_ns()}.log").open("w")
        self.process = subprocess.Popen(
            [str(BIN), "serve"], cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{port}"

    def wait_ready(self) -> None:
        """Until serve says it listens; from that line on, its port must answer at once."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not re.search(r'listening on|"event": "listening"', Path(self.log.name).read_text()):
            assert self.process.poll() is None, f"serve exited early; see {self.log.name}"
            assert time.monotonic() < deadline, "serve did not say it listens"
            time.sleep(0.2)
        assert httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200, "said listening, not ready"

    def stop(self) -> None:
        """SIGTERM, then check the drain ran to the end (uvicorn then re-raises the signal, by design)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self.log.close()
        assert code in (0, -signal.SIGTERM), f"serve exited with {code}"
        log = Path(self.log.name).read_text()
        assert "runtime_stopped" in log, "serve must flush and stop the runtime before exiting"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever happened, leave no server behind (its Ray and embedded Postgres go with it).
    for server in STARTED:
        server.kill()
    STARTED.clear()
    subprocess.run(["pkill", "-f", f"postgres -D {tmp_path}"], check=False)


STARTED: list[Serve] = []


def serve(cwd: Path, env: dict[str, str], port: int) -> Serve:
    server = Serve(cwd, env, port)
    STARTED.append(server)
    server.wait_ready()
    return server


def test_new_user_runs_a_session_and_usage_survives_restart(workdir: Path) -> None:
    port = free_port()
    env = clean_env(LEDGER_PORT=str(port))
    server = serve(workdir, env, port)
    try:
        token = run_cli("token", "alice", cwd=workdir, env=env)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
            started = http.post("/v1/sessions", json={"topic": "ordering coffee", "difficulty": "beginner"})
            assert started.status_code == 201, started.text
            session_id = started.json()["session_id"]
            time.sleep(1.5)
            beat = http.post(f"/v1/sessions/{session_id}/heartbeat", json={"seq": 1})
            assert beat.status_code == 200 and beat.json()["state"] == "active"
            ended = http.post(f"/v1/sessions/{session_id}/end")
            assert ended.status_code == 200 and ended.json()["end_reason"] == "user_ended"
            used = ended.json()["minutes_used"]
            assert used >= 0.02
        # Without LEDGER_PORT, a command run in the server's directory finds it (its server.json).
        answer = run_cli("internal", "plan", "alice", "pro", cwd=workdir, env=clean_env())
        assert '"applied": true' in answer
        assert run_cli("db", cwd=workdir, env=clean_env()).startswith("postgresql://")
        reader = run_cli("db", "--dashboard", cwd=workdir, env=clean_env())
        assert reader == run_cli("db", "--dashboard", cwd=workdir, env=clean_env()), (
            "made once, then the same"
        )
        assert asyncio.run(read_as_dashboard(reader)) == ["alice"]
        bought = run_cli(
            "internal",
            "credits",
            "alice",
            "30",
            "--reference",
            "order-1",
            "--url",
            server.base,
            cwd=workdir,
            env=env,
        )
        assert '"purchased_minutes": 30.0' in bought
        checked = run_cli("internal", "reconcile", "alice", "--url", server.base, cwd=workdir, env=env)
        assert '"drift_found": false' in checked
        narrow = {**env, "COLUMNS": "80"}
        shards = run_cli("status", "--url", server.base, cwd=workdir, env=narrow)
        assert "usage-ledger shards" in shards and "…" not in shards
        rows = [line for line in shards.splitlines() if "running" in line and "@" in line]
        assert len(rows) == 4, shards  # the default LEDGER_SHARDS, each with where it runs
        shown = run_cli("user", "alice", "--url", server.base, cwd=workdir, env=narrow)
        assert "…" not in shown, shown
        for expected in ("pro", "30.0 purchased", "ordering coffee", "user_ended", "in a session  no"):
            assert expected in shown, (expected, shown)
    finally:
        server.stop()
    assert (workdir / ".usage-ledger" / "dev-secrets.json").stat().st_mode & 0o077 == 0
    assert not (workdir / ".usage-ledger" / "server.json").exists(), "a stopped server leaves no server.json"

    again = serve(workdir, env, port)
    try:
        with httpx.Client(base_url=again.base, headers=headers, timeout=30) as http:
            usage = http.get("/v1/usage").json()
            assert (usage["plan"], usage["minutes_used"], usage["purchased_minutes"]) == ("pro", used, 30)
            history = http.get("/v1/sessions").json()["sessions"]
            assert [(s["session_id"], s["topic"]) for s in history] == [(session_id, "ordering coffee")]
    finally:
        again.stop()
    # Secrets and tokens never reach the logs (both runs, debug lines included where enabled).
    secrets = json.loads((workdir / ".usage-ledger" / "dev-secrets.json").read_text())
    logged = Path(server.log.name).read_text() + Path(again.log.name).read_text()
    assert "runtime_stopped" in logged, "the logs were captured"
    for name, value in [*secrets.items(), ("user token", token)]:
        assert value not in logged, f"the {name} appears in the server's log"
    # Nothing on the screen a user must learn to ignore: no colour codes in a file, no prefixes or
    # notices of Ray's, no warnings that are not about the user's own configuration.
    assert "\x1b[" not in logged
    for noise in (
        "pid=",
        "repeated",
        "Token authentication",
        "SIGTERM handler",
        "RuntimeDirWarning",
        "Traceback",
    ):
        assert noise not in logged, f"{noise!r} in the server's output"


async def read_as_dashboard(dsn: str) -> list[str]:
    """The users the dashboard login sees (its views), after checking it sees no table."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.fetch("select * from public.usage_users")
        return [row["user_id"] for row in await connection.fetch("select user_id from users")]
    finally:
        await connection.close()


def test_migrate_command_prepares_an_embedded_database(workdir: Path) -> None:
    env = clean_env()
    versions = [migration.version for migration in discover()]
    assert f"applied migrations: {versions}" in run_cli("migrate", cwd=workdir, env=env)
    assert "up to date" in run_cli("migrate", cwd=workdir, env=env)


def readme_client_example() -> str:
    """The Python block of the README's *Python client* section, as a user would copy it."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_client_example_runs_as_written_and_ends_its_session(workdir: Path) -> None:
    port = free_port()
    env = clean_env(LEDGER_PORT=str(port))
    server = serve(workdir, env, port)
    try:
        token = run_cli("token", "carol", cwd=workdir, env=env)
        example = workdir / "example.py"
        example.write_text(readme_client_example())
        done = subprocess.run(
            [sys.executable, str(example)],
            cwd=workdir,
            env={**env, "LEDGER_TOKEN": token, "LEDGER_URL": server.base},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "the call failed: the call dropped | session ended: user_ended" in done.stdout, done.stdout
        assert "active session now: None" in done.stdout, done.stdout
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {token}"}) as http:
            [session] = http.get("/v1/sessions").json()["sessions"]
        assert session["end_reason"] == "user_ended" and session["topic"] == "ordering coffee"
        assert session["session_id"] in done.stdout
    finally:
        server.stop()


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of a serve log run with LEDGER_LOG_FORMAT=json: each one must be a JSON object
    (the shards' lines, Ray's and Python's warnings, the "listening" line included)."""
    found = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(value, dict), line
        found.append(value)
    return found


def test_a_requests_log_line_and_its_shards_share_the_request_id(workdir: Path) -> None:
    port = free_port()
    # A stale timeout under the client's heartbeat interval (and the flush's): warned of, in
    # development, as one JSON line like every other.
    env = clean_env(LEDGER_PORT=str(port), LEDGER_LOG_FORMAT="json", LEDGER_STALE_SESSION_S="20")
    server = serve(workdir, env, port)
    try:
        token = run_cli("token", "dave", cwd=workdir, env=env)
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {token}"}) as http:
            started = http.post(
                "/v1/sessions", json={"topic": "logs"}, headers={"X-Request-ID": "trace-start-1"}
            )
            assert started.status_code == 201, started.text
            assert started.headers["x-request-id"] == "trace-start-1"
            ended = http.post(f"/v1/sessions/{started.json()['session_id']}/end")  # an id of its own
            assert ended.status_code == 200
            generated = ended.headers["x-request-id"]
        deadline = time.monotonic() + 20  # the shard's lines reach the driver's output asynchronously
        while True:
            lines = json_lines(Path(server.log.name).read_text())
            by_event = {
                (line.get("event"), line.get("request_id")): line for line in lines if line.get("request_id")
            }
            wanted = [
                ("request", "trace-start-1"),
                ("session_started", "trace-start-1"),
                ("request", generated),
                ("session_ended", generated),
            ]
            if all(key in by_event for key in wanted) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        missing = [key for key in wanted if key not in by_event]
        assert not missing, f"log lines missing: {missing}"
        canonical = by_event["request", "trace-start-1"]
        assert (canonical["method"], canonical["route"], canonical["status"]) == ("POST", "/v1/sessions", 201)
        assert (
            canonical["user_id"] == "dave"
            and by_event["session_started", "trace-start-1"]["user_id"] == "dave"
        )
        # An internal call names its user in the path; the description is a route like any other.
        run_cli("internal", "reconcile", "dave", cwd=workdir, env=env)
        assert httpx.get(f"{server.base}/openapi.json", headers={"X-Request-ID": "spec-1"}).status_code == 200
        deadline = time.monotonic() + 10
        while True:
            requests = [
                line for line in json_lines(Path(server.log.name).read_text()) if line["event"] == "request"
            ]
            internal = [line for line in requests if str(line["route"]).startswith("/internal/")]
            spec = [line for line in requests if line.get("request_id") == "spec-1"]
            if (internal and spec) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        warned = [
            line
            for line in json_lines(Path(server.log.name).read_text())
            if line["event"] == "settings_contradict"
        ]
        assert len(warned) == 2 and "LEDGER_STALE_SESSION_S (20)" in str(warned[0]["problem"]), warned
        assert internal and internal[0]["user_id"] == "dave", internal
        assert spec and spec[0]["route"] == "/openapi.json", spec
    finally:
        server.stop()
    json_lines(Path(server.log.name).read_text())  # the drain's lines too


def test_a_database_that_cannot_be_reached_stops_serve_in_one_line(workdir: Path) -> None:
    closed = free_port()  # nothing listens there
    env = clean_env(
        LEDGER_PORT=str(free_port()), LEDGER_DATABASE_URL=f"postgresql://ledger@127.0.0.1:{closed}/ledger"
    )
    done = subprocess.run(
        [str(BIN), "serve"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    [failed] = [line for line in output.splitlines() if "startup_failed" in line]
    assert str(closed) in failed or "refused" in failed.lower(), failed
    assert "is the database (LEDGER_DATABASE_URL)" in failed, failed  # the hint of a failed connection
    assert "listening" not in output


def test_a_newcomers_first_mistakes_are_one_line_each(workdir: Path) -> None:
    """Run as a user runs them, in a directory no server has run in: each says what is wrong and
    what to do, in one line on stderr, with a non-zero exit."""
    env = clean_env(LEDGER_PORT=str(free_port()))  # nothing listens there

    def fails(*args: str, extra: dict[str, str] | None = None) -> tuple[int, str]:
        done = subprocess.run(
            [str(BIN), *args],
            cwd=workdir,
            env={**env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("usage-ledger: "), done.stderr
        return done.returncode, lines[0]

    code, line = fails("token", "alice")
    assert code == 1 and "no secrets in" in line and "usage-ledger serve" in line
    assert not (workdir / ".usage-ledger" / "dev-secrets.json").exists(), "token made secrets"
    code, line = fails("db")
    assert code == 1 and "no server with an embedded database runs from" in line
    plans = workdir / "plans.toml"
    plans.write_text('default_plan = "free"\n[plans.free]\nminutess = 5\n')
    code, line = fails("serve", extra={"LEDGER_PLANS_FILE": str(plans)})
    assert code == 2 and str(plans) in line and "minutess" in line
    assert not (workdir / ".usage-ledger" / "server.json").exists()
    helped = subprocess.run([str(BIN), "internal", "plan", "--help"], env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "<bool>" not in helped.stdout and "--reset-usage" in helped.stdout
