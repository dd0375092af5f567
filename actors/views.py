"""Views: the results the ledger hands back, in domain units (epoch ms, ms).

They are plain frozen dataclasses so they pickle cheaply across Ray; the
gateway turns them into the API's JSON (minutes, RFC 3339 times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from actors.records import (
    Difficulty,
    EndReason,
    HoldRecord,
    HoldState,
    LedgerEvent,
    PeriodRecord,
    SessionRecord,
)

Warning = Literal["low_balance", "exhausted"]
Item = TypeVar("Item")
SessionState = Literal["active", "ended"]


@dataclass(frozen=True, slots=True)
class ActiveSessionView:
    session_id: str
    started_at_ms: int
    last_heartbeat_at_ms: int
    used_ms: int
    ends_at_ms: int


@dataclass(frozen=True, slots=True)
class UsageView:
    """The period's figures: `used_ms` counts both buckets; `remaining_ms` = allowance left + purchased."""

    user_id: str
    plan: str
    period_start_ms: int
    period_end_ms: int
    limit_ms: int
    used_ms: int
    allowance_remaining_ms: int
    purchased_ms: int
    remaining_ms: int
    warning: Warning | None
    active_session: ActiveSessionView | None
    version: int
    held_ms: int = 0  # held, not yet billed (tails of sessions the limit ended); not in `remaining_ms`


@dataclass(frozen=True, slots=True)
class UsageChange:
    """What a live stream is told after a change: the events it made (oldest first), then the usage."""

    usage: UsageView
    events: tuple[LedgerEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    started_at_ms: int
    remaining_ms: int
    ends_at_ms: int
    version: int


@dataclass(frozen=True, slots=True)
class SessionProgress:
    """The answer to a heartbeat or an end: the session's state and the user's balance."""

    session_id: str
    state: SessionState
    end_reason: EndReason | None
    session_used_ms: int
    used_ms: int
    remaining_ms: int
    warning: Warning | None
    ends_at_ms: int | None
    version: int


@dataclass(frozen=True, slots=True)
class CurrentSession:
    session_id: str
    started_at_ms: int
    last_heartbeat_at_ms: int
    used_ms: int
    remaining_ms: int
    ends_at_ms: int
    topic: str | None
    difficulty: Difficulty | None
    version: int


@dataclass(frozen=True, slots=True)
class SessionSummary:
    session_id: str
    started_at_ms: int
    ended_at_ms: int | None
    used_ms: int
    topic: str | None
    difficulty: Difficulty | None
    end_reason: EndReason | None

    @classmethod
    def of(cls, record: SessionRecord) -> SessionSummary:
        return cls(
            session_id=record.session_id,
            started_at_ms=record.started_at_ms,
            ended_at_ms=record.ended_at_ms,
            used_ms=record.used_ms,
            topic=record.topic,
            difficulty=record.difficulty,
            end_reason=record.end_reason,
        )


@dataclass(frozen=True, slots=True)
class HoldView:
    """A hold as the API shows it (`amount`, `captured`, `released` in meter units, or ms for a
    minute hold: `meter` None); `version` is the ledger's version when the hold last changed."""

    hold_id: str
    meter: str | None
    amount: int
    state: HoldState
    captured: int
    released: int
    reference: str | None
    created_at_ms: int
    expires_at_ms: int
    resolved_at_ms: int | None
    version: int

    @classmethod
    def of(cls, record: HoldRecord) -> HoldView:
        return cls(
            hold_id=record.hold_id,
            meter=record.meter,
            amount=record.amount,
            state=record.state,
            captured=record.captured,
            released=record.released,
            reference=record.reference,
            created_at_ms=record.created_at_ms,
            expires_at_ms=record.expires_at_ms,
            resolved_at_ms=record.resolved_at_ms,
            version=record.version,
        )


@dataclass(frozen=True, slots=True)
class Page(Generic[Item]):
    """A list read for a user, with the user's version when it was read."""

    items: list[Item]
    version: int


@dataclass(frozen=True, slots=True)
class PlanChangeResult:
    applied: bool
    usage: UsageView


@dataclass(frozen=True, slots=True)
class CreditsAdded:
    purchased_ms: int
    usage: UsageView


@dataclass(frozen=True, slots=True)
class MeterView:
    limit: int | None  # None: unlimited
    used: int
    remaining: int | None
    window: Literal["day", "period"]
    resets_at_ms: int
    held: int = 0  # held by unresolved holds; not in `remaining`


@dataclass(frozen=True, slots=True)
class CreditsView:
    allowance_remaining_ms: int
    purchased_ms: int
    remaining_ms: int
    meters: dict[str, MeterView]
    version: int


@dataclass(frozen=True, slots=True)
class MeterConsumed:
    meter: str
    remaining: int | None
    resets_at_ms: int
    version: int


@dataclass(frozen=True, slots=True)
class PeriodSummary:
    period_start_ms: int
    period_end_ms: int
    plan: str
    used_ms: int
    limit_ms: int
    archived: bool

    @classmethod
    def of(cls, record: PeriodRecord) -> PeriodSummary:
        return cls(
            period_start_ms=record.start_ms,
            period_end_ms=record.end_ms,
            plan=record.plan,
            used_ms=record.total_used_ms,
            limit_ms=record.limit_ms,
            archived=record.archived,
        )


@dataclass(frozen=True, slots=True)
class BalanceCheck:
    """One balance as the live ledger has it and as the credit ledger's entries add up."""

    bucket: str
    window_start_ms: int | None
    live: int
    derived: int  # the sum of the entries' deltas
    recorded: int  # the last entry's balance_after

    @property
    def drift(self) -> int:
        return self.live - self.derived

    @property
    def consistent(self) -> bool:
        return self.live == self.derived == self.recorded


@dataclass(frozen=True, slots=True)
class Reconciliation:
    user_id: str
    checks: tuple[BalanceCheck, ...]
    version: int

    @property
    def drifting(self) -> tuple[BalanceCheck, ...]:
        return tuple(check for check in self.checks if not check.consistent)
