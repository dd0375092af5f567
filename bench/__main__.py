"""`python -m bench`: run the benchmark scenarios against a real server, write the results.

    .venv/bin/python -m bench                 # every scenario, the full rate sweep
    .venv/bin/python -m bench --short         # a quick look (under 3 minutes)
    .venv/bin/python -m bench check heartbeat # some scenarios

Each scenario starts a real `usage-ledger serve` (local Ray, its own embedded
Postgres), prepares its users through the HTTP API, then offers constant-rate
open-loop load at each rate of the sweep from a separate process
(`bench/loadgen.py`). It writes `bench/results/<date>-<scenario>.json` and
regenerates `BENCHMARKS.md` from the newest result of each scenario.
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

from bench.loadgen import LoadSpec, http_request, run_load
from bench.server import BenchServer, baseline_server, bench_database, bench_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


@dataclass(frozen=True)
class Sweep:
    rates: tuple[float, ...]
    seconds: float
    users: int


FULL = Sweep(rates=(250, 500, 1000, 2000, 3000, 4000), seconds=15, users=2000)
SHORT = Sweep(rates=(250, 1000, 2000), seconds=6, users=500)


async def _prepare_users(server: BenchServer, users: list[str], *, start_sessions: bool) -> dict[str, str]:
    """Make every user resident (and give each a session); returns user -> session id."""
    sessions: dict[str, str] = {}
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=60) as http:
        semaphore = asyncio.Semaphore(32)

        async def one(user: str) -> None:
            headers = {"Authorization": f"Bearer {server.token(user)}"}
            async with semaphore:
                (await http.get("/v1/usage", headers=headers)).raise_for_status()
                if start_sessions:
                    started = await http.post("/v1/sessions", json={"topic": "bench"}, headers=headers)
                    started.raise_for_status()
                    sessions[user] = started.json()["session_id"]

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


def _sweep(
    server: BenchServer,
    requests: list[bytes] | Callable[[float], list[bytes]],
    sweep: Sweep,
    rates: tuple[float, ...] | None = None,
) -> list[dict[str, Any]]:
    """Offer each rate in turn; `requests` may depend on the rate (its own users, say)."""
    points = []
    for rate in rates or sweep.rates:
        before = asyncio.run(_write_transactions(server.database_url))
        result = run_load(
            LoadSpec(
                host="127.0.0.1",
                port=server.port,
                requests=requests(rate) if callable(requests) else requests,
                rate_per_s=rate,
                duration_s=sweep.seconds,
            )
        )
        # Let the server's write-behind catch up, so its writes are counted against this rate.
        time.sleep(2)
        transactions = asyncio.run(_write_transactions(server.database_url)) - before - 1  # (ours)
        point = result.summary()
        point["db_write_transactions_per_1000"] = round(1000 * transactions / max(1, result.completed), 2)
        points.append(point)
        print(
            f"  {rate:>6.0f}/s offered: {point['achieved_per_s']:>7.1f}/s done, "
            f"p50 {point['p50_ms']:.2f} ms, "
            f"p99 {point['p99_ms']:.2f} ms, p99.9 {point['p999_ms']:.2f} ms, "
            f"{point['ok']}/{point['requests']} 2xx, "
            f"{point['db_write_transactions_per_1000']} db writes/1000",
            flush=True,
        )
    return points


def scenario_check(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Credit checks (`GET /v1/usage`) of warm users."""
    users = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(sweep.users)]
    asyncio.run(_prepare_users(server, users, start_sessions=False))
    requests = [
        http_request("GET", "/v1/usage", headers={"Authorization": f"Bearer {server.token(user)}"})
        for user in users
    ]
    return {"users": len(users), "points": _sweep(server, requests, sweep)}


def scenario_heartbeat(server: BenchServer, sweep: Sweep) -> dict[str, Any]:
    """Heartbeats across one running session per user."""
    users = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(sweep.users)]
    sessions = asyncio.run(_prepare_users(server, users, start_sessions=True))
    requests = [
        http_request(
            "POST",
            f"/v1/sessions/{sessions[user]}/heartbeat",
            headers={"Authorization": f"Bearer {server.token(user)}"},
            body=b"{}",
        )
        for user in users
    ]
    return {"users": len(users), "sessions": len(sessions), "points": _sweep(server, requests, sweep)}


