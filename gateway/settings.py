"""Settings: every `LEDGER_*` environment variable, read once into one typed object.

Built by the CLI or by whoever calls `create_app`, never at import. Names
carry their units. In production the validators refuse configurations that
are only fit for a laptop.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A secret shorter than this is refused in production (RFC 7518 §3.2: an
# HS256 key must be at least as long as the hash output, 32 bytes).
SECRET_MIN_LENGTH_PRODUCTION = 32
# The events webhook key (the bytes under `whsec_`): Standard Webhooks' 24 to 64.
EVENTS_SECRET_MIN_BYTES = 24
# A secret of fewer distinct characters than this is a placeholder ("xxxx...", "aaaa..."), not a key.
SECRET_MIN_DISTINCT_CHARACTERS = 10
# Inside one gateway->shard call, a durable operation gets: at least 0.5 s to begin, the
# statement timeout + 1 s to write, 2 s to read back an ambiguous write, 1 s of margin.
WRITE_SLACK_S = 1.0
RESOLVE_TIMEOUT_S = 2.0
CALL_MARGIN_S = 1.0
WAIT_BUDGET_MIN_S = 0.5
DURABLE_OVERHEAD_S = WRITE_SLACK_S + RESOLVE_TIMEOUT_S + CALL_MARGIN_S + WAIT_BUDGET_MIN_S


# The Python client's default heartbeat interval (`usage_ledger_client.DEFAULT_HEARTBEAT_INTERVAL_S`):
# a stale timeout shorter than this ends every session of a client left at its default.
CLIENT_HEARTBEAT_INTERVAL_S = 30.0


class SettingsError(ValueError):
    """A setting is impossible or unsafe; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", frozen=True, validate_default=True)

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65_535)
    # Set: /internal/ routes are served only on this listener (and no longer on `port`).
    internal_port: int | None = Field(default=None, ge=0, le=65_535)
    internal_host: str = "127.0.0.1"
    data_dir: Path = Path(".usage-ledger")
    database_url: SecretStr | None = None
    # Set: migrations run with these (owner) credentials, and database_url may be a role that
    # owns nothing (usage_ledger_app; deploy/README.md).
    migration_database_url: SecretStr | None = None
    ray_address: str | None = None
    ray_namespace: str = Field(default="usage-ledger", min_length=1, max_length=64)
    # The Ray dashboard of a local Ray (never of LEDGER_RAY_ADDRESS's cluster, which is started
    # elsewhere), on 127.0.0.1:8265: off by default, because a server does not need it. It needs
    # `pip install 'ray[default]'`; without it Ray refuses to start.
    ray_dashboard: bool = False
    shards: int = Field(default=4, ge=1, le=1_024)
    # The most shards a resize may ask for: each is a process (~100 MB with its users' memory on
    # top), so a mistyped count must not start hundreds of them.
    shards_max: int = Field(default=64, ge=1, le=1_024)
    # How hot calls reach the shards: "channel", the direct data plane (`gateway.channel`); "ray",
    # batched Ray calls (the way everything cold travels).
    data_plane: Literal["channel", "ray"] = "channel"
    plans_file: Path | None = None

    jwt_secret: SecretStr | None = None
    # Set: user tokens are RS256/ES256, verified with this JWKS (and never with jwt_secret).
    jwt_jwks_url: str | None = Field(default=None, pattern=r"^https?://")
    jwt_jwks_refetch_s: float = Field(default=30.0, ge=1, le=3_600)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = Field(default=30.0, ge=0, le=300)
    internal_secret: SecretStr | None = None
    # Set: POST /webhooks/polar (Polar's webhook secret) and /webhooks/stripe (`whsec_...`) are on.
    polar_webhook_secret: SecretStr | None = Field(default=None, min_length=8)
    stripe_webhook_secret: SecretStr | None = Field(default=None, min_length=8)

    # Set: threshold events are POSTed here as Standard Webhooks signed with the `whsec_` secret.
    events_webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    events_webhook_secret: SecretStr | None = None
    # Failed deliveries are retried with doubling waits up to this, until the event is this old.
    events_retry_max_s: float = Field(default=300.0, ge=1, le=86_400)
    events_max_age_s: float = Field(default=259_200.0, ge=60, le=30 * 86_400)

    sync_interval_s: float = Field(default=30.0, gt=0, le=3_600)
    stale_session_s: float = Field(default=600.0, gt=0, le=86_400)
    low_balance_minutes: float = Field(default=5.0, ge=0)
    # Unresolved holds one user may have at once; past it, 429 `too_many_holds`.
    max_open_holds: int = Field(default=100, ge=1, le=1_000)

    actor_call_timeout_s: float = Field(default=12.0, gt=0, le=300)
    shard_max_pending_calls: int = Field(default=10_000, ge=1, le=1_000_000)
    # A request's head, then its body, must each arrive within this (408 otherwise).
    request_read_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Requests in flight in one gateway process (streams not counted); past it, 503 at once.
    max_requests_in_flight: int = Field(default=1_024, ge=1, le=100_000)
    db_statement_timeout_s: float = Field(default=5.0, gt=0, le=600)
    db_pool_max_size: int = Field(default=4, ge=1, le=100)

    log_format: Literal["console", "json"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _durable_writes_fit_in_a_call(self) -> Settings:
        # A durable write may take the statement timeout plus a read-back; the shard must give up
        # (and say nothing changed) before the gateway stops waiting for it.
        needed = self.db_statement_timeout_s + DURABLE_OVERHEAD_S
        if self.actor_call_timeout_s < needed:
            raise SettingsError(
                f"LEDGER_ACTOR_CALL_TIMEOUT_S must be at least LEDGER_DB_STATEMENT_TIMEOUT_S + "
                f"{DURABLE_OVERHEAD_S:g} (= {needed:g}); it is {self.actor_call_timeout_s:g}"
            )
        return self

    @model_validator(mode="after")
    def _shards_within_their_bound(self) -> Settings:
        if self.shards > self.shards_max:
            raise SettingsError(
                f"LEDGER_SHARDS ({self.shards}) is more than LEDGER_SHARDS_MAX ({self.shards_max})"
            )
        return self

    @model_validator(mode="after")
    def _event_webhooks_are_signed(self) -> Settings:
        if self.events_webhook_url is None:
            return self
        if self.events_webhook_secret is None:
            raise SettingsError("LEDGER_EVENTS_WEBHOOK_URL needs LEDGER_EVENTS_WEBHOOK_SECRET (whsec_...)")
        secret = self.events_webhook_secret.get_secret_value()
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            key = b""
        if not secret.startswith("whsec_") or len(key) < EVENTS_SECRET_MIN_BYTES:
            raise SettingsError(
                "LEDGER_EVENTS_WEBHOOK_SECRET must be whsec_ and the base64 of at least "
                f"{EVENTS_SECRET_MIN_BYTES} random bytes, e.g. whsec_$(openssl rand -base64 32)"
            )
        return self

    @model_validator(mode="after")
    def _migration_credentials_need_a_database(self) -> Settings:
        if self.migration_database_url is not None and self.database_url is None:
            raise SettingsError(
                "LEDGER_MIGRATION_DATABASE_URL needs LEDGER_DATABASE_URL "
                "(the embedded database has one owner)"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            return self
        needed = ("internal_secret",) if self.jwt_jwks_url else ("jwt_secret", "internal_secret")
        for name in needed:
            value: SecretStr | None = getattr(self, name)
            if value is None:
                raise SettingsError(
                    f"LEDGER_{name.upper()} must be set in production (generated secrets are for development)"
                )
            secret = value.get_secret_value()
            if len(secret) < SECRET_MIN_LENGTH_PRODUCTION:
                raise SettingsError(
                    f"LEDGER_{name.upper()} is shorter than {SECRET_MIN_LENGTH_PRODUCTION} characters"
                )
            if len(set(secret.removeprefix("whsec_"))) < SECRET_MIN_DISTINCT_CHARACTERS:
                raise SettingsError(
                    f"LEDGER_{name.upper()} looks like a placeholder (fewer than "
                    f"{SECRET_MIN_DISTINCT_CHARACTERS} distinct characters); generate one, e.g. "
                    "`openssl rand -base64 32`"
                )
        for problem in self.contradictions():
            raise SettingsError(problem)
        return self

    def contradictions(self) -> list[str]:
        """Settings that each work but defeat one another: refused in production, warned of otherwise."""
        found = []
        if self.stale_session_s < CLIENT_HEARTBEAT_INTERVAL_S:
            found.append(
                f"LEDGER_STALE_SESSION_S ({self.stale_session_s:g}) is shorter than the client's default "
                f"heartbeat interval ({CLIENT_HEARTBEAT_INTERVAL_S:g} s): the sessions of such clients all "
                "end stale"
            )
        if self.sync_interval_s > self.stale_session_s:
            found.append(
                f"LEDGER_SYNC_INTERVAL_S ({self.sync_interval_s:g}) is longer than LEDGER_STALE_SESSION_S "
                f"({self.stale_session_s:g}): a session can go stale before any of its time was written"
            )
        return found

    def migration_dsn(self, database_dsn: str) -> str:
        """The DSN migrations run with: LEDGER_MIGRATION_DATABASE_URL, else the server's own."""
        if self.migration_database_url is not None:
            return self.migration_database_url.get_secret_value()
        return database_dsn

    @property
    def resolved_log_format(self) -> Literal["console", "json"]:
        if self.log_format is not None:
            return self.log_format
        return "json" if self.env == "production" else "console"
