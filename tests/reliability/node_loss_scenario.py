"""Reliability #5, node loss: a script, run by test_node_loss.py in a process of its own.

A process can be connected to one Ray only, and the pytest process already has
its local one; so this script builds its own two-node cluster on this machine
(`ray.cluster_utils.Cluster`), serves the gateway in-process with uvicorn
attached to it, and takes the worker node away while clients keep going:

1. Twelve users, three per shard (two "steady", one "silent"), each with a plan
   change, a purchase and a running session. Silent users heartbeat twice and
   stop; steady users heartbeat every 0.5 s throughout.
2. At least one shard must run on the worker node (shards are SPREAD; if they
   all landed on the head, one is restarted until Ray places one there).
3. The worker node is lost as a machine is: every Ray process of it and the
   shards' processes are SIGKILLed (no graceful drain). Ray notices through its
   health checks (tightened here to ~3 s) and restarts those shards on the
   head. Meanwhile one steady user per moved shard buys minutes and the other
   changes plan, retrying on 503 with the same webhook-id.
4. Once every moved shard answers again, heartbeats go on for a while: every
   heartbeat that is answered must say the session is still active. Then the
   steady users end their sessions (`user_ended`); the silent users' sessions
   must end `stale` on the survivor, billed to their last heartbeat.
5. `assert_nothing_lost`, then one JSON line of figures on stdout.

Exit 0 on success, 1 with the assertion on failure, 2 on any other error. The
cluster is shut down on every path. Needs NODE_LOSS_DATABASE_URL (an empty or
migrated database) and the repository root on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import ray
import uvicorn
from ray.cluster_utils import Cluster

from actors.routing import shard_index, shard_name
from gateway.app import create_app
from gateway.settings import Settings
from tests.harness import INTERNAL_SECRET, JWT_SECRET, PLANS_FILE, SYNC_INTERVAL_S, auth, new_user, signed
from tests.reliability.truth import GroundTruth, assert_nothing_lost

DATABASE_ENV = "NODE_LOSS_DATABASE_URL"
NAMESPACE = "node-loss"
SHARDS = 4
STEADY_PER_SHARD = 2
HEARTBEAT_EVERY_S = 0.5
SILENT_BEATS = 2
# Longer than the outage (node detection ~3 s + a new worker process + reloading users), so a
# session whose client keeps heartbeating survives the move; the silent ones still end stale.
STALE_SESSION_S = 20.0
# Ray declares a node dead after this many failed health checks this far apart (3 s x 5 by default).
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
RECOVERY_TIMEOUT_S = 60.0
AFTER_RECOVERY_S = 3.0
ANSWER_TIMEOUT_S = 60.0
MAX_REPLACEMENTS = 20


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Figures:
    http: Counter[str] = field(default_factory=Counter)  # "<what> <status>" -> count
    heartbeats_answered: int = 0
    heartbeat_max_s: float = 0.0
    durable_during_loss_s: list[float] = field(default_factory=list)


@dataclass
class Client:
    http: httpx.AsyncClient
    truth: GroundTruth
    figures: Figures

    async def answered(
        self, what: str, send: Callable[[], Awaitable[httpx.Response]], *, ok: int = 200
    ) -> httpx.Response:
        """Send until the gateway answers (503s, lost connections and in-flight 409s are retried)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            try:
                response = await send()
            except httpx.TransportError as exc:
                self.figures.http[f"{what} {type(exc).__name__}"] += 1
            else:
                self.figures.http[f"{what} {response.status_code}"] += 1
                retry = response.status_code == 503 or (
                    response.status_code == 409 and response.json().get("code") == "idempotency_conflict"
                )
                if not retry:
                    assert response.status_code == ok, f"{what}: {response.status_code} {response.text}"
                    return response
            assert time.monotonic() < deadline, f"{what}: no answer within {ANSWER_TIMEOUT_S} s"
            await asyncio.sleep(0.5)

    async def deliver(self, user_id: str, path: str, body: dict[str, Any]) -> str:
        """A signed billing delivery, retried under its one webhook-id until answered."""
        delivery = f"msg_{uuid.uuid4().hex}"

        async def send() -> httpx.Response:
            content, headers = signed(body, webhook_id=delivery)
            return await self.http.post(
                f"/internal/v1/users/{user_id}/{path}", content=content, headers=headers
            )

        await self.answered(path, send)
        return delivery

    async def change_plan(self, user_id: str, plan: str) -> None:
        body = {"plan": plan, "action": "upgrade", "occurred_at": datetime.now(UTC).isoformat()}
        self.truth.plan_changes[await self.deliver(user_id, "plan", body)] = user_id

    async def purchase(self, user_id: str, minutes: float) -> None:
        body = {"minutes": minutes, "reason": "purchase", "reference": f"order-{uuid.uuid4().hex[:8]}"}
        self.truth.purchases[await self.deliver(user_id, "credits", body)] = user_id

    async def start(self, user_id: str) -> str:
        headers = {**auth(user_id), "Idempotency-Key": f"start-{uuid.uuid4().hex}"}
        response = await self.answered(
            "start",
            lambda: self.http.post("/v1/sessions", json={"topic": "node-loss"}, headers=headers),
            ok=201,
        )
        return self.truth.started(user_id, response.json()).session_id

    async def end(self, user_id: str, session_id: str) -> dict[str, Any]:
        headers = {**auth(user_id), "Idempotency-Key": f"end-{uuid.uuid4().hex}"}
        response = await self.answered(
            "end", lambda: self.http.post(f"/v1/sessions/{session_id}/end", json={}, headers=headers)
        )
        body: dict[str, Any] = response.json()
        self.truth.answered(session_id, body)
        return body

    async def heartbeat(self, user_id: str, session_id: str) -> None:
        """One heartbeat; an answer must say the session is active (these clients never go quiet)."""
        sent = time.monotonic()
        try:
            response = await self.http.post(
                f"/v1/sessions/{session_id}/heartbeat", json={}, headers=auth(user_id)
            )
        except httpx.TransportError as exc:
            self.figures.http[f"heartbeat {type(exc).__name__}"] += 1
            self.truth.unanswered(session_id)
            return
        self.figures.heartbeat_max_s = max(self.figures.heartbeat_max_s, time.monotonic() - sent)
        self.figures.http[f"heartbeat {response.status_code}"] += 1
        if response.status_code == 503:
            self.truth.unanswered(session_id)
            return
        assert response.status_code == 200, f"heartbeat {session_id}: {response.status_code} {response.text}"
        body = response.json()
        self.truth.answered(session_id, body)
        self.figures.heartbeats_answered += 1
        assert body["state"] == "active", f"a heartbeating session ended: {body}"

    async def keep_beating(self, user_id: str, session_id: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.heartbeat(user_id, session_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_EVERY_S)


# ------------------------------------------------------------------ Ray side


def start_cluster() -> tuple[Any, Any]:
    """The cluster (its head runs the gateway) and its worker node. Blocking."""
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    try:
        worker = cluster.add_node(num_cpus=1)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, worker


def shard_handles() -> list[Any]:
    return [ray.get_actor(shard_name(index), namespace=NAMESPACE) for index in range(SHARDS)]


async def placement(handles: list[Any]) -> list[tuple[str, int]]:
    """(node id, pid) of each shard."""
    nodes = await asyncio.gather(*(h.node_id.remote() for h in handles))
    pids = await asyncio.gather(*(h.pid.remote() for h in handles))
    return list(zip(nodes, pids, strict=True))


async def answer_again(handle: Any, old_pid: int, *, timeout_s: float) -> tuple[str, int]:
    """(node id, pid) of a shard once a new process of it answers (after a kill or a node loss)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with asyncio.timeout(1.0):
                pid: int = await handle.pid.remote()
                node: str = await handle.node_id.remote()
            if pid != old_pid:
                return node, pid
        except (TimeoutError, ray.exceptions.RayActorError):
            pass
        assert time.monotonic() < deadline, f"a shard did not answer again within {timeout_s} s"
        await asyncio.sleep(0.2)


async def put_a_shard_on(node_id: str, handles: list[Any]) -> int:
    """Make sure some shard runs on `node_id`; returns how many restarts that took (usually 0).

    SPREAD alternates nodes per raylet, and Ray hands a creation that needs no CPU to a random
    raylet, so now and then every shard lands on the head. A restarted shard is placed again.
    """
    for attempt in range(MAX_REPLACEMENTS + 1):
        where = await placement(handles)
        if any(node == node_id for node, _ in where):
            return attempt
        index = attempt % len(handles)
        ray.kill(handles[index], no_restart=False)
        await answer_again(handles[index], where[index][1], timeout_s=30)
    raise AssertionError(f"no shard was placed on the worker node in {MAX_REPLACEMENTS} restarts")


def lose_node(cluster: Any, node: Any, shard_pids: list[int]) -> None:
    """Lose `node` as a machine is lost: SIGKILL its Ray processes and the shards it hosts. Blocking."""
    cluster.remove_node(node, allow_graceful=False)
    for pid in shard_pids:  # workers only notice their raylet is gone a moment later
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ the scenario


async def serve(settings: Settings) -> tuple[_QuietServer, asyncio.Task[None], str]:
    server = _QuietServer(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, lifespan="on", log_config=None)
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 120
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited during startup")
        assert time.monotonic() < deadline, "server did not start within 120 s"
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"


def pick_users() -> tuple[dict[int, list[str]], dict[int, str]]:
    """Steady users and a silent user for every shard."""
    steady: dict[int, list[str]] = {index: [] for index in range(SHARDS)}
    silent: dict[int, str] = {}
    while len(silent) < SHARDS or any(len(users) < STEADY_PER_SHARD for users in steady.values()):
        user = new_user()
        index = shard_index(user, SHARDS)
        if len(steady[index]) < STEADY_PER_SHARD:
            steady[index].append(user)
        elif index not in silent:
            silent[index] = user
    return steady, silent


async def scenario(cluster: Any, worker: Any, dsn: str, data_dir: Path) -> dict[str, Any]:
    began = time.monotonic()
    settings = Settings(
        database_url=dsn,
        data_dir=data_dir,
        ray_address=cluster.address,
        ray_namespace=NAMESPACE,
        shards=SHARDS,
        plans_file=PLANS_FILE,
        jwt_secret=JWT_SECRET,
        internal_secret=INTERNAL_SECRET,
        sync_interval_s=SYNC_INTERVAL_S,
        stale_session_s=STALE_SESSION_S,
        log_level="warning",
    )
    server, task, base_url = await serve(settings)
    started_s = time.monotonic() - began
    head_id = cluster.head_node.node_id
    try:
        assert ray.get_runtime_context().get_node_id() == head_id, "the gateway must run on the head"
        handles = shard_handles()
        replacements = await put_a_shard_on(worker.node_id, handles)
        before = await placement(handles)
        doomed = [index for index, (node, _) in enumerate(before) if node == worker.node_id]
        assert doomed, "at least one shard is on the node to be removed"

        truth = GroundTruth()
        figures = Figures()
        steady, silent = pick_users()
        database = await asyncpg.connect(dsn)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            client = Client(http, truth, figures)
            everyone = [user for users in steady.values() for user in users] + list(silent.values())

            async def set_up(user: str) -> str:
                await client.change_plan(user, "basic")
                await client.purchase(user, 5)
                return await client.start(user)

            sessions = dict(zip(everyone, await asyncio.gather(*map(set_up, everyone)), strict=True))
            stop = asyncio.Event()
            beating = [
                asyncio.create_task(client.keep_beating(user, sessions[user], stop))
                for users in steady.values()
                for user in users
            ]
            for _ in range(SILENT_BEATS):
                await asyncio.sleep(HEARTBEAT_EVERY_S)
                await asyncio.gather(*(client.heartbeat(user, sessions[user]) for user in silent.values()))
            # The silent users' last heartbeats reach Postgres before the node goes.
            await asyncio.sleep(2.5 * SYNC_INTERVAL_S)

            lost_at = time.monotonic()
            await asyncio.to_thread(lose_node, cluster, worker, [before[index][1] for index in doomed])
            truth.faults.append(f"node {worker.node_id[:8]} lost with shards {doomed}")

            async def durable_during_loss(index: int) -> None:
                first, second = steady[index]
                await asyncio.gather(client.purchase(first, 3), client.change_plan(second, "pro"))
                figures.durable_during_loss_s.append(round(time.monotonic() - lost_at, 2))

            during = asyncio.gather(*(durable_during_loss(index) for index in doomed))
            moved = await asyncio.gather(
                *(
                    answer_again(handles[index], before[index][1], timeout_s=RECOVERY_TIMEOUT_S)
                    for index in doomed
                )
            )
            recovered_s = time.monotonic() - lost_at
            for index, (node, _) in zip(doomed, moved, strict=True):
                assert node == head_id, f"shard {index} restarted on {node}, not on the surviving head"
            await during
            await asyncio.sleep(AFTER_RECOVERY_S)
            stop.set()
            await asyncio.gather(*beating)

            # Everyone who kept heartbeating ends their own session.
            ends = await asyncio.gather(
                *(client.end(user, sessions[user]) for users in steady.values() for user in users)
            )
            reasons = Counter(body["end_reason"] for body in ends)
            assert reasons == Counter({"user_ended": len(ends)}), f"steady sessions ended as {reasons}"

            # The silent ones end stale, on the survivor too, billed to their last heartbeat.
            silent_ids = [uuid.UUID(sessions[user]) for user in silent.values()]

            async def all_stale() -> bool:
                count = await database.fetchval(
                    "select count(*) from usage_sessions where id = any($1::uuid[]) and end_reason = 'stale'",
                    silent_ids,
                )
                return bool(count == len(silent_ids))

            deadline = time.monotonic() + STALE_SESSION_S + 15
            while not await all_stale():
                assert time.monotonic() < deadline, "silent sessions did not end stale"
                await asyncio.sleep(0.25)
            for user in silent.values():
                body = await client.end(user, sessions[user])
                assert body["end_reason"] == "stale", f"silent session: {body}"
            rows = await database.fetch(
                "select started_at, last_heartbeat_at, ended_at, used_ms from usage_sessions"
                " where id = any($1::uuid[])",
                silent_ids,
            )
            for row in rows:
                assert row["ended_at"] == row["last_heartbeat_at"], dict(row)
                billed = round((row["last_heartbeat_at"] - row["started_at"]).total_seconds() * 1000)
                assert row["used_ms"] == billed, dict(row)

            checked = await assert_nothing_lost(database, http, truth, sync_interval_s=SYNC_INTERVAL_S)
            await database.close()
            after = await placement(handles)
            assert all(node == head_id for node, _ in after), "every shard is on the survivor"
        return {
            "shards_on_lost_node": doomed,
            "placement_restarts": replacements,
            "gateway_start_s": round(started_s, 1),
            "moved_shards_answer_after_s": round(recovered_s, 2),
            "durable_during_loss_acked_after_s": sorted(figures.durable_during_loss_s),
            "heartbeats_answered": figures.heartbeats_answered,
            "heartbeat_max_s": round(figures.heartbeat_max_s, 2),
            "http": dict(sorted(figures.http.items())),
            **checked,
            "scenario_s": round(time.monotonic() - began, 1),
        }
    finally:
        server.should_exit = True
        await task


def main() -> int:
    dsn = os.environ.get(DATABASE_ENV)
    if not dsn:
        print(f"{DATABASE_ENV} is not set", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    began = time.monotonic()
    cluster, worker = start_cluster()
    cluster_s = time.monotonic() - began
    try:
        with tempfile.TemporaryDirectory(prefix="node-loss-") as data_dir:
            figures = asyncio.run(scenario(cluster, worker, dsn, Path(data_dir)))
    except AssertionError as exc:
        traceback.print_exc()
        print(f"NODE LOSS FAILED: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    figures["cluster_start_s"] = round(cluster_s, 1)
    figures["total_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