ACTIVATION_RATES_FULL: tuple[float, ...] = (250, 500, 1000)
ACTIVATION_RATES_SHORT: tuple[float, ...] = (250, 500)


def scenario_activation(database_url: str, sweep: Sweep, shards: int) -> dict[str, Any]:
    """Cold activation: each request is the first since a restart for a user who exists only in
    Postgres (created through a first server, which is then stopped)."""
    rates = ACTIVATION_RATES_SHORT if sweep is SHORT else ACTIVATION_RATES_FULL
    cohorts = {
        rate: [f"cold-{uuid.uuid4().hex[:12]}" for _ in range(int(rate * sweep.seconds))] for rate in rates
    }
    with bench_server(database_url, shards=str(shards)) as first:
        for users in cohorts.values():
            asyncio.run(_prepare_users(first, users, start_sessions=False))
    with bench_server(database_url, shards=str(shards), sync_interval_s="5") as server:

        def requests(rate: float) -> list[bytes]:  # each user once: every request activates
            return [
                http_request("GET", "/v1/usage", headers={"Authorization": f"Bearer {server.token(user)}"})
                for user in cohorts[rate]
            ]

        points = _sweep(server, requests, sweep, rates)
    return {"users": sum(len(users) for users in cohorts.values()), "points": points}


MEMORY_USERS_FULL = (10_000, 100_000)
MEMORY_USERS_SHORT = (10_000,)
MEMORY_FILL_RATE_PER_S = 1_000.0


def _shard_rss_bytes() -> int:
    """Resident memory of the machine's shard processes (`ray::_HostedShard`), from /proc (Linux):
    the benchmark's server is the only one running."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"_HostedShard" not in (proc / "cmdline").read_bytes():
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def scenario_memory(database_url: str, sweep: Sweep, shards: int) -> dict[str, Any]:
    """Resident memory per idle user: shard RSS grown by making N users resident (one check each,
    then idle), divided by N."""
    counts = MEMORY_USERS_SHORT if sweep is SHORT else MEMORY_USERS_FULL
    points = []
    for count in counts:
        with bench_server(database_url, shards=str(shards)) as server:
            users = [f"idle-{uuid.uuid4().hex[:12]}" for _ in range(count)]
            requests = [
                http_request("GET", "/v1/usage", headers={"Authorization": f"Bearer {server.token(user)}"})
                for user in users
            ]
            time.sleep(2)
            before = _shard_rss_bytes()
            result = run_load(
                LoadSpec(
                    host="127.0.0.1",
                    port=server.port,
                    requests=requests,
                    rate_per_s=MEMORY_FILL_RATE_PER_S,
                    duration_s=count / MEMORY_FILL_RATE_PER_S,
                )
            )
            time.sleep(2)
            after = _shard_rss_bytes()
            point = {
                "users": count,
                "resident": result.statuses.get(200, 0),
                "shard_rss_before_mb": round(before / 2**20, 1),
                "shard_rss_after_mb": round(after / 2**20, 1),
                "bytes_per_user": round((after - before) / max(1, result.statuses.get(200, 0))),
            }
            points.append(point)
            print(
                f"  {count} users: {point['resident']} resident, shard RSS {point['shard_rss_before_mb']} -> "
                f"{point['shard_rss_after_mb']} MB, {point['bytes_per_user']} bytes per user",
                flush=True,
            )
    return {"users": max(counts), "memory": points}


# Scenarios that start their own servers (no postgres-direct counterpart: the baseline's every
# check already reads Postgres, so its `check` figures are the comparison).
STANDALONE: dict[str, Callable[[str, Sweep, int], dict[str, Any]]] = {
    "activation": scenario_activation,
    "memory": scenario_memory,
}

SCENARIOS: dict[str, Callable[[BenchServer, Sweep], dict[str, Any]]] = {
    "check": scenario_check,
    "heartbeat": scenario_heartbeat,
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
    RESULTS.mkdir(parents=True, exist_ok=True)
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
    path = RESULTS / f"{now:%Y-%m-%d}-{scenario}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def compare(ours: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per offered rate: our p99 and DB transactions as fractions of the baseline's."""
    by_rate = {point["offered_per_s"]: point for point in baseline}
    ratios = []
    for point in ours:
        theirs = by_rate.get(point["offered_per_s"])
        if theirs is None:
            continue
        ratios.append(
            {
                "offered_per_s": point["offered_per_s"],
                "p99_ratio": _ratio(point["p99_ms"], theirs["p99_ms"]),
                "db_write_ratio": _ratio(
                    point["db_write_transactions_per_1000"], theirs["db_write_transactions_per_1000"]
                ),
            }
        )
    return ratios


