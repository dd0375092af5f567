"""Settings: defaults, units, and what production refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.secrets import resolve_secrets
from gateway.settings import CLIENT_HEARTBEAT_INTERVAL_S, Settings
from usage_ledger_client.client import DEFAULT_HEARTBEAT_INTERVAL_S

STRONG = "k3Jq9xZ2vN8pL4tW7yB1mC6dF0gH5sRa"


def test_defaults_match_the_documented_table(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert (settings.host, settings.port, settings.shards) == ("127.0.0.1", 8080, 4)
    assert (settings.sync_interval_s, settings.stale_session_s, settings.low_balance_minutes) == (30, 600, 5)
    assert settings.database_url is None and settings.ray_address is None
    assert settings.resolved_log_format == "console"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGER_SHARDS", "8")
    monkeypatch.setenv("LEDGER_SYNC_INTERVAL_S", "2.5")
    settings = Settings()
    assert (settings.shards, settings.sync_interval_s) == (8, 2.5)


@pytest.mark.parametrize(
    "fields",
    [
        {"shards": 0},
        {"sync_interval_s": 0},
        {"port": 70_000},
        {"stale_session_s": -1},
        {"actor_call_timeout_s": 6, "db_statement_timeout_s": 5},
        {"migration_database_url": "postgresql://owner@db/ledger"},
    ],
)
def test_impossible_values_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({}, "LEDGER_JWT_SECRET"),
        ({"jwt_secret": STRONG}, "LEDGER_INTERNAL_SECRET"),
        ({"jwt_secret": "short", "internal_secret": STRONG}, "LEDGER_JWT_SECRET is shorter"),
        ({"jwt_secret": "x" * 64, "internal_secret": STRONG}, "LEDGER_JWT_SECRET looks like a placeholder"),
        ({"jwt_secret": STRONG, "internal_secret": "whsec_" + "a" * 40}, "LEDGER_INTERNAL_SECRET looks like"),
    ],
)
def test_production_refuses_generated_or_short_secrets(fields: dict[str, str], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(env="production", **fields)  # type: ignore[arg-type]


def test_production_with_strong_secrets_logs_json() -> None:
    settings = Settings(env="production", jwt_secret=STRONG, internal_secret=STRONG)  # type: ignore[arg-type]
    assert settings.resolved_log_format == "json"


def test_development_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    first = resolve_secrets(Settings(data_dir=tmp_path))
    second = resolve_secrets(Settings(data_dir=tmp_path))
    assert first == second
    assert first.internal_secret.startswith("whsec_")
    assert (tmp_path / "dev-secrets.json").stat().st_mode & 0o077 == 0
    assert first.jwt_secret not in repr(first)


def test_configured_secrets_win_over_generated(tmp_path: Path) -> None:
    secrets = resolve_secrets(Settings(data_dir=tmp_path, jwt_secret=STRONG))  # type: ignore[arg-type]
    assert secrets.jwt_secret == STRONG
    assert secrets.internal_secret.startswith("whsec_")


def test_production_with_a_jwks_needs_no_jwt_secret() -> None:
    settings = Settings(
        env="production",
        internal_secret=STRONG,  # type: ignore[arg-type]
        jwt_jwks_url="https://auth.example/.well-known/jwks.json",
    )
    assert settings.jwt_secret is None
    with pytest.raises(ValidationError, match="LEDGER_INTERNAL_SECRET"):
        Settings(env="production", jwt_jwks_url="https://auth.example/jwks.json")


EVENTS_URL = "https://billing.example.com/hooks/usage-ledger"
EVENTS_SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY="  # 32 bytes


def test_event_webhooks_are_off_by_default_and_on_with_a_url_and_a_secret() -> None:
    assert Settings().events_webhook_url is None
    settings = Settings(events_webhook_url=EVENTS_URL, events_webhook_secret=EVENTS_SECRET)
    assert (settings.events_retry_max_s, settings.events_max_age_s) == (300, 3 * 86_400)


@pytest.mark.parametrize(
    "secret",
    [
        None,  # unsigned deliveries are refused
        "MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY=",  # no whsec_ prefix
        "whsec_not base64!",
        "whsec_c2hvcnQ=",  # 5 bytes
    ],
)
def test_an_events_url_needs_a_whsec_secret_of_24_bytes_or_more(secret: str | None) -> None:
    with pytest.raises(ValidationError, match="LEDGER_EVENTS_WEBHOOK_SECRET"):
        Settings(events_webhook_url=EVENTS_URL, events_webhook_secret=secret)


def test_settings_that_defeat_each_other_are_refused_in_production_and_named_in_development() -> None:
    strong = {"jwt_secret": STRONG, "internal_secret": STRONG}
    assert Settings().contradictions() == []
    quick = Settings(stale_session_s=10, sync_interval_s=30)
    [short_stale, slow_sync] = quick.contradictions()
    assert "LEDGER_STALE_SESSION_S (10)" in short_stale and "heartbeat interval (30 s)" in short_stale
    assert "LEDGER_SYNC_INTERVAL_S (30)" in slow_sync
    with pytest.raises(ValidationError, match="LEDGER_STALE_SESSION_S"):
        Settings(env="production", stale_session_s=10, **strong)  # type: ignore[arg-type]
    assert Settings(env="production", **strong).contradictions() == []  # type: ignore[arg-type]
    assert CLIENT_HEARTBEAT_INTERVAL_S == DEFAULT_HEARTBEAT_INTERVAL_S
