"""The server's answers as frozen dataclasses (API.md): minutes as floats, times as aware datetimes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

Warning = Literal["low_balance", "exhausted"]


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class ActiveSession:
    session_id: str
    started_at: datetime
    last_heartbeat_at: datetime
    minutes_used: float


@dataclass(frozen=True, slots=True)
class Usage:
    user_id: str
    plan: str
    period_start: datetime
    period_end: datetime
    minutes_limit: float
    minutes_used: float
    minutes_remaining: float
    purchased_minutes: float
    percent_used: float
    warning: Warning | None
    active_session: ActiveSession | None
    version: int
    minutes_held: float = 0.0  # held by holds and held session tails; not in `minutes_remaining`

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Usage:
        active = body["active_session"]
        return cls(
            user_id=body["user_id"],
            plan=body["plan"],
            period_start=datetime.fromisoformat(body["period_start"]),
            period_end=datetime.fromisoformat(body["period_end"]),
            minutes_limit=body["minutes_limit"],
            minutes_used=body["minutes_used"],
            minutes_remaining=body["minutes_remaining"],
            purchased_minutes=body["purchased_minutes"],
            percent_used=body["percent_used"],
            warning=body["warning"],
            active_session=ActiveSession(
                session_id=active["session_id"],
                started_at=datetime.fromisoformat(active["started_at"]),
                last_heartbeat_at=datetime.fromisoformat(active["last_heartbeat_at"]),
                minutes_used=active["minutes_used"],
            )
            if active is not None
            else None,
            version=body["version"],
            minutes_held=body.get("minutes_held", 0.0),
        )


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    started_at: datetime
    minutes_remaining: float
    ends_at: datetime
    version: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionStarted:
        return cls(
            session_id=body["session_id"],
            started_at=datetime.fromisoformat(body["started_at"]),
            minutes_remaining=body["minutes_remaining"],
            ends_at=datetime.fromisoformat(body["ends_at"]),
            version=body["version"],
        )


@dataclass(frozen=True, slots=True)
class SessionProgress:
    """A heartbeat's answer, or an ended session's final account (`state == "ended"`)."""

    session_id: str
    state: Literal["active", "ended"]
    end_reason: str | None
    session_minutes: float
    minutes_used: float
    minutes_remaining: float
    warning: Warning | None
    ends_at: datetime | None
    version: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionProgress:
        return cls(
            session_id=body["session_id"],
            state=body["state"],
            end_reason=body["end_reason"],
            session_minutes=body["session_minutes"],
            minutes_used=body["minutes_used"],
            minutes_remaining=body["minutes_remaining"],
            warning=body.get("warning"),
            ends_at=_time(body.get("ends_at")),
            version=body["version"],
        )


HoldState = Literal["held", "captured", "released", "expired"]


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold: `amount`, `captured` and `released` in its unit (meter units, or minutes when `meter`
    is None); `state` is "held" until it is captured, released or expires, once."""

    hold_id: str
    meter: str | None
    minutes: float | None
    amount: float
    state: HoldState
    captured: float
    released: float
    reference: str | None
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None
    version: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Hold:
        return cls(
            hold_id=body["hold_id"],
            meter=body["meter"],
            minutes=body["minutes"],
            amount=body["amount"],
            state=body["state"],
            captured=body["captured"],
            released=body["released"],
            reference=body["reference"],
            created_at=datetime.fromisoformat(body["created_at"]),
            expires_at=datetime.fromisoformat(body["expires_at"]),
            resolved_at=_time(body["resolved_at"]),
            version=body["version"],
        )
