"""The data plane, both ends (`actors.channel`, `gateway.channel`) over real sockets, to a real
`LedgerShard` on the in-memory store: no Ray (the shard's address is handed over directly, as
Ray would hand it). A SIGKILLed shard and a restart under Ray: tests/reliability/test_channel.py."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from actors import wire
from actors.channel import ChannelServer
from actors.errors import SessionNotFound
from actors.shard import LedgerShard, ShardConfig
from actors.store import LedgerStore
from actors.views import UsageView
from gateway.channel import ShardChannel, ShardUnreachable
from gateway.metrics import Metrics
from tests.faulty_store import FaultyMemoryStore
from tests.unit.actors.support import POLICY

pytestmark = pytest.mark.asyncio(loop_scope="function")

SECRET = b"s" * 32
NODE = "node-a"


@pytest.fixture
def socket_dir() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ch-", dir="/tmp"))  # short: a socket path is ≤ 107 bytes
    yield path  # type: ignore[misc]
    shutil.rmtree(path, ignore_errors=True)


class SlowStore(FaultyMemoryStore):
    """Writes that take `save_delay_s` (a Postgres under load)."""

    save_delay_s = 0.0

    async def save(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(self.save_delay_s)
        await super().save(*args, **kwargs)


@pytest.fixture
def store() -> SlowStore:
    return SlowStore()


@pytest_asyncio.fixture(loop_scope="function")
async def shard(store: SlowStore) -> AsyncIterator[LedgerShard]:
    async def factory() -> LedgerStore:
        return store

    config = ShardConfig(shard_index=0, shard_count=1, policy=POLICY, start_wait_s=1, owner="test/shard-0")
    shard = LedgerShard(config, factory)
    await shard.start()
    yield shard
    await shard.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def served(
    shard: LedgerShard, socket_dir: Path
) -> AsyncIterator[tuple[ChannelServer, wire.ChannelAddress]]:
    assert shard.epoch is not None
    server = ChannelServer(shard.answer, epoch=shard.epoch, secret=SECRET, shard_index=0)
    address = await server.open(node_id=NODE, host="127.0.0.1", socket_dir=socket_dir)
    yield server, address
    server.close()


def resolving(*addresses: wire.ChannelAddress) -> Callable[[], Awaitable[wire.ChannelAddress]]:
    """What Ray would answer to `channel()`: each address in turn, the last one from then on."""
    queue = list(addresses)

    async def resolve() -> wire.ChannelAddress:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return resolve


@pytest.mark.parametrize("node", [NODE, "another-node"], ids=["unix socket", "tcp"])
async def test_calls_are_answered_each_to_its_caller(
    served: tuple[ChannelServer, wire.ChannelAddress], node: str
) -> None:
    server, address = served
    channel = ShardChannel(resolving(address), Metrics(), node_id=node)
    users = [f"u{index}" for index in range(50)]
    answers = await asyncio.gather(*(channel.call("usage", (user,), {}) for user in users))
    assert [answer.user_id for answer in answers] == users
    assert all(isinstance(answer, UsageView) for answer in answers)
    # An error stays with the call that raised it, as itself.
    with pytest.raises(SessionNotFound):
        await channel.call("heartbeat", ("u1", "no-such-session"), {"seq": None})
    assert channel.connects == 1
    assert server.calls == len(users) + 1
    channel.close()


async def test_only_batchable_operations_may_be_called(
    served: tuple[ChannelServer, wire.ChannelAddress],
) -> None:
    _, address = served
    channel = ShardChannel(resolving(address), Metrics(), node_id=NODE)
    with pytest.raises(wire.RemoteError, match="cannot be batched"):
        await channel.call("stop", (), {})
    channel.close()


@pytest.mark.parametrize(
    "change",
    [
        {"secret": b"w" * 32},
        {"epoch": -1},
    ],
    ids=["a wrong secret", "a stale epoch"],
)
async def test_a_gateway_without_the_secret_or_with_a_stale_epoch_is_refused(
    served: tuple[ChannelServer, wire.ChannelAddress], change: dict[str, object]
) -> None:
    server, address = served
    wrong = replace(address, **change)  # type: ignore[arg-type]
    channel = ShardChannel(resolving(wrong), Metrics(), node_id=NODE)
    with pytest.raises(ShardUnreachable, match="refused") as refused:
        await channel.call("usage", ("u1",), {})
    assert not refused.value.sent  # nothing was sent: any call may be tried again
    assert server.refused == 1
    assert server.calls == 0
    assert server.connections == 0


async def test_a_stale_epoch_is_refused_and_the_next_connection_asks_again(
    served: tuple[ChannelServer, wire.ChannelAddress],
) -> None:
    _, address = served
    channel = ShardChannel(
        resolving(replace(address, epoch=address.epoch - 1), address), Metrics(), node_id=NODE
    )
    with pytest.raises(ShardUnreachable, match="stale epoch"):
        await channel.call("usage", ("u1",), {})
    assert (await channel.call("usage", ("u1",), {})).user_id == "u1"
    assert channel.epoch == address.epoch
    channel.close()


async def _raw(address: wire.ChannelAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection of our own: the shard's nonce from its hello."""
    reader, writer = await asyncio.open_unix_connection(address.unix_path)
    hello = await _document(reader)
    return reader, writer, hello["nonce"]