def _table(points: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| offered /s | done /s | p50 ms | p99 ms | p99.9 ms | 2xx | errors | DB write tx per 1000 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for point in points:
        lines.append(
            f"| {point['offered_per_s']:.0f} | {point['achieved_per_s']:.0f} | {point['p50_ms']:.2f} | "
            f"{point['p99_ms']:.2f} | {point['p999_ms']:.2f} | {point['ok']}/{point['requests']} | "
            f"{point['errors']} | {point['db_write_transactions_per_1000']} |"
        )
    return lines


def render_benchmarks_md() -> str:
    """BENCHMARKS.md from the newest result file of each scenario."""
    newest: dict[str, dict[str, Any]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        document = json.loads(path.read_text())
        newest[document["scenario"]] = document  # sorted by date: the last one wins
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` from `bench/results/` (the newest result of each scenario);",
        "do not edit by hand. Open-loop constant-rate load from a separate process; latency is",
        "measured from each request's scheduled time. The server, Ray, Postgres and the load",
        "generator share the machine. *postgres-direct* is the baseline (`bench/baseline.py`): the",
        "same endpoints and gateway stack, every request one Postgres statement, run right after.",
        "",
    ]
    for scenario, document in newest.items():
        lines += [
            f"## {scenario}: {document['doc']}",
            "",
            f"{document['at']}, commit `{document['commit']}`, {document['machine']}, "
            f"{document.get('users', '?')} users{' (short run)' if document.get('short') else ''}.",
            "",
        ]
        if document.get("memory"):
            lines += [
                "| users | resident | shard RSS before MB | after MB | bytes per idle user |",
                "| ---: | ---: | ---: | ---: | ---: |",
                *(
                    f"| {m['users']} | {m['resident']} | {m['shard_rss_before_mb']} | "
                    f"{m['shard_rss_after_mb']} | {m['bytes_per_user']} |"
                    for m in document["memory"]
                ),
                "",
            ]
            continue
        lines += ["usage-ledger:", "", *_table(document["points"]), ""]
        if document.get("baseline"):
            lines += ["postgres-direct:", "", *_table(document["baseline"]), ""]
            lines += [
                "| offered /s | p99: ours / baseline | DB write transactions: ours / baseline |",
                "| ---: | ---: | ---: |",
                *(
                    f"| {r['offered_per_s']:.0f} | {r['p99_ratio']} | {r['db_write_ratio']} |"
                    for r in document.get("ratios", [])
                ),
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark a real usage-ledger server."
    )
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, *STANDALONE, []], help="default: all")
    parser.add_argument("--short", action="store_true", help="fewer rates, shorter runs (a quick look)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the postgres-direct runs")
    args = parser.parse_args()
    sweep = SHORT if args.short else FULL
    for scenario in args.scenarios or [*SCENARIOS, *STANDALONE]:
        if scenario in STANDALONE:
            print(f"{scenario}: {(STANDALONE[scenario].__doc__ or '').strip()}", flush=True)
            with bench_database() as database_url:
                body = STANDALONE[scenario](database_url, sweep, args.shards)
            print(f"  -> {write_result(scenario, body, short=args.short)}", flush=True)
            continue
        run = SCENARIOS[scenario]
        print(f"{scenario}: {(run.__doc__ or '').strip()}", flush=True)
        with bench_database() as database_url:
            # Flushes every 5 s rather than the default 30 s, so each measured window holds some
            # (the default would only make the ledger's DB transactions per request fewer still).
            with bench_server(database_url, shards=str(args.shards), sync_interval_s="5") as server:
                body = run(server, sweep)
            if not args.no_baseline:
                print("  postgres-direct:", flush=True)
                with baseline_server(database_url) as baseline:
                    body["baseline"] = run(baseline, sweep)["points"]
                body["ratios"] = compare(body["points"], body["baseline"])
        print(f"  -> {write_result(scenario, body, short=args.short)}", flush=True)
    BENCHMARKS_MD.write_text(render_benchmarks_md())
    print(f"wrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
