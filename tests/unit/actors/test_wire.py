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


@pytest.mark.parametrize("value", VALUES, ids=lambda value: type(value).__name__)
def test_values_cross_intact(value: object) -> None:
    (document,) = wire.FrameReader().feed(wire.frame(value))
    assert document == value
    assert type(document) is type(value)


def test_domain_errors_cross_as_themselves_with_their_fields() -> None:
    refused = errors.RateLimited("slow down", wait_ms=250)
    (document,) = wire.FrameReader().feed(wire.frame([1, False, refused]))
    _, ok, value = document
    assert not ok
    assert type(value) is errors.RateLimited
    assert (value.detail, value.fields, value.code) == ("slow down", {"wait_ms": 250}, "rate_limited")


def test_an_unexpected_error_crosses_as_its_name_and_text() -> None:
    (document,) = wire.FrameReader().feed(wire.frame(ZeroDivisionError("division by zero")))
    assert isinstance(document, wire.RemoteError)
    assert str(document) == "ZeroDivisionError: division by zero"


def test_frames_split_anywhere_are_read_whole() -> None:
    data = wire.frame(USAGE) + wire.frame(HOLD) + wire.frame([1, True, None])
    reader = wire.FrameReader()
    documents = []
    for index in range(len(data)):
        documents += reader.feed(data[index : index + 1])
    assert documents == [USAGE, HOLD, [1, True, None]]


def test_a_frame_too_large_is_refused_on_both_ends() -> None:
    with pytest.raises(wire.WireError, match="larger than"):
        wire.frame("x" * (wire.FRAME_MAX_BYTES + 1))
    header = wire.HEADER.pack(wire.FRAME_MAX_BYTES + 1)
    with pytest.raises(wire.WireError, match="larger than"):
        wire.FrameReader().feed(header)  # refused on its length, before any of its body arrives


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
    body = msgpack.packb([1, True, ext])
    with pytest.raises(wire.WireError):
        wire.FrameReader().feed(wire.HEADER.pack(len(body)) + body)


def test_values_we_do_not_know_are_not_sent() -> None:
    with pytest.raises(TypeError, match="cannot send"):
        wire.frame(object())


def test_a_proof_holds_for_its_secret_nonce_and_epoch_only() -> None:
    mac = wire.proof(b"secret", b"n" * 16, 7)
    assert wire.proves(b"secret", b"n" * 16, 7, mac)
    assert not wire.proves(b"other", b"n" * 16, 7, mac)
    assert not wire.proves(b"secret", b"m" * 16, 7, mac)
    assert not wire.proves(b"secret", b"n" * 16, 8, mac)
    assert not wire.proves(b"secret", b"n" * 16, 7, "not bytes")