async def _document(reader: asyncio.StreamReader) -> Any:
    (length,) = wire.HEADER.unpack(await reader.readexactly(wire.HEADER.size))
    return msgpack.unpackb(await reader.readexactly(length))


async def _proven(address: wire.ChannelAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer, nonce = await _raw(address)
    mac = wire.proof(address.secret, nonce, address.epoch)
    writer.write(
        wire.frame({"v": wire.PROTOCOL_VERSION, "epoch": address.epoch, "mac": mac, "nonce": b"n" * 16})
    )
    welcome = await _document(reader)
    assert isinstance(welcome, dict)
    assert wire.proves(address.secret, b"n" * 16, address.epoch, welcome["mac"])
    return reader, writer


async def test_a_frame_too_large_is_refused_and_the_connection_closed(
    served: tuple[ChannelServer, wire.ChannelAddress],
) -> None:
    server, address = served
    reader, writer = await _proven(address)
    writer.write(wire.HEADER.pack(wire.FRAME_MAX_BYTES + 1) + b"x" * 1024)
    refusal = await _document(reader)
    assert isinstance(refusal, dict)
    assert "larger than" in refusal["refused"]
    assert await reader.read() == b""  # closed
    assert server.refused == 1
    assert server.calls == 0
    writer.close()


async def test_before_the_handshake_a_frame_is_small(
    served: tuple[ChannelServer, wire.ChannelAddress],
) -> None:
    server, address = served
    reader, writer, _ = await _raw(address)
    writer.write(wire.HEADER.pack(wire.HANDSHAKE_FRAME_MAX_BYTES + 1) + b"x" * 64)
    refusal = await _document(reader)
    assert isinstance(refusal, dict)
    assert "larger than" in refusal["refused"]
    assert server.calls == 0
    writer.close()


async def test_an_unreadable_call_fails_alone(served: tuple[ChannelServer, wire.ChannelAddress]) -> None:
    """A call whose arguments the shard cannot read (a gateway of another version, say) is answered
    as an error; the connection and the other calls on it go on."""
    server, address = served
    reader, writer = await _proven(address)
    unreadable = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["NoSuchView", 1])))
    writer.write(wire.frame([1, "usage", unreadable]) + wire.call_frame(2, "usage", ("u1",), {}))
    answers = {}
    for _ in range(2):
        call_id, ok, payload = await _document(reader)  # type: ignore[misc]
        answers[call_id] = (ok, wire.unpack(payload))
    assert answers[1][0] is False and "unreadable" in str(answers[1][1])
    assert answers[2][0] is True and answers[2][1].user_id == "u1"
    assert server.calls == 1
    writer.close()


async def test_a_stopping_shard_answers_the_calls_it_took_before_it_closes(
    store: SlowStore, served: tuple[ChannelServer, wire.ChannelAddress]
) -> None:
    """Closing the channel (a shard draining or fenced) stops listening but owes the answers of the
    calls already running: a durable write that lands is answered, not lost as 'sent'."""
    server, address = served
    channel = ShardChannel(resolving(address), Metrics(), node_id=NODE)
    await channel.call("usage", ("u1",), {})
    store.save_delay_s = 0.2
    start = asyncio.ensure_future(
        channel.call(
            "start_session", ("u2",), {"topic": None, "difficulty": None, "request_id": None, "idem": None}
        )
    )
    await asyncio.sleep(0.05)  # the call is running on the shard, its write under way
    server.close()
    started = await start
    assert started.session_id
    await asyncio.sleep(0.05)
    assert server.connections == 0  # closed once answered
    with pytest.raises(ShardUnreachable):  # and nobody listens any more
        await channel.call("usage", ("u1",), {})
    channel.close()


