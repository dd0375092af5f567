"""The benchmark harness itself works (no timing is asserted): the open-loop generator sends what it
is given and counts what comes back, and the postgres-direct baseline answers the same requests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest_asyncio

from bench.__main__ import compare, render_benchmarks_md
from bench.baseline import create_baseline_app
from bench.client import run_clients
from bench.loadgen import FlowSpec, LoadSpec, Step, http_request, run_load
from gateway.auth import issue_token
from gateway.serving import server_config
from tests.harness import JWT_SECRET, QuietServer, RunningServer, auth, new_user


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


async def test_the_generator_sends_at_its_rate_and_counts_the_answers(server: RunningServer) -> None:
    users = [new_user() for _ in range(5)]
    requests = [http_request("GET", "/v1/usage", headers=auth(user)) for user in users]
    requests.append(http_request("GET", "/v1/usage", headers={"Authorization": "Bearer nope"}))
    spec = LoadSpec(
        host="127.0.0.1", port=_port(server.base_url), requests=requests, rate_per_s=60, duration_s=1
    )
    result = await asyncio.to_thread(run_load, spec)
    assert result.completed == 60 and result.errors == 0
    assert result.statuses == {200: 50, 401: 10}
    summary = result.summary()
    assert summary["ok"] == 50 and 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]


async def test_flows_carry_the_session_id_from_the_first_answer(server: RunningServer) -> None:
    users = [new_user() for _ in range(4)]
    flows = []
    for user in users:
        headers = auth(user)
        flows.append(
            (
                Step(0, "start", http_request("POST", "/v1/sessions", headers=headers, body=b"{}")),
                Step(
                    0.2,
                    "heartbeat",
                    http_request("POST", "/v1/sessions/{session}/heartbeat", headers=headers, body=b"{}"),
                ),
                Step(
                    0.4,
                    "end",
                    http_request("POST", "/v1/sessions/{session}/end", headers=headers, body=b"{}"),
                ),
            )
        )
    # A flow whose start is refused stops there.
    flows.append((Step(0, "start", http_request("POST", "/v1/sessions", body=b"{}")), flows[0][1]))
    spec = FlowSpec(host="127.0.0.1", port=_port(server.base_url), flows=flows, rate_per_s=10, duration_s=0.5)
    result = await asyncio.to_thread(run_load, spec)
    assert result.errors == 0 and result.flows_cut_short == 1
    assert result.statuses == {201: 4, 200: 8, 401: 1}
    steps = result.summary()["steps"]
    assert {kind: figures["requests"] for kind, figures in steps.items()} == {
        "start": 5,
        "heartbeat": 4,
        "end": 4,
    }
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        for user in users:  # each flow ended its own session
            assert (await http.get("/v1/sessions/current", headers=auth(user))).status_code == 404


@pytest_asyncio.fixture
async def baseline_url(postgres_dsn: str) -> AsyncIterator[str]:
    server = QuietServer(
        server_config(create_baseline_app(postgres_dsn, JWT_SECRET), host="127.0.0.1", port=0)
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "the baseline did not start"
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    await task


async def test_the_baseline_checks_starts_heartbeats_and_ends_through_postgres(
    baseline_url: str, postgres_dsn: str
) -> None:
    user = f"baseline-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {issue_token(secret=JWT_SECRET, user_id=user, ttl_s=60)}"}
    async with httpx.AsyncClient(base_url=baseline_url) as http:
        usage = await http.get("/v1/usage", headers=headers)
        assert usage.status_code == 200 and usage.json()["user_id"] == user
        assert (await http.get("/v1/usage")).status_code == 401
        session_id = (await http.post("/v1/sessions", json={}, headers=headers)).json()["session_id"]
        await asyncio.sleep(0.2)
        beat = await http.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=headers)
        assert beat.status_code == 200 and beat.json()["version"] >= 2
        assert (await http.get("/v1/usage", headers=headers)).json()["minutes_used"] >= 0
        other = await http.post(f"/v1/sessions/{uuid.uuid4()}/heartbeat", json={}, headers=headers)
        assert other.status_code == 404
        ended = await http.post(f"/v1/sessions/{session_id}/end", json={}, headers=headers)
        assert ended.status_code == 200
        assert (
            await http.post(f"/v1/sessions/{session_id}/end", json={}, headers=headers)
        ).status_code == 404
    connection = await asyncpg.connect(postgres_dsn)
    try:
        session = await connection.fetchrow(
            "select used_ms, ended_at from baseline_sessions where id = $1", uuid.UUID(session_id)
        )
        period_used = await connection.fetchval("select used_ms from baseline_usage where user_id = $1", user)
    finally:
        await connection.close()
    assert session["ended_at"] is not None
    assert session["used_ms"] >= 200, "the heartbeat billed the time since the start"
    assert period_used == session["used_ms"], "and so did the user's period"


def test_ratios_and_the_table_come_from_the_results() -> None:
    ours = [{"offered_per_s": 100, "p99_ms": 2.0, "db_write_transactions_per_1000": 10}]
    theirs = [{"offered_per_s": 100, "p99_ms": 8.0, "db_write_transactions_per_1000": 2000}]
    assert compare(ours, theirs) == [{"offered_per_s": 100, "p99_ratio": 0.25, "db_write_ratio": 0.005}]
    assert render_benchmarks_md().startswith("# Benchmarks")


async def test_the_client_scenario_runs_sessions_through_the_python_client(server: RunningServer) -> None:
    row = await run_clients(
        server.base_url,
        lambda user: issue_token(secret=JWT_SECRET, user_id=user, ttl_s=600),
        clients=5,
        session_s=1.0,
        heartbeat_s=0.25,
    )
    assert (row["clients"], row["ended_user_ended"], row["ended_otherwise"], row["errors"]) == (5, 5, 0, 0)
    assert row["heartbeats"] >= 5  # every session heartbeated in the background
    assert row["requests"] >= 5 * 3 + row["heartbeats"]  # start, usage, end, and the heartbeats
    assert 0 < row["start_p50_ms"] <= row["start_p99_ms"]
