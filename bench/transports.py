"""Data-plane transports between a gateway and a shard process: plain asyncio vs pyzmq.

    .venv/bin/pip install pyzmq                # optional: without it the zmq rows are skipped
    .venv/bin/python -m bench.transports       # about 30 s; --calls and --seconds change it

The client (this process) and the server (a spawned process, as a shard is) both run on uvloop.
A call is a msgpack request `[call_id, "usage", ["user-123"], {}]`; the server answers each as
it reads it with a ~200-byte msgpack reply `[call_id, 1, [fields...]]`, and the client matches
replies to calls by id (many in flight on one connection, answered in any order). Transports:
asyncio.Protocol over a Unix socket and over TCP loopback and asyncio streams (StreamReader and
StreamWriter) over a Unix socket, each frame a 4-byte big-endian length and the body; zmq.asyncio
DEALER (client) and ROUTER (server) over ipc:// and tcp://, a zmq message a frame. For each:

- unloaded: one call at a time, --calls of them after a warm-up: p50 and p99 round trip;
- pipelined: 64 calls kept in flight by one client for --seconds: calls/s, p50 and p99;
- CPU per call in each: getrusage (user + system, every thread) of the client and of the server
  (asked over the channel), divided by the calls;
- a lost connection: what the caller of a call in flight sees when the server is SIGKILLed, and
  of a call made while it is down (and, if that does not fail, once a new server is up there).

Prints a JSON report, then a table. On a small shared machine expect 10-30% run-to-run noise in
the latencies and rates; the CPU per call is steadier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import multiprocessing
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any, cast

import msgpack
import uvloop

HAVE_ZMQ = importlib.util.find_spec("zmq") is not None
IN_FLIGHT = 64
WARMUP = 500
USER = ["user-123"]
FIELDS = [
    "user-123", "pro", "2026-05-01T00:00:00Z", "2026-06-01T00:00:00Z", 1_234_567, 3_600_000, 42,
    {"tokens": [12_000, 1_000_000], "images": [3, 50], "minutes": [61, 600]}, "open",
    "7f3c9a4e-2b1d-4c6a-9e8f-0a1b2c3d4e5f", True, 1_717_200_000_000, "eu-west-1", [0.5, 0.9, 1.0],
]  # fmt: skip
Address = str | tuple[str, int]  # a Unix socket's path, a TCP (host, port), or a zmq endpoint


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: zmq's I/O thread too
    return usage.ru_utime + usage.ru_stime


def _answer(frame: bytes) -> bytes | None:
    """The server's work. "cpu" answers its CPU seconds; "hang" is never answered."""
    call_id, method, _args, _kwargs = msgpack.unpackb(frame)
    if method == "hang":
        return None
    return msgpack.packb([call_id, 1, _cpu_s() if method == "cpu" else FIELDS])  # type: ignore[no-any-return]


def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    return await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))


