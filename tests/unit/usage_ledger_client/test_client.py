"""The client's retry rules, against httpx's own test transport (no server needed)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from usage_ledger_client import LedgerClient, LedgerError, NoCredits, Unavailable
from usage_ledger_client import client as client_module

STARTED = {
    "session_id": "0b8e2a7e-0000-4000-8000-000000000001",
    "started_at": "2026-11-23T10:00:00Z",
    "minutes_remaining": 9.5,
    "ends_at": "2026-11-23T10:09:30Z",
    "version": 3,
}


def problem(status: int, code: str, **headers: str) -> httpx.Response:
    body = {
        "type": f"urn:usage-ledger:problem:{code}",
        "title": "x",
        "status": status,
        "detail": code,
        "code": code,
    }
    return httpx.Response(status, json=body, headers=headers)


def client_answering(answers: list[httpx.Response | Exception], seen: list[httpx.Request]) -> LedgerClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = httpx.AsyncClient(base_url="http://ledger.test", transport=httpx.MockTransport(handler))
    # The waits themselves are not under test here; Retry-After's floor is (test_backoff_*).
    return LedgerClient(http=http, token="t", max_attempts=4, backoff_base_s=0.0)


async def test_a_start_retried_after_503_and_a_lost_answer_reuses_one_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    client = client_answering(
        [
            problem(503, "unavailable", **{"Retry-After": "0"}),
            httpx.ReadTimeout("lost"),
            httpx.Response(201, json=STARTED),
        ],
        seen,
    )
    started = await client.start_session(topic="coffee")
    assert started.session_id == STARTED["session_id"]
    assert len(seen) == 3
    keys = {request.headers["Idempotency-Key"] for request in seen}
    assert len(keys) == 1 and keys != {""}
    assert all(json.loads(request.content) == {"topic": "coffee"} for request in seen)
    assert seen[0].headers["Authorization"] == "Bearer t"


async def test_each_operation_gets_its_own_key() -> None:
    seen: list[httpx.Request] = []
    client = client_answering([httpx.Response(201, json=STARTED), httpx.Response(201, json=STARTED)], seen)
    await client.start_session()
    await client.start_session()
    assert seen[0].headers["Idempotency-Key"] != seen[1].headers["Idempotency-Key"]


@pytest.mark.parametrize(
    ("answer", "kind", "code"),
    [
        (problem(403, "no_credits"), NoCredits, "no_credits"),
        (problem(422, "invalid_request"), LedgerError, "invalid_request"),
        (problem(422, "idempotency_conflict"), LedgerError, "idempotency_conflict"),
        (httpx.Response(500, text="boom"), LedgerError, "http_error"),
    ],
)
async def test_an_answer_that_retrying_cannot_change_is_raised_at_once(
    answer: httpx.Response, kind: type[LedgerError], code: str
) -> None:
    seen: list[httpx.Request] = []
    client = client_answering([answer], seen)
    with pytest.raises(kind) as raised:
        await client.start_session()
    assert raised.value.code == code and not isinstance(raised.value, Unavailable)
    assert len(seen) == 1


async def test_an_in_flight_conflict_and_rate_limits_are_retried_until_the_tries_run_out() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        problem(409, "idempotency_conflict", **{"Retry-After": "0"}),
        problem(429, "rate_limited", **{"Retry-After": "0"}),
        problem(429, "rate_limited", **{"Retry-After": "0"}),
        httpx.ConnectError("refused"),
    ]
    client = client_answering(answers, seen)
    with pytest.raises(Unavailable) as raised:
        await client.usage()
    assert len(seen) == 4
    assert "gave up after 4 tries" in raised.value.detail
    assert "Idempotency-Key" not in seen[0].headers  # a GET needs none


@pytest.mark.parametrize("make", [lambda: 0, lambda: -1])
def test_a_client_needs_at_least_one_try(make: Callable[[], int]) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        LedgerClient("http://ledger.test", token="t", max_attempts=make())


def test_backoff_never_waits_less_than_retry_after() -> None:
    waited = [
        client_module._backoff_s(1, Unavailable(503, "unavailable", "", {"retry_after_s": 3}))
        for _ in range(50)
    ]
    assert min(waited) >= 3
    free = [client_module._backoff_s(3, None) for _ in range(50)]
    assert max(free) <= client_module.BACKOFF_MAX_S
