"""`client`: voice clients written with the Python client (`usage_ledger_client`), as an app would.

Each virtual client opens `LedgerClient.session()` (start, background heartbeats, end on the way
out), checks its usage half-way through, and leaves. Unlike the other scenarios this is closed
loop and runs in the benchmark's own process: it measures what an application using the client
sees (its retries and JSON decoding included), not the server's capacity. Latency is timed per
HTTP exchange, body read included, with an httpx response hook.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx

from bench.loadgen import percentile
from bench.server import bench_server
from usage_ledger_client import LedgerClient, LedgerError
from usage_ledger_client.client import tls_context

CLIENTS_FULL: tuple[int, ...] = (50, 200, 500)
CLIENTS_SHORT: tuple[int, ...] = (50,)
SESSION_S_FULL = 10.0
SESSION_S_SHORT = 4.0
HEARTBEAT_S = 1.0  # the 30 s cadence compressed, as in `mixed`
STAGGER_S = 1.0  # clients start spread over this


def _kind(request: httpx.Request) -> str:
    path = request.url.path
    if request.method == "GET":
        return "usage"
    if path.endswith("/heartbeat"):
        return "heartbeat"
    if path.endswith("/end"):
        return "end"
    return "start"


async def run_clients(
    base_url: str, token_for: Callable[[str], str], *, clients: int, session_s: float, heartbeat_s: float
) -> dict[str, Any]:
    """Run `clients` virtual clients at once; figures per request kind, and how the sessions ended."""
    latencies: dict[str, list[float]] = defaultdict(list)
    endings: dict[str, int] = defaultdict(int)
    errors: list[str] = []

    async def timed(response: httpx.Response) -> None:
        await response.aread()
        latencies[_kind(response.request)].append(response.elapsed.total_seconds() * 1000)

    async def one(index: int) -> None:
        await asyncio.sleep(STAGGER_S * index / clients)
        user = f"sdk-{uuid.uuid4().hex[:12]}"
        # A connection pool per client, as `LedgerClient` makes by default (plus the timing hook),
        # with its TLS context made once (`tls_context`: httpx makes one per client, ~50 ms each).
        # One pool shared by hundreds of busy sessions is slow: httpcore matches every request
        # against every connection (75% of this process's CPU at 200 sessions when shared).
        async with httpx.AsyncClient(
            base_url=base_url, timeout=30, verify=tls_context(), event_hooks={"response": [timed]}
        ) as http:
            ledger = LedgerClient(token=token_for(user), http=http)
            try:
                async with ledger.session(topic="bench", heartbeat_interval_s=heartbeat_s) as session:
                    await asyncio.sleep(session_s / 2)
                    await ledger.usage()
                    await asyncio.sleep(session_s / 2)
                result = session.result
                endings[result.end_reason if result is not None and result.end_reason else "unknown"] += 1
            except LedgerError as exc:
                errors.append(exc.code)

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(clients)))
    elapsed_s = time.perf_counter() - started
    row: dict[str, Any] = {
        "clients": clients,
        "requests": sum(len(values) for values in latencies.values()),
        "requests_per_s": round(sum(len(values) for values in latencies.values()) / elapsed_s, 1),
        "heartbeats": len(latencies["heartbeat"]),
    }
    for kind in ("start", "heartbeat", "usage", "end"):
        values = latencies[kind]
        if values:
            row[f"{kind}_p50_ms"] = round(statistics.median(values), 2)
            row[f"{kind}_p99_ms"] = round(percentile(values, 0.99), 2)
    row["ended_user_ended"] = endings.get("user_ended", 0)
    row["ended_otherwise"] = sum(count for reason, count in endings.items() if reason != "user_ended")
    row["errors"] = len(errors)
    return row


def scenario_client(database_url: str, short: bool, shards: int) -> dict[str, Any]:
    """Voice clients written with the Python client: `client.session()` heartbeating every second
    in the background, a usage check half-way, the end on the way out; 50 to 500 at once, closed
    loop, in the benchmark's process. Latency per request kind as the application sees it."""
    counts = CLIENTS_SHORT if short else CLIENTS_FULL
    session_s = SESSION_S_SHORT if short else SESSION_S_FULL
    rows = []
    with bench_server(database_url, shards=str(shards)) as server:
        for clients in counts:
            print(f"  client: {clients} clients for {session_s:g} s", flush=True)
            rows.append(
                asyncio.run(
                    run_clients(
                        server.base_url,
                        server.token,
                        clients=clients,
                        session_s=session_s,
                        heartbeat_s=HEARTBEAT_S,
                    )
                )
            )
    return {"users": sum(counts), "rows": rows}
