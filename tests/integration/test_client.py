"""The Python client (`usage_ledger_client`) against a real server: Ray, Postgres, HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from gateway.auth import issue_token
from tests.harness import JWT_SECRET, RunningServer, auth, change_plan, new_user
from usage_ledger_client import (
    HoldResolved,
    LedgerClient,
    LimitReached,
    NoCredits,
    SessionActive,
    SessionProgress,
    Unauthorized,
)


def client_for(server: RunningServer, user: str, *, ttl_s: int = 600) -> LedgerClient:
    return LedgerClient(server.base_url, token=issue_token(secret=JWT_SECRET, user_id=user, ttl_s=ttl_s))


async def recent_sessions(http: httpx.AsyncClient, user: str) -> list[dict[str, object]]:
    answer = await http.get("/v1/sessions", headers=auth(user))
    assert answer.status_code == 200, answer.text
    return list(answer.json()["sessions"])


async def test_a_session_heartbeats_in_the_background_and_ends_on_the_way_out(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:
        async with ledger.session(topic="coffee", difficulty="beginner", heartbeat_interval_s=0.3) as session:
            assert (await ledger.usage()).active_session is not None
            await asyncio.sleep(1.2)
            assert session.last is not None and session.last.state == "active"
            with pytest.raises(SessionActive):
                await ledger.start_session()
        assert session.result is not None
        assert (session.result.state, session.result.end_reason) == ("ended", "user_ended")
        assert session.result.session_minutes >= 0.02
        assert (await ledger.usage()).active_session is None
    [row] = await recent_sessions(client, user)
    assert (row["session_id"], row["end_reason"], row["topic"]) == (
        session.session_id,
        "user_ended",
        "coffee",
    )


async def test_the_session_is_ended_even_when_the_body_raises(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:
        with pytest.raises(RuntimeError, match="the call dropped"):
            async with ledger.session(topic="dropped") as session:
                raise RuntimeError("the call dropped")
        assert (await ledger.usage()).active_session is None
    [row] = await recent_sessions(client, user)
    assert (row["session_id"], row["end_reason"]) == (session.session_id, "user_ended")


async def test_the_end_of_the_balance_warns_then_cancels_the_body_and_raises_limit_reached(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    """The `tiny` plan holds 6 s, all of it under the low-balance threshold."""
    user = new_user()
    assert (await change_plan(client, user, "tiny")).status_code == 200
    warnings: list[SessionProgress] = []
    limits: list[SessionProgress] = []
    body_finished = False
    began = time.monotonic()
    async with client_for(server, user) as ledger:
        with pytest.raises(LimitReached) as raised:
            async with ledger.session(
                heartbeat_interval_s=1.0, on_low_balance=warnings.append, on_limit_reached=limits.append
            ):
                await asyncio.sleep(60)
                body_finished = True
        took_s = time.monotonic() - began
        assert not body_finished and took_s < 20, took_s
        assert len(warnings) == 1 and warnings[0].warning == "low_balance"
        assert len(limits) == 1 and limits[0] is raised.value.result
        assert raised.value.result.end_reason == "limit_reached"
        assert raised.value.result.minutes_remaining == 0
        with pytest.raises(NoCredits):
            async with ledger.session():
                pass
    [row] = await recent_sessions(client, user)
    assert row["end_reason"] == "limit_reached"


async def test_an_outer_cancellation_is_not_mistaken_for_the_limit(server: RunningServer) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:

        async def call() -> None:
            async with ledger.session(heartbeat_interval_s=0.2):
                await asyncio.sleep(60)

        task = asyncio.create_task(call())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await ledger.usage()).active_session is None  # ended on the way out all the same


async def test_a_bad_token_is_unauthorized_at_once(server: RunningServer) -> None:
    async with LedgerClient(server.base_url, token="not.a.token") as ledger:
        with pytest.raises(Unauthorized):
            async with ledger.session():
                pass


async def generations(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    """The free plan's `generations` meter (tests/integration/plans.toml: 5 a day)."""
    answer = await http.get("/v1/credits", headers=auth(user))
    assert answer.status_code == 200, answer.text
    return answer.json()["meters"]["generations"]  # type: ignore[no-any-return]


async def test_a_hold_captures_part_and_the_rest_goes_back_at_once(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:
        async with ledger.hold(meter="generations", amount=4, ttl_s=60, reference="completion-1") as hold:
            meter = await generations(client, user)
            assert (meter["held"], meter["used"], meter["remaining"]) == (4, 0, 1)
            assert [h.hold_id for h in await ledger.list_holds()] == [hold.hold_id]
            captured = await hold.capture(3)
            assert await hold.capture(3) == captured
        assert (captured.state, captured.captured, captured.released) == ("captured", 3, 1)
        assert (await ledger.get_hold(hold.hold_id)) == captured, "no release after the capture"
        with pytest.raises(HoldResolved) as again:
            await ledger.release_hold(hold.hold_id)
        assert again.value.state == "captured"
        assert await ledger.list_holds() == []
    meter = await generations(client, user)
    assert (meter["held"], meter["used"], meter["remaining"]) == (0, 3, 2)


async def test_a_body_that_raises_releases_its_hold(server: RunningServer, client: httpx.AsyncClient) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:
        with pytest.raises(RuntimeError, match="the stream broke"):
            async with ledger.hold(meter="generations", amount=5, ttl_s=60) as hold:
                assert (await generations(client, user))["remaining"] == 0
                raise RuntimeError("the stream broke")
        assert hold.state == "released"
        shown = await ledger.get_hold(hold.hold_id)
        assert (shown.state, shown.captured, shown.released) == ("released", 0, 5)
    meter = await generations(client, user)
    assert (meter["held"], meter["used"], meter["remaining"]) == (0, 0, 5)


async def test_a_body_running_past_its_ttl_keeps_the_hold_and_then_captures(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:
        async with ledger.hold(meter="generations", amount=2, ttl_s=2) as hold:
            first_expiry = hold.expires_at
            await asyncio.sleep(3)  # the hold would have expired at 2 s
            assert hold.state == "held" and hold.expires_at > first_expiry
            assert (await generations(client, user))["held"] == 2
            captured = await hold.capture(2)
        assert (captured.state, captured.captured) == ("captured", 2)
    meter = await generations(client, user)
    assert (meter["held"], meter["used"]) == (0, 2)


async def test_a_minutes_hold_bills_what_it_captures(server: RunningServer) -> None:
    user = new_user()
    async with client_for(server, user) as ledger:
        async with ledger.hold(minutes=2.5, ttl_s=60) as hold:
            assert (hold.current is not None) and (hold.current.meter, hold.current.minutes) == (None, 2.5)
            captured = await hold.capture(1.5)
        assert (captured.captured, captured.released) == (1.5, 1.0)
        assert (await ledger.usage()).minutes_used >= 1.5