@pytest.mark.parametrize(
    "document",
    [["not", "a", "call"], [1, "usage", "u1"], {"v": 1}, [1, "usage"], [1, "usage", b"", b""]],
    ids=["strings", "payload not bytes", "a map", "two items", "four items"],
)
async def test_a_frame_that_is_not_a_call_is_refused(
    served: tuple[ChannelServer, wire.ChannelAddress], document: object
) -> None:
    server, address = served
    reader, writer = await _proven(address)
    writer.write(wire.frame(document))
    refusal = await _document(reader)
    assert isinstance(refusal, dict)
    assert refusal["refused"] == "a frame that is not a call"
    assert server.calls == 0
    writer.close()


async def test_calls_before_the_handshake_are_refused(
    served: tuple[ChannelServer, wire.ChannelAddress],
) -> None:
    server, address = served
    reader, writer, _ = await _raw(address)
    writer.write(wire.frame([1, "usage", ["u1"], {}]))
    refusal = await _document(reader)
    assert isinstance(refusal, dict)
    assert "protocol" in refusal["refused"]
    assert server.calls == 0
    writer.close()


async def test_a_lost_connection_fails_its_calls_as_sent_and_the_next_call_reconnects(
    shard: LedgerShard, served: tuple[ChannelServer, wire.ChannelAddress], socket_dir: Path
) -> None:
    server, address = served
    channel = ShardChannel(resolving(address), Metrics(), node_id=NODE)
    await channel.call("usage", ("u1",), {})
    # A call sent when the connection goes (whether it ran, the gateway cannot know).
    pending = asyncio.ensure_future(
        channel.call(
            "start_session", ("u2",), {"topic": None, "difficulty": None, "request_id": None, "idem": None}
        )
    )
    await asyncio.sleep(0)
    server.close()  # what a fenced or stopping activation does
    with pytest.raises(ShardUnreachable) as lost:
        await pending
    assert lost.value.sent  # it may have run: only a repeatable call is retried
    # A new activation listens elsewhere; the next call asks where and reconnects.
    successor = ChannelServer(shard.answer, epoch=address.epoch, secret=SECRET, shard_index=0)
    (socket_dir / "next").mkdir()
    moved = await successor.open(node_id=NODE, host="127.0.0.1", socket_dir=socket_dir / "next")
    channel._resolve = resolving(moved)
    assert (await channel.call("usage", ("u1",), {})).user_id == "u1"
    assert channel.connects == 2
    successor.close()
    channel.close()


async def test_a_shard_gone_silent_is_retired_new_calls_reconnect_and_old_ones_still_wait(
    served: tuple[ChannelServer, wire.ChannelAddress],
) -> None:
    """A peer that vanished without closing (a node cut off) is silence, not a closed socket: the
    gateway pings it and, with no pong, sends new calls on a new connection; a call already on the
    silent one is not failed (it may have run), it waits for its answer within its own time limit."""
    server, address = served
    channel = ShardChannel(resolving(address), Metrics(), node_id=NODE, silence_ping_s=0.05)
    await channel.call("usage", ("u1",), {})
    (silent,) = list(server._connections)
    assert silent._transport is not None
    silent._transport.pause_reading()  # the shard hears nothing more on this connection
    waiting = asyncio.ensure_future(channel.call("usage", ("u1",), {}))
    await asyncio.sleep(0.3)  # pinged, no pong: retired
    assert not waiting.done()
    assert (await channel.call("usage", ("u2",), {})).user_id == "u2"  # on a new connection
    assert channel.connects == 2
    silent._transport.resume_reading()  # the old connection was only slow after all
    assert (await waiting).user_id == "u1"
    channel.close()


async def test_a_busy_shard_answers_pings_so_a_slow_call_is_not_given_up(
    store: SlowStore, served: tuple[ChannelServer, wire.ChannelAddress]
) -> None:
    """A call that takes long (a durable write waiting for Postgres) on a shard that still answers:
    pings are answered, the connection is kept, and the call gets its answer."""
    _, address = served
    channel = ShardChannel(resolving(address), Metrics(), node_id=NODE, silence_ping_s=0.05)
    await channel.call("usage", ("u1",), {})
    store.save_delay_s = 0.4  # ~8 ping intervals
    started = await channel.call(
        "start_session", ("u1",), {"topic": None, "difficulty": None, "request_id": None, "idem": None}
    )
    assert started.session_id
    assert channel.connects == 1
    channel.close()
