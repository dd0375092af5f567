"""`python -m bench`: run the benchmark scenarios against a real server, write the results.

    .venv/bin/python -m bench                 # every scenario, the full rate sweep
    .venv/bin/python -m bench --short         # a quick look (a few minutes)
    .venv/bin/python -m bench check heartbeat # some scenarios

Each scenario starts a real `usage-ledger serve` (local Ray, its own embedded
Postgres), prepares its users through the HTTP API, measures the unloaded point
(one connection, one request at a time) and then offers constant-rate open-loop
load at each rate of the sweep from a separate process (`bench/loadgen.py`).
The HTTP scenarios run the same way on the postgres-direct baseline
(`bench/baseline.py`) and on the floor (`bench/floor.py`: uvicorn as `serve` runs
it, and an app that does nothing). It writes
`bench/results/<date>-<scenario>.json` and regenerates `BENCHMARKS.md` from the
newest result of each scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import client, replies, shards
from bench.loadgen import FlowSpec, LoadSpec, Step, UnloadedSpec, http_request, run_load
from bench.server import BenchServer, baseline_server, bench_database, bench_server, floor_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
README_MD = ROOT / "README.md"
# The analysis of the goals missed, written from profiles (not generated): copied after the goals.
WHERE_THE_TIME_GOES = ROOT / "bench" / "where_the_time_goes.md"


@dataclass(frozen=True)
class Sweep:
    rates: tuple[float, ...]
    seconds: float
    users: int
    settle_s: float  # after each rate, for the write-behind to catch up before writes are counted
    unloaded_s: float  # the unloaded point: one connection, one request at a time, this long


# Up to 8,000/s: past postgres-direct's saturation (~2,500/s here) and, for checks and heartbeats,
# past 3x it (issue 17's goal), so the highest achieved rate is each server's saturated throughput.
FULL = Sweep(
    rates=(250, 500, 1000, 2000, 3000, 4000, 6000, 8000), seconds=15, users=2000, settle_s=2, unloaded_s=5
)
SHORT = Sweep(rates=(250, 1000), seconds=4, users=500, settle_s=1, unloaded_s=3)


async def _prepare_users(
    server: BenchServer,
    users: list[str],
    *,
    start_sessions: bool,
    hold_meter: str | None = None,
    use_meter: str | None = None,
) -> dict[str, str]:
    """Make every user resident (and give each a session, or reserve and capture one of
    `hold_meter`, so that the meter is in use too, or use `use_meter` once, so that the user is
    written at the next flush); returns user -> session id."""
    sessions: dict[str, str] = {}
    # A connection idle for 2 s is not reused: the servers close theirs after 5 s idle
    # (`KEEPALIVE_S`), and a request sent just as one closes fails with a ReadError (which ended
    # a full run once, preparing postgres-direct's holds).
    limits = httpx.Limits(max_connections=32, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=60) as http:
        semaphore = asyncio.Semaphore(32)

        async def one(user: str) -> None:
            headers = _bearer(server, user)
            async with semaphore:
                (await http.get("/v1/usage", headers=headers)).raise_for_status()
                if start_sessions:
                    started = await http.post("/v1/sessions", json={"topic": "bench"}, headers=headers)
                    started.raise_for_status()
                    sessions[user] = started.json()["session_id"]
                if use_meter is not None:
                    used = await http.post(
                        f"/v1/meters/{use_meter}/consume", json={"amount": 1}, headers=headers
                    )
                    used.raise_for_status()
                if hold_meter is not None:
                    held = await http.post(
                        "/v1/holds", json={"meter": hold_meter, "amount": 1}, headers=headers
                    )
                    held.raise_for_status()
                    hold_id = held.json()["hold_id"]
                    captured = await http.post(f"/v1/holds/{hold_id}/capture", json={}, headers=headers)
                    captured.raise_for_status()

        await asyncio.gather(*(one(user) for user in users))
    return sessions


async def _write_transactions(database_url: str) -> int:
    """Transactions that have written to the database so far (its transaction-id counter: exact and
    immediate, unlike pg_stat_database, which idle connections report up to 10 s late). Reads are
    not counted: a baseline check is one read statement by construction, a ledger check none."""
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("select pg_current_xact_id()::text::bigint"))
    finally:
        await connection.close()


def _measure(server: BenchServer, spec: LoadSpec | FlowSpec | UnloadedSpec, sweep: Sweep) -> dict[str, Any]:
    """Run `spec`, counting the database's write transactions until the server has caught up."""
    before = asyncio.run(_write_transactions(server.database_url))
    result = run_load(spec)
    # Let the server's write-behind catch up, so its writes are counted against this run.
    time.sleep(sweep.settle_s)
    transactions = asyncio.run(_write_transactions(server.database_url)) - before - 1  # (ours)
    point = result.summary()
    point["db_write_transactions_per_1000"] = round(1000 * transactions / max(1, result.completed), 2)
    return point


