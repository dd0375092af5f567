"""An open-loop, constant-rate HTTP/1.1 load generator, run in a process of its own.

Why not wrk: the README's commands must work on a machine with only Python.
Why not httpx: at thousands of requests per second its per-request cost (about
a millisecond of CPU) would be the bottleneck on two cores. This sends
pre-built requests over raw keep-alive connections on uvloop and parses only
the status line and `content-length`.

Open loop: request i is due at `start + i / rate` whatever happened before.
Its latency is measured from that due time, not from when a connection became
free, so a server that falls behind shows it in the percentiles instead of
slowing the generator down (no coordinated omission). A request that cannot
get a connection waits for one, and that wait counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank); NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    requests: list[bytes]  # whole HTTP/1.1 requests, used in turn
    rate_per_s: float
    duration_s: float
    connections: int = 256


@dataclass
class LoadResult:
    offered_per_s: float
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    late_start_ms_max: float = 0.0  # how far behind schedule the generator itself fell

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict[str, Any]:
        ok = sum(count for status, count in self.statuses.items() if 200 <= status < 300)
        return {
            "offered_per_s": self.offered_per_s,
            "achieved_per_s": round(self.completed / self.duration_s, 1),
            "requests": self.completed,
            "ok": ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "p999_ms": round(self.percentile(0.999), 3),
            "max_ms": round(max(self.latencies_ms, default=float("nan")), 3),
            "generator_late_ms_max": round(self.late_start_ms_max, 3),
        }


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
    if length:
        await reader.readexactly(length)
    return status


async def _run(spec: LoadSpec) -> LoadResult:
    result = LoadResult(offered_per_s=spec.rate_per_s, duration_s=spec.duration_s)
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(spec.connections):
        free.put_nowait(await asyncio.open_connection(spec.host, spec.port))
    requests = itertools.cycle(spec.requests)
    pending: set[asyncio.Task[None]] = set()

    async def one(request: bytes, due: float) -> None:
        reader, writer = await free.get()
        try:
            writer.write(request)
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            with contextlib.suppress(Exception):
                writer.close()
            free.put_nowait(await asyncio.open_connection(spec.host, spec.port))
            return
        result.latencies_ms.append((time.perf_counter() - due) * 1000)
        result.statuses[status] += 1
        free.put_nowait((reader, writer))

    interval = 1 / spec.rate_per_s
    total = int(spec.rate_per_s * spec.duration_s)
    start = time.perf_counter() + 0.05
    for i in range(total):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        else:
            result.late_start_ms_max = max(result.late_start_ms_max, -delay * 1000)
        task = asyncio.create_task(one(next(requests), due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    while not free.empty():
        _, writer = free.get_nowait()
        writer.close()
    return result


def _process_main(spec: LoadSpec, queue: multiprocessing.Queue[LoadResult]) -> None:
    import uvloop

    queue.put(uvloop.run(_run(spec)))


def run_load(spec: LoadSpec) -> LoadResult:
    """Run `spec` in a separate process (so the measuring side has a core's worth of its own loop)."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[LoadResult] = context.Queue()
    process = context.Process(target=_process_main, args=(spec, queue))
    process.start()
    try:
        return queue.get(timeout=spec.duration_s + 120)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def http_request(
    method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"", host: str = "bench"
) -> bytes:
    """A whole HTTP/1.1 keep-alive request, ready to send."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
