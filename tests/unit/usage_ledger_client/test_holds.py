"""`client.hold(...)`: what it releases, captures and extends, against a fake server on httpx's
test transport (no server needed)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.unit.usage_ledger_client.test_client import problem
from usage_ledger_client import (
    HoldResolved,
    LedgerClient,
    MeterNotFound,
    TooManyHolds,
    Unavailable,
)


class FakeHolds:
    """/v1/holds as API.md has it, for one user; `failures[verb]` are answered first, in order."""

    def __init__(self) -> None:
        self.holds: dict[str, dict[str, Any]] = {}
        self.seen: list[httpx.Request] = []
        self.failures: dict[str, list[httpx.Response | Exception]] = {}

    def verbs(self) -> list[str]:
        return [_verb(request) for request in self.seen]

    def keys(self, verb: str) -> list[str]:
        return [r.headers["Idempotency-Key"] for r in self.seen if _verb(r) == verb]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        verb = _verb(request)
        if self.failures.get(verb):
            failure = self.failures[verb].pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        body = json.loads(request.content) if request.content else {}
        now = datetime.now(UTC)
        if verb == "create":
            hold_id = uuid.uuid4().hex
            amount = body.get("amount", body.get("minutes"))
            self.holds[hold_id] = {
                "hold_id": hold_id,
                "meter": body.get("meter"),
                "minutes": body.get("minutes"),
                "amount": amount,
                "state": "held",
                "captured": 0,
                "released": 0,
                "reference": body.get("reference"),
                "created_at": now.isoformat(),
                "expires_at": (now + timedelta(seconds=body["ttl_s"])).isoformat(),
                "resolved_at": None,
                "version": 1,
            }
            return httpx.Response(201, json=self.holds[hold_id])
        hold = self.holds[request.url.path.split("/")[3]]
        if verb == "get":
            return httpx.Response(200, json=hold)
        if hold["state"] != "held":
            answer = problem(409, "hold_resolved")
            return httpx.Response(409, json={**answer.json(), "state": hold["state"]})
        hold["version"] += 1
        if verb == "extend":
            hold["expires_at"] = (now + timedelta(seconds=body["ttl_s"])).isoformat()
        elif verb == "capture":
            captured = body.get("amount", hold["amount"])
            hold.update(state="captured", captured=captured, released=hold["amount"] - captured)
        else:
            hold.update(state="released", released=hold["amount"])
        if verb != "extend":
            hold["resolved_at"] = now.isoformat()
        return httpx.Response(200, json=hold)

    def client(self) -> LedgerClient:
        http = httpx.AsyncClient(base_url="http://ledger.test", transport=httpx.MockTransport(self.handler))
        return LedgerClient(http=http, token="t", max_attempts=4, backoff_base_s=0.0)


def _verb(request: httpx.Request) -> str:
    parts = request.url.path.split("/")  # "", "v1", "holds", id, verb
    if len(parts) == 3:
        return "create" if request.method == "POST" else "list"
    return parts[4] if len(parts) == 5 else "get"


async def test_a_body_that_raises_releases_the_hold_and_its_exception_propagates() -> None:
    server = FakeHolds()
    with pytest.raises(RuntimeError, match="the stream broke"):
        async with server.client().hold(meter="tokens", amount=4000, ttl_s=120) as hold:
            raise RuntimeError("the stream broke")
    assert server.verbs() == ["create", "release"]
    assert hold.state == "released" and server.holds[hold.hold_id]["released"] == 4000


async def test_a_body_that_does_not_capture_releases_and_never_captures() -> None:
    server = FakeHolds()
    async with server.client().hold(minutes=2.5, ttl_s=60) as hold:
        inside = hold.state
        assert hold.expires_at > datetime.now(UTC)
    assert server.verbs() == ["create", "release"]
    assert json.loads(server.seen[0].content) == {"minutes": 2.5, "ttl_s": 60}
    assert (inside, hold.state) == ("held", "released")


async def test_a_capture_is_not_followed_by_a_release_and_answers_the_same_again() -> None:
    server = FakeHolds()
    async with server.client().hold(meter="tokens", amount=4000, ttl_s=120, reference="c-1") as hold:
        captured = await hold.capture(1234)
        assert await hold.capture(1234) is captured, "the same capture: the same hold"
        with pytest.raises(HoldResolved) as other:
            await hold.capture(99)
        assert other.value.state == "captured"
    assert server.verbs() == ["create", "capture", "capture"]
    assert json.loads(server.seen[0].content) == {
        "meter": "tokens",
        "amount": 4000,
        "ttl_s": 120,
        "reference": "c-1",
    }
    assert json.loads(server.seen[1].content) == {"amount": 1234}
    assert (captured.state, captured.captured, captured.released) == ("captured", 1234, 2766)
    assert hold.state == "captured"


async def test_a_body_running_past_half_the_ttl_is_extended_until_it_ends() -> None:
    server = FakeHolds()
    async with server.client().hold(meter="tokens", amount=10, ttl_s=1) as hold:
        first_expiry = hold.expires_at
        await asyncio.sleep(1.3)  # past the TTL: extended at ~0.5 s and ~1.0 s
        assert server.verbs().count("extend") == 2
        assert hold.expires_at > first_expiry and hold.state == "held"
        await hold.capture(7)
    extends = [r for r in server.seen if _verb(r) == "extend"]
    assert all(json.loads(r.content) == {"ttl_s": 1} for r in extends)
    assert len(set(server.keys("extend"))) == 2, "one key per extension"
    await asyncio.sleep(0.7)
    assert server.verbs().count("extend") == 2, "the extender stops with the body"


async def test_retries_after_a_503_and_a_lost_answer_reuse_one_key_per_call() -> None:
    server = FakeHolds()
    server.failures["create"] = [problem(503, "unavailable", **{"Retry-After": "0"})]
    server.failures["capture"] = [
        problem(503, "unavailable", **{"Retry-After": "0"}),
        httpx.ReadTimeout("lost"),
    ]
    async with server.client().hold(meter="tokens", amount=10, ttl_s=60) as hold:
        await hold.capture(4)
    assert server.verbs() == ["create", "create", "capture", "capture", "capture"]
    [create_key] = set(server.keys("create"))
    [capture_key] = set(server.keys("capture"))
    assert create_key != capture_key
    assert len(server.holds) == 1 and hold.state == "captured"


async def test_a_capture_whose_answer_stayed_lost_is_retried_on_the_way_out_not_released() -> None:
    server = FakeHolds()
    server.failures["capture"] = [httpx.ConnectError("down")] * 4  # every try of the first call
    with pytest.raises(Unavailable):
        async with server.client().hold(meter="tokens", amount=10, ttl_s=60) as hold:
            await hold.capture(4)
    assert server.verbs() == ["create"] + ["capture"] * 5
    assert len(set(server.keys("capture"))) == 1, "the same capture, the same key"
    assert server.holds[hold.hold_id]["captured"] == 4


async def test_a_hold_that_expired_under_the_body_makes_capture_raise_and_the_exit_quiet() -> None:
    server = FakeHolds()
    async with server.client().hold(meter="tokens", amount=10, ttl_s=1) as hold:
        server.holds[hold.hold_id].update(state="expired", released=10)  # the server's alarm
        await asyncio.sleep(0.7)  # the extension is refused: 409
        assert hold.state == "expired"
        with pytest.raises(HoldResolved) as late:
            await hold.capture(3)
        assert late.value.state == "expired"
    assert server.verbs() == ["create", "extend", "get", "capture"], "no release of an expired hold"


async def test_too_many_holds_and_an_unknown_meter_are_raised_at_once() -> None:
    server = FakeHolds()
    server.failures["create"] = [problem(429, "too_many_holds", **{"Retry-After": "250"})]
    client = server.client()
    with pytest.raises(TooManyHolds) as raised:
        async with client.hold(meter="tokens", amount=1):
            pass
    assert raised.value.retry_after_s == 250
    server.failures["create"] = [problem(404, "meter_not_found")]
    with pytest.raises(MeterNotFound):
        await client.create_hold(meter="videos", amount=1)
    assert server.verbs() == ["create", "create"]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"meter": "tokens"}, {"amount": 1}, {"meter": "tokens", "amount": 1, "minutes": 1.0}],
)
def test_a_hold_is_of_a_meters_amount_or_of_minutes(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="meter"):
        FakeHolds().client().hold(**kwargs)
