"""Records: the durable shape of a ledger, exchanged with a `LedgerStore`.

Every record carries the ledger `version` at which it last changed. A store
writes a record only over an older one (`stored.version < record.version`),
so replayed or late writes never overwrite newer state.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Difficulty = Literal["beginner", "intermediate", "advanced"]
EndReason = Literal["user_ended", "limit_reached", "timeout", "error", "stale"]
PlanAction = Literal["upgrade", "downgrade", "cancel"]
CreditReason = Literal["grant", "purchase", "refund", "consume", "reset", "adjust"]
PurchaseReason = Literal["purchase", "grant", "refund"]
EventKind = Literal["low_balance", "exhausted", "plan_changed", "period_rolled"]
HoldState = Literal["held", "captured", "released", "expired"]

# Credit-ledger buckets: the plan's allowance for one period, purchased minutes, and one per
# count meter and window ("meter:<name>"). Minute buckets count milliseconds; meters count uses.
MONTHLY_BUCKET = "monthly"
PURCHASED_BUCKET = "purchased"
METER_BUCKET_PREFIX = "meter:"

DIFFICULTIES: tuple[Difficulty, ...] = ("beginner", "intermediate", "advanced")
END_REASONS: tuple[EndReason, ...] = ("user_ended", "limit_reached", "timeout", "error", "stale")
EVENT_KINDS: tuple[EventKind, ...] = ("low_balance", "exhausted", "plan_changed", "period_rolled")
HOLD_STATES: tuple[HoldState, ...] = ("held", "captured", "released", "expired")

# The balance's alert level: above the low-balance threshold, at or under it, none left. The
# ledger announces each level once as the balance falls to it (`LedgerEvent`), and re-arms a
# level only when the balance rises above it again.
ALERT_NONE = 0
ALERT_LOW = 1
ALERT_EXHAUSTED = 2

# Event ids are UUIDv5 names in this namespace of (user, version, kind): deterministic, so a
# write repeated after a lost reply inserts nothing new, and header-safe whatever the user id.
_EVENT_NAMESPACE = uuid.UUID("6f0c1c3e-2b7a-5d8e-9a41-0d3f2c6b7e15")


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    plan: str
    version: int
    plan_event_at_ms: int | None = None
    plan_event_id: str | None = None
    purchased_ms: int = 0
    # The billing anchor (all None/0: calendar months).
    anchor_start_ms: int | None = None
    anchor_months: int = 0
    anchor_duration_ms: int = 0
    # The sequence number the user's next credit-ledger entry will get.
    next_entry_seq: int = 1
    # The alert level last announced (ALERT_*); None: never recorded (derive it from the balance).
    alert_level: int | None = None


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
    # Time taken from purchased minutes during this period (`used_ms` is the allowance's).
    purchased_used_ms: int = 0

    @property
    def total_used_ms(self) -> int:
        return self.used_ms + self.purchased_used_ms


@dataclass(frozen=True, slots=True)
class MeterRecord:
    """A count meter's use in its current window."""

    user_id: str
    meter: str
    window_start_ms: int
    window_end_ms: int
    used: int
    version: int


@dataclass(frozen=True, slots=True)
class CreditEntry:
    """One change to one balance, in the append-only credit ledger.

    `(user_id, seq)` identifies it: writing it again changes nothing. For a
    bucket and window, the deltas of its entries add up to its balance, and
    each entry's `balance_after` is that running sum.
    """

    user_id: str
    seq: int
    occurred_at_ms: int
    bucket: str
    window_start_ms: int | None  # the period (monthly) or window (meters); None for purchased
    delta: int
    balance_after: int
    reason: CreditReason
    reference: str | None
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
    # Ended by the limit, with its stretch since the last heartbeat still held (not billed): per
    # period (by start), what is held of its allowance and of purchased minutes. Empty otherwise.
    pending: tuple[tuple[int, int, int], ...] = ()

    @property
    def is_open(self) -> bool:
        return self.ended_at_ms is None

    @property
    def is_pending(self) -> bool:
        """Ended, but with a held tail: billed once the client is heard from, or never."""
        return bool(self.pending)


@dataclass(frozen=True, slots=True)
class HoldRecord:
    """An amount of a count meter (`meter`) or of minutes (`meter` None; ms) reserved for work whose
    cost is known afterwards: `held` until resolved once, as `captured` (whole or part; the rest is
    released), `released`, or `expired` (released whole at `expires_at_ms`).

    Where it holds: a minute hold, per period (by start) what it holds of the allowance and of
    purchased minutes (as a session's tail, `SessionRecord.pending`); a meter hold, the start of
    the meter window it was made in (its capture counts there, even after that window ended)."""

    hold_id: str
    user_id: str
    meter: str | None
    amount: int
    state: HoldState
    reference: str | None
    created_at_ms: int
    expires_at_ms: int
    version: int
    captured: int = 0
    released: int = 0
    resolved_at_ms: int | None = None
    draws: tuple[tuple[int, int, int], ...] = ()
    window_start_ms: int | None = None

    @property
    def is_held(self) -> bool:
        return self.state == "held"


