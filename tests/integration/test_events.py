"""Threshold events against a real server: the outbox in Postgres, signed webhooks to a real
receiver over HTTP (stopped for a minute and started again), and the live stream.

This module's server has LEDGER_EVENTS_WEBHOOK_URL set to a receiver in the test process and a
3-second low-balance threshold, so the 6-second `tiny` plan crosses it within seconds. It has a
database of its own: the outbox is per database, and this server must deliver only its events.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import uvicorn
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from persistence.embedded import ensure_database
from tests.harness import (
    QuietServer,
    RunningServer,
    ServerFactory,
    auth,
    change_plan,
    eventually,
    new_user,
    samples,
    signed,
    sse_frames,
    total,
    with_database,
)

EVENTS_SECRET = "whsec_" + "ZXZlbnRzLXdlYmhvb2staW50ZWdyYXRpb24tdGVzdC1rZXk="
LOW_BALANCE_S = 3.0
RETRY_MAX_S = 5.0
RECEIVER_DOWN_S = 60.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A webhook receiver on a fixed port that can go down (connection refused) and come back."""

    port: int
    received: list[Received] = field(default_factory=list)
    _server: QuietServer | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/ledger"

    async def _hook(self, request: Request) -> Response:
        self.received.append(Received(dict(request.headers), await request.body()))
        return Response(status_code=204)

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        app = Starlette(routes=[Route("/hooks/ledger", self._hook, methods=["POST"])])
        self._server = QuietServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
        await eventually(self._started, timeout_s=10, every_s=0.02)

    async def _started(self) -> bool:
        return self._server is not None and self._server.started

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None

    def of(self, user: str) -> list[Received]:
        return [r for r in self.received if r.payload["data"]["user_id"] == user]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest_asyncio.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    running = Receiver(_free_port())
    await running.start()
    yield running
    await running.stop()


