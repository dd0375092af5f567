"""The CLI's offline commands: `token`, and how it reports bad configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.auth import TokenVerifier
from gateway.cli import app
from gateway.secrets import resolve_secrets
from gateway.settings import Settings

runner = CliRunner()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("LEDGER_JWT_SECRET", "LEDGER_INTERNAL_SECRET", "LEDGER_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LEDGER_DATA_DIR", str(tmp_path))
    return tmp_path


def test_token_is_accepted_by_the_same_configuration(clean_env: Path) -> None:
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
