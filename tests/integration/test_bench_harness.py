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

from actors.plans import PlanCatalog
from bench.__main__ import HOLD_METER, compare, render_benchmarks_md, reserve_and_capture
from bench.baseline import create_baseline_app
from bench.client import run_clients
from bench.loadgen import FlowSpec, LoadResult, LoadSpec, Step, http_request, run_load
from bench.server import PLANS_FILE as BENCH_PLANS_FILE
from gateway.auth import issue_token
from gateway.schemas import Hold
from gateway.serving import server_config
from tests.harness import JWT_SECRET, PLANS_FILE, QuietServer, RunningServer, auth, new_user


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
    """The baseline with the tests' plans, as the test server has them (`generations`: 5 a day)."""
    app = create_baseline_app(postgres_dsn, JWT_SECRET, plans_file=PLANS_FILE)
    server = QuietServer(server_config(app, host="127.0.0.1", port=0))
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


async def _hold_flows(base_url: str) -> tuple[LoadResult, list[str]]:
    """The `hold` scenario's pairs, one flow a user: 2 of the tests' `generations` (5 a day) held,
    1 captured; and one flow whose hold is refused (6 is more than the limit)."""
    users = [new_user() for _ in range(4)]
    flows: list[tuple[Step, ...]] = [
        reserve_and_capture(auth(user), meter="generations", amount=2, capture=1) for user in users
    ]
    flows.append(reserve_and_capture(auth(new_user()), meter="generations", amount=6, capture=1))
    spec = FlowSpec(
        host="127.0.0.1", port=_port(base_url), flows=flows, rate_per_s=10, duration_s=0.5, per_flow=True
    )
    return await asyncio.to_thread(run_load, spec), users


async def test_hold_pairs_are_one_request_each_on_the_ledger_and_the_baseline(
    server: RunningServer, baseline_url: str, postgres_dsn: str
) -> None:
    balances: dict[str, list[tuple[int, int]]] = {}
    for base_url in (server.base_url, baseline_url):
        result, users = await _hold_flows(base_url)
        # One latency and one status per pair: the capture's, or the refusal that cut it short.
        assert result.errors == 0 and result.flows_cut_short == 1
        assert result.completed == 5 and result.statuses == {200: 4, 403: 1}, base_url
        summary = result.summary()
        assert {kind: figures["requests"] for kind, figures in summary["steps"].items()} == {
            "reserve": 5,
            "capture": 4,
        }
        assert 0 < summary["steps"]["reserve"]["p50_ms"] <= summary["p50_ms"] <= summary["max_ms"]
        # Each capture found its hold (the id from the reserve's answer): 1 used, nothing held.
        if base_url == server.base_url:
            async with httpx.AsyncClient(base_url=base_url) as http:
                credits = [(await http.get("/v1/credits", headers=auth(user))).json() for user in users]
            balances[base_url] = [
                (c["meters"]["generations"]["used"], c["meters"]["generations"]["held"]) for c in credits
            ]
        else:
            connection = await asyncpg.connect(postgres_dsn)
            try:
                rows = [
                    await connection.fetchrow(
                        "select used, held from baseline_meters where user_id = $1 and meter = 'generations'",
                        user,
                    )
                    for user in users
                ]
            finally:
                await connection.close()
            balances[base_url] = [(row["used"], row["held"]) if row else (-1, -1) for row in rows]
    assert balances == {server.base_url: [(1, 0)] * 4, baseline_url: [(1, 0)] * 4}


