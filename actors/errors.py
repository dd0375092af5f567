"""Errors of the domain and of its hosting.

    LedgerError                 a request the ledger refuses; nothing changed
    ├── NoCredits               start with nothing left to spend
    ├── SessionActive           start while a session is running
    ├── SessionNotFound         unknown session id, or one of another user
    ├── SessionEnded            heartbeat for a session that has ended
    ├── UnknownPlan             a plan the plans file does not define (or an impossible period)
    ├── MeterNotFound           a count meter the user's plan does not have
    ├── HoldNotFound            unknown hold id, or one of another user
    ├── HoldResolved            a hold resolved otherwise (or extended once resolved)
    ├── InvalidCapture          a capture of more than the hold holds (or of part of a unit)
    ├── TooManyHolds            the user's bound on unresolved holds is reached
    ├── EventConflict           a delivery id reused for a different event
    ├── IdempotencyMismatch     an Idempotency-Key reused for a different request
    └── RateLimited             the user's requests exceed their plan's rate limit
    ShardError                  the shard could not do the work; nothing changed
    ├── Unavailable             storage needed for a durable write is down
    │   ├── UserMoving          the user is being handed to another shard (a resize)
    │   └── UserMoved           the user belongs to another shard now (the gateway routes again)
    ├── Overloaded              the shard's bound on pending calls is reached
    └── IdempotencyInFlight     a request with this Idempotency-Key is still running

Every error carries a stable `code` (the API's problem `code`) and is
picklable, so it crosses the Ray boundary intact; the gateway maps codes to
HTTP statuses in one place.
"""

from __future__ import annotations

import math
from typing import Any


class DomainError(Exception):
    """Base of every error the domain and its hosting raise on purpose."""

    code: str = "error"

    def __init__(self, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args only; keep the keyword fields across Ray.
        return (_rebuild, (type(self), self.detail, self.fields))

    def __repr__(self) -> str:
        extra = "".join(f", {key}={value!r}" for key, value in self.fields.items())
        return f"{type(self).__name__}({self.detail!r}{extra})"


def _rebuild(cls: type[DomainError], detail: str, fields: dict[str, Any]) -> DomainError:
    return cls(detail, **fields)


class LedgerError(DomainError):
    """The ledger refused the request; its state is unchanged."""


class NoCredits(LedgerError):
    code = "no_credits"


class SessionActive(LedgerError):
    code = "session_active"


class SessionNotFound(LedgerError):
    code = "session_not_found"


class SessionEnded(LedgerError):
    code = "session_ended"


class UnknownPlan(LedgerError):
    code = "invalid_request"


class MeterNotFound(LedgerError):
    code = "meter_not_found"


class HoldNotFound(LedgerError):
    code = "hold_not_found"


class HoldResolved(LedgerError):
    """Carries `hold_id` and `state` (the hold's terminal state)."""

    code = "hold_resolved"


class InvalidCapture(LedgerError):
    code = "invalid_request"


class TooManyHolds(LedgerError):
    """429: the user holds `max_open_holds` unresolved holds; one must be resolved (or expire,
    `retry_after_s` from now at the latest) before another is made."""

    code = "too_many_holds"


class EventConflict(LedgerError):
    code = "idempotency_conflict"


class IdempotencyMismatch(LedgerError):
    code = "idempotency_conflict"


class RateLimited(LedgerError):
    """Carries `retry_after_s` (whole seconds, for the header) and `wait_ms` (exact); never
    remembered as a keyed request's reply (it is about timing)."""

    code = "rate_limited"

    @classmethod
    def waiting(cls, wait_s: float) -> RateLimited:
        """Refused until a token comes back in `wait_s` seconds."""
        return cls(
            "too many requests for this user; retry later",
            retry_after_s=max(1, math.ceil(wait_s)),
            wait_ms=math.ceil(wait_s * 1000),
        )


class ShardError(DomainError):
    """The shard could not do the work; nothing was changed."""


class Unavailable(ShardError):
    code = "unavailable"

    @classmethod
    def of_store(cls, what: str = "storage", *, changed: bool = False) -> Unavailable:
        """The one answer to a store that failed or was too slow for an operation: whether anything
        changed is said (a write of unknown outcome: "retry shortly"; else "nothing was changed")."""
        if changed:
            return cls(f"{what} failed during the write; retry shortly")
        return cls(f"{what} is unavailable; nothing was changed")


class UserMoving(Unavailable):
    """The user's slot is being handed to another shard (a resize): retry shortly (503)."""


class UserMoved(Unavailable):
    """The user's slot belongs to another shard now (carries `slot`): the gateway routes again."""


class Overloaded(ShardError):
    code = "unavailable"


class IdempotencyInFlight(ShardError):
    """409, where the other `idempotency_conflict` is 422: retry once the first has answered."""

    code = "idempotency_conflict"
