"""The Python client (`usage_ledger_client`) against a real server: Ray, Postgres, HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.auth import issue_token
from tests.harness import JWT_SECRET, RunningServer, auth, change_plan, new_user
from usage_ledger_client import (
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