@pytest_asyncio.fixture(scope="module")
async def events_dsn(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"ledger_events_{uuid.uuid4().hex[:12]}"
    await ensure_database(postgres_dsn, name)
    yield with_database(postgres_dsn, name)
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await connection.close()


@pytest_asyncio.fixture(scope="module")
async def database(events_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """This module's database (the events server's), for reading its outbox."""
    connection = await asyncpg.connect(events_dsn)
    yield connection
    await connection.close()


@pytest_asyncio.fixture(scope="module")
async def events_server(
    start_server: ServerFactory, receiver: Receiver, events_dsn: str
) -> AsyncIterator[RunningServer]:
    running = await start_server(
        database_url=events_dsn,
        events_webhook_url=receiver.url,
        events_webhook_secret=EVENTS_SECRET,
        events_retry_max_s=RETRY_MAX_S,
        low_balance_minutes=LOW_BALANCE_S / 60,
    )
    yield running
    await running.stop()  # its delivery loop would go on trying the stopped receiver


@pytest_asyncio.fixture
async def http(events_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with events_server.client() as client:
        yield client


async def outbox(database: asyncpg.Connection, user: str) -> list[asyncpg.Record]:
    return await database.fetch("select * from usage_events where user_id = $1 order by version, kind", user)


async def run_until(http: httpx.AsyncClient, user: str, warning: str) -> None:
    """Run a session, heartbeating every 0.3 s, until a heartbeat shows `warning`; then end it."""
    started = await http.post("/v1/sessions", json={}, headers=auth(user))
    assert started.status_code == 201, started.text
    session = started.json()["session_id"]
    for _ in range(100):
        await asyncio.sleep(0.3)
        beat = await http.post(f"/v1/sessions/{session}/heartbeat", json={}, headers=auth(user))
        assert beat.status_code == 200, beat.text
        if beat.json()["warning"] == warning:
            break
    else:
        raise AssertionError(f"the balance never showed {warning}")
    ended = await http.post(f"/v1/sessions/{session}/end", json={}, headers=auth(user))
    assert ended.status_code == 200, ended.text


async def top_up(http: httpx.AsyncClient, user: str, minutes: float) -> None:
    content, headers = signed({"minutes": minutes, "reason": "purchase"})
    bought = await http.post(f"/internal/v1/users/{user}/credits", content=content, headers=headers)
    assert bought.status_code == 200, bought.text


@pytest.mark.reliability
async def test_each_crossing_is_one_event_written_once_and_delivered_signed(
    http: httpx.AsyncClient, receiver: Receiver, database: asyncpg.Connection
) -> None:
    user = new_user()
    assert (await change_plan(http, user, "tiny")).status_code == 200  # 6 s; the threshold is 3 s
    await run_until(http, user, "low_balance")  # the first crossing
    await run_until(http, user, "low_balance")  # still under: no second event
    await top_up(http, user, 0.1)  # back above the threshold: re-armed
    await run_until(http, user, "low_balance")  # a new crossing
    await run_until(http, user, "exhausted")

    async def all_written() -> bool:
        return [row["kind"] for row in await outbox(database, user)].count("exhausted") == 1

    await eventually(all_written)
    rows = await outbox(database, user)
    assert [row["kind"] for row in rows] == ["plan_changed", "low_balance", "low_balance", "exhausted"]
    assert len({row["event_id"] for row in rows}) == 4

    async def all_delivered() -> bool:
        return {r.headers["webhook-id"] for r in receiver.of(user)} == {row["event_id"] for row in rows}

    await eventually(all_delivered, timeout_s=30)
    signer = Webhook(EVENTS_SECRET)
    for delivery in receiver.of(user):
        payload = signer.verify(delivery.body, delivery.headers)  # raises unless signed with our secret
        assert payload["id"] == delivery.headers["webhook-id"]
        assert delivery.headers["content-type"] == "application/json"
    by_kind = {r.payload["type"]: r.payload for r in receiver.of(user)}
    assert by_kind["plan_changed"]["data"]["previous_plan"] == "free"
    assert by_kind["plan_changed"]["data"]["plan"] == "tiny"
    assert 0 < by_kind["low_balance"]["data"]["minutes_remaining"] <= LOW_BALANCE_S / 60
    assert by_kind["exhausted"]["data"]["minutes_remaining"] == 0

    async def marked_delivered() -> bool:
        return all(row["delivered_at"] is not None for row in await outbox(database, user))

    await eventually(marked_delivered)


@pytest.mark.reliability
async def test_delivery_survives_the_receiver_being_down_for_a_minute(
    http: httpx.AsyncClient, receiver: Receiver, database: asyncpg.Connection
) -> None:
    user = new_user()
    await receiver.stop()
    try:
        assert (await change_plan(http, user, "basic")).status_code == 200
        await asyncio.sleep(RECEIVER_DOWN_S)
        [row] = await outbox(database, user)
        assert row["delivered_at"] is None and row["failed_at"] is None
        assert row["attempts"] >= 3, "retried while the receiver was down"
        assert "ConnectError" in row["last_error"]
    finally:
        await receiver.start()

    async def delivered() -> bool:
        [row] = await outbox(database, user)
        return row["delivered_at"] is not None

    await eventually(delivered, timeout_s=RETRY_MAX_S * 3)
    received = receiver.of(user)
    assert {r.headers["webhook-id"] for r in received} == {row["event_id"]}
    assert received[0].payload["type"] == "plan_changed"
    found = await samples(http)
    assert total(found, 'ledger_event_deliveries_total{outcome="retry"}') >= 3
    assert total(found, 'ledger_event_deliveries_total{outcome="delivered"}') >= 1


async def test_the_stream_shows_each_event_before_the_usage_it_changed(http: httpx.AsyncClient) -> None:
    user = new_user()
    async with http.stream("GET", "/v1/usage/stream", headers=auth(user)) as response:
        frames = sse_frames(response.aiter_lines())
        first = await anext(frames)
        assert first["event"] == "usage"
        assert (await change_plan(http, user, "tiny")).status_code == 200
        changed = await asyncio.wait_for(anext(frames), timeout=5)
        usage = await asyncio.wait_for(anext(frames), timeout=5)
    assert changed["event"] == "plan_changed"
    assert changed["data"]["type"] == "plan_changed" and changed["data"]["data"]["plan"] == "tiny"
    assert changed["data"]["id"].startswith("evt_")
    assert usage["event"] == "usage" and usage["data"]["plan"] == "tiny"
    assert changed["id"] is None  # only the usage frame moves the stream's last event id
    assert changed["data"]["data"]["version"] == int(usage["id"]) == usage["data"]["version"]


async def test_events_are_readable_in_the_dashboard_views(
    http: httpx.AsyncClient, database: asyncpg.Connection
) -> None:
    user = new_user()
    assert (await change_plan(http, user, "pro")).status_code == 200
    row = await database.fetchrow(
        "select kind, delivery, payload from dashboards.events where user_id = $1", user
    )
    assert row is not None and row["kind"] == "plan_changed"
    assert row["delivery"] in {"pending", "delivered"}
    assert json.loads(row["payload"])["data"]["plan"] == "pro"
    health = await database.fetchrow("select * from dashboards.event_delivery")
    assert health is not None and health["pending"] >= 0


async def test_a_reconnect_with_last_event_id_repeats_nothing_and_misses_no_event(
    http: httpx.AsyncClient,
) -> None:
    """API.md: with `Last-Event-ID: v` the first frame is a change after v, preceded by the
    threshold events after v; a value that cannot be a version seen is a first connect."""
    user = new_user()
    async with http.stream("GET", "/v1/usage/stream", headers=auth(user)) as response:
        seen = int((await anext(sse_frames(response.aiter_lines())))["id"])
    assert (await change_plan(http, user, "tiny")).status_code == 200  # while disconnected
    headers = {**auth(user), "Last-Event-ID": str(seen)}
    async with http.stream("GET", "/v1/usage/stream", headers=headers) as response:
        frames = sse_frames(response.aiter_lines())
        missed = await asyncio.wait_for(anext(frames), timeout=5)
        usage = await asyncio.wait_for(anext(frames), timeout=5)
    assert missed["event"] == "plan_changed" and missed["data"]["data"]["plan"] == "tiny"
    assert usage["event"] == "usage" and int(usage["id"]) > seen
    now = int(usage["id"])
    async with http.stream(
        "GET", "/v1/usage/stream", headers={**auth(user), "Last-Event-ID": str(now)}
    ) as response:
        frames = sse_frames(response.aiter_lines())
        waiting = asyncio.ensure_future(anext(frames))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "nothing is repeated: no frame until the next change"
        assert (await change_plan(http, user, "pro")).status_code == 200
        changed = await asyncio.wait_for(waiting, timeout=5)
        assert changed["event"] == "plan_changed"
    for odd in ("abc", "-1", str(now + 10**9)):
        async with http.stream(
            "GET", "/v1/usage/stream", headers={**auth(user), "Last-Event-ID": odd}
        ) as response:
            first = await asyncio.wait_for(anext(sse_frames(response.aiter_lines())), timeout=5)
        assert first["event"] == "usage" and first["data"]["plan"] == "pro", odd
