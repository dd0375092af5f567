"""HTTP request and response models: the API's JSON, in API.md's units.

Requests forbid unknown fields and coerce nothing (a string is not a number).
Responses are built from the shard's views with the `from_*` helpers:
milliseconds become minutes with two decimals, epoch milliseconds become
RFC 3339 UTC times. No Ray or asyncpg type appears here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from actors.records import (
    METER_BUCKET_PREFIX,
    CreditEntry,
    CreditReason,
    Difficulty,
    EndReason,
    HoldState,
    PlanAction,
    PurchaseReason,
)
from actors.routing import SLOTS
from actors.times import checked_instant, from_datetime, minutes_to_ms, rfc3339, to_datetime, to_minutes
from actors.views import (
    ActiveSessionView,
    BalanceCheck,
    CreditsView,
    CurrentSession,
    HoldView,
    MeterConsumed,
    MeterView,
    PeriodSummary,
    Reconciliation,
    SessionProgress,
    SessionStarted,
    SessionSummary,
    UsageView,
)

# A time in a response: RFC 3339, UTC.
Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def _in_range(value: datetime) -> datetime:
    checked_instant(value)
    return value


def _not_a_number(value: object) -> object:
    """A time is RFC 3339 text: a JSON number (seconds? milliseconds?) is refused, not guessed."""
    if isinstance(value, int | float):
        raise ValueError("a time is an RFC 3339 string, such as 2026-11-01T00:00:00Z")
    return value


# A time in a request: RFC 3339 with its timezone, between 2000-01-01 and 2200-01-01 UTC
# (`actors.times.checked_instant`); anything else is 422 and changes nothing.
Instant = Annotated[
    AwareDatetime, Field(strict=False), BeforeValidator(_not_a_number), AfterValidator(_in_range)
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
HISTORY_PERIODS_DEFAULT = 6
HISTORY_PERIODS_MAX = 60
CREDIT_HISTORY_DEFAULT = 50
CREDIT_HISTORY_MAX = 500
METER_AMOUNT_MAX = 1_000_000
PURCHASE_MINUTES_MAX = 1_000_000
Reference = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")]


def percent(used_ms: int, remaining_ms: int) -> float:
    """How much of what this period offered (allowance and purchased minutes) has been used."""
    available = used_ms + remaining_ms
    if available <= 0:
        return 100.0
    return round(used_ms * 100 / available, 2)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: object) -> object:
    """JSON has one number type: 3.0 is the integer 3 (JSON Schema agrees), 3.5 is not one."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# For an integer in a request body: still strict (no strings, no booleans), but 3.0 is 3. Put it
# after the field's constraints, so the JSON schema keeps them as minimum/maximum.
WHOLE_NUMBER = BeforeValidator(_integral)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ requests


class StartSessionRequest(RequestModel):
    topic: Topic | None = None
    difficulty: Difficulty | None = None


class HeartbeatRequest(RequestModel):
    seq: Annotated[int, Field(ge=0, le=2**62), WHOLE_NUMBER] | None = None


class EndSessionRequest(RequestModel):
    pass


class MeterConsumeRequest(RequestModel):
    amount: Annotated[int, Field(ge=1, le=METER_AMOUNT_MAX), WHOLE_NUMBER]


HOLD_TTL_DEFAULT_S = 300
# A hold of a meter may be large (the tokens of a long completion); what is available refuses the rest.
HOLD_AMOUNT_MAX = 10**12
HOLD_TTL_MAX_S = 3600
MeterName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
HoldTtl = Annotated[int, Field(ge=1, le=HOLD_TTL_MAX_S), WHOLE_NUMBER]


class CreateHoldRequest(RequestModel):
    """`meter` and `amount` (a count meter), or `minutes`: one or the other."""

    meter: MeterName | None = None
    amount: Annotated[int, Field(ge=1, le=HOLD_AMOUNT_MAX), WHOLE_NUMBER] | None = None
    minutes: Annotated[float, Field(gt=0, le=PURCHASE_MINUTES_MAX, allow_inf_nan=False)] | None = None
    ttl_s: HoldTtl = HOLD_TTL_DEFAULT_S
    reference: Reference | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CreateHoldRequest:
        if self.minutes is not None:
            if self.meter is not None or self.amount is not None:
                raise ValueError("a hold is of minutes, or of a meter's amount: not both")
            if minutes_to_ms(self.minutes) < 1:
                raise ValueError("minutes is below the ledger's resolution (one millisecond)")
        elif self.meter is None or self.amount is None:
            raise ValueError('give "meter" and "amount", or "minutes"')
        return self


