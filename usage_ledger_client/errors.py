"""What the client raises. Every error from the server is a `LedgerError` carrying the problem's
stable `code`; the session context raises `SessionEnded` when the server ends the session.

    LedgerError                   any answer the client does not turn into a result
    ├── Unauthorized              401: the token is missing, expired or wrong
    ├── NoCredits                 403 no_credits: nothing left to spend
    ├── SessionActive             409 session_active: the user already has a running session
    ├── MeterNotFound             404 meter_not_found: the user's plan has no such meter
    ├── HoldNotFound              404 hold_not_found: no such hold (or another user's)
    ├── HoldResolved              409 hold_resolved: captured, released or expired already (`state`)
    ├── TooManyHolds              429 too_many_holds: too many unresolved holds (not retried)
    ├── Unavailable               503 unavailable / 429 rate_limited / no answer, after every retry
    └── SessionEnded              the server ended the session (limit reached, stale, elsewhere)
        └── LimitReached          ... because the balance ran out
"""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """An error answer (problem+json) from the server, or none at all."""

    def __init__(
        self, status: int | None, code: str, detail: str, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, detail={self.detail!r})"


class Unauthorized(LedgerError):
    pass


class NoCredits(LedgerError):
    pass


class SessionActive(LedgerError):
    pass


class MeterNotFound(LedgerError):
    pass


class HoldNotFound(LedgerError):
    pass


class HoldResolved(LedgerError):
    """The hold was resolved already, another way: `state` is "captured", "released" or "expired"."""

    def __init__(
        self, status: int | None, code: str, detail: str, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(status, code, detail, problem)
        state = self.problem.get("state")
        self.state: str | None = state if isinstance(state, str) else None


class TooManyHolds(LedgerError):
    """The user has as many unresolved holds as the server allows. Not retried: waiting for the
    soonest to expire (`retry_after_s`) may take as long as its TTL."""

    @property
    def retry_after_s(self) -> int | None:
        value = self.problem.get("retry_after_s")
        return value if isinstance(value, int) else None


class Unavailable(LedgerError):
    """The server could not do it (503, 429 or no answer) for as long as the client retried."""


class SessionEnded(LedgerError):
    """The server ended the session: `result` is its final account."""

    def __init__(self, result: Any) -> None:
        reason = result.end_reason or "ended"
        super().__init__(None, "session_ended", f"the session ended: {reason}")
        self.result = result


class LimitReached(SessionEnded):
    """The session ended because the user's balance ran out."""


ERRORS_BY_CODE: dict[str, type[LedgerError]] = {
    "unauthorized": Unauthorized,
    "no_credits": NoCredits,
    "session_active": SessionActive,
    "meter_not_found": MeterNotFound,
    "hold_not_found": HoldNotFound,
    "hold_resolved": HoldResolved,
    "too_many_holds": TooManyHolds,
}
