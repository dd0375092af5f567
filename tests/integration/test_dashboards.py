"""The Grafana dashboard cannot rot: every SQL query in deploy/grafana/usage-ledger.json runs, as
the read-only dashboard role, against the real views after real sessions; every metric its
Prometheus queries name is one the server exports."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest_asyncio

from tests.harness import RunningServer, auth, change_plan, eventually, new_user
from tests.integration.test_postgres_roles import _as_user, _login_role

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "usage-ledger.json"


def targets(kind: str) -> list[str]:
    """Every query of `kind` ("rawSql" or "expr") in the dashboard."""
    document = json.loads(DASHBOARD.read_text())
    return [target[kind] for panel in document["panels"] for target in panel["targets"] if kind in target]


@pytest_asyncio.fixture
async def dashboard_role(postgres_dsn: str, server: RunningServer) -> AsyncIterator[asyncpg.Connection]:
    """A login in the usage_ledger_dashboard role (the server's start applied the migrations)."""
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await _login_role(admin, "ledger_test_dashboard", "usage_ledger_dashboard")
    finally:
        await admin.close()
    connection = await asyncpg.connect(_as_user(postgres_dsn, "ledger_test_dashboard"))
    yield connection
    await connection.close()


async def test_every_dashboard_query_runs_as_the_dashboard_role_and_sees_real_sessions(
    client: httpx.AsyncClient, dashboard_role: asyncpg.Connection
) -> None:
    talking, spent = new_user(), new_user()
    started = await client.post("/v1/sessions", json={"topic": "dashboards"}, headers=auth(talking))
    assert started.status_code == 201, started.text
    assert (await change_plan(client, spent, "tiny")).status_code == 200  # 6 seconds a period
    spending = await client.post("/v1/sessions", json={}, headers=auth(spent))
    assert spending.status_code == 201, spending.text
    beat = f"/v1/sessions/{spending.json()['session_id']}/heartbeat"
    held = await client.post("/v1/holds", json={"minutes": 1, "ttl_s": 600}, headers=auth(talking))
    assert held.status_code == 201, held.text

    async def heartbeats(user: str, path: str) -> None:  # silence would end a session stale
        while True:
            await asyncio.sleep(1)
            answer = await client.post(path, json={}, headers=auth(user))
            if answer.status_code != 200 or answer.json()["state"] == "ended":
                return

    talking_beats = asyncio.create_task(
        heartbeats(talking, f"/v1/sessions/{started.json()['session_id']}/heartbeat")
    )
    spent_beats = asyncio.create_task(heartbeats(spent, beat))

    async def spent_is_at_limit() -> bool:
        row = await dashboard_role.fetchrow(
            "select status from dashboards.users_near_limit where user_id = $1", spent
        )
        return row is not None and row["status"] == "at_limit"

    try:
        await eventually(spent_is_at_limit, timeout_s=20)
    except AssertionError:
        seen = await dashboard_role.fetch("select * from dashboards.current_usage where user_id = $1", spent)
        raise AssertionError(f"not at its limit: {[dict(row) for row in seen]}") from None
    await spent_beats
    running = await dashboard_role.fetch("select session_id::text, plan from dashboards.active_sessions")
    assert (started.json()["session_id"], "free") in [tuple(row) for row in running]
    holds = await dashboard_role.fetch(
        "select hold_id, holds, amount from dashboards.open_holds where user_id = $1", talking
    )
    assert [tuple(row) for row in holds] == [(held.json()["hold_id"], "minutes", 1)]
    usage = await dashboard_role.fetchrow("select * from dashboards.current_usage where user_id = $1", spent)
    assert usage is not None and (usage["plan"], usage["percent_used"]) == ("tiny", 100)

    queries = targets("rawSql")
    assert len(queries) >= 6
    rows_by_query: dict[str, int] = {}
    for query in queries:
        rows_by_query[query] = len(await dashboard_role.fetch(query))
    assert all(count > 0 for count in rows_by_query.values()), rows_by_query
    talking_beats.cancel()


async def test_every_metric_the_dashboard_charts_is_exported(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    text = (await client.get("/metrics")).text
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    exported = families | {
        f"{name}{suffix}" for name in families for suffix in ("_total", "_bucket", "_count", "_sum")
    }
    named = {name for expr in targets("expr") for name in re.findall(r"\bledger_[a-z_]+\b", expr)}
    assert len(named) >= 10
    assert not named - exported, f"charted but not exported: {sorted(named - exported)}"


def test_the_dashboard_is_importable_grafana_json() -> None:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert document["uid"] == "usage-ledger"
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    sources = {variable["name"] for variable in document["templating"]["list"]}
    for panel in document["panels"]:
        assert panel["datasource"]["uid"].strip("${}") in sources, panel["title"]
