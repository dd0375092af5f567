"""The benchmark harness itself works (no timing is asserted): the open-loop generator sends what it
is given and counts what comes back, the unloaded point sends it one request at a time over one
connection, the postgres-direct baseline answers the same requests, the floor answers them as the
flows need with bodies of the ledger's size, and the results render with or without the floor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest_asyncio

from actors.plans import PlanCatalog
from bench import floor
from bench.__main__ import (
    HOLD_METER,
    README_GOALS_BEGIN,
    README_GOALS_END,
    compare,
    render_benchmarks_md,
    render_readme,
    reserve_and_capture,
)
from bench.baseline import create_baseline_app
from bench.client import run_clients
from bench.loadgen import FlowSpec, LoadResult, LoadSpec, Step, UnloadedSpec, http_request, run_load
from bench.server import PLANS_FILE as BENCH_PLANS_FILE
from bench.server import floor_server
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


@contextlib.asynccontextmanager
async def _serving(app: Any) -> AsyncIterator[str]:
    """`app` under the gateway's uvicorn configuration on a free port; yields its base URL."""
    server = QuietServer(server_config(app, host="127.0.0.1", port=0))
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "the server did not start"
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    await task


@pytest_asyncio.fixture
async def baseline_url(postgres_dsn: str) -> AsyncIterator[str]:
    """The baseline with the tests' plans, as the test server has them (`generations`: 5 a day)."""
    async with _serving(create_baseline_app(postgres_dsn, JWT_SECRET, plans_file=PLANS_FILE)) as url:
        yield url


