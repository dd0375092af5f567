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

Flows (`run_flows`) are scripted clients: flow i starts at `start + i / rate`
and each of its steps is due at the flow's start plus the step's offset (a
session start, heartbeats every second, an end). A step whose request names
`{session}` (or `{hold}`) gets the session id (the hold id) from the first of
the flow's answers that carries one; a step that is due before the previous one
answered is sent when it has, and its latency still counts from its due time. A
flow whose step fails stops there. With `per_flow`, a flow is one request: its
latency runs from its start to its last answer (or its first failure), and the
steps' latencies are reported by kind only.

The unloaded point (`UnloadedSpec`) is the other mode: closed loop, one
keep-alive connection, one request at a time, each sent as soon as the last one
answered, for a few seconds. It sends what a `LoadSpec` or `FlowSpec` would
(flows one after another, their steps back to back: the offsets are ignored),
and its latency runs from a request's sending (a flow's start, with `per_flow`)
to its answer. It is what one request costs an idle server, and its rate one
client's ceiling, not the server's capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine
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
    offered_per_s: float  # 0 for the unloaded point: closed loop, nothing is offered
    duration_s: float
    closed_loop: bool = False
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: dict[str, list[float]] = field(default_factory=dict)  # flows: latencies per step kind
    flows_cut_short: int = 0
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
            **(
                {"closed_loop_connections": 1, "seconds": round(self.duration_s, 3)}
                if self.closed_loop
                else {"offered_per_s": self.offered_per_s}
            ),
            "achieved_per_s": round(self.completed / self.duration_s, 1),
            "requests": self.completed,
            "ok": ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "p999_ms": round(self.percentile(0.999), 3),
            "max_ms": round(max(self.latencies_ms, default=float("nan")), 3),
            **({} if self.closed_loop else {"generator_late_ms_max": round(self.late_start_ms_max, 3)}),
            **(
                {
                    "flows_cut_short": self.flows_cut_short,
                    "steps": {
                        kind: {
                            "requests": len(values),
                            "p50_ms": round(percentile(values, 0.50), 3),
                            "p99_ms": round(percentile(values, 0.99), 3),
                        }
                        for kind, values in sorted(self.by_kind.items())
                    },
                }
                if self.by_kind
                else {}
            ),
        }

    def record(self, status: int, latency_ms: float, kind: str | None = None) -> None:
        self.latencies_ms.append(latency_ms)
        self.statuses[status] += 1
        if kind is not None:
            self.by_kind.setdefault(kind, []).append(latency_ms)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
    body = await reader.readexactly(length) if length else b""
    return status, body


class _Connections:
    """A pool of keep-alive connections; a broken one is replaced."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def open(self, count: int) -> None:
        for _ in range(count):
            self._free.put_nowait(await asyncio.open_connection(self._host, self._port))

    async def send(self, request: bytes) -> tuple[int, bytes] | None:
        """The answer's status and body; None when the connection failed (counted as an error)."""
        reader, writer = await self._free.get()
        try:
            writer.write(request)
            answer = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            with contextlib.suppress(Exception):
                writer.close()
            self._free.put_nowait(await asyncio.open_connection(self._host, self._port))
            return None
        self._free.put_nowait((reader, writer))
        return answer

    def close(self) -> None:
        while not self._free.empty():
            _, writer = self._free.get_nowait()
            writer.close()


