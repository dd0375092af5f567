"""Records: the durable shape of a ledger, exchanged with a `LedgerStore`.

Every record carries the ledger `version` at which it last changed. A store
writes a record only over an older one (`stored.version < record.version`),
so replayed or late writes never overwrite newer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Difficulty = Literal["beginner", "intermediate", "advanced"]
EndReason = Literal["user_ended", "limit_reached", "timeout", "error", "stale"]
PlanAction = Literal["upgrade", "downgrade", "cancel"]

DIFFICULTIES: tuple[Difficulty, ...] = ("beginner", "intermediate", "advanced")
END_REASONS: tuple[EndReason, ...] = ("user_ended", "limit_reached", "timeout", "error", "stale")


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    plan: str
    version: int
    plan_event_at_ms: int | None = None
    plan_event_id: str | None = None


@dataclass(frozen=True, slots=True)
class PeriodRecord:
    user_id: str
    start_ms: int
    end_ms: int
    plan: str
    used_ms: int
    limit_ms: int
    archived: bool
    version: int


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    user_id: str
    started_at_ms: int
    last_heartbeat_at_ms: int
    used_ms: int
    topic: str | None
    difficulty: Difficulty | None
    version: int
    ended_at_ms: int | None = None
    end_reason: EndReason | None = None
    last_seq: int | None = None

    @property
    def is_open(self) -> bool:
        return self.ended_at_ms is None


@dataclass(frozen=True, slots=True)
class PlanEventRecord:
    """A plan change as billing delivered it, applied or not; `response` is the first answer given."""

    delivery_id: str
    user_id: str
    plan: str
    action: PlanAction
    occurred_at_ms: int
    reset_usage: bool
    period_start_ms: int | None
    period_end_ms: int | None
    applied: bool
    response: dict[str, Any]

    def same_event(self, other: PlanEventRecord) -> bool:
        """True when `other` is a retry of this delivery (everything but the outcome matches)."""
        return (
            self.user_id,
            self.plan,
            self.action,
            self.occurred_at_ms,
            self.reset_usage,
            self.period_start_ms,
            self.period_end_ms,
        ) == (
            other.user_id,
            other.plan,
            other.action,
            other.occurred_at_ms,
            other.reset_usage,
            other.period_start_ms,
            other.period_end_ms,
        )


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """Everything about one user that a write must make durable."""

    user: UserRecord
    periods: tuple[PeriodRecord, ...]
    sessions: tuple[SessionRecord, ...]

    @property
    def version(self) -> int:
        return self.user.version


@dataclass(frozen=True, slots=True)
class StoredLedger:
    """What a store knows of one user: enough to rebuild the ledger."""

    user: UserRecord
    periods: tuple[PeriodRecord, ...]  # newest first, at most two
    open_session: SessionRecord | None