def _print_point(label: str, point: dict[str, Any]) -> None:
    steps = "".join(
        f", {kind} p99 {figures['p99_ms']:.1f} ms" for kind, figures in point.get("steps", {}).items()
    )
    print(
        f"  {label}: {point['achieved_per_s']:>7.1f}/s done, "
        f"p50 {point['p50_ms']:.2f} ms, "
        f"p99 {point['p99_ms']:.2f} ms, p99.9 {point['p999_ms']:.2f} ms, "
        f"{point['ok']}/{point['requests']} 2xx, "
        f"{point['db_write_transactions_per_1000']} db writes/1000{steps}",
        flush=True,
    )


def _sweep(
    server: BenchServer,
    spec_for: Callable[[float], LoadSpec | FlowSpec],
    rates: tuple[float, ...],
    sweep: Sweep,
) -> list[dict[str, Any]]:
    """Offer each rate in turn (`spec_for(rate)` is what to send at it), counting DB writes."""
    points = []
    for rate in rates:
        point = _measure(server, spec_for(rate), sweep)
        points.append(point)
        _print_point(f"{rate:>6.0f}/s offered", point)
    return points


def _unloaded_and_sweep(
    server: BenchServer,
    spec_for: Callable[[float], LoadSpec | FlowSpec],
    rates: tuple[float, ...],
    sweep: Sweep,
) -> dict[str, Any]:
    """The unloaded point (what the sweep sends, one request at a time over one connection, closed
    loop), then the sweep: `{"unloaded": point, "points": [point per rate]}`."""
    unloaded = _measure(server, UnloadedSpec(spec_for(rates[0]), duration_s=sweep.unloaded_s), sweep)
    _print_point("unloaded (1 connection, closed loop)", unloaded)
    return {"unloaded": unloaded, "points": _sweep(server, spec_for, rates, sweep)}


def _constant(server: BenchServer, requests: list[bytes], sweep: Sweep) -> Callable[[float], LoadSpec]:
    return lambda rate: LoadSpec(
        host="127.0.0.1", port=server.port, requests=requests, rate_per_s=rate, duration_s=sweep.seconds
    )


def _bearer(server: BenchServer, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user)}"}


def scenario_check(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Credit checks (`GET /v1/usage`) of warm users."""
    users = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(sweep.users)]
    asyncio.run(_prepare_users(server, users, start_sessions=False))
    requests = [http_request("GET", "/v1/usage", headers=_bearer(server, user)) for user in users]
    return {
        "users": len(users),
        **_unloaded_and_sweep(server, _constant(server, requests, sweep), sweep.rates, sweep),
    }


def scenario_heartbeat(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Heartbeats across one running session per user."""
    users = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(sweep.users)]
    sessions = asyncio.run(_prepare_users(server, users, start_sessions=True))
    requests = [
        http_request(
            "POST",
            f"/v1/sessions/{sessions[user]}/heartbeat",
            headers=_bearer(server, user),
            body=b"{}",
        )
        for user in users
    ]
    measured = _unloaded_and_sweep(server, _constant(server, requests, sweep), sweep.rates, sweep)
    return {"users": len(users), "sessions": len(sessions), **measured}


SESSION_RATES_FULL: tuple[float, ...] = (100, 250, 500, 1000)
SESSION_RATES_SHORT: tuple[float, ...] = (100,)


def _users(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:12]}" for _ in range(count)]


def _flows(
    server: BenchServer, flows: list[tuple[Step, ...]], sweep: Sweep, *, per_flow: bool = False
) -> Callable[[float], FlowSpec]:
    return lambda rate: FlowSpec(
        host="127.0.0.1",
        port=server.port,
        flows=flows,
        rate_per_s=rate,
        duration_s=sweep.seconds,
        per_flow=per_flow,
    )


def _start_and_end(server: BenchServer, user: str, *, end_at_s: float) -> tuple[Step, Step]:
    headers = _bearer(server, user)
    return (
        Step(0, "start", http_request("POST", "/v1/sessions", headers=headers, body=b'{"topic":"bench"}')),
        Step(
            end_at_s, "end", http_request("POST", "/v1/sessions/{session}/end", headers=headers, body=b"{}")
        ),
    )