async def _paced(
    rate_per_s: float,
    duration_s: float,
    result: LoadResult,
    start_one: Callable[[int, float], Coroutine[Any, Any, None]],
) -> None:
    """Call `start_one(i, due)` for i at `rate_per_s` for `duration_s`, open loop, then wait for
    everything started to finish."""
    pending: set[asyncio.Task[None]] = set()
    interval = 1 / rate_per_s
    total = int(rate_per_s * duration_s)
    start = time.perf_counter() + 0.05
    for i in range(total):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        else:
            result.late_start_ms_max = max(result.late_start_ms_max, -delay * 1000)
        task = asyncio.create_task(start_one(i, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=60)


async def _run(spec: LoadSpec) -> LoadResult:
    result = LoadResult(offered_per_s=spec.rate_per_s, duration_s=spec.duration_s)
    connections = _Connections(spec.host, spec.port)
    await connections.open(spec.connections)
    requests = itertools.cycle(spec.requests)

    async def one(i: int, due: float) -> None:
        answer = await connections.send(next(requests))
        if answer is None:
            result.errors += 1
            return
        result.record(answer[0], (time.perf_counter() - due) * 1000)

    await _paced(spec.rate_per_s, spec.duration_s, result, one)
    connections.close()
    return result


@dataclass(frozen=True)
class Step:
    at_s: float  # after the flow's start
    kind: str  # the label its latencies are reported under
    request: bytes  # may contain b"{session}" or b"{hold}": the id from an earlier answer


ANSWER_ID = re.compile(rb'"(session|hold)_id"\s*:\s*"([^"]+)"')  # fills `{session}`, `{hold}`


@dataclass(frozen=True)
class FlowSpec:
    host: str
    port: int
    flows: list[tuple[Step, ...]]  # scripted clients, used in turn
    rate_per_s: float  # flows started per second
    duration_s: float  # flows are started for this long; the run lasts until they finish
    connections: int = 256
    per_flow: bool = False  # one latency and status per flow (start to last answer), not per step


async def _play_flow(
    steps: tuple[Step, ...],
    connections: _Connections,
    result: LoadResult,
    *,
    start: float,
    per_flow: bool,
    paced: bool,
) -> None:
    """One flow: each step when it is due (`paced`, at the flow's start plus its offset; its
    latency counts from then) or as soon as the last one answered (its latency from its sending)."""
    ids: dict[bytes, bytes] = {}  # b"{session}" or b"{hold}" -> the id an answer gave
    status = 0
    for step in steps:
        if paced:
            due = start + step.at_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            due = time.perf_counter()
        request = step.request
        for placeholder, value in ids.items():
            request = request.replace(placeholder, value)
        answer = await connections.send(request)
        if answer is None:
            result.errors += 1
            result.flows_cut_short += 1
            return
        status, body = answer
        latency_ms = (time.perf_counter() - due) * 1000
        if per_flow:
            result.by_kind.setdefault(step.kind, []).append(latency_ms)
        else:
            result.record(status, latency_ms, step.kind)
        if not 200 <= status < 300:
            result.flows_cut_short += 1
            break
        if (found := ANSWER_ID.search(body)) and (placeholder := b"{%s}" % found.group(1)) not in ids:
            ids[placeholder] = found.group(2)
    if per_flow:
        result.record(status, (time.perf_counter() - start) * 1000)


async def _run_flows(spec: FlowSpec) -> LoadResult:
    result = LoadResult(offered_per_s=spec.rate_per_s, duration_s=spec.duration_s)
    connections = _Connections(spec.host, spec.port)
    await connections.open(spec.connections)
    flows = itertools.cycle(spec.flows)

    async def flow(i: int, start: float) -> None:
        await _play_flow(next(flows), connections, result, start=start, per_flow=spec.per_flow, paced=True)

    await _paced(spec.rate_per_s, spec.duration_s, result, flow)
    connections.close()
    return result


UNLOADED_WARMUP_S = 0.5  # sent before the measured seconds, not counted (the generator's first calls)


@dataclass(frozen=True)
class UnloadedSpec:
    """The unloaded point: what `work` sends (its rate, duration and connections are not used),
    one request at a time over one keep-alive connection, for `duration_s` after a warm-up."""

    work: LoadSpec | FlowSpec
    duration_s: float
    warmup_s: float = UNLOADED_WARMUP_S


async def _run_unloaded(spec: UnloadedSpec) -> LoadResult:
    work = spec.work
    result = LoadResult(offered_per_s=0.0, duration_s=spec.duration_s, closed_loop=True)
    warmup = LoadResult(offered_per_s=0.0, duration_s=spec.warmup_s, closed_loop=True)  # dropped
    connection = _Connections(work.host, work.port)
    await connection.open(1)
    warm_at = time.perf_counter() + spec.warmup_s
    began: float | None = None  # when the first measured request (or flow) was sent
    items: list[bytes | tuple[Step, ...]] = [*(work.requests if isinstance(work, LoadSpec) else work.flows)]
    for item in itertools.cycle(items):
        sent = time.perf_counter()
        if began is None and sent >= warm_at:
            began = sent
        if began is not None and sent >= began + spec.duration_s:
            break
        into = warmup if began is None else result
        if isinstance(item, bytes):
            answer = await connection.send(item)
            if answer is None:
                into.errors += 1
            else:
                into.record(answer[0], (time.perf_counter() - sent) * 1000)
        else:
            assert isinstance(work, FlowSpec)
            await _play_flow(item, connection, into, start=sent, per_flow=work.per_flow, paced=False)
    # To the last answer: a flow begun before the end is played to its end, and counted.
    result.duration_s = time.perf_counter() - (began if began is not None else warm_at)
    connection.close()
    return result


def _process_main(spec: LoadSpec | FlowSpec | UnloadedSpec, queue: multiprocessing.Queue[LoadResult]) -> None:
    import uvloop

    if isinstance(spec, UnloadedSpec):
        queue.put(uvloop.run(_run_unloaded(spec)))
    else:
        queue.put(uvloop.run(_run(spec) if isinstance(spec, LoadSpec) else _run_flows(spec)))


def run_load(spec: LoadSpec | FlowSpec | UnloadedSpec) -> LoadResult:
    """Run `spec` in a separate process (so the measuring side has a core's worth of its own loop)."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[LoadResult] = context.Queue()
    process = context.Process(target=_process_main, args=(spec, queue))
    process.start()
    try:
        if isinstance(spec, UnloadedSpec):
            seconds = spec.warmup_s + spec.duration_s
        elif isinstance(spec, FlowSpec):
            seconds = spec.duration_s + max((step.at_s for flow in spec.flows for step in flow), default=0.0)
        else:
            seconds = spec.duration_s
        return queue.get(timeout=seconds + 120)
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