@dataclass(frozen=True, slots=True)
class PlanEvent:
    """A plan change as billing sent it: one type from the gateway through the ledger to the store.
    `delivery_id` (the webhook id) deduplicates retries and orders events with equal `occurred_at_ms`.

    `period_start_ms`/`period_end_ms`, when given, are the subscription's current
    period: from then on the user's periods follow that anchor.
    """

    delivery_id: str
    plan: str
    action: PlanAction
    occurred_at_ms: int
    reset_usage: bool = False
    period_start_ms: int | None = None
    period_end_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PlanEventRecord:
    """A plan event as recorded for its user, applied or not; `response` is the first answer given."""

    user_id: str
    event: PlanEvent
    applied: bool = False
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def delivery_id(self) -> str:
        return self.event.delivery_id

    def same_event(self, other: PlanEventRecord) -> bool:
        """True when `other` is a retry of this delivery (everything but the outcome matches)."""
        return (self.user_id, self.event) == (other.user_id, other.event)


@dataclass(frozen=True, slots=True)
class CreditPurchaseRecord:
    """Minutes billing added (purchase, grant or refund), keyed by its delivery id; `response` is
    the first answer given."""

    delivery_id: str
    user_id: str
    minutes_ms: int
    reason: PurchaseReason
    reference: str | None
    response: dict[str, Any]

    def same_request(self, other: CreditPurchaseRecord) -> bool:
        return (self.user_id, self.minutes_ms, self.reason, self.reference) == (
            other.user_id,
            other.minutes_ms,
            other.reason,
            other.reference,
        )


Delivery = PlanEventRecord | CreditPurchaseRecord


@dataclass(frozen=True, slots=True)
class ReplyRecord:
    """The answer a request with an `Idempotency-Key` got, kept so a retry gets it again.

    `outcome` is the result or the refusal as compact JSON, encoded by `actors.replies` (a string:
    a fifth of the memory of the same dicts). A reply never changes once made; `version` only
    says which write of the ledger carries it."""

    user_id: str
    key: str
    request_hash: str
    outcome: str
    created_at_ms: int
    expires_at_ms: int
    version: int


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """Something billing or the product wants told: a threshold crossed, a plan changed, a new period.

    Written to the outbox (`usage_events`) in the same write as the change that made it, so an
    event exists exactly when its change is durable; delivered from there at least once.
    `version` is the ledger version of the change. The balance fields are the user's as of the
    event; `previous_*` and `action` say what a plan change or a new period replaced.
    """

    user_id: str
    kind: EventKind
    version: int
    occurred_at_ms: int
    plan: str
    period_start_ms: int
    period_end_ms: int
    limit_ms: int
    used_ms: int
    remaining_ms: int
    previous_plan: str | None = None  # plan_changed
    action: PlanAction | None = None  # plan_changed
    previous_period_start_ms: int | None = None  # period_rolled
    previous_period_end_ms: int | None = None  # period_rolled
    previous_used_ms: int | None = None  # period_rolled

    @property
    def event_id(self) -> str:
        name = f"{self.user_id}\x00{self.version}\x00{self.kind}"
        return "evt_" + uuid.uuid5(_EVENT_NAMESPACE, name).hex


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """Everything about one user that a write must make durable."""

    user: UserRecord
    periods: tuple[PeriodRecord, ...]
    sessions: tuple[SessionRecord, ...]
    meters: tuple[MeterRecord, ...] = ()
    entries: tuple[CreditEntry, ...] = ()
    replies: tuple[ReplyRecord, ...] = ()
    events: tuple[LedgerEvent, ...] = ()
    holds: tuple[HoldRecord, ...] = ()

    @property
    def version(self) -> int:
        return self.user.version


@dataclass(frozen=True, slots=True)
class StoredLedger:
    """What a store knows of one user: enough to rebuild the ledger."""

    user: UserRecord
    # The current period (the one not archived), then, for an open session whose last heartbeat
    # falls in an archived period, that period (its unbilled time starts there).
    # Then the archived periods the pending sessions hold time in.
    periods: tuple[PeriodRecord, ...]
    open_session: SessionRecord | None
    meters: tuple[MeterRecord, ...] = ()
    replies: tuple[ReplyRecord, ...] = ()  # those not expired
    pending_sessions: tuple[SessionRecord, ...] = ()  # ended with a held tail (`SessionRecord.pending`)
    # The newest applied plan event (occurred_at, delivery id), as the plan events record it.
    last_applied_plan_event: tuple[int, str] | None = None
    holds: tuple[HoldRecord, ...] = ()  # those still held, oldest first