def scenario_session(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Session start then end (`POST /v1/sessions`, then `POST /v1/sessions/{id}/end` as soon as it
    answers): both are durable before they answer. Offered rate in sessions per second (two
    requests each); latency per request, from its due time."""
    rates = SESSION_RATES_SHORT if sweep is SHORT else SESSION_RATES_FULL
    # Enough users that one's next session starts well after its last one ended.
    users = _users("session", max(sweep.users, int(max(rates) * 10)))
    asyncio.run(_prepare_users(server, users, start_sessions=False))
    flows: list[tuple[Step, ...]] = [_start_and_end(server, user, end_at_s=0) for user in users]
    return {"users": len(users), **_unloaded_and_sweep(server, _flows(server, flows, sweep), rates, sweep)}


# The count meter `hold` reserves, with a limit no run comes near (bench/plans.toml), how much a
# pair reserves and how much of it it captures (an LLM call: its most, then what it cost).
HOLD_METER = "bench_tokens"
HOLD_AMOUNT = 1_000
HOLD_CAPTURE = 640
HOLD_RATES_FULL: tuple[float, ...] = SESSION_RATES_FULL
HOLD_RATES_SHORT: tuple[float, ...] = (100, 250)


def reserve_and_capture(
    headers: dict[str, str],
    *,
    meter: str = HOLD_METER,
    amount: int = HOLD_AMOUNT,
    capture: int = HOLD_CAPTURE,
) -> tuple[Step, Step]:
    """A hold of `amount` of `meter`, then the capture of `capture` of it as soon as it answers."""
    assert 0 <= capture <= amount
    hold = json.dumps({"meter": meter, "amount": amount}).encode()
    return (
        Step(0, "reserve", http_request("POST", "/v1/holds", headers=headers, body=hold)),
        Step(
            0,
            "capture",
            http_request(
                "POST",
                "/v1/holds/{hold}/capture",
                headers=headers,
                body=json.dumps({"amount": capture}).encode(),
            ),
        ),
    )


def scenario_hold(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Holds: reserve then capture (`POST /v1/holds` of 1,000 of a count meter, then `POST
    /v1/holds/{id}/capture` of 640 of it as soon as it answers), both durable before they answer,
    for warm users who have used the meter before. Offered rate in pairs per second; each pair is
    one request: its latency runs from its due time to the capture's answer, and DB write
    transactions are per 1,000 pairs."""
    rates = HOLD_RATES_SHORT if sweep is SHORT else HOLD_RATES_FULL
    # As for sessions: enough users that each pair is a user's only one for a while (the free
    # plan's rate limit is 5 requests/s a user).
    users = _users("hold", max(sweep.users, int(max(rates) * 10)))
    asyncio.run(_prepare_users(server, users, start_sessions=False, hold_meter=HOLD_METER))
    flows: list[tuple[Step, ...]] = [reserve_and_capture(_bearer(server, user)) for user in users]
    measured = _unloaded_and_sweep(server, _flows(server, flows, sweep, per_flow=True), rates, sweep)
    return {"users": len(users), **measured}


MIXED_HEARTBEATS = 10  # a session of ten heartbeats, the 30 s cadence compressed to 1 s
MIXED_RATES_FULL: tuple[float, ...] = (25, 50, 100, 200)
MIXED_RATES_SHORT: tuple[float, ...] = (25,)


def _voice_client(server: BenchServer, user: str) -> tuple[Step, ...]:
    """Start, a heartbeat every second, a usage check after every fifth, end."""
    headers = _bearer(server, user)
    start, end = _start_and_end(server, user, end_at_s=MIXED_HEARTBEATS + 0.5)
    beat = http_request("POST", "/v1/sessions/{session}/heartbeat", headers=headers, body=b"{}")
    check = http_request("GET", "/v1/usage", headers=headers)
    steps = [start]
    for second in range(1, MIXED_HEARTBEATS + 1):
        steps.append(Step(second, "heartbeat", beat))
        if second % 5 == 0:
            steps.append(Step(second + 0.25, "usage", check))
    return (*steps, end)


def scenario_mixed(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Voice clients: each starts a session, heartbeats every second (the 30 s cadence compressed),
    checks its usage after every fifth heartbeat and ends after ten: 14 requests over 10.5 s.
    Offered rate in clients started per second; at 100/s about 1,000 sessions are live at once
    and the server sees about 1,300 requests/s."""
    rates = MIXED_RATES_SHORT if sweep is SHORT else MIXED_RATES_FULL
    users = _users("voice", int(max(rates) * (MIXED_HEARTBEATS + 3) * 1.2))
    asyncio.run(_prepare_users(server, users, start_sessions=False))
    flows = [_voice_client(server, user) for user in users]
    return {"users": len(users), **_unloaded_and_sweep(server, _flows(server, flows, sweep), rates, sweep)}


ACTIVATION_RATES_FULL: tuple[float, ...] = (250, 500, 1000)
ACTIVATION_RATES_SHORT: tuple[float, ...] = (250, 500)


def scenario_activation(database_url: str, short: bool, shards: int) -> dict[str, Any]:
    """Cold activation: each request is the first since a restart for a user who exists only in
    Postgres (created through a first server, each user with one meter use, so that the server's
    last flush writes them, then stopped)."""
    sweep = SHORT if short else FULL
    rates = ACTIVATION_RATES_SHORT if short else ACTIVATION_RATES_FULL
    cohorts = {
        rate: [f"cold-{uuid.uuid4().hex[:12]}" for _ in range(int(rate * sweep.seconds))] for rate in rates
    }
    with bench_server(database_url, shards=str(shards)) as first:
        for users in cohorts.values():
            asyncio.run(_prepare_users(first, users, start_sessions=False, use_meter=HOLD_METER))
    with bench_server(database_url, shards=str(shards), sync_interval_s="5") as server:

        def spec(rate: float) -> LoadSpec:  # each user once: every request activates
            requests = [
                http_request("GET", "/v1/usage", headers=_bearer(server, user)) for user in cohorts[rate]
            ]
            return _constant(server, requests, sweep)(rate)

        points = _sweep(server, spec, rates, sweep)
    return {"users": sum(len(users) for users in cohorts.values()), "points": points}


# Scenarios that start their own servers or shards (no postgres-direct counterpart: the baseline's
# every check already reads Postgres, so its `check` figures are the comparison); each is given the
# database, whether the run is short, and the number of shards.
STANDALONE: dict[str, Callable[[str, bool, int], dict[str, Any]]] = {
    "activation": scenario_activation,
    "memory": shards.scenario_memory,
    "restart": shards.scenario_restart,
    "actors": shards.scenario_actors,
    "client": client.scenario_client,
    "replies": replies.scenario_replies,
}
# What `--short` runs besides the HTTP scenarios (the others take minutes each on their own).
SHORT_STANDALONE = ("memory",)

SCENARIOS: dict[str, Callable[[BenchServer, Sweep], dict[str, Any]]] = {
    "check": scenario_check,
    "heartbeat": scenario_heartbeat,
    "session": scenario_session,
    "mixed": scenario_mixed,
    "hold": scenario_hold,
}


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_result(scenario: str, body: dict[str, Any], *, short: bool) -> Path:
    """`bench/results/<date>-<scenario>.json`; a short run's go to `bench/results/short/`, so a
    quick look never replaces the full figures BENCHMARKS.md is made from."""
    directory = RESULTS / "short" if short else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    document = {
        "scenario": scenario,
        "doc": " ".join((({**SCENARIOS, **STANDALONE})[scenario].__doc__ or "").split()),
        "at": now.isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": _machine(),
        "short": short,
        **body,
    }
    path = directory / f"{now:%Y-%m-%d}-{scenario}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


Point = dict[str, Any]


def point_ratios(ours: Point, baseline: Point | None = None, floor: Point | None = None) -> dict[str, Any]:
    """Our p50, p99 and throughput as fractions of postgres-direct's (`*_ratio`, and DB write
    transactions) and of the floor's (`*_floor_ratio`), at one point; None where not measured."""
    ratios: dict[str, Any] = {}
    for suffix, theirs in (("ratio", baseline), ("floor_ratio", floor)):
        for figure, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("per_s", "achieved_per_s")):
            ratios[f"{figure}_{suffix}"] = None if theirs is None else _ratio(ours[key], theirs[key])
    writes = "db_write_transactions_per_1000"
    ratios["db_write_ratio"] = None if baseline is None else _ratio(ours[writes], baseline[writes])
    return ratios


