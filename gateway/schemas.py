"""HTTP request and response models: the API's JSON, in API.md's units.

Requests forbid unknown fields and coerce nothing (a string is not a number).
Responses are built from the shard's views with the `from_*` helpers:
milliseconds become minutes with two decimals, epoch milliseconds become
RFC 3339 UTC times. No Ray or asyncpg type appears here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from actors.records import Difficulty, EndReason, PlanAction
from actors.times import MS_PER_MINUTE, to_datetime
from actors.views import (
    ActiveSessionView,
    CurrentSession,
    SessionProgress,
    SessionStarted,
    SessionSummary,
    UsageView,
)


def rfc3339(value: datetime) -> str:
    """UTC with a `Z`, to the millisecond the ledger keeps (whole seconds print without a fraction)."""
    spec = "seconds" if value.microsecond == 0 else "milliseconds"
    return value.isoformat(timespec=spec).replace("+00:00", "Z")


# A time in a response: RFC 3339, UTC.
Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
WarningKind = Literal["low_balance", "exhausted"]
# Free text, but no control characters other than tab and line breaks (Postgres text cannot hold NUL).
Topic = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=1000, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
    ),
]
PlanName = Annotated[str, StringConstraints(min_length=1, max_length=64)]

SESSIONS_PAGE_DEFAULT = 20
SESSIONS_PAGE_MAX = 100


def minutes(ms: int) -> float:
    return round(ms / MS_PER_MINUTE, 2)


def percent(used_ms: int, limit_ms: int) -> float:
    if limit_ms <= 0:
        return 100.0
    return min(100.0, round(used_ms * 100 / limit_ms, 2))


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ requests


class StartSessionRequest(RequestModel):
    topic: Topic | None = None
    difficulty: Difficulty | None = None


class HeartbeatRequest(RequestModel):
    seq: Annotated[int, Field(ge=0, le=2**62)] | None = None


class EndSessionRequest(RequestModel):
    pass


class PlanChangeRequest(RequestModel):
    plan: PlanName
    action: PlanAction
    occurred_at: Annotated[AwareDatetime, Field(strict=False)]
    reset_usage: bool = False
    period_start: Annotated[AwareDatetime, Field(strict=False)] | None = None
    period_end: Annotated[AwareDatetime, Field(strict=False)] | None = None

    @model_validator(mode="after")
    def _period_is_whole(self) -> PlanChangeRequest:
        if (self.period_start is None) != (self.period_end is None):
            raise ValueError("period_start and period_end come together")
        if (
            self.period_start is not None
            and self.period_end is not None
            and self.period_start >= self.period_end
        ):
            raise ValueError("period_start must be before period_end")
        return self


# ----------------------------------------------------------------- responses


class ActiveSession(ResponseModel):
    session_id: str
    started_at: Timestamp
    last_heartbeat_at: Timestamp
    minutes_used: float

    @classmethod
    def from_view(cls, view: ActiveSessionView) -> ActiveSession:
        return cls(
            session_id=view.session_id,
            started_at=to_datetime(view.started_at_ms),
            last_heartbeat_at=to_datetime(view.last_heartbeat_at_ms),
            minutes_used=minutes(view.used_ms),
        )


class Usage(ResponseModel):
    """The usage object (API.md, *The usage object*)."""

    user_id: str
    plan: str
    period_start: Timestamp
    period_end: Timestamp
    minutes_limit: float
    minutes_used: float
    minutes_remaining: float
    purchased_minutes: float
    percent_used: float
    warning: WarningKind | None
    active_session: ActiveSession | None
    version: int

    @classmethod
    def from_view(cls, view: UsageView) -> Usage:
        return cls(
            user_id=view.user_id,
            plan=view.plan,
            period_start=to_datetime(view.period_start_ms),
            period_end=to_datetime(view.period_end_ms),
            minutes_limit=minutes(view.limit_ms),
            minutes_used=minutes(view.used_ms),
            minutes_remaining=minutes(view.remaining_ms + view.purchased_ms),
            purchased_minutes=minutes(view.purchased_ms),
            percent_used=percent(view.used_ms, view.limit_ms),
            warning=view.warning,
            active_session=ActiveSession.from_view(view.active_session) if view.active_session else None,
            version=view.version,
        )


class SessionStartedResponse(ResponseModel):
    session_id: str
    started_at: Timestamp
    minutes_remaining: float
    ends_at: Timestamp
    version: int

    @classmethod
    def from_view(cls, view: SessionStarted) -> SessionStartedResponse:
        return cls(
            session_id=view.session_id,
            started_at=to_datetime(view.started_at_ms),
            minutes_remaining=minutes(view.remaining_ms),
            ends_at=to_datetime(view.ends_at_ms),
            version=view.version,
        )


class HeartbeatResponse(ResponseModel):
    session_id: str
    state: Literal["active", "ended"]
    end_reason: EndReason | None
    session_minutes: float
    minutes_used: float
    minutes_remaining: float
    warning: WarningKind | None
    ends_at: Timestamp | None
    version: int

    @classmethod
    def from_view(cls, view: SessionProgress) -> HeartbeatResponse:
        return cls(
            session_id=view.session_id,
            state=view.state,
            end_reason=view.end_reason,
            session_minutes=minutes(view.session_used_ms),
            minutes_used=minutes(view.used_ms),
            minutes_remaining=minutes(view.remaining_ms),
            warning=view.warning,
            ends_at=to_datetime(view.ends_at_ms) if view.ends_at_ms is not None else None,
            version=view.version,
        )


class EndSessionResponse(ResponseModel):
    session_id: str
    state: Literal["ended"]
    end_reason: EndReason | None
    session_minutes: float
    minutes_used: float
    minutes_remaining: float
    version: int

    @classmethod
    def from_view(cls, view: SessionProgress) -> EndSessionResponse:
        assert view.state == "ended"
        return cls(
            session_id=view.session_id,
            state="ended",
            end_reason=view.end_reason,
            session_minutes=minutes(view.session_used_ms),
            minutes_used=minutes(view.used_ms),
            minutes_remaining=minutes(view.remaining_ms),
            version=view.version,
        )


class CurrentSessionResponse(ResponseModel):
    session_id: str
    started_at: Timestamp
    last_heartbeat_at: Timestamp
    minutes_used: float
    minutes_remaining: float
    ends_at: Timestamp
    topic: str | None
    difficulty: Difficulty | None
    version: int

    @classmethod
    def from_view(cls, view: CurrentSession) -> CurrentSessionResponse:
        return cls(
            session_id=view.session_id,
            started_at=to_datetime(view.started_at_ms),
            last_heartbeat_at=to_datetime(view.last_heartbeat_at_ms),
            minutes_used=minutes(view.used_ms),
            minutes_remaining=minutes(view.remaining_ms),
            ends_at=to_datetime(view.ends_at_ms),
            topic=view.topic,
            difficulty=view.difficulty,
            version=view.version,
        )


class SessionItem(ResponseModel):
    session_id: str
    started_at: Timestamp
    ended_at: Timestamp | None
    minutes_used: float
    topic: str | None
    difficulty: Difficulty | None
    end_reason: EndReason | None

    @classmethod
    def from_view(cls, view: SessionSummary) -> SessionItem:
        return cls(
            session_id=view.session_id,
            started_at=to_datetime(view.started_at_ms),
            ended_at=to_datetime(view.ended_at_ms) if view.ended_at_ms is not None else None,
            minutes_used=minutes(view.used_ms),
            topic=view.topic,
            difficulty=view.difficulty,
            end_reason=view.end_reason,
        )


class SessionList(ResponseModel):
    sessions: list[SessionItem]


class PlanChangeResponse(ResponseModel):
    applied: bool
    usage: Usage


class Problem(BaseModel):
    """An error (RFC 9457). Some errors add members, e.g. `session_id` or `errors`."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


class Health(ResponseModel):
    status: Literal["ok"]


class ShardReadiness(ResponseModel):
    shard: int
    ready: bool
    resident_users: int | None = None
    active_sessions: int | None = None
    dirty_users: int | None = None
    error: str | None = None


class Readiness(ResponseModel):
    status: Literal["ready", "unavailable"]
    database: bool
    shards: list[ShardReadiness]
