"""The gateway's end of the data plane: one persistent connection from this process to each shard.

`ShardChannel.call` sends one call of a batchable operation and returns its
answer (or raises the error the shard raised for it), as `ShardBatcher.call`
does over Ray (see `actors.channel` for the shard's end, `actors.wire` for the
frames). Calls are pipelined: many are in flight on one connection, each
answered when the shard is done with it; the calls made in one turn of the
event loop leave in one write, which is all the batching there is.

The connection is made on first use: the shard is asked over Ray where it
listens and with which epoch (`LedgerShard.channel`), then dialled (its Unix
socket when it runs on this node, else TCP) and both ends prove they hold the
shards' secret. When the connection is lost (the shard died or restarted),
every call on it fails with `ShardUnreachable(sent=True)` and the next call
makes a new connection the same way, so a restarted shard costs a reconnect.
A connection gone silent (pinged, no pong) is retired: new calls reconnect,
calls on it still get their answers if they come. The router retries what
may be repeated (`gateway.shards`); a failure to connect is
`ShardUnreachable(sent=False)`: nothing was sent, so any call may be tried
again.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal, cast

import ray.exceptions
import structlog

from actors import wire
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.channel")

# Asking Ray where a shard listens, dialling it and the handshake, together.
CONNECT_TIMEOUT_S = 5.0
# While calls are pending and nothing has arrived for this long, the shard is asked for a pong
# (`wire.PING`); a connection that stays silent as long again is retired (a peer gone without a
# close: a node cut off, a host that vanished): new calls go on a new connection, while the calls
# already on it keep waiting for their answers, within their callers' own time limits.
SILENCE_PING_S = 2.0
# A retired connection is closed this long after it was retired (its callers have given up by then).
RETIRED_KEPT_S = 60.0


class ShardUnreachable(Exception):
    """The data plane to a shard failed. `sent`: the call may have reached the shard (and run)."""

    def __init__(self, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.sent = sent


class ShardChannel:
    """The data plane from this process to one shard (see the module's docstring)."""

    def __init__(
        self,
        resolve: Callable[[], Awaitable[wire.ChannelAddress]],
        metrics: Metrics,
        *,
        node_id: str | None,
        silence_ping_s: float = SILENCE_PING_S,
    ) -> None:
        """`resolve`: asks the shard where it listens (over Ray: its handle's `channel.remote`)."""
        self._resolve = resolve
        self._silence_ping_s = silence_ping_s
        self._metrics = metrics
        self._node_id = node_id  # this process's Ray node: a shard on it is dialled on its socket
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self.connects = 0

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call's result; raises what the shard raised for it, or `ShardUnreachable`."""
        link = self._link
        if link is None or not link.is_open:
            link = await self._connected()
        return await link.call(method, args, kwargs)

    @property
    def epoch(self) -> int | None:
        """The epoch of the activation this process is connected to (None: not connected)."""
        link = self._link
        return link.address.epoch if link is not None and link.is_open else None

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._connecting is not None:
            self._connecting.cancel()

    async def _connected(self) -> _Link:
        # One connection attempt at a time, shared by every caller that needs it; not cancelled by a
        # caller that stops waiting (its own time limit), so the others still get it.
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(task)

    async def _connect(self) -> _Link:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                address = await self._resolve()
                loop = asyncio.get_running_loop()
                link = _Link(address, self._metrics, silence_ping_s=self._silence_ping_s)
                how: Literal["unix", "tcp"] = "unix" if address.node_id == self._node_id else "tcp"
                if how == "unix":
                    try:
                        await loop.create_unix_connection(lambda: link, address.unix_path)
                    except OSError:  # not on this node after all (the same id, another host)
                        how = "tcp"
                if how == "tcp":
                    await loop.create_connection(lambda: link, address.host, address.port)
                await link.ready
        except ShardUnreachable:
            raise
        except TimeoutError:
            raise ShardUnreachable("the shard's channel did not answer in time", sent=False) from None
        except (OSError, ray.exceptions.RayError) as exc:
            detail = f"cannot reach the shard's channel: {type(exc).__name__}"
            raise ShardUnreachable(detail, sent=False) from exc
        self._link = link
        self.connects += 1
        self._metrics.channel_connects.labels(how).inc()
        log.info("channel_connected", via=how, epoch=address.epoch, host=address.host, port=address.port)
        return link


class _Link(asyncio.Protocol):
    """One connection to one shard activation: the handshake, then pipelined calls."""

    def __init__(self, address: wire.ChannelAddress, metrics: Metrics, *, silence_ping_s: float) -> None:
        self.address = address
        self._silence_ping_s = silence_ping_s
        self._metrics = metrics
        self._reader = wire.FrameReader()
        self._transport: asyncio.Transport | None = None
        self._nonce = secrets.token_bytes(wire.NONCE_BYTES)
        self._state: Literal["greeting", "proving", "open", "retired", "closed"] = "greeting"
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._outbox = wire.Outbox(self._send)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self._heard_at = loop.time()  # when a frame last arrived
        self._pinged_at: float | None = None  # a ping not answered yet was sent then
        self._watchdog = loop.call_later(silence_ping_s, self._watch)

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        if self._state != "open":
            raise ShardUnreachable("the connection to the shard is closed", sent=False)
        call_id = next(self._ids)
        data = wire.call_frame(call_id, method, args, kwargs)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        future.add_done_callback(lambda _, call_id=call_id: self._calls.pop(call_id, None))  # type: ignore[misc]
        self._outbox.put(data)
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)

    def data_received(self, data: bytes) -> None:
        self._heard_at = asyncio.get_running_loop().time()
        self._pinged_at = None
        try:
            documents = self._reader.feed(data)
        except wire.WireError as exc:
            self._lose(f"the shard sent what is not a frame: {exc}")
            return
        for document in documents:
            if self._state in ("open", "retired"):
                self._answered(document)
            elif self._state == "greeting":
                self._prove(document)
            elif self._state == "proving":
                self._welcomed(document)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = "closed"
        self._transport = None
        self._watchdog.cancel()
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(ShardUnreachable("the connection to the shard was lost", sent=True))
        if not self.ready.done():
            self.ready.set_exception(ShardUnreachable("the shard closed the connection", sent=False))

    def _watch(self) -> None:
        """Every `silence_ping_s`: ping a connection silent while calls wait; give up on one that
        stayed silent since the last ping."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._state == "closed":
            return
        bound_s = self._silence_ping_s
        if self._state == "retired":
            return
        if self._pinged_at is not None and now - self._pinged_at >= bound_s:
            # New calls go on a new connection; these keep waiting (their callers' time limits).
            log.warning("channel_retired", silent_s=round(now - self._heard_at, 1), epoch=self.address.epoch)
            self._state = "retired"
            loop.call_later(RETIRED_KEPT_S, self.close)
            return
        silent = now - self._heard_at >= bound_s
        if self._pinged_at is None and silent and (self._calls or self._state != "open"):
            if self._state == "open":
                self._pinged_at = now
                self._outbox.put(wire.call_frame(next(self._ids), wire.PING, (), {}))
            else:  # still greeting: the handshake has this long too
                self._lose("the shard did not finish the handshake")
                return
        self._watchdog = loop.call_later(bound_s, self._watch)

    # The handshake

    def _prove(self, hello: Any) -> None:
        if not isinstance(hello, dict) or hello.get("v") != wire.PROTOCOL_VERSION:
            self._lose("the shard does not speak this protocol")
            return
        nonce = hello.get("nonce")
        if not isinstance(nonce, bytes):
            self._lose("the shard does not speak this protocol")
            return
        epoch = self.address.epoch
        self._state = "proving"
        self._outbox.put(
            wire.frame(
                {
                    "v": wire.PROTOCOL_VERSION,
                    "epoch": epoch,
                    "mac": wire.proof(self.address.secret, nonce, epoch),
                    "nonce": self._nonce,
                }
            )
        )

    def _welcomed(self, answer: Any) -> None:
        if self.ready.done():  # the connect gave up meanwhile
            self._lose("the handshake finished too late")
            return
        if isinstance(answer, dict) and "refused" in answer:
            self._lose(f"the shard refused the connection: {answer['refused']}")
            return
        mac = answer.get("mac") if isinstance(answer, dict) else None
        if not wire.proves(self.address.secret, self._nonce, self.address.epoch, mac):
            self._lose("the shard did not prove it holds the secret")
            return
        self._state = "open"
        self._reader.max_frame_bytes = wire.FRAME_MAX_BYTES
        self.ready.set_result(None)

    # Calls

    def _answered(self, answer: Any) -> None:
        if isinstance(answer, dict):  # refused mid-stream (a frame too large, say); it closes next
            log.error("channel_refused", reason=answer.get("refused"))
            return
        if (
            not isinstance(answer, list)
            or len(answer) != 3
            or not isinstance(answer[0], int)
            or not isinstance(answer[2], bytes)
        ):
            self._lose("the shard sent what is not an answer")
            return
        call_id, ok, payload = answer
        future = self._calls.pop(call_id, None)
        if future is None or future.done():
            return  # its caller stopped waiting (or a pong)
        try:
            value = wire.unpack(payload)
        except wire.WireError as exc:  # this answer alone (a view of another version, say)
            ok, value = False, wire.RemoteError(f"an unreadable answer: {exc}")
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value if isinstance(value, Exception) else wire.RemoteError(repr(value)))

    def _send(self, frames: list[bytes]) -> None:
        if self._transport is None:
            return
        if self._state == "open":
            self._metrics.shard_batch_size.observe(len(frames))
        self._transport.write(b"".join(frames))

    def _lose(self, reason: str) -> None:
        """Give up on this connection: `ready` and every call fail with `reason`."""
        log.warning("channel_lost", reason=reason, epoch=self.address.epoch)
        self._watchdog.cancel()
        if not self.ready.done():
            self.ready.set_exception(ShardUnreachable(reason, sent=False))
        self._state = "closed"
        if self._transport is not None:
            self._transport.abort()  # (not close: that would wait to send to a peer that may be gone)
