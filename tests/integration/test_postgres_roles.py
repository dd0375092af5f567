"""Least privilege in Postgres: the dashboard role reads only its views; the server runs as a role
that owns nothing and cannot rewrite the credit ledger."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from gateway.runtime import migrate_database
from gateway.settings import Settings
from persistence.errors import PersistenceError
from tests.harness import ServerFactory, auth, change_plan, new_user, signed

DASHBOARD_VIEWS = (
    "users",
    "usage_periods",
    "usage_sessions",
    "credit_ledger",
    "credit_balances",
    "plan_events",
)
# The ops views (0005): joins and aggregates, which no one can write through anyway.
OPS_VIEWS = (
    "current_usage",
    "users_near_limit",
    "active_sessions",
    "minutes_by_day",
    "plan_distribution",
    "flush_lag",
)
TABLES = (
    "usage_users",
    "usage_periods",
    "usage_sessions",
    "usage_meters",
    "plan_events",
    "credit_ledger",
    "credit_purchases",
    "idempotency_keys",
    "schema_migrations",
)


def _as_user(dsn: str, user: str, database: str | None = None) -> str:
    """The same server and database (or `database`), logged in as `user` (test servers trust local logins)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=f"{user}@{host}", path=path))


async def _login_role(admin: asyncpg.Connection, name: str, group: str) -> None:
    exists = await admin.fetchval("select exists (select from pg_roles where rolname = $1)", name)
    if not exists:
        await admin.execute(f'create role "{name}" login in role {group}')


@pytest_asyncio.fixture(scope="module")
async def logins(postgres_dsn: str, start_server: ServerFactory) -> AsyncIterator[dict[str, str]]:
    """DSNs for a dashboard login and an app login (the shared database is migrated by then)."""
    await start_server()  # migrations applied
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await _login_role(admin, "ledger_test_dashboard", "usage_ledger_dashboard")
        await _login_role(admin, "ledger_test_app", "usage_ledger_app")
    finally:
        await admin.close()
    yield {
        "dashboard": _as_user(postgres_dsn, "ledger_test_dashboard"),
        "app": _as_user(postgres_dsn, "ledger_test_app"),
    }


async def _refused(connection: asyncpg.Connection, statement: str) -> bool:
    try:
        await connection.execute(statement)
    except asyncpg.exceptions.InsufficientPrivilegeError:
        return True
    return False


async def test_dashboard_role_reads_its_views_and_nothing_else(logins: dict[str, str]) -> None:
    connection = await asyncpg.connect(logins["dashboard"])
    try:
        for view in (*DASHBOARD_VIEWS, *OPS_VIEWS):
            await connection.fetch(f"select * from dashboards.{view} limit 1")
        allowed = [
            statement
            for statement in (
                *(f"select * from {table} limit 1" for table in TABLES),
                "select * from credit_balances limit 1",
                *(f"delete from dashboards.{view}" for view in DASHBOARD_VIEWS if view != "credit_balances"),
                "update dashboards.users set plan = 'pro'",
                "insert into dashboards.users (user_id, plan, version) values ('x', 'pro', 1)",
                *(f"update {table} set version = 0" for table in ("usage_users", "usage_periods")),
                "delete from credit_ledger",
                "insert into usage_users (user_id, plan, version) values ('x', 'pro', 1)",
                "truncate usage_sessions",
                "create table public.intruder (id int)",
                "create table dashboards.intruder (id int)",
                "create view dashboards.intruder as select 1",
                "drop view dashboards.users",
                "alter view dashboards.users rename to people",
                "drop table usage_users",
                "alter table usage_users add column intruder int",
                "create schema intruder",
                "grant select on usage_users to public",
            )
            if not await _refused(connection, statement)
        ]
        assert allowed == []
    finally:
        await connection.close()


async def test_app_role_owns_nothing_and_cannot_rewrite_the_credit_ledger(logins: dict[str, str]) -> None:
    connection = await asyncpg.connect(logins["app"])
    try:
        owned = await connection.fetchval(
            "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname in ('public', 'dashboards') and pg_has_role(c.relowner, 'USAGE')"
        )
        assert owned == 0
        allowed = [
            statement
            for statement in (
                "update credit_ledger set delta = delta + 1",
                "delete from credit_ledger",
                "delete from usage_users where false",
                "delete from credit_purchases",
                "update plan_events set applied = true",
                "truncate idempotency_keys",
                "drop table usage_sessions",
                "alter table usage_users add column intruder int",
                "create table public.intruder (id int)",
                "create index intruder on usage_users (plan)",
                "drop view dashboards.users",
                "insert into schema_migrations (version, name) values (9999, 'intruder')",
            )
            if not await _refused(connection, statement)
        ]
        assert allowed == []
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def fresh_database(postgres_dsn: str) -> AsyncIterator[str]:
    """An empty database on the test server, dropped afterwards."""
    name = f"ledger_roles_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'create database "{name}"')
        yield name
        await admin.execute(f'drop database "{name}" with (force)')
    finally:
        await admin.close()


@pytest.mark.usefixtures("logins")
async def test_server_migrates_as_owner_then_serves_everything_as_the_app_role(
    postgres_dsn: str, fresh_database: str, start_server: ServerFactory
) -> None:
    app_dsn = _as_user(postgres_dsn, "ledger_test_app", fresh_database)
    owner_dsn = _as_user(postgres_dsn, urlsplit(postgres_dsn).username or "postgres", fresh_database)

    # The app role alone cannot set up an unmigrated database, and says why.
    with pytest.raises(PersistenceError, match="permission denied"):
        await migrate_database(app_dsn, Settings(database_url=app_dsn))

    running = await start_server(database_url=app_dsn, migration_database_url=owner_dsn)
    user = new_user()
    async with running.client() as http:
        started = await http.post(
            "/v1/sessions", json={"topic": "roles"}, headers={**auth(user), "Idempotency-Key": "k1"}
        )
        assert started.status_code == 201, started.text
        session_id = started.json()["session_id"]
        beat = await http.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=auth(user))
        assert beat.status_code == 200, beat.text
        assert (await change_plan(http, user, "pro")).status_code == 200
        body, headers = signed({"minutes": 5, "reason": "purchase", "reference": "roles"})
        bought = await http.post(f"/internal/v1/users/{user}/credits", content=body, headers=headers)
        assert bought.status_code == 200, bought.text
        ended = await http.post(f"/v1/sessions/{session_id}/end", json={}, headers=auth(user))
        assert ended.status_code == 200, ended.text
        report = await http.get(f"/internal/v1/users/{user}/reconcile", headers=signed("")[1])
        assert report.status_code == 200 and report.json()["drift_found"] is False, report.text
    await running.stop()  # flushes as the app role

    owner = await asyncpg.connect(owner_dsn)
    try:
        row = await owner.fetchrow("select plan, purchased_ms from usage_users where user_id = $1", user)
        assert row is not None and row["plan"] == "pro"
        ended_reason = await owner.fetchval(
            "select end_reason from usage_sessions where id = $1", uuid.UUID(session_id)
        )
        assert ended_reason == "user_ended"
        assert await owner.fetchval("select count(*) from idempotency_keys where user_id = $1", user) == 1
        tables_owned_by_app = await owner.fetchval(
            "select count(*) from pg_tables where schemaname = 'public' and tableowner = 'ledger_test_app'"
        )
        assert tables_owned_by_app == 0
    finally:
        await owner.close()
