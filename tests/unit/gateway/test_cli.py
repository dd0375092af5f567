"""The CLI without a server: `token`, `db`, finding the server, and how it reports what is wrong."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gateway import serverfile
from gateway.auth import TokenVerifier
from gateway.cli import app, status_table
from gateway.secrets import resolve_secrets
from gateway.settings import Settings

runner = CliRunner()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (
        "LEDGER_JWT_SECRET",
        "LEDGER_INTERNAL_SECRET",
        "LEDGER_ENV",
        "LEDGER_PORT",
        "LEDGER_PLANS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LEDGER_DATA_DIR", str(tmp_path))
    return tmp_path


def test_token_is_accepted_by_the_same_configuration(clean_env: Path) -> None:
    made_secrets(clean_env)
    result = runner.invoke(app, ["token", "alice", "--ttl-s", "60"])
    assert result.exit_code == 0, result.output
    secrets = resolve_secrets(Settings(data_dir=clean_env))
    assert TokenVerifier(secret=secrets.jwt_secret).user_id(result.stdout.strip()) == "alice"


def test_bad_configuration_names_the_setting_but_not_its_value(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEDGER_ENV", "production")
    monkeypatch.setenv("LEDGER_JWT_SECRET", "hunter2")
    monkeypatch.setenv("LEDGER_INTERNAL_SECRET", "whsec_" + "a" * 40)
    result = runner.invoke(app, ["token", "alice"])
    assert result.exit_code == 2
    assert "LEDGER_JWT_SECRET is shorter than 32 characters" in result.output
    assert "hunter2" not in result.output


def test_token_refuses_an_impossible_user_id(clean_env: Path) -> None:
    result = runner.invoke(app, ["token", "x" * 300])
    assert result.exit_code == 2


def made_secrets(data_dir: Path) -> None:
    """What `serve` does on its first start: generate the development secrets."""
    resolve_secrets(Settings(data_dir=data_dir))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_token_never_makes_secrets_and_says_in_one_line_where_they_should_be(clean_env: Path) -> None:
    result = runner.invoke(app, ["token", "alice"])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("usage-ledger: no secrets in ") and "usage-ledger serve" in line
    assert not (clean_env / "dev-secrets.json").exists()


def test_an_internal_call_with_no_server_is_one_line_naming_where_it_looked(clean_env: Path) -> None:
    made_secrets(clean_env)
    port = free_port()  # nothing listens there
    result = runner.invoke(app, ["internal", "plan", "alice", "pro", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert f"no server answers at http://127.0.0.1:{port} (ConnectError)" in line


def test_the_cli_finds_the_server_started_from_its_directory_unless_told_otherwise(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made_secrets(clean_env)
    recorded, configured = free_port(), free_port()
    monkeypatch.delenv("LEDGER_PORT", raising=False)
    monkeypatch.delenv("LEDGER_INTERNAL_PORT", raising=False)
    info = serverfile.ServerInfo(
        pid=os.getpid(),
        url=f"http://127.0.0.1:{recorded}",
        internal_url=f"http://127.0.0.1:{recorded}",
        database=None,
    )
    serverfile.write(clean_env, info)
    assert (clean_env / serverfile.SERVER_FILE).stat().st_mode & 0o077 == 0
    found = runner.invoke(app, ["internal", "reconcile", "alice"])
    assert f"no server answers at http://127.0.0.1:{recorded} " in found.output
    monkeypatch.setenv("LEDGER_PORT", str(configured))  # the environment says where: it wins
    told = runner.invoke(app, ["internal", "reconcile", "alice"])
    assert f"no server answers at http://127.0.0.1:{configured} " in told.output


def test_a_server_file_left_by_a_dead_server_is_ignored(clean_env: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    serverfile.write(
        clean_env, serverfile.ServerInfo(pid=child.pid, url="u", internal_url="u", database="pg")
    )
    assert serverfile.read(clean_env) is None
    serverfile.remove(clean_env, os.getpid())  # not this process's: left alone
    assert (clean_env / serverfile.SERVER_FILE).exists()
    serverfile.remove(clean_env, child.pid)
    assert not (clean_env / serverfile.SERVER_FILE).exists()


def test_db_prints_the_running_servers_embedded_database_or_says_there_is_none(clean_env: Path) -> None:
    result = runner.invoke(app, ["db"])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert "no server with an embedded database runs from" in line
    dsn = "postgresql://postgres@/ledger?host=/tmp/x&port=5999"
    serverfile.write(
        clean_env, serverfile.ServerInfo(pid=os.getpid(), url="u", internal_url="u", database=dsn)
    )
    shown = runner.invoke(app, ["db"])
    assert shown.exit_code == 0 and shown.stdout.strip() == dsn


def test_a_bad_plans_file_stops_serve_in_one_line_naming_the_file_and_key(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans = clean_env / "plans.toml"
    plans.write_text('default_plan = "free"\n[plans.free]\nminutess = 5\n')
    monkeypatch.setenv("LEDGER_PLANS_FILE", str(plans))
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("usage-ledger: invalid plans file: ") and str(plans) in line and "minutess" in line


def every_command() -> list[list[str]]:
    commands = [[name] for name in ("serve", "migrate", "token", "status", "user", "db")]
    return commands + [["internal", name] for name in ("plan", "credits", "reconcile")]


@pytest.mark.parametrize("command", every_command(), ids=" ".join)
def test_help_shows_no_type_placeholders_on_flags(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "--help" in result.output


def test_status_fits_80_columns_without_cutting_a_value() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    shards = [
        {
            "shard": index,
            "state": "running",
            "host": "10.0.0.4",
            "pid": 4_194_304,  # the largest pid Linux gives
            "resident_users": 1_000_000,
            "active_sessions": 250_000,
            "dirty_users": 99_999,
            "last_flush_at": (now - timedelta(seconds=12)).isoformat(),
            "flush_failures": 12,
            "reactivating": index == 1,
        }
        for index in range(3)
    ]
    shards.append({"shard": 3, "state": "unreachable", "error": "GetTimeoutError"})
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(status_table(shards, now=now))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for expected in ("4194304@10.0.0.4", "1000000", "250000", "12 s ago", "loading", "GetTimeoutError"):
        assert expected in text, (expected, text)


def test_an_ipv6_host_a_bad_url_and_port_zero_are_handled_in_one_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made_secrets(clean_env)
    port = free_port()
    monkeypatch.setenv("LEDGER_HOST", "::1")
    monkeypatch.setenv("LEDGER_PORT", str(port))
    ipv6 = runner.invoke(app, ["internal", "reconcile", "alice"])
    assert ipv6.exit_code == 1 and f"no server answers at http://[::1]:{port} " in ipv6.output
    bad = runner.invoke(app, ["internal", "reconcile", "alice", "--url", "http://::1:8080"])
    [line] = bad.output.strip().splitlines()
    assert bad.exit_code == 1 and "is not a URL to call" in line
    # A port of 0 says "any": the server picked one and recorded it, which the CLI then uses.
    monkeypatch.delenv("LEDGER_HOST")
    monkeypatch.setenv("LEDGER_PORT", "0")
    recorded = f"http://127.0.0.1:{free_port()}"
    serverfile.write(
        clean_env, serverfile.ServerInfo(pid=os.getpid(), url=recorded, internal_url=recorded, database=None)
    )
    found = runner.invoke(app, ["internal", "reconcile", "alice"])
    assert f"no server answers at {recorded} " in found.output


def test_secrets_another_user_cannot_read_are_one_line(clean_env: Path) -> None:
    made_secrets(clean_env)
    secrets_file = clean_env / "dev-secrets.json"
    secrets_file.unlink()
    secrets_file.mkdir()  # unreadable as a file, whoever runs the test (root reads any file)
    result = runner.invoke(app, ["token", "alice"])
    [line] = result.output.strip().splitlines()
    assert result.exit_code == 1 and line.startswith("usage-ledger: cannot read the secrets: ")


def test_serve_refuses_an_impossible_port_before_starting_anything() -> None:
    result = runner.invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "Traceback" not in result.output
