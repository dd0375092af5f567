"""Apply the numbered SQL migrations, safely when several processes start at once.

A session-level advisory lock serializes migrators: the second process waits,
then finds every migration already recorded in `schema_migrations` and does
nothing. Each migration runs in its own transaction with its record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Protocol

import asyncpg
import structlog

from persistence.errors import MigrationError, translate_errors

if TYPE_CHECKING:
    from persistence.database import Connection

log = structlog.get_logger("persistence.migrate")

# pg_advisory_lock key: the bytes of "usageldg".
MIGRATION_LOCK_KEY = int.from_bytes(b"usageldg", "big") & 0x7FFF_FFFF_FFFF_FFFF
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def discover() -> list[Migration]:
    """The packaged migrations, in version order."""
    found = []
    for entry in resources.files("persistence.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if match is None:
            raise MigrationError("discover", f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("discover", f"duplicate migration versions in {versions}")
    return found


class MigrationProgress(Protocol):
    """Told what `migrate` is doing (the CLI draws a progress bar with it)."""

    def pending(self, migrations: Sequence[Migration]) -> None: ...

    def applied(self, migration: Migration) -> None: ...


async def migrate(connection: Connection, *, progress: MigrationProgress | None = None) -> list[int]:
    """Apply what is missing; returns the versions applied by this call."""
    applied_now: list[int] = []
    with translate_errors("migrate"):
        await connection.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            # Nothing pending: no DDL, so a role that owns nothing (usage_ledger_app) can start the
            # server on a database its owner has migrated.
            applied = await _applied_versions(connection)
            pending = [m for m in discover() if applied is None or m.version not in applied]
            if not pending:
                return applied_now
            if applied is None:
                await connection.execute(
                    """
                    create table schema_migrations (
                        version     integer primary key,
                        name        text not null,
                        applied_at  timestamptz not null default now()
                    )
                    """
                )
            migrator = await connection.fetchval("select current_user")
            if progress is not None:
                progress.pending(pending)
            for migration in pending:
                async with connection.transaction():
                    try:
                        await connection.execute(migration.sql)
                    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
                        raise MigrationError(
                            "migrate",
                            f"migration {migration.version:04d}_{migration.name} needs more rights than "
                            f"{migrator!r} has ({exc}): migrate as "
                            "the tables' owner (`usage-ledger migrate` with its credentials, or "
                            "LEDGER_MIGRATION_DATABASE_URL)",
                        ) from exc
                    await connection.execute(
                        "insert into schema_migrations (version, name) values ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                applied_now.append(migration.version)
                log.info("migration_applied", version=migration.version, name=migration.name)
                if progress is not None:
                    progress.applied(migration)
        finally:
            await connection.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def _applied_versions(connection: Connection) -> set[int] | None:
    """The versions recorded in `schema_migrations`; None before it exists."""
    if await connection.fetchval("select to_regclass('schema_migrations')") is None:
        return None
    return {row["version"] for row in await connection.fetch("select version from schema_migrations")}