def compare(
    ours: list[Point], baseline: list[Point] | None = None, *, floor: list[Point] | None = None
) -> list[dict[str, Any]]:
    """Per offered rate we ran: our figures as fractions of the baseline's and of the floor's
    (`point_ratios`), None where the other server did not run that rate."""
    baseline_at = {point["offered_per_s"]: point for point in baseline or ()}
    floor_at = {point["offered_per_s"]: point for point in floor or ()}
    return [
        {
            "offered_per_s": point["offered_per_s"],
            **point_ratios(
                point, baseline_at.get(point["offered_per_s"]), floor_at.get(point["offered_per_s"])
            ),
        }
        for point in ours
    ]


UNLOADED_LABEL = "unloaded (1 connection)"


def _table(points: list[Point], unloaded: Point | None = None) -> list[str]:
    lines = [
        "| offered /s | done /s | p50 ms | p99 ms | p99.9 ms | 2xx | errors | DB write tx per 1000 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = ([(UNLOADED_LABEL, unloaded)] if unloaded else []) + [
        (f"{point['offered_per_s']:.0f}", point) for point in points
    ]
    for label, point in rows:
        lines.append(
            f"| {label} | {point['achieved_per_s']:.0f} | {point['p50_ms']:.2f} | "
            f"{point['p99_ms']:.2f} | {point['p999_ms']:.2f} | {point['ok']}/{point['requests']} | "
            f"{point['errors']} | {point['db_write_transactions_per_1000']} |"
        )
    return lines