class Framed(asyncio.Protocol):
    """Length-prefixed frames; as it is, the server's end (answers each frame as it is read)."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        buffer, start = self.buffer, 0
        buffer += data
        while len(buffer) - start >= 4:
            end = start + 4 + int.from_bytes(buffer[start : start + 4], "big")
            if len(buffer) < end:
                break
            self.frame_received(bytes(buffer[start + 4 : end]))
            start = end
        del buffer[:start]

    def frame_received(self, frame: bytes) -> None:
        if (reply := _answer(frame)) is not None:
            self.transport.write(_framed(reply))


async def _serve(style: str, address: Address, ready: Event) -> None:
    if style == "zmq":
        import zmq  # type: ignore[import-not-found, unused-ignore]
        import zmq.asyncio  # type: ignore[import-not-found, unused-ignore]

        router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        router.bind(cast(str, address))
        ready.set()
        while True:
            identity, frame = await router.recv_multipart()
            if (reply := _answer(frame)) is not None:
                await router.send_multipart([identity, reply])

    async def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                if (reply := _answer(await _read_frame(reader))) is not None:
                    writer.write(_framed(reply))

    loop = asyncio.get_running_loop()
    if style == "streams":
        await asyncio.start_unix_server(on_stream, cast(str, address))
    elif isinstance(address, str):
        await loop.create_unix_server(Framed, address)
    else:
        await loop.create_server(Framed, *address)
    ready.set()
    await asyncio.Event().wait()


def _server_main(style: str, address: Address, ready: Event) -> None:
    uvloop.run(_serve(style, address, ready))


async def start_server(style: str, address: Address) -> BaseProcess:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_server_main, args=(style, address, ready), daemon=True)
    process.start()
    if not await asyncio.to_thread(ready.wait, 20):
        raise RuntimeError(f"the {style} server at {address} did not start")
    return process


class Channel:
    """Calls by id on one connection, answered in any order; a lost connection fails them all."""

    def __init__(self, send: Callable[[bytes], object], close: Callable[[], object]) -> None:
        self.send, self.close = send, close
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count()
        self.lost: Exception | None = None
        self.reader: asyncio.Task[None] | None = None

    async def call(self, method: str, args: list[Any]) -> Any:
        if self.lost is not None:
            raise self.lost
        call_id = next(self.ids)
        self.pending[call_id] = future = self.loop.create_future()
        try:
            self.send(msgpack.packb([call_id, method, args, {}]))
            return await future
        finally:
            del self.pending[call_id]

    def deliver(self, frame: bytes) -> None:
        call_id, _status, result = msgpack.unpackb(frame)
        future = self.pending.get(call_id)
        if future is not None and not future.done():
            future.set_result(result)

    def fail(self, error: Exception) -> None:
        self.lost = error
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)


class ProtocolEnd(Framed):
    """The client's end: frames go to its channel, and so does the loss of the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.channel = Channel(
            lambda body: self.transport.write(_framed(body)), lambda: self.transport.close()
        )

    def frame_received(self, frame: bytes) -> None:
        self.channel.deliver(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel.fail(ConnectionError(f"connection lost ({exc!r})"))


async def connect(style: str, address: Address) -> Channel:
    if style == "zmq":
        import zmq  # type: ignore[import-not-found, unused-ignore]
        import zmq.asyncio  # type: ignore[import-not-found, unused-ignore]

        dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.connect(cast(str, address))
        zmq_channel = Channel(dealer.send, lambda: dealer.close(linger=0))  # send: queues, peer or not

        async def read_messages() -> None:
            while True:
                zmq_channel.deliver(await dealer.recv())

        zmq_channel.reader = asyncio.create_task(read_messages())
        return zmq_channel
    if style == "streams":
        reader, writer = await asyncio.open_unix_connection(cast(str, address))
        channel = Channel(lambda body: writer.write(_framed(body)), writer.close)

        async def read_frames() -> None:
            try:
                while True:
                    channel.deliver(await _read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                channel.fail(ConnectionError(f"connection lost ({error!r})"))

        channel.reader = asyncio.create_task(read_frames())
        return channel
    loop = asyncio.get_running_loop()
    if isinstance(address, str):
        return (await loop.create_unix_connection(ProtocolEnd, address))[1].channel
    return (await loop.create_connection(ProtocolEnd, *address))[1].channel


async def measure(channel: Channel, callers: int, calls: int, seconds: float) -> dict[str, Any]:
    """`callers` each make a call as soon as their last is answered, until `calls` or `seconds`."""
    latencies: list[float] = []
    client_cpu, server_cpu, began = _cpu_s(), await channel.call("cpu", []), time.perf_counter()

    async def caller() -> None:
        while len(latencies) < calls and (start := time.perf_counter()) < began + seconds:
            await channel.call("usage", USER)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed, count = time.perf_counter() - began, len(latencies)
    client_cpu, server_cpu = _cpu_s() - client_cpu, await channel.call("cpu", []) - server_cpu
    latencies.sort()
    return {
        "calls": count,
        "calls_per_s": round(count / elapsed),
        "p50_us": round(1e6 * latencies[count // 2], 1),
        "p99_us": round(1e6 * latencies[count * 99 // 100], 1),
        "cpu_us_per_call": {
            "client": round(1e6 * client_cpu / count, 1),
            "server": round(1e6 * server_cpu / count, 1),
        },
    }


def _outcome(call: asyncio.Future[Any], since: float) -> str:
    waited = time.perf_counter() - since
    if not call.done():
        return f"still pending after {waited:.2f} s"
    error = call.exception()
    return f"{'answered' if error is None else type(error).__name__} after {1e3 * waited:.1f} ms"


async def lose_connection(style: str, address: Address, server: BaseProcess) -> dict[str, str]:
    """SIGKILL the server with calls in flight; call while it is down; start a new one if need be."""
    channel = await connect(style, address)
    await channel.call("usage", USER)
    in_flight = [asyncio.ensure_future(channel.call("hang", [])) for _ in range(8)]
    await asyncio.sleep(0.05)
    killed = time.perf_counter()
    server.kill()
    await asyncio.wait(in_flight, timeout=1.0)  # returns as soon as they are all done
    report = {"in_flight_at_kill": _outcome(in_flight[0], killed)}
    down = time.perf_counter()
    during = asyncio.ensure_future(channel.call("usage", USER))
    await asyncio.wait([during], timeout=0.1)
    report["call_while_down"] = _outcome(during, down)
    if not during.done():
        replacement = await start_server(style, address)
        restarted = time.perf_counter()
        await asyncio.wait([during], timeout=2.0)
        report["call_while_down_once_a_new_server_is_up"] = _outcome(during, restarted)
        report["in_flight_at_kill_once_a_new_server_is_up"] = _outcome(in_flight[0], killed)
        replacement.kill()
    for call in [*in_flight, during]:
        call.cancel()
    await asyncio.gather(*in_flight, during, return_exceptions=True)
    channel.close()
    return report


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run(calls: int, seconds: float) -> dict[str, Any]:
    versions = {name: importlib.metadata.version(name) for name in ("uvloop", "msgpack")}
    if HAVE_ZMQ:
        import zmq  # type: ignore[import-not-found, unused-ignore]

        versions |= {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}
    else:
        print("pyzmq is not installed: no zmq rows (.venv/bin/pip install pyzmq)", flush=True)
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "versions": versions,
        "request_bytes": len(msgpack.packb([123_456, "usage", USER, {}])),
        "reply_bytes": len(msgpack.packb([123_456, 1, FIELDS])),
        "transports": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        transports: dict[str, tuple[str, Address]] = {
            "asyncio-protocol/unix": ("protocol", f"{folder}/protocol.sock"),
            "asyncio-protocol/tcp": ("protocol", ("127.0.0.1", _free_port())),
            "asyncio-streams/unix": ("streams", f"{folder}/streams.sock"),
            "zmq-dealer-router/ipc": ("zmq", f"ipc://{folder}/zmq.sock"),
            "zmq-dealer-router/tcp": ("zmq", f"tcp://127.0.0.1:{_free_port()}"),
        }
        for name, (style, address) in transports.items():
            if style == "zmq" and not HAVE_ZMQ:
                continue
            print(f"{name} ...", flush=True)
            server = await start_server(style, address)
            channel = await connect(style, address)
            await measure(channel, 1, WARMUP, 60)
            report["transports"][name] = {
                "unloaded": await measure(channel, 1, calls, 60),
                "pipelined": await measure(channel, IN_FLIGHT, 1 << 62, seconds),
            }
            channel.close()
            report["transports"][name]["lost_connection"] = await lose_connection(style, address, server)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=5000, help="calls of the unloaded run")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the pipelined run")
    args = parser.parse_args()
    report = uvloop.run(run(args.calls, args.seconds))
    print(json.dumps(report, indent=2))
    widths = (22, 6, 6, 11, 7, 6, 6, 11)
    print(f"\n{'':22} | {'unloaded: one at a time':^29} | {f'pipelined: {IN_FLIGHT} in flight':^38}")
    head = (
        f"{'transport':<22}",
        "p50 us",
        "p99 us",
        "CPU us/call",
        "calls/s",
        "p50 us",
        "p99 us",
        "CPU us/call",
    )
    print(" | ".join(f"{cell:>{width}}" for cell, width in zip(head, widths, strict=True)))
    for name, row in report["transports"].items():
        cells: list[object] = [f"{name:<22}"]
        for phase in ("unloaded", "pipelined"):
            figures, cpu = row[phase], row[phase]["cpu_us_per_call"]
            cells += [figures["calls_per_s"]] if phase == "pipelined" else []
            cells += [
                round(figures["p50_us"]),
                round(figures["p99_us"]),
                round(cpu["client"] + cpu["server"], 1),
            ]
        print(" | ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)))
    print("(CPU: client + server; us = microseconds)\n")
    for name, row in report["transports"].items():
        print(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in row["lost_connection"].items()))


if __name__ == "__main__":
    main()
