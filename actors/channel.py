"""The shard's end of the data plane: hot calls straight from gateway processes, beside Ray.

Ray stays the control plane: it places, names and restarts a shard, and a
gateway asks the shard over Ray where it listens (`ChannelAddress`). The hot
calls (the operations declared with a batch lane: checks, heartbeats, meter
uses, session starts and ends, hold verbs) then travel over a persistent
connection of the gateway's own: a Unix socket on the same node, TCP across
nodes (`actors.wire` has the frames and the handshake). A Ray call costs about
a millisecond of CPU on each side; a frame costs microseconds.

Each call runs exactly as `LedgerShard.batch` runs it (`Batches.one`): the
same pipeline, bounds and errors. Calls are answered as they finish, in any
order; the answers finished in one turn of the event loop leave in one write.
A connection that goes away does not cancel its calls (a durable write runs to
its end, as it would for a Ray caller that stopped waiting); their answers are
dropped, and the gateway retries only what may be repeated. So a shard that
stops or is fenced stops listening, refuses new calls by name (`Unavailable`,
nothing changed), and closes each connection once the calls it took have been
answered.

A connection proves it holds the shards' secret and names this activation's
epoch before its first call; anything else (a wrong secret, an older epoch, a
frame over `FRAME_MAX_BYTES`, a document that is not a call) is refused and
the connection closed. When the activation is fenced or stops, the server
closes every connection, and gateways ask Ray again where the shard is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import structlog

from actors import wire
from actors.errors import Overloaded, Unavailable

log = structlog.get_logger("actors.channel")

# Calls one connection may have running at once; past it a call is answered `Overloaded` (the
# shard's own `max_pending_calls` usually refuses first).
CONNECTION_CALLS_MAX = 100_000
# A peer that has not proved itself within this is dropped; past this many such peers at once, a
# new connection is dropped at once (an unproven peer costs one small buffer each).
HANDSHAKE_TIMEOUT_S = 5.0
UNPROVEN_CONNECTIONS_MAX = 64
# A stopping or fenced activation keeps a connection open while calls it took are still running
# (their answers are owed), at most this long.
DRAIN_MAX_S = 30.0

Answer = Callable[[str, tuple[Any, ...], dict[str, Any]], Awaitable[tuple[bool, Any]]]


class ChannelServer:
    """Listens for gateways on a Unix socket and a TCP port; answers their calls with `answer`."""

    def __init__(self, answer: Answer, *, epoch: int, secret: bytes, shard_index: int) -> None:
        self._answer = answer
        self.epoch = epoch
        self._secret = secret
        self._shard_index = shard_index
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._unix_path: Path | None = None
        self._closed = False
        self.calls = 0  # answered, since the activation started
        self.refused = 0  # connections refused

    async def open(self, *, node_id: str, host: str, socket_dir: Path) -> wire.ChannelAddress:
        """Start listening (`socket_dir` exists); where gateways find this activation."""
        if self._closed:
            raise Unavailable("shard is shutting down")
        loop = asyncio.get_running_loop()
        # A new path per activation (its pid): a restarted shard never meets its predecessor's socket.
        self._unix_path = socket_dir / f"shard-{self._shard_index}-{os.getpid()}.sock"
        with contextlib.suppress(FileNotFoundError):
            self._unix_path.unlink()
        unix = await loop.create_unix_server(lambda: _Connection(self), str(self._unix_path))
        tcp = await loop.create_server(lambda: _Connection(self), host, 0, reuse_address=True)
        self._servers = [unix, tcp]
        if self._closed:  # closed while it was opening
            self.close()
            raise Unavailable("shard is shutting down")
        port = tcp.sockets[0].getsockname()[1]
        log.info("channel_listening", shard=self._shard_index, unix_path=str(self._unix_path), port=port)
        return wire.ChannelAddress(
            node_id=node_id,
            unix_path=str(self._unix_path),
            host=host,
            port=port,
            epoch=self.epoch,
            secret=self._secret,
        )

    def close(self) -> None:
        """Stop listening; close each connection once the calls it took are answered (within
        `DRAIN_MAX_S`)."""
        self._closed = True
        for server in self._servers:
            server.close()
        self._servers = []
        for connection in list(self._connections):
            connection.close_when_answered()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()

    @property
    def unproven(self) -> int:
        return sum(1 for connection in self._connections if not connection.welcomed)

    @property
    def connections(self) -> int:
        return len(self._connections)


class _Connection(asyncio.Protocol):
    """One gateway process's connection: the handshake, then its calls."""

    def __init__(self, server: ChannelServer) -> None:
        self._server = server
        self._reader = wire.FrameReader()
        self._transport: asyncio.Transport | None = None
        self._nonce = secrets.token_bytes(wire.NONCE_BYTES)
        self.welcomed = False
        self._closing = False
        self._running: set[asyncio.Task[None]] = set()
        self._outbox = wire.Outbox(self._send)
        self._handshake_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._server.unproven >= UNPROVEN_CONNECTIONS_MAX or self._server._closed:
            cast(asyncio.Transport, transport).abort()  # (connection_lost follows; nothing counted)
            return
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)
        self._server._connections.add(self)
        self._transport.write(wire.frame({"v": wire.PROTOCOL_VERSION, "nonce": self._nonce}))
        self._handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._refuse, "no handshake in time"
        )

    def data_received(self, data: bytes) -> None:
        try:
            documents = self._reader.feed(data)
        except wire.WireError as exc:
            self._refuse(str(exc))
            return
        for document in documents:
            if self._transport is None:
                return  # refused by an earlier document
            if self.welcomed:
                self._call(document)
            else:
                self._greet(document)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()

    def close_when_answered(self) -> None:
        self._closing = True
        if not self._running:
            self._close()
        else:
            asyncio.get_running_loop().call_later(DRAIN_MAX_S, self._close)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _greet(self, proof: Any) -> None:
        server = self._server
        if not isinstance(proof, dict) or proof.get("v") != wire.PROTOCOL_VERSION:
            self._refuse("not this protocol or version")
            return
        epoch, mac, nonce = proof.get("epoch"), proof.get("mac"), proof.get("nonce")
        if not isinstance(epoch, int) or not isinstance(nonce, bytes) or len(nonce) != wire.NONCE_BYTES:
            self._refuse("not this protocol or version")
            return
        if not wire.proves(server._secret, self._nonce, epoch, mac):
            self._refuse("not authenticated")
            return
        if epoch != server.epoch:
            self._refuse(f"stale epoch: this activation is epoch {server.epoch}, not {epoch}")
            return
        self.welcomed = True
        self._reader.max_frame_bytes = wire.FRAME_MAX_BYTES
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._outbox.put(wire.frame({"mac": wire.proof(server._secret, nonce, server.epoch)}))

    def _refuse(self, reason: str) -> None:
        transport = self._transport
        if transport is None:
            return
        self._server.refused += 1
        log.warning("channel_refused", shard=self._server._shard_index, reason=reason, welcomed=self.welcomed)
        transport.write(wire.frame({"refused": reason}))
        transport.close()
        self._transport = None

    def _call(self, document: Any) -> None:
        if (
            not isinstance(document, list)
            or len(document) != 3
            or not isinstance(document[0], int)
            or not isinstance(document[1], str)
            or not isinstance(document[2], bytes)
        ):
            self._refuse("a frame that is not a call")
            return
        call_id, method, payload = document
        if method == wire.PING:
            self._outbox.put(wire.answer_frame(call_id, True, None))
            return
        try:
            args, kwargs = wire.unpack(payload)
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise wire.WireError("not [args, kwargs]")
        except (wire.WireError, ValueError) as exc:  # this call alone: its caller learns why
            self._outbox.put(
                wire.answer_frame(call_id, False, wire.RemoteError(f"an unreadable call: {exc}"))
            )
            return
        if len(self._running) >= CONNECTION_CALLS_MAX:
            refused = Overloaded("too many calls at once on this connection", limit=CONNECTION_CALLS_MAX)
            self._outbox.put(wire.answer_frame(call_id, False, refused))
            return
        task = asyncio.get_running_loop().create_task(self._run(call_id, method, tuple(args), kwargs))
        self._running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._closing and not self._running:
            asyncio.get_running_loop().call_soon(self._close)  # after the answer's write

    async def _run(self, call_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ok, value = await self._server._answer(method, args, kwargs)
        self._server.calls += 1
        if self._transport is None:
            return  # the gateway went away; it retries what may be repeated
        self._outbox.put(wire.answer_frame(call_id, ok, value))

    def _send(self, frames: list[bytes]) -> None:
        if self._transport is not None:
            self._transport.write(b"".join(frames))