MISSING = "—"  # a server, a point or a figure this result does not have (e.g. older runs: no floor)


def _cell(values: list[Any], form: str) -> str:
    return " · ".join(MISSING if value is None else format(value, form) for value in values)


def _side_by_side(document: dict[str, Any]) -> list[str]:
    """Ours, postgres-direct and the floor at each point (the unloaded one first), and the ratios."""
    ours: list[Point] = document["points"]
    baseline_at = {point["offered_per_s"]: point for point in document.get("baseline") or ()}
    floor_at = {point["offered_per_s"]: point for point in document.get("floor") or ()}
    rows: list[tuple[str, Point | None, Point | None, Point | None]] = []
    if document.get("unloaded"):
        unloaded = document.get("baseline_unloaded"), document.get("floor_unloaded")
        rows.append((UNLOADED_LABEL, document["unloaded"], *unloaded))
    rows += [
        (
            f"{point['offered_per_s']:.0f}",
            point,
            baseline_at.get(point["offered_per_s"]),
            floor_at.get(point["offered_per_s"]),
        )
        for point in ours
    ]
    lines = [
        "| offered /s | done /s: ours · postgres-direct · floor | p50 ms: ours · postgres-direct · floor "
        "| p99 ms: ours · postgres-direct · floor | ours / postgres-direct: p50 · p99 · DB writes "
        "| ours / floor: p50 · p99 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, *servers in rows:
        mine = servers[0]
        assert mine is not None
        ratios = point_ratios(mine, servers[1], servers[2])

        def figures(key: str, servers: list[Point | None] = servers) -> list[Any]:
            return [None if point is None else point[key] for point in servers]

        lines.append(
            f"| {label} | {_cell(figures('achieved_per_s'), '.0f')} | {_cell(figures('p50_ms'), '.2f')} "
            f"| {_cell(figures('p99_ms'), '.2f')} "
            f"| {_cell([ratios['p50_ratio'], ratios['p99_ratio'], ratios['db_write_ratio']], '.3g')} "
            f"| {_cell([ratios['p50_floor_ratio'], ratios['p99_floor_ratio']], '.3g')} |"
        )
    return lines


PLOTTED = ("check", "heartbeat", "session", "mixed", "hold")
PLOT = "latency.png"


def plot_latency() -> Path | None:
    """A PNG of p50 and p99 latency against offered load, ours, the baseline's and the floor's, one
    panel per scenario with a baseline (newest results); None without matplotlib (`pip install -e
    '.[bench]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no latency plot: matplotlib is not installed; pip install -e '.[bench]')", flush=True)
        return None
    newest = _newest_results()
    shown = [name for name in PLOTTED if newest.get(name, {}).get("baseline")]
    if not shown:
        return None
    figure, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for axis, name in zip(axes[0], shown, strict=True):
        document = newest[name]
        for label, points, colour in (
            ("usage-ledger", document["points"], "tab:blue"),
            ("postgres-direct", document["baseline"], "tab:orange"),
            ("floor", document.get("floor") or [], "tab:green"),
        ):
            if not points:
                continue
            rates = [point["offered_per_s"] for point in points]
            axis.plot(rates, [point["p99_ms"] for point in points], "o-", color=colour, label=f"{label} p99")
            axis.plot(rates, [point["p50_ms"] for point in points], "x--", color=colour, label=f"{label} p50")
        axis.set_yscale("log")
        axis.set_title(name)
        unit = {"session": " (sessions)", "mixed": " (sessions)", "hold": " (reserve + capture pairs)"}
        axis.set_xlabel("offered per second" + unit.get(name, ""))
        axis.set_ylabel("latency, ms (log)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(f"Latency against offered load ({_machine()})")
    figure.tight_layout()
    path = RESULTS / PLOT
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _newest_results(directory: Path = RESULTS) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        document = json.loads(path.read_text())
        newest[document["scenario"]] = document  # sorted by date: the last one wins
    return newest


def render_benchmarks_md(results: Path = RESULTS) -> str:
    """BENCHMARKS.md from the newest result file of each scenario in `results`."""
    newest = _newest_results(results)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` from `bench/results/` (the newest result of each scenario);",
        "do not edit by hand. Open-loop constant-rate load from a separate process; latency is",
        "measured from each request's scheduled time. The server, Ray, Postgres and the load",
        "generator share the machine. *postgres-direct* is the baseline (`bench/baseline.py`): the",
        "same endpoints and gateway stack, every request one Postgres statement, run right after.",
        "The *floor* (`bench/floor.py`) is uvicorn configured as `usage-ledger serve` runs it, with a",
        "bare ASGI app that answers each request with a fixed body of the same size: what HTTP and",
        "the load generator cost on this machine, below which no server of ours can go. The",
        "*unloaded* row is one connection sending one request at a time, each as soon as the last",
        "answered, for a few seconds: one request's cost on an idle server (with a flow, its steps",
        "back to back). `—`: not measured (older results have no floor and no unloaded row).",
        "",
        *(
            [f"![latency against offered load](bench/results/{PLOT})", ""]
            if (results / PLOT).exists()
            else []
        ),
    ]
    lines += _goals(newest)
    if WHERE_THE_TIME_GOES.exists():
        lines += [WHERE_THE_TIME_GOES.read_text().rstrip(), ""]
    for scenario, document in newest.items():
        lines += [
            f"## {scenario}: {document['doc']}",
            "",
            f"{document['at']}, commit `{document['commit']}`, {document['machine']}, "
            f"{document.get('users', '?')} users{' (short run)' if document.get('short') else ''}.",
            "",
        ]
        if document.get("rows"):
            columns = list(document["rows"][0])
            lines += [
                "| " + " | ".join(column.replace("_", " ") for column in columns) + " |",
                "| " + " | ".join("---:" for _ in columns) + " |",
                *("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in document["rows"]),
                "",
            ]
            continue
        if scenario in SCENARIOS:  # served over HTTP: side by side with the baseline and the floor
            lines += [*_side_by_side(document), ""]
        lines += ["usage-ledger:", "", *_table(document["points"], document.get("unloaded")), ""]
        for key, name in (("baseline", "postgres-direct"), ("floor", "floor")):
            if document.get(key):
                lines += [f"{name}:", "", *_table(document[key], document.get(f"{key}_unloaded")), ""]
            elif document.get(f"{key}_failed"):
                lines += [f"{name}: not measured in this run (`{document[f'{key}_failed']}`).", ""]
    return "\n".join(lines)


P99_BOUND_MS = 10.0


def _goals(newest: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 17's goals, each with its figure from the newest results, the ratio, and whether it holds."""
    rows: list[tuple[str, str, str, str, str]] = []

    def add(
        goal: str, ours: float | None, theirs: float | None, unit: str, bound: str, holds: bool | None
    ) -> None:
        ratio = _ratio(ours, theirs) if ours is not None and theirs else None
        verdict = "—" if holds is None else ("met" if holds else "missed")
        figure = "—" if ours is None else f"{ours:g} {unit}"
        against = "—" if theirs is None else f"{theirs:g} {unit}"
        rows.append(
            (goal, figure, against, f"{ratio:g}" if ratio is not None else "—", f"{bound} ({verdict})")
        )

    for scenario in ("check", "heartbeat"):
        document = newest.get(scenario, {})
        ours, theirs = document.get("unloaded"), document.get("baseline_unloaded")
        if ours and theirs:
            add(
                f"unloaded {scenario} p50",
                ours["p50_ms"],
                theirs["p50_ms"],
                "ms",
                "ratio ≤ 0.5",
                ours["p50_ms"] <= theirs["p50_ms"] / 2,
            )
        points, baseline = document.get("points", []), document.get("baseline", [])
        if points and baseline:
            best, their_best = _saturated(points), _saturated(baseline)
            add(
                f"sustained {scenario} throughput (the highest rate with p99 ≤ {SUSTAINED_P99_MS:g} ms)",
                best,
                their_best,
                "/s",
                "ratio ≥ 3",
                best >= 3 * their_best,
            )
            passing = [point for point in baseline if point["p99_ms"] > P99_BOUND_MS]
            if passing:
                rate = passing[0]["offered_per_s"]
                at = next((point for point in points if point["offered_per_s"] == rate), None)
                if at is not None:
                    add(
                        f"{scenario} p99 at {rate:g}/s, where postgres-direct's first passes 10 ms",
                        at["p99_ms"],
                        passing[0]["p99_ms"],
                        "ms",
                        "ours ≤ 10 ms",
                        at["p99_ms"] <= P99_BOUND_MS,
                    )
    check = newest.get("check", {})
    ours_1000 = next((p for p in check.get("points", []) if p["offered_per_s"] == 1000), None)
    theirs_1000 = next((p for p in check.get("baseline", []) if p["offered_per_s"] == 1000), None)
    if ours_1000 and theirs_1000:
        add(
            "check p99 at 1,000/s",
            ours_1000["p99_ms"],
            theirs_1000["p99_ms"],
            "ms",
            "ratio ≤ 0.33",
            ours_1000["p99_ms"] <= theirs_1000["p99_ms"] / 3,
        )
    restart = (newest.get("restart", {}).get("rows") or [{}])[0]
    if "flush_users_per_s" in restart:
        add(
            "flush",
            restart["flush_users_per_s"],
            None,
            "users/s",
            "≥ 100,000",
            restart["flush_users_per_s"] >= 100_000,
        )
    if "restart_first_answer_s" in restart:
        add(
            "a killed shard serves again",
            restart["restart_first_answer_s"],
            None,
            "s",
            "≤ 5 s",
            restart["restart_first_answer_s"] <= 5,
        )
    at_500 = next(
        (p for p in newest.get("activation", {}).get("points", []) if p["offered_per_s"] == 500), None
    )
    if at_500:
        add("cold activation p99 at 500/s", at_500["p99_ms"], None, "ms", "≤ 20 ms", at_500["p99_ms"] <= 20)
    memory = newest.get("memory", {}).get("rows") or []
    if memory:
        largest = max(memory, key=lambda row: row["users"])
        add(
            f"memory per resident user ({largest['users']:,} users)",
            largest["bytes_per_user"],
            None,
            "bytes",
            "≤ 1,024",
            largest["bytes_per_user"] <= 1024,
        )
    if not rows:
        return []
    return [
        "## Issue 17's goals",
        "",
        "Each figure from the newest result of its scenario (below); the ratio is ours / postgres-direct.",
        "",
        *_goals_table(rows),
        "",
    ]


def _goals_table(rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    return [
        "| goal | usage-ledger | postgres-direct | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]


README_GOALS_BEGIN = "<!-- goals: generated by `python -m bench` from bench/results/ -->"
README_GOALS_END = "<!-- /goals -->"


def render_readme(readme: str, results: Path = RESULTS) -> str:
    """`readme` with the goals table between its markers regenerated from the newest results."""
    begin, end = readme.index(README_GOALS_BEGIN), readme.index(README_GOALS_END)
    table = _goals(_newest_results(results))[4:-1]  # the table alone, without heading and blank lines
    return readme[: begin + len(README_GOALS_BEGIN)] + "\n" + "\n".join(table) + "\n" + readme[end:]


# Past its saturation a server queues without bound under open-loop load: its p99 grows with the
# length of the run (seconds, not milliseconds). The highest rate it kept under this is what it
# sustains.
SUSTAINED_P99_MS = 100.0


def _saturated(points: list[dict[str, Any]]) -> float:
    """The highest offered rate a server sustained over a sweep: every answer a 2xx, p99 ≤
    `SUSTAINED_P99_MS` (0 if none)."""
    kept = [
        p["offered_per_s"]
        for p in points
        if p["errors"] == 0 and p["ok"] == p["requests"] and p["p99_ms"] <= SUSTAINED_P99_MS
    ]
    return float(max(kept, default=0.0))


OTHER_SERVERS = {  # result key -> the name printed, and how to start it on the run's database
    "baseline": ("postgres-direct", baseline_server),
    "floor": ("the floor", floor_server),
}


def run_over_http(
    scenarios: list[str], sweep: Sweep, *, shards: int, baseline: bool, floor: bool, short: bool
) -> None:
    """The HTTP scenarios on one database: each on our server, then each on postgres-direct, then
    each on the floor (one server of each for the whole run: starting Ray and the shards is most of
    a short run)."""
    bodies: dict[str, dict[str, Any]] = {}
    others = [key for key, wanted in (("baseline", baseline), ("floor", floor)) if wanted]
    with bench_database() as database_url:
        # Flushes every 5 s rather than the default 30 s, so each measured window holds some
        # (the default would only make the ledger's DB transactions per request fewer still).
        with bench_server(database_url, shards=str(shards), sync_interval_s="5") as server:
            for scenario in scenarios:
                run = SCENARIOS[scenario]
                print(f"{scenario}: {(run.__doc__ or '').strip()}", flush=True)
                bodies[scenario] = run(server, sweep)
        for key in others:
            name, start = OTHER_SERVERS[key]
            with start(database_url) as other:
                for scenario in scenarios:
                    print(f"{scenario}, {name}:", flush=True)
                    try:
                        measured = SCENARIOS[scenario](other, sweep)
                    except Exception as exc:  # ours are measured: keep them, say what is missing
                        print(f"  {name} failed: {exc!r}; the result has none of its figures", flush=True)
                        bodies[scenario][f"{key}_failed"] = repr(exc)
                        continue
                    bodies[scenario][key] = measured["points"]
                    bodies[scenario][f"{key}_unloaded"] = measured["unloaded"]
    for scenario, body in bodies.items():
        if others:
            body["ratios"] = compare(body["points"], body.get("baseline"), floor=body.get("floor"))
            body["unloaded_ratios"] = point_ratios(
                body["unloaded"], body.get("baseline_unloaded"), body.get("floor_unloaded")
            )
            _print_ratios(scenario, body)
        print(f"  -> {write_result(scenario, body, short=short)}", flush=True)


def _print_ratios(scenario: str, body: dict[str, Any]) -> None:
    """The run's ratios, one line per point: ours / postgres-direct and ours / floor."""

    def show(ratios: dict[str, Any], suffix: str) -> str:
        values = [(figure, ratios[f"{figure}_{suffix}"]) for figure in ("p50", "p99", "per_s")]
        return ", ".join(
            f"{figure} {MISSING if value is None else format(value, '.3g')}" for figure, value in values
        )

    print(f"{scenario}: ours / postgres-direct; ours / floor", flush=True)
    named = [("unloaded", body["unloaded_ratios"])]
    named += [(f"{ratios['offered_per_s']:.0f}/s", ratios) for ratios in body["ratios"]]
    for label, ratios in named:
        print(f"  {label:>9}: {show(ratios, 'ratio')}; {show(ratios, 'floor_ratio')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark a real usage-ledger server."
    )
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, *STANDALONE, []], help="default: all")
    parser.add_argument(
        "--short",
        action="store_true",
        help="a quick look, a few minutes: fewer rates, shorter runs, the HTTP scenarios and memory",
    )
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the postgres-direct runs")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor's runs (bare uvicorn)")
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="run nothing: rewrite BENCHMARKS.md, the plot and the README's goals from bench/results/",
    )
    args = parser.parse_args()
    if args.regenerate:
        write_reports()
        return
    sweep = SHORT if args.short else FULL
    chosen = args.scenarios or [*SCENARIOS, *(SHORT_STANDALONE if args.short else STANDALONE)]
    over_http = [scenario for scenario in chosen if scenario in SCENARIOS]
    if over_http:
        run_over_http(
            over_http,
            sweep,
            shards=args.shards,
            baseline=not args.no_baseline,
            floor=not args.no_floor,
            short=args.short,
        )
    for scenario in chosen:
        if scenario in STANDALONE:
            print(f"{scenario}: {(STANDALONE[scenario].__doc__ or '').strip()}", flush=True)
            with bench_database() as database_url:
                body = STANDALONE[scenario](database_url, args.short, args.shards)
            print(f"  -> {write_result(scenario, body, short=args.short)}", flush=True)
    if args.short:
        return  # a quick look: BENCHMARKS.md and the plot show full runs only
    write_reports()


def write_reports() -> None:
    """BENCHMARKS.md, the plot and the README's goals table, from the newest full results."""
    plot_latency()
    BENCHMARKS_MD.write_text(render_benchmarks_md())
    README_MD.write_text(render_readme(README_MD.read_text()))
    print(f"wrote {BENCHMARKS_MD} and the goals in {README_MD}")


if __name__ == "__main__":
    main()
