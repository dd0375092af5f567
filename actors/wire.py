"""The data plane's wire format: frames, the handshake, and how calls and answers are encoded.

A connection from a gateway process to a shard (`actors.channel` serves it,
`gateway.channel` dials it) carries frames: a 4-byte big-endian length, then a
msgpack envelope of at most `FRAME_MAX_BYTES` (`HANDSHAKE_FRAME_MAX_BYTES`
until the handshake is done).

    shard   → gateway   HELLO   {"v", "nonce"}
    gateway → shard     PROOF   {"v", "epoch", "mac", "nonce"}    mac = HMAC(secret, shard nonce ‖ epoch)
    shard   → gateway   WELCOME {"mac"}                           mac = HMAC(secret, gateway nonce ‖ epoch)
                        or REFUSED {"refused": reason}, then the shard closes
    gateway → shard     [call id, method, payload]                many, pipelined; payload: [args, kwargs]
    shard   → gateway   [call id, ok, payload]                    each when it is done, in any order

Envelopes are plain msgpack read with tight limits (no extension types, a few
items, short strings), so what a peer sends before it has proved itself costs
a few hundred bytes and builds nothing. A payload is msgpack bytes of its own,
decoded only for the call it belongs to: a value one side cannot read (a view
of another version, say) fails that call alone, not the connection.

A call of `PING` is answered at once by the connection itself (the gateway
asks when calls are pending and nothing has arrived for a while: a peer that
vanished without closing the connection, a node cut off, shows as silence).

Both ends prove they hold the activation's secret without sending it, and the
gateway names the activation epoch it was told of, so it never talks to an
activation that has since been replaced.

Values are msgpack's own types plus, as extension types, the domain's
dataclasses (views, idempotency keys) and its errors, each by class name from
a fixed registry. Nothing is unpickled: a peer can make us build only these.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import operator
import struct
import threading
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from actors import errors, views
from actors.replies import IdempotencyKey

PROTOCOL_VERSION = 1
FRAME_MAX_BYTES = 1 << 20  # 1 MiB: a page of 1,000 holds is ~300 KB
HANDSHAKE_FRAME_MAX_BYTES = 512  # HELLO, PROOF, WELCOME and REFUSED are under 200 bytes
# Views nest (a usage view holds its active session, a page its holds): deeper is not ours.
EXTENSION_DEPTH_MAX = 4
_ENVELOPE_TEXT_MAX = 1_024  # a method name, a refusal's reason
NONCE_BYTES = 16
PING = "__ping__"  # a call the shard's connection answers itself (not an operation)
HEADER = struct.Struct(">I")

_DATACLASS, _DOMAIN_ERROR, _OTHER_ERROR = 1, 2, 3


class WireError(Exception):
    """A peer broke the protocol (a frame too large, a document that is not one we know)."""


class RemoteError(Exception):
    """An unexpected error raised in the shard (not a domain error), as its type name and text."""


def _dataclasses() -> dict[str, type[Any]]:
    """The views (`actors.views`) and the idempotency key: all a hot call takes or returns."""
    found: dict[str, type[Any]] = {
        name: value
        for name, value in vars(views).items()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == views.__name__
    }
    found[IdempotencyKey.__name__] = IdempotencyKey
    return found


def _domain_errors() -> dict[str, type[errors.DomainError]]:
    found: dict[str, type[errors.DomainError]] = {}
    pending: list[type[errors.DomainError]] = [errors.DomainError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


class _Shape:
    """How one dataclass crosses: its field values in order, and the fields that are tuples."""

    __slots__ = ("cls", "name", "tuples", "values")

    def __init__(self, cls: type[Any]) -> None:
        names = [field.name for field in dataclasses.fields(cls)]
        hints = typing.get_type_hints(cls)
        self.cls = cls
        self.name = cls.__name__
        getter = operator.attrgetter(*names)
        self.values: Callable[[Any], tuple[Any, ...]] = (
            getter if len(names) > 1 else (lambda value: (getter(value),))
        )
        self.tuples = tuple(
            index for index, name in enumerate(names) if typing.get_origin(hints[name]) is tuple
        )


_SHAPES = {cls: _Shape(cls) for cls in _dataclasses().values()}
_BY_NAME = {shape.name: shape for shape in _SHAPES.values()}
_ERRORS = _domain_errors()


def _default(value: Any) -> Any:
    shape = _SHAPES.get(type(value))
    if shape is not None:
        return msgpack.ExtType(_DATACLASS, pack([shape.name, *shape.values(value)]))
    if isinstance(value, errors.DomainError) and _ERRORS.get(type(value).__name__) is type(value):
        return msgpack.ExtType(_DOMAIN_ERROR, pack([type(value).__name__, value.detail, value.fields]))
    if isinstance(value, BaseException):
        return msgpack.ExtType(_OTHER_ERROR, pack([type(value).__name__, str(value)]))
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot send a {type(value).__name__} over the data plane")


class _Depth(threading.local):
    value = 0


_depth = _Depth()


def _ext(code: int, data: bytes) -> Any:
    if _depth.value >= EXTENSION_DEPTH_MAX:
        raise WireError(f"values nested deeper than {EXTENSION_DEPTH_MAX}")
    _depth.value += 1
    try:
        document = unpack(data)
    finally:
        _depth.value -= 1
    if code == _DATACLASS:
        shape = _BY_NAME.get(document[0]) if isinstance(document, list) and document else None
        if shape is None:
            raise WireError("unknown type")
        values = document[1:]
        for index in shape.tuples:
            values[index] = tuple(values[index])
        return shape.cls(*values)
    if code == _DOMAIN_ERROR:
        cls = _ERRORS.get(document[0]) if isinstance(document, list) and len(document) == 3 else None
        if cls is None:
            raise WireError("unknown error")
        return cls(document[1], **document[2])
    if code == _OTHER_ERROR:
        return RemoteError(f"{document[0]}: {document[1]}")
    raise WireError(f"unknown extension {code}")


def pack(value: Any) -> bytes:
    """A payload: `value` (msgpack's types, the registered dataclasses, errors) as bytes."""
    return msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """The value of a payload (raises `WireError` if it is not one we know)."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as exc:  # msgpack's own errors, a dataclass given the wrong fields, …
        raise WireError(f"a value that is not one we know: {type(exc).__name__}") from None


def _no_extensions(code: int, data: bytes) -> Any:
    raise WireError("an envelope holds no extension types")


def _envelope(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_no_extensions,
            raw=False,
            strict_map_key=True,
            max_str_len=_ENVELOPE_TEXT_MAX,
            max_bin_len=FRAME_MAX_BYTES,
            max_array_len=4,
            max_map_len=4,
        )
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"an envelope that is not one we know: {type(exc).__name__}") from None


def frame(envelope: Any) -> bytes:
    """`envelope` (plain msgpack: payloads in it are bytes) as one frame, length prefix included."""
    body: bytes = msgpack.packb(envelope, use_bin_type=True)
    if len(body) > FRAME_MAX_BYTES:
        raise WireError(f"a frame of {len(body)} bytes is larger than {FRAME_MAX_BYTES}")
    return HEADER.pack(len(body)) + body


def call_frame(call_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return frame([call_id, method, pack([args, kwargs])])


def answer_frame(call_id: int, ok: bool, value: Any) -> bytes:
    """An answer; one that cannot cross (a value we cannot send, too large) is an error instead."""
    try:
        return frame([call_id, ok, pack(value)])
    except Exception as exc:
        error = RemoteError(f"the answer could not be sent: {type(exc).__name__}: {exc}")
        return frame([call_id, False, pack(error)])


class FrameReader:
    """Envelopes out of a byte stream: feed what arrives, take those that are complete. Frames are
    bounded by `max_frame_bytes` (raise it once the peer has proved itself)."""

    __slots__ = ("_buffer", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = HANDSHAKE_FRAME_MAX_BYTES) -> None:
        self._buffer = bytearray()
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[Any]:
        """The envelopes `data` completes; `WireError` on a frame too large or not an envelope."""
        buffer = self._buffer
        buffer += data
        documents = []
        start = 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            if length > self.max_frame_bytes:
                raise WireError(f"a frame of {length} bytes is larger than {self.max_frame_bytes}")
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            documents.append(_envelope(bytes(buffer[start + HEADER.size : end])))
            start = end
        if start:
            del buffer[:start]
        return documents


class Outbox:
    """Frames queued in one turn of the event loop, handed to `send` together at its end: both ends
    of a connection write what they have to say in a turn in one send."""

    __slots__ = ("_frames", "_send")

    def __init__(self, send: Callable[[list[bytes]], None]) -> None:
        self._send = send
        self._frames: list[bytes] = []

    def put(self, data: bytes) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.append(data)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        self._send(frames)


def proof(secret: bytes, nonce: bytes, epoch: int) -> bytes:
    """What proves the holder of `secret` answered `nonce` for activation `epoch`."""
    return hmac.new(secret, nonce + epoch.to_bytes(8, "big", signed=True), hashlib.sha256).digest()


def proves(secret: bytes, nonce: bytes, epoch: int, mac: object) -> bool:
    return isinstance(mac, bytes) and hmac.compare_digest(proof(secret, nonce, epoch), mac)


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelAddress:
    """Where one shard activation listens, as it tells gateways over Ray (the control plane)."""

    node_id: str  # the Ray node it runs on: a gateway on the same node dials `unix_path`
    unix_path: str
    host: str
    port: int
    epoch: int  # the activation's fencing epoch: a newer activation has a larger one
    secret: bytes = dataclasses.field(repr=False)  # the shards' channel secret (see `ShardConfig`)
