"""ASGI plumbing shared by the middleware that must see a whole request body before the app does."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope


class BodyTooLarge(Exception):
    """The body grew past the bound; `ended` when its last part was read too (nothing to drain)."""

    def __init__(self, *, ended: bool) -> None:
        super().__init__("the request body is too large")
        self.ended = ended


async def read_body(receive: Receive, *, max_bytes: int | None = None) -> bytes | None:
    """The whole request body; None if the client went away. Raises `BodyTooLarge`."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body.extend(message.get("body", b""))
        if max_bytes is not None and len(body) > max_bytes:
            raise BodyTooLarge(ended=not message.get("more_body", False))
        if not message.get("more_body", False):
            return bytes(body)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app `body` once, then defers to the real one (for disconnects)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower-case bytes), decoded as latin-1; None when absent."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