class CaptureHoldRequest(RequestModel):
    """`{}` captures the whole hold; `amount` (in the hold's unit: meter units, or minutes) part of it."""

    amount: Annotated[float, Field(ge=0, le=HOLD_AMOUNT_MAX, allow_inf_nan=False)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_null_amount(cls, data: object) -> object:
        # `{"amount": null}` is not `{}`: a client that lost its count must not capture everything.
        if isinstance(data, dict) and "amount" in data and data["amount"] is None:
            raise ValueError('"amount" is a number; leave it out to capture the whole hold')
        return data


class ReleaseHoldRequest(RequestModel):
    pass


class ExtendHoldRequest(RequestModel):
    ttl_s: HoldTtl


class CreditsRequest(RequestModel):
    minutes: Annotated[float, Field(gt=0, le=PURCHASE_MINUTES_MAX, allow_inf_nan=False)]
    reason: PurchaseReason
    reference: Reference | None = None

    @model_validator(mode="after")
    def _at_least_a_millisecond(self) -> CreditsRequest:
        if minutes_to_ms(self.minutes) < 1:
            raise ValueError("minutes is below the ledger's resolution (one millisecond)")
        return self


class PlanChangeRequest(RequestModel):
    plan: PlanName
    action: PlanAction
    occurred_at: Instant
    reset_usage: bool = False
    period_start: Instant | None = None
    period_end: Instant | None = None

    @model_validator(mode="after")
    def _period_is_whole(self) -> PlanChangeRequest:
        if (self.period_start is None) != (self.period_end is None):
            raise ValueError("period_start and period_end come together")
        # Compared as the ledger keeps them: in whole milliseconds.
        start = from_datetime(self.period_start) if self.period_start is not None else None
        end = from_datetime(self.period_end) if self.period_end is not None else None
        if start is not None and end is not None and start >= end:
            raise ValueError("period_start must be before period_end (by at least a millisecond)")
        return self

    @model_validator(mode="after")
    def _not_from_the_future(self) -> PlanChangeRequest:
        # A change newer than every later one would be applied while they are all recorded as
        # older: one event stamped years ahead would freeze the user's plan until then.
        if self.occurred_at > datetime.now(UTC) + OCCURRED_AT_SKEW:
            raise ValueError(f"occurred_at lies more than {OCCURRED_AT_SKEW} in the future (a clock?)")
        return self


# How far ahead of this server's clock a plan change's `occurred_at` may be (billing's clock).
OCCURRED_AT_SKEW = timedelta(hours=1)


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
            minutes_used=to_minutes(view.used_ms),
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
    # Held, not yet billed: the time a session the limit ended ran after its last heartbeat, billed
    # once its client is heard from (within the stale timeout), dropped otherwise. Not counted in
    # `minutes_remaining` (nor in `purchased_minutes`).
    minutes_held: float = 0.0

    @classmethod
    def from_view(cls, view: UsageView) -> Usage:
        return cls(
            user_id=view.user_id,
            plan=view.plan,
            period_start=to_datetime(view.period_start_ms),
            period_end=to_datetime(view.period_end_ms),
            minutes_limit=to_minutes(view.limit_ms),
            minutes_used=to_minutes(view.used_ms),
            minutes_remaining=to_minutes(view.remaining_ms),
            purchased_minutes=to_minutes(view.purchased_ms),
            percent_used=percent(view.used_ms, view.remaining_ms),
            warning=view.warning,
            active_session=ActiveSession.from_view(view.active_session) if view.active_session else None,
            version=view.version,
            minutes_held=to_minutes(view.held_ms),
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
            minutes_remaining=to_minutes(view.remaining_ms),
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
            session_minutes=to_minutes(view.session_used_ms),
            minutes_used=to_minutes(view.used_ms),
            minutes_remaining=to_minutes(view.remaining_ms),
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
            session_minutes=to_minutes(view.session_used_ms),
            minutes_used=to_minutes(view.used_ms),
            minutes_remaining=to_minutes(view.remaining_ms),
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
            minutes_used=to_minutes(view.used_ms),
            minutes_remaining=to_minutes(view.remaining_ms),
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
            minutes_used=to_minutes(view.used_ms),
            topic=view.topic,
            difficulty=view.difficulty,
            end_reason=view.end_reason,
        )


class SessionList(ResponseModel):
    sessions: list[SessionItem]
    version: int


class PlanChangeResponse(ResponseModel):
    applied: bool
    usage: Usage


class CreditsResponse(ResponseModel):
    purchased_minutes: float
    usage: Usage


class MeterState(ResponseModel):
    limit: int | Literal["unlimited"]
    used: int
    remaining: int | None  # None when unlimited; never counts what is held
    window: Literal["day", "period"]
    resets_at: Timestamp
    held: int = 0

    @classmethod
    def from_view(cls, view: MeterView) -> MeterState:
        return cls(
            limit=view.limit if view.limit is not None else "unlimited",
            used=view.used,
            remaining=view.remaining,
            window=view.window,
            resets_at=to_datetime(view.resets_at_ms),
            held=view.held,
        )


class Hold(ResponseModel):
    """A hold (API.md, *Holds*): `amount`, `captured`, `released` in meter units, or minutes."""

    hold_id: str
    meter: str | None
    minutes: float | None
    amount: int | float  # meter units (a whole number), or minutes
    state: HoldState
    captured: int | float
    released: int | float
    reference: str | None
    created_at: Timestamp
    expires_at: Timestamp
    resolved_at: Timestamp | None
    version: int

    @classmethod
    def from_view(cls, view: HoldView) -> Hold:
        def unit(value: int) -> int | float:
            return to_minutes(value) if view.meter is None else value

        return cls(
            hold_id=view.hold_id,
            meter=view.meter,
            minutes=to_minutes(view.amount) if view.meter is None else None,
            amount=unit(view.amount),
            state=view.state,
            captured=unit(view.captured),
            released=unit(view.released),
            reference=view.reference,
            created_at=to_datetime(view.created_at_ms),
            expires_at=to_datetime(view.expires_at_ms),
            resolved_at=to_datetime(view.resolved_at_ms) if view.resolved_at_ms is not None else None,
            version=view.version,
        )


class Holds(ResponseModel):
    holds: list[Hold]
    version: int


class Credits(ResponseModel):
    monthly_remaining_minutes: float
    purchased_minutes: float
    total_remaining_minutes: float
    meters: dict[str, MeterState]
    version: int

    @classmethod
    def from_view(cls, view: CreditsView) -> Credits:
        return cls(
            monthly_remaining_minutes=to_minutes(view.allowance_remaining_ms),
            purchased_minutes=to_minutes(view.purchased_ms),
            total_remaining_minutes=to_minutes(view.remaining_ms),
            meters={name: MeterState.from_view(meter) for name, meter in view.meters.items()},
            version=view.version,
        )


class MeterConsumeResponse(ResponseModel):
    allowed: Literal[True]
    remaining: int | None  # None when unlimited
    resets_at: Timestamp
    version: int

    @classmethod
    def from_view(cls, view: MeterConsumed) -> MeterConsumeResponse:
        return cls(
            allowed=True,
            remaining=view.remaining,
            resets_at=to_datetime(view.resets_at_ms),
            version=view.version,
        )


class PeriodItem(ResponseModel):
    period_start: Timestamp
    period_end: Timestamp
    plan: str
    minutes_used: float
    minutes_limit: float
    # Of the plan's allowance: 100 once the period used all of it (what it used beyond came from
    # purchased minutes, which a past period no longer knows the balance of).
    percent_used: float
    archived: bool

    @classmethod
    def from_view(cls, view: PeriodSummary) -> PeriodItem:
        return cls(
            period_start=to_datetime(view.period_start_ms),
            period_end=to_datetime(view.period_end_ms),
            plan=view.plan,
            minutes_used=to_minutes(view.used_ms),
            minutes_limit=to_minutes(view.limit_ms),
            percent_used=percent(view.used_ms, max(0, view.limit_ms - view.used_ms)),
            archived=view.archived,
        )


class UsageHistory(ResponseModel):
    periods: list[PeriodItem]
    version: int


class CreditHistoryEntry(ResponseModel):
    """One credit-ledger entry. Minute buckets count minutes (rounded to two decimals, with the
    exact milliseconds alongside, since rounded entries need not add up); a meter's bucket counts uses."""

    id: int
    occurred_at: Timestamp
    bucket: str
    window_start: Timestamp | None
    unit: Literal["minutes", "count"]
    delta: float
    balance_after: float
    delta_ms: int | None
    balance_after_ms: int | None
    reason: CreditReason
    reference: str | None

    @classmethod
    def from_record(cls, entry: CreditEntry) -> CreditHistoryEntry:
        counts = entry.bucket.startswith(METER_BUCKET_PREFIX)
        scale = (lambda value: float(value)) if counts else to_minutes
        return cls(
            id=entry.seq,
            occurred_at=to_datetime(entry.occurred_at_ms),
            bucket=entry.bucket,
            window_start=to_datetime(entry.window_start_ms) if entry.window_start_ms is not None else None,
            unit="count" if counts else "minutes",
            delta=scale(entry.delta),
            balance_after=scale(entry.balance_after),
            delta_ms=None if counts else entry.delta,
            balance_after_ms=None if counts else entry.balance_after,
            reason=entry.reason,
            reference=entry.reference,
        )


class CreditHistory(ResponseModel):
    entries: list[CreditHistoryEntry]
    version: int


class BalanceCheckItem(ResponseModel):
    """A balance as the live ledger has it, as its credit-ledger entries add up to, and as the last
    entry recorded it (milliseconds for minute buckets, uses for meters)."""

    bucket: str
    window_start: Timestamp | None
    live: int
    derived: int
    recorded: int
    drift: int
    consistent: bool

    @classmethod
    def from_view(cls, check: BalanceCheck) -> BalanceCheckItem:
        return cls(
            bucket=check.bucket,
            window_start=to_datetime(check.window_start_ms) if check.window_start_ms is not None else None,
            live=check.live,
            derived=check.derived,
            recorded=check.recorded,
            drift=check.drift,
            consistent=check.consistent,
        )


class ReconciliationReport(ResponseModel):
    user_id: str
    drift_found: bool
    checks: list[BalanceCheckItem]
    version: int

    @classmethod
    def from_view(cls, view: Reconciliation) -> ReconciliationReport:
        return cls(
            user_id=view.user_id,
            drift_found=bool(view.drifting),
            checks=[BalanceCheckItem.from_view(check) for check in view.checks],
            version=view.version,
        )


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


class ShardStatus(ResponseModel):
    """One shard as `GET /internal/v1/status` reports it (`usage-ledger status`)."""

    shard: int
    state: str
    host: str | None = None
    pid: int | None = None
    resident_users: int | None = None
    active_sessions: int | None = None
    dirty_users: int | None = None
    pending_calls: int | None = None
    reactivating: bool | None = None
    last_flush_at: Timestamp | None = None
    flushes: int | None = None
    flush_failures: int | None = None
    error: str | None = None


class Status(ResponseModel):
    shards: list[ShardStatus]


class ResizeRequest(RequestModel):
    count: int = Field(ge=1, le=SLOTS, description="the shard count to go to")


class MapShard(ResponseModel):
    """One shard of the map: the slots it owns, and what it says of itself."""

    shard: int
    slots: int
    state: str
    resident_users: int | None = None
    active_sessions: int | None = None
    slots_leaving: int | None = None
    users_handed_off: int | None = None
    error: str | None = None


class ShardMapStatus(ResponseModel):
    """`GET /internal/v1/shards`: the shard map as the database holds it (`usage-ledger shards`)."""

    count: int
    epoch: int
    moving: bool
    target: int | None = None
    error: str | None = Field(default=None, description="why this gateway's last resize stopped")
    shards: list[MapShard]


class Readiness(ResponseModel):
    status: Literal["ready", "unavailable"]
    database: bool
    shards: list[ShardReadiness]
