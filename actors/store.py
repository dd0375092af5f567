"""The storage a shard needs, as a protocol, and a real in-memory implementation.

`LedgerStore` is what `persistence.PostgresStore` implements; the shard knows
nothing else about storage. `MemoryStore` keeps the same guarantees in a
process (version-guarded writes, at most one open session per user, one
record per plan delivery) and can be switched off to play a storage outage;
unit tests and the in-process property tests use it. `CountingStore` counts
calls per operation, which the shard reports so anyone can see how many
storage round trips a workload cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from actors.records import (
    LedgerSnapshot,
    PeriodRecord,
    PlanEventRecord,
    SessionRecord,
    StoredLedger,
    UserRecord,
)


class StoreError(Exception):
    """A store operation failed; nothing it was asked to write was written."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (connection refused, timed out, shutting down).

    Nothing was written: the failure came before the write was committed.
    """


class StoreOutcomeUnknown(StoreUnavailable):
    """The commit itself failed (the connection broke or timed out during COMMIT): the write may
    or may not have landed. Read it back before deciding."""


class LedgerStore(Protocol):
    async def load(self, user_ids: Sequence[str]) -> dict[str, StoredLedger]:
        """What is stored of each user; users never seen are absent from the result."""
        ...

    async def open_session_users(self) -> list[str]:
        """Users with a session that has not ended."""
        ...

    async def save(
        self, snapshots: Sequence[LedgerSnapshot], *, plan_event: PlanEventRecord | None = None
    ) -> None:
        """Write snapshots (and a plan event) atomically; older versions never overwrite newer ones."""
        ...

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None: ...

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        """The user's sessions, newest first."""
        ...

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """A `LedgerStore` in a dict. Set `available = False` to make every call fail as an outage would."""

    def __init__(self) -> None:
        self.available = True
        # Set to make the next save apply and then fail as a lost COMMIT reply would.
        self.lose_next_commit_reply = False
        self.users: dict[str, UserRecord] = {}
        self.periods: dict[tuple[str, int], PeriodRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.plan_events: dict[str, PlanEventRecord] = {}

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("memory store switched off")

    async def load(self, user_ids: Sequence[str]) -> dict[str, StoredLedger]:
        self._check()
        found: dict[str, StoredLedger] = {}
        for user_id in user_ids:
            user = self.users.get(user_id)
            if user is None:
                continue
            periods = sorted(
                (p for (owner, _), p in self.periods.items() if owner == user_id), key=lambda p: -p.start_ms
            )[:2]
            open_sessions = [s for s in self.sessions.values() if s.user_id == user_id and s.is_open]
            found[user_id] = StoredLedger(
                user=user, periods=tuple(periods), open_session=open_sessions[0] if open_sessions else None
            )
        return found

    async def open_session_users(self) -> list[str]:
        self._check()
        return sorted({s.user_id for s in self.sessions.values() if s.is_open})

    async def save(
        self, snapshots: Sequence[LedgerSnapshot], *, plan_event: PlanEventRecord | None = None
    ) -> None:
        self._check()
        users = dict(self.users)
        periods = dict(self.periods)
        sessions = dict(self.sessions)
        for snapshot in snapshots:
            user = snapshot.user
            if (kept := users.get(user.user_id)) is None or kept.version < user.version:
                users[user.user_id] = user
            for period in snapshot.periods:
                key = (period.user_id, period.start_ms)
                if (kept_period := periods.get(key)) is None or kept_period.version < period.version:
                    periods[key] = period
            for session in snapshot.sessions:
                kept_session = sessions.get(session.session_id)
                if kept_session is None or kept_session.version < session.version:
                    sessions[session.session_id] = session
        for user_id in {s.user.user_id for s in snapshots}:
            open_count = sum(1 for s in sessions.values() if s.user_id == user_id and s.is_open)
            if open_count > 1:
                raise StoreError(f"user {user_id} would have {open_count} open sessions")
        if plan_event is not None and plan_event.delivery_id in self.plan_events:
            raise StoreError(f"plan event {plan_event.delivery_id} already recorded")
        # All checks passed: apply atomically.
        self.users, self.periods, self.sessions = users, periods, sessions
        if plan_event is not None:
            self.plan_events[plan_event.delivery_id] = plan_event
        if self.lose_next_commit_reply:
            self.lose_next_commit_reply = False
            raise StoreOutcomeUnknown("the write landed but its acknowledgement was lost")

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        self._check()
        session = self.sessions.get(session_id)
        return session if session is not None and session.user_id == user_id else None

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        self._check()
        mine = [s for s in self.sessions.values() if s.user_id == user_id]
        return sorted(mine, key=lambda s: (-s.started_at_ms, s.session_id))[:limit]

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None:
        self._check()
        return self.plan_events.get(delivery_id)

    async def close(self) -> None:
        return None


class CountingStore:
    """Wraps a store and counts calls per operation (reported in shard stats)."""

    def __init__(self, inner: LedgerStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def load(self, user_ids: Sequence[str]) -> dict[str, StoredLedger]:
        self.calls["load"] += 1
        return await self.inner.load(user_ids)

    async def open_session_users(self) -> list[str]:
        self.calls["open_session_users"] += 1
        return await self.inner.open_session_users()

    async def save(
        self, snapshots: Sequence[LedgerSnapshot], *, plan_event: PlanEventRecord | None = None
    ) -> None:
        self.calls["save"] += 1
        await self.inner.save(snapshots, plan_event=plan_event)

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        self.calls["find_session"] += 1
        return await self.inner.find_session(user_id, session_id)

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        self.calls["list_sessions"] += 1
        return await self.inner.list_sessions(user_id, limit)

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None:
        self.calls["find_plan_event"] += 1
        return await self.inner.find_plan_event(delivery_id)

    async def close(self) -> None:
        await self.inner.close()
