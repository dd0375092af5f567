"""One abusive user at 100x the normal rate: what it does to everyone else's latency.

Starts `usage-ledger serve` (local Ray, embedded Postgres unless LEDGER_BENCH_DATABASE_URL), gives
each of N normal users a session, and has each send one request per `1/rate` seconds (a heartbeat,
then a usage check, alternately), open loop. The run has three phases of equal length: without the
abuser, with one abusive user sending `factor` times the normal rate (a usage check each, from a
process of its own, open loop), and without it again. It prints the normal users' p50/p99 per
phase, the same for the normal users that share the abuser's shard, the ratio of p99 with the
abuser to the mean p99 of the two phases without, and what the abuser got back.

    .venv/bin/python -m bench.abusive_user               # 40 users at 1/s, abuser at 100/s
    .venv/bin/python -m bench.abusive_user --users 80 --phase-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import httpx

from actors.routing import shard_index
from bench.loadgen import percentile
from bench.server import BenchServer, bench_database, bench_server

PHASES = ("without", "with abuser", "without again")
# Time given to the abuser's process to start (its imports), not measured.
ABUSER_START_S = 3.0


@dataclass
class Samples:
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)


async def _normal_user(
    http: httpx.AsyncClient,
    token: str,
    period_s: float,
    stop_at: float,
    phase_of: list[str],
    out: Samples,
    key: str,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    started = await http.post("/v1/sessions", json={"topic": "bench"}, headers=headers)
    started.raise_for_status()
    session_id = started.json()["session_id"]
    next_at = time.monotonic() + random.uniform(0, period_s)
    beat = True
    while (now := time.monotonic()) < stop_at:
        if now < next_at:
            await asyncio.sleep(next_at - now)
        next_at += period_s
        phase = phase_of[0]
        sent = time.perf_counter()
        if beat:
            answer = await http.post(f"/v1/sessions/{session_id}/heartbeat", json={}, headers=headers)
        else:
            answer = await http.get("/v1/usage", headers=headers)
        elapsed = time.perf_counter() - sent
        beat = not beat
        out.statuses[answer.status_code] += 1
        if phase:
            out.latencies_s[f"{key}|{phase}"].append(elapsed)
    await http.post(f"/v1/sessions/{session_id}/end", json={}, headers=headers)


def _abuse(
    base_url: str,
    token: str,
    rate_per_s: float,
    seconds: float,
    go: Event,
    queue: multiprocessing.Queue[dict[int, int]],
) -> None:
    """In a process of its own: `rate_per_s` usage checks per second for `seconds`, open loop,
    from when `go` is set (so the process's start-up is not part of the measurement)."""

    async def run() -> collections.Counter[int]:
        statuses: collections.Counter[int] = collections.Counter()
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as http:
            headers = {"Authorization": f"Bearer {token}"}
            in_flight: set[asyncio.Task[None]] = set()

            async def one() -> None:
                try:
                    statuses[(await http.get("/v1/usage", headers=headers)).status_code] += 1
                except httpx.HTTPError:
                    statuses[0] += 1

            period_s = 1 / rate_per_s
            await asyncio.to_thread(go.wait)
            start = time.monotonic()
            sent = 0
            while (now := time.monotonic()) < start + seconds:
                due = int((now - start) / period_s) + 1
                while sent < due and len(in_flight) < 512:
                    task = asyncio.create_task(one())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    sent += 1
                await asyncio.sleep(period_s / 2)
            if in_flight:
                await asyncio.wait(in_flight)
        return statuses

    queue.put(dict(asyncio.run(run())))


async def measure(
    server: BenchServer, *, users: int, rate_per_s: float, factor: float, phase_s: float, shards: int
) -> dict[str, Any]:
    abuser = f"abuser-{uuid.uuid4().hex[:8]}"
    abuser_shard = shard_index(abuser, shards)
    normal = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(users)]
    samples = Samples()
    phase_of = [""]  # "" while warming up
    warmup_s = 5.0
    stop_at = time.monotonic() + warmup_s + 3 * phase_s + ABUSER_START_S
    limits = httpx.Limits(max_connections=users * 2, max_keepalive_connections=users * 2)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=30) as http:
        workers = [
            asyncio.create_task(
                _normal_user(
                    http,
                    server.token(user),
                    1 / rate_per_s,
                    stop_at,
                    phase_of,
                    samples,
                    "shared" if shard_index(user, shards) == abuser_shard else "other",
                )
            )
            for user in normal
        ]
        await asyncio.sleep(warmup_s)
        abuse_result: dict[int, int] = {}
        for phase in PHASES:
            phase_of[0] = phase
            if phase == "with abuser":
                context = multiprocessing.get_context("spawn")
                queue: multiprocessing.Queue[dict[int, int]] = context.Queue()
                go = context.Event()
                process = context.Process(
                    target=_abuse,
                    args=(server.base_url, server.token(abuser), rate_per_s * factor, phase_s, go, queue),
                )
                phase_of[0] = ""  # not measured while the abuser's process starts
                process.start()
                await asyncio.sleep(ABUSER_START_S)
                phase_of[0] = phase
                go.set()
                await asyncio.sleep(phase_s)
                abuse_result = await asyncio.to_thread(queue.get, True, 120)
                await asyncio.to_thread(process.join, 30)
            else:
                await asyncio.sleep(phase_s)
        phase_of[0] = ""
        await asyncio.gather(*workers)

    phases = {}
    for phase in PHASES:
        shared = samples.latencies_s[f"shared|{phase}"]
        everyone = samples.latencies_s[f"other|{phase}"] + shared
        phases[phase] = {
            "requests": len(everyone),
            "p50_ms": round(1000 * statistics.median(everyone), 2),
            "p99_ms": round(1000 * percentile(everyone, 0.99), 2),
            "shared_shard_requests": len(shared),
            "shared_shard_p99_ms": round(1000 * percentile(shared, 0.99), 2) if shared else None,
        }
    base_p99 = ((phases["without"]["p99_ms"] or 0) + (phases["without again"]["p99_ms"] or 0)) / 2
    return {
        "users": users,
        "normal_rate_per_s": rate_per_s,
        "abuser_rate_per_s": rate_per_s * factor,
        "phase_s": phase_s,
        "normal_statuses": dict(samples.statuses),
        "abuser_statuses": abuse_result,
        "phases": phases,
        "p99_ratio_with_abuser": round((phases["with abuser"]["p99_ms"] or 0) / base_p99, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second of a normal user")
    parser.add_argument("--factor", type=float, default=100.0, help="the abuser's rate, in normal rates")
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with bench_database() as database_url, bench_server(database_url, shards=str(args.shards)) as server:
        report = asyncio.run(
            measure(
                server,
                users=args.users,
                rate_per_s=args.rate,
                factor=args.factor,
                phase_s=args.phase_s,
                shards=args.shards,
            )
        )
    print(json.dumps(report, indent=2))
    phases = report["phases"]
    print(
        f"\nnormal users' p99: {phases['without']['p99_ms']} ms without, "
        f"{phases['with abuser']['p99_ms']} ms with the abuser, "
        f"{phases['without again']['p99_ms']} ms without again; "
        f"ratio {report['p99_ratio_with_abuser']}x (bound: 2x)"
    )


if __name__ == "__main__":
    main()
