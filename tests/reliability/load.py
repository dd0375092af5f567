"""A load of voice sessions for the fault-injection tests: users start, heartbeat and end sessions
while faults are injected, and every acknowledged answer is recorded in a `GroundTruth`."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.harness import auth, signed
from tests.reliability.truth import GroundTruth

HEARTBEAT_S = 0.3


@dataclass
class SessionLoad:
    """Users each running one session, heartbeating with `seq` until `stop` is set."""

    http: httpx.AsyncClient
    users: list[str]
    # What a heartbeat may answer while the fault lasts besides 200 (503: nothing was changed).
    fault_statuses: frozenset[int] = frozenset({503})
    truth: GroundTruth = field(default_factory=GroundTruth)
    statuses: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sessions: dict[str, str] = field(default_factory=dict)

    async def begin(self) -> None:
        """Buy each user some minutes and start their sessions; return once all are running."""
        for user in self.users:
            content, headers = signed({"minutes": 5, "reason": "purchase", "reference": f"order-{user}"})
            bought = await self.http.post(
                f"/internal/v1/users/{user}/credits", content=content, headers=headers
            )
            assert bought.status_code == 200, bought.text
            self.truth.purchases[headers["webhook-id"]] = user
        for user in self.users:
            started = await self.http.post("/v1/sessions", json={"topic": "load"}, headers=auth(user))
            assert started.status_code == 201, started.text
            self._sessions[user] = self.truth.started(user, started.json()).session_id
        self._tasks = [asyncio.create_task(self._heartbeats(user)) for user in self.users]

    async def _heartbeats(self, user: str) -> None:
        session_id = self._sessions[user]
        seq = 0
        while not self.stop.is_set():
            await asyncio.sleep(HEARTBEAT_S)
            seq += 1
            try:
                answer = await self.http.post(
                    f"/v1/sessions/{session_id}/heartbeat", json={"seq": seq}, headers=auth(user)
                )
            except httpx.TransportError as exc:
                self.statuses[type(exc).__name__] += 1
                self.truth.unanswered(session_id)
                continue
            self.statuses[str(answer.status_code)] += 1
            if answer.status_code == 200:
                self.truth.answered(session_id, answer.json())
                if answer.json()["state"] == "ended":
                    return
            else:
                assert answer.status_code in self.fault_statuses, answer.text
                assert answer.json()["code"] == "unavailable"
                self.truth.unanswered(session_id)

    async def end(self, *, attempts: int = 60) -> None:
        """Stop heartbeating and end every session, retrying while the fault lasts."""
        self.stop.set()
        await asyncio.gather(*self._tasks)
        for user, session_id in self._sessions.items():
            for _ in range(attempts):
                try:
                    ended = await self.http.post(f"/v1/sessions/{session_id}/end", headers=auth(user))
                except httpx.TransportError:
                    self.truth.unanswered(session_id)
                    await asyncio.sleep(0.5)
                    continue
                if ended.status_code == 200:
                    self.truth.answered(session_id, ended.json())
                    break
                assert ended.status_code in {503}, ended.text
                self.truth.unanswered(session_id)
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"session {session_id} could not be ended")