async def test_the_baseline_reserves_and_captures_as_the_ledger_answers(
    baseline_url: str, postgres_dsn: str
) -> None:
    user = f"baseline-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {issue_token(secret=JWT_SECRET, user_id=user, ttl_s=60)}"}
    async with httpx.AsyncClient(base_url=baseline_url, headers=headers) as http:
        created = await http.post("/v1/holds", json={"meter": "generations", "amount": 4, "reference": "r-1"})
        assert created.status_code == 201, created.text
        held = created.json()
        assert set(held) == set(Hold.model_fields), "the ledger's hold object"
        assert (held["state"], held["amount"], held["meter"], held["minutes"]) == (
            "held",
            4,
            "generations",
            None,
        )
        assert held["reference"] == "r-1" and held["resolved_at"] is None
        refused = await http.post("/v1/holds", json={"meter": "generations", "amount": 2})
        assert refused.status_code == 403 and refused.json()["code"] == "no_credits"
        assert refused.json()["remaining"] == 1, "what is held is unavailable"
        unknown = await http.post("/v1/holds", json={"meter": "nope", "amount": 1})
        assert unknown.status_code == 404 and unknown.json()["code"] == "meter_not_found"
        assert (await http.post("/v1/holds", json={"meter": "generations"})).status_code == 422

        hold_id = held["hold_id"]
        too_much = await http.post(f"/v1/holds/{hold_id}/capture", json={"amount": 5})
        assert too_much.status_code == 422
        captured = await http.post(f"/v1/holds/{hold_id}/capture", json={"amount": 3})
        assert captured.status_code == 200, captured.text
        body = captured.json()
        assert (body["state"], body["captured"], body["released"]) == ("captured", 3, 1)
        assert body["resolved_at"] is not None and body["version"] > held["version"]
        again = await http.post(f"/v1/holds/{hold_id}/capture", json={"amount": 3})
        assert again.status_code == 200 and again.json() == body, "a capture repeated answers the same"
        other = await http.post(f"/v1/holds/{hold_id}/capture", json={"amount": 2})
        assert other.status_code == 409 and other.json()["state"] == "captured"
        missing = await http.post(f"/v1/holds/{uuid.uuid4()}/capture", json={})
        assert missing.status_code == 404 and missing.json()["code"] == "hold_not_found"
        assert (await http.post("/v1/holds/not-a-uuid/capture", json={})).status_code == 404

        # The rest was released at once: 2 are available again (5 - 3 used), and no more.
        whole = await http.post("/v1/holds", json={"meter": "generations", "amount": 2})
        assert whole.status_code == 201
        assert (await http.post(f"/v1/holds/{whole.json()['hold_id']}/capture")).json()["captured"] == 2
        assert (await http.post("/v1/holds", json={"meter": "generations", "amount": 1})).status_code == 403
    intruder = {"Authorization": f"Bearer {issue_token(secret=JWT_SECRET, user_id=new_user(), ttl_s=60)}"}
    async with httpx.AsyncClient(base_url=baseline_url, headers=intruder) as http:
        stolen = await http.post(f"/v1/holds/{hold_id}/capture", json={})
        assert stolen.status_code == 404, "another user's hold is not found"
    connection = await asyncpg.connect(postgres_dsn)
    try:
        meter = await connection.fetchrow(
            "select used, held from baseline_meters where user_id = $1 and meter = 'generations'", user
        )
        state = await connection.fetchval(
            "select state from baseline_holds where id = $1", uuid.UUID(hold_id)
        )
    finally:
        await connection.close()
    assert meter is not None and (meter["used"], meter["held"], state) == (5, 0, "captured")


def test_the_bench_plans_are_the_built_in_ones_and_the_hold_meter() -> None:
    bench, builtin = PlanCatalog.from_file(BENCH_PLANS_FILE), PlanCatalog.builtin()
    free = bench.plans["free"]
    limit = free.meters[HOLD_METER].limit
    assert set(free.meters) == {HOLD_METER} and limit is not None and limit >= 10**12, "never refuses"
    assert bench.default_plan == builtin.default_plan
    assert {name: plan for name, plan in bench.plans.items() if name != "free"} == {
        name: plan for name, plan in builtin.plans.items() if name != "free"
    }
    assert (free.limit_ms, free.rate_limit) == (builtin.default.limit_ms, builtin.default.rate_limit)


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
