"""The data plane's encoding: every value a hot call takes or returns crosses intact, and a peer can
make us build nothing but those."""

from __future__ import annotations

import msgpack
import pytest

from actors import errors, views, wire
from actors.replies import IdempotencyKey

ACTIVE = views.ActiveSessionView("s1", 1, 2, 3, 4)
USAGE = views.UsageView("u1", "free", 0, 10, 600_000, 5, 6, 7, 13, "low_balance", ACTIVE, 9, held_ms=2)
HOLD = views.HoldView("hold_1", "tokens", 10, "held", 0, 0, None, 1, 2, None, 3)
VALUES = [
    USAGE,
    views.UsageView("u1", "free", 0, 10, 600_000, 5, 6, 7, 13, None, None, 9),
    views.SessionProgress("s1", "ended", "limit_reached", 1, 2, 3, "exhausted", None, 4),
    views.SessionStarted("s1", 1, 2, 3, 4),
    views.CurrentSession("s1", 1, 2, 3, 4, 5, "topic", "advanced", 6),
    views.MeterConsumed("tokens", None, 5, 6),
    HOLD,
    views.Page([HOLD, HOLD], 7),
    views.CreditsView(1, 2, 3, {"tokens": views.MeterView(10, 2, 8, "day", 99, held=1)}, 4),
    views.UsageChange(USAGE, ()),
    IdempotencyKey("key", "hash"),
    {"nested": [1, 2.5, None, True, "é", b"\x00"]},
]


def _answer(data: bytes) -> tuple[int, bool, object]:
    (envelope,) = wire.FrameReader(wire.FRAME_MAX_BYTES).feed(data)
    call_id, ok, payload = envelope
    return call_id, ok, wire.unpack(payload)


@pytest.mark.parametrize("value", VALUES, ids=lambda value: type(value).__name__)
def test_values_cross_intact(value: object) -> None:
    _, ok, document = _answer(wire.answer_frame(7, True, value))
    assert ok
    assert document == value
    assert type(document) is type(value)


def test_domain_errors_cross_as_themselves_with_their_fields() -> None:
    _, ok, value = _answer(wire.answer_frame(1, False, errors.RateLimited("slow down", wait_ms=250)))
    assert not ok
    assert type(value) is errors.RateLimited
    assert (value.detail, value.fields, value.code) == ("slow down", {"wait_ms": 250}, "rate_limited")


def test_an_unexpected_error_crosses_as_its_name_and_text() -> None:
    _, _, value = _answer(wire.answer_frame(1, False, ZeroDivisionError("division by zero")))
    assert isinstance(value, wire.RemoteError)
    assert str(value) == "ZeroDivisionError: division by zero"


def test_an_answer_that_cannot_cross_is_an_error_for_its_call() -> None:
    call_id, ok, value = _answer(wire.answer_frame(3, True, object()))
    assert (call_id, ok) == (3, False)
    assert isinstance(value, wire.RemoteError)
    assert "cannot send a object" in str(value)


def test_frames_split_anywhere_are_read_whole() -> None:
    data = (
        wire.call_frame(1, "usage", ("u1",), {})
        + wire.answer_frame(1, True, HOLD)
        + wire.frame({"mac": b"m"})
    )
    reader = wire.FrameReader(wire.FRAME_MAX_BYTES)
    documents = []
    for index in range(len(data)):
        documents += reader.feed(data[index : index + 1])
    assert documents[0][:2] == [1, "usage"]
    assert wire.unpack(documents[0][2]) == [["u1"], {}]
    assert wire.unpack(documents[1][2]) == HOLD
    assert documents[2] == {"mac": b"m"}


def test_a_frame_too_large_is_refused_on_both_ends() -> None:
    with pytest.raises(wire.WireError, match="larger than"):
        wire.frame(["x" * (wire.FRAME_MAX_BYTES + 1)])
    header = wire.HEADER.pack(wire.FRAME_MAX_BYTES + 1)
    with pytest.raises(wire.WireError, match="larger than"):
        wire.FrameReader(wire.FRAME_MAX_BYTES).feed(header)  # on its length, before its body arrives
    # Before the handshake, a frame is a few hundred bytes at most.
    with pytest.raises(wire.WireError, match="larger than"):
        wire.FrameReader().feed(wire.HEADER.pack(wire.HANDSHAKE_FRAME_MAX_BYTES + 1))


def test_values_nested_past_ours_are_refused_not_recursed_into() -> None:
    """An extension in an extension, ~200 deep, is ~1 KB: decoding it naively recurses in C until the
    stack overflows (a crash, not an exception)."""
    ext = msgpack.ExtType(1, msgpack.packb(["UsageView"]))
    for _ in range(300):
        ext = msgpack.ExtType(1, msgpack.packb(["Page", ext]))
    with pytest.raises(wire.WireError, match="nested deeper"):
        wire.unpack(msgpack.packb(ext))


def test_an_envelope_holds_no_extensions_and_nothing_large() -> None:
    for envelope in (
        [1, "usage", msgpack.ExtType(1, b"")],  # an extension outside a payload
        [[]] * 5,  # more items than an envelope has
        {"reason": "x" * 2_000},  # a long string
    ):
        body = msgpack.packb(envelope)
        with pytest.raises(wire.WireError):
            wire.FrameReader(wire.FRAME_MAX_BYTES).feed(wire.HEADER.pack(len(body)) + body)


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(1, msgpack.packb(["Popen", "rm -rf /"])),  # not a registered type
        msgpack.ExtType(1, msgpack.packb(["UsageView", 1])),  # the wrong fields
        msgpack.ExtType(2, msgpack.packb(["SystemExit", "bye", {}])),  # not a domain error
        msgpack.ExtType(9, b"\x90"),  # not an extension we use
    ],
)
def test_a_peer_can_make_us_build_nothing_but_our_values(ext: msgpack.ExtType) -> None:
    with pytest.raises(wire.WireError):
        wire.unpack(msgpack.packb([1, True, ext]))


def test_values_we_do_not_know_are_not_sent() -> None:
    with pytest.raises(TypeError, match="cannot send"):
        wire.pack(object())


def test_a_proof_holds_for_its_secret_nonce_and_epoch_only() -> None:
    mac = wire.proof(b"secret", b"n" * 16, 7)
    assert wire.proves(b"secret", b"n" * 16, 7, mac)
    assert not wire.proves(b"other", b"n" * 16, 7, mac)
    assert not wire.proves(b"secret", b"m" * 16, 7, mac)
    assert not wire.proves(b"secret", b"n" * 16, 8, mac)
    assert not wire.proves(b"secret", b"n" * 16, 7, "not bytes")
