"""What the client raises. Every error from the server is a `LedgerError` carrying the problem's
stable `code`; the session context raises `SessionEnded` when the server ends the session.

    LedgerError                   any answer the client does not turn into a result
    ├── Unauthorized              401: the token is missing, expired or wrong
    ├── NoCredits                 403 no_credits: nothing left to spend
    ├── SessionActive             409 session_active: the user already has a running session
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
}