class Watched:
    """The floor, counting what reaches it: requests, the connections they came on, the most at once."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections: set[tuple[str, int]] = set()
        self.in_flight = 0
        self.in_flight_max = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await floor.app(scope, receive, send)
            return
        self.requests += 1
        self.connections.add(tuple(scope["client"]))
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            await floor.app(scope, receive, send)
        finally:
            self.in_flight -= 1


@pytest_asyncio.fixture
async def watched_floor() -> AsyncIterator[tuple[str, Watched]]:
    watched = Watched()
    async with _serving(watched) as url:
        yield url, watched


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


def _point(offered: float, *, p50: float, p99: float, per_s: float, writes: float) -> dict[str, Any]:
    return {
        "offered_per_s": offered,
        "achieved_per_s": per_s,
        "requests": 100,
        "ok": 100,
        "errors": 0,
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p99,
        "db_write_transactions_per_1000": writes,
    }


def test_ratios_and_the_table_come_from_the_results() -> None:
    ours = [
        _point(100, p50=1.0, p99=2.0, per_s=100, writes=10),
        _point(200, p50=1.0, p99=4.0, per_s=200, writes=10),
    ]
    theirs = [_point(100, p50=4.0, p99=8.0, per_s=100, writes=2000)]
    floor_points = [_point(100, p50=0.5, p99=0.5, per_s=100, writes=0)]
    ratios = compare(ours, theirs, floor=floor_points)
    assert ratios[0] == {
        "offered_per_s": 100,
        "p50_ratio": 0.25,
        "p99_ratio": 0.25,
        "per_s_ratio": 1.0,
        "db_write_ratio": 0.005,
        "p50_floor_ratio": 2.0,
        "p99_floor_ratio": 4.0,
        "per_s_floor_ratio": 1.0,
    }
    assert ratios[1]["offered_per_s"] == 200 and set(ratios[1].values()) == {200, None}, "not run there"
    assert compare(ours)[0]["p99_ratio"] is None and compare(ours)[0]["p99_floor_ratio"] is None
    assert render_benchmarks_md().startswith("# Benchmarks")


def _write(results: Path, document: dict[str, Any]) -> None:
    base = {"doc": "Credit checks.", "at": "2026-12-06T00:00:00+00:00", "commit": "abc1234", "machine": "m"}
    (results / f"2026-12-06-{document['scenario']}.json").write_text(json.dumps({**base, **document}))


def _rows(markdown: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def test_results_render_side_by_side_with_the_floor_and_the_unloaded_point(tmp_path: Path) -> None:
    unloaded = {**_point(0, p50=0.8, p99=1.6, per_s=1200, writes=0), "closed_loop_connections": 1}
    del unloaded["offered_per_s"]
    _write(
        tmp_path,
        {
            "scenario": "check",
            "users": 10,
            "unloaded": unloaded,
            "points": [_point(250, p50=1.0, p99=3.0, per_s=250, writes=0)],
            "baseline_unloaded": {**unloaded, "p50_ms": 1.6, "p99_ms": 3.2, "achieved_per_s": 600},
            "baseline": [_point(250, p50=2.0, p99=6.0, per_s=250, writes=1)],
            "floor_unloaded": {**unloaded, "p50_ms": 0.2, "p99_ms": 0.4, "achieved_per_s": 4000},
            "floor": [_point(250, p50=0.25, p99=0.5, per_s=250, writes=0)],
        },
    )
    rendered = render_benchmarks_md(tmp_path)
    side_by_side = _rows(rendered, "unloaded (1 connection)")[0]
    assert side_by_side == [
        "unloaded (1 connection)",
        "1200 · 600 · 4000",
        "0.80 · 1.60 · 0.20",
        "1.60 · 3.20 · 0.40",
        "0.5 · 0.5 · —",
        "4 · 4",
    ]
    assert _rows(rendered, "250")[0] == [
        "250",
        "250 · 250 · 250",
        "1.00 · 2.00 · 0.25",
        "3.00 · 6.00 · 0.50",
        "0.5 · 0.5 · 0",
        "4 · 6",
    ]
    # And each server's own table, the unloaded point first.
    assert len(_rows(rendered, "unloaded (1 connection)")) == 1 + 3
    assert "\nfloor:\n" in rendered and "\npostgres-direct:\n" in rendered


def test_results_from_before_the_floor_still_render(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "scenario": "check",
            "users": 10,
            "points": [_point(250, p50=1.0, p99=3.0, per_s=250, writes=0)],
            "baseline": [_point(250, p50=2.0, p99=6.0, per_s=250, writes=0)],
            "ratios": [{"offered_per_s": 250, "p99_ratio": 0.5, "db_write_ratio": None}],
        },
    )
    rendered = render_benchmarks_md(tmp_path)
    assert _rows(rendered, "250")[0] == [
        "250",
        "250 · 250 · —",
        "1.00 · 2.00 · —",
        "3.00 · 6.00 · —",
        "0.5 · 0.5 · —",
        "— · —",
    ]
    assert not _rows(rendered, "unloaded (1 connection)") and "\nfloor:\n" not in rendered


async def test_the_floor_answers_as_the_ledger_does_with_bodies_of_its_size(
    server: RunningServer, watched_floor: tuple[str, Watched]
) -> None:
    """Same statuses, ids where the flows look for them, and bodies within a factor of 2 of ours."""
    floor_url, _ = watched_floor
    user = new_user()
    sizes: dict[str, list[tuple[int, int]]] = {}
    for base_url in (server.base_url, floor_url):
        async with httpx.AsyncClient(base_url=base_url, headers=auth(user)) as http:
            usage = await http.get("/v1/usage")
            started = await http.post("/v1/sessions", json={"topic": "bench"})
            session = started.json()["session_id"]
            beat = await http.post(f"/v1/sessions/{session}/heartbeat", json={})
            ended = await http.post(f"/v1/sessions/{session}/end", json={})
            held = await http.post("/v1/holds", json={"meter": "generations", "amount": 2})
            captured = await http.post(f"/v1/holds/{held.json()['hold_id']}/capture", json={"amount": 1})
        answers = (usage, started, beat, ended, held, captured)
        sizes[base_url] = [(answer.status_code, len(answer.content)) for answer in answers]
    ours, floors = sizes[server.base_url], sizes[floor_url]
    assert (
        [status for status, _ in floors] == [status for status, _ in ours] == [200, 201, 200, 200, 201, 200]
    )
    for (_, mine), (_, theirs) in zip(ours, floors, strict=True):
        assert mine / 2 <= theirs <= mine * 2, (ours, floors)


async def test_the_flows_run_on_the_floor(watched_floor: tuple[str, Watched]) -> None:
    floor_url, watched = watched_floor
    result, _ = await _hold_flows(floor_url)  # the floor refuses nothing: every pair is captured
    assert result.errors == 0 and result.flows_cut_short == 0 and result.statuses == {200: 5}
    assert watched.requests == 10


async def test_the_unloaded_point_sends_one_request_at_a_time_over_one_connection(
    watched_floor: tuple[str, Watched],
) -> None:
    floor_url, watched = watched_floor
    requests = [
        http_request("GET", "/v1/usage"),
        http_request("POST", "/v1/sessions/x/heartbeat", body=b"{}"),
    ]
    work = LoadSpec(host="127.0.0.1", port=_port(floor_url), requests=requests, rate_per_s=1, duration_s=60)
    result = await asyncio.to_thread(run_load, UnloadedSpec(work, duration_s=0.5, warmup_s=0.2))
    assert watched.in_flight_max == 1 and len(watched.connections) == 1
    assert result.errors == 0 and result.completed > 0 and result.statuses == {200: result.completed}
    assert watched.requests > result.completed, "the warm-up's requests are not counted"
    summary = result.summary()
    assert "offered_per_s" not in summary and summary["closed_loop_connections"] == 1
    assert summary["achieved_per_s"] == round(result.completed / result.duration_s, 1)
    assert 0.5 <= result.duration_s < 5, "as long as asked, to the last answer"

    # Flows, one after another, each step as soon as the last answered: a pair is one request.
    pairs: list[tuple[Step, ...]] = [
        reserve_and_capture(auth(new_user()), meter="generations", amount=2, capture=1)
    ]
    flows = FlowSpec(
        host="127.0.0.1", port=_port(floor_url), flows=pairs, rate_per_s=1, duration_s=60, per_flow=True
    )
    before = watched.requests
    paired = await asyncio.to_thread(run_load, UnloadedSpec(flows, duration_s=0.3, warmup_s=0))
    assert paired.errors == 0 and paired.flows_cut_short == 0 and paired.statuses == {200: paired.completed}
    steps = paired.summary()["steps"]
    assert steps["reserve"]["requests"] == steps["capture"]["requests"] == paired.completed > 0
    assert watched.requests - before == 2 * paired.completed
    assert len(watched.connections) == 2 and watched.in_flight_max == 1


def test_the_floor_runs_in_a_process_of_its_own() -> None:
    with floor_server("postgresql://unused") as running:
        answer = httpx.get(f"{running.base_url}/v1/usage", timeout=10)
        assert answer.status_code == 200 and answer.content == floor.USAGE
        assert running.process.poll() is None
    assert running.process.poll() is not None, "stopped with its context"


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


def test_the_readmes_goals_are_the_ones_the_results_give(tmp_path: Path) -> None:
    unloaded = {**_point(0, p50=0.4, p99=1.0, per_s=2000, writes=0), "closed_loop_connections": 1}
    del unloaded["offered_per_s"]
    _write(
        tmp_path,
        {
            "scenario": "check",
            "users": 10,
            "unloaded": unloaded,
            "points": [_point(250, p50=1.0, p99=3.0, per_s=250, writes=0)],
            "baseline_unloaded": {**unloaded, "p50_ms": 1.0},
            "baseline": [_point(250, p50=2.0, p99=16.0, per_s=250, writes=1)],
        },
    )
    before = f"intro\n{README_GOALS_BEGIN}\n| stale | row |\n{README_GOALS_END}\nafter\n"
    rendered = render_readme(before, tmp_path)
    assert rendered.startswith(f"intro\n{README_GOALS_BEGIN}\n| goal |") and rendered.endswith(
        f"{README_GOALS_END}\nafter\n"
    )
    assert "stale" not in rendered
    assert _rows(rendered, "unloaded check p50")[0] == [
        "unloaded check p50",
        "0.4 ms",
        "1 ms",
        "0.4",
        "ratio ≤ 0.5 (met)",
    ]
    assert render_readme(rendered, tmp_path) == rendered
    # And the README on disk holds what the committed results give.
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert render_readme(readme) == readme, "run `python -m bench --regenerate`"
