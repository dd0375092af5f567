"""`usage_events`: the outbox of threshold events, and the webhook body each is delivered as.

A ledger's events are inserted in the same transaction as the change that made them, keyed by
their deterministic id with `on conflict do nothing`: a write repeated after a lost reply adds
nothing. Delivery claims due rows in short transactions (`for update skip locked`, then a lease
in `next_attempt_at`), so no transaction stays open across an HTTP call and a gateway that dies
mid-delivery only delays the event until its lease runs out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.records import LedgerEvent
from actors.times import from_datetime, rfc3339, to_datetime, to_minutes
from persistence.batch import INSTANT, Batch, BatchStatement, Row, Rows

if TYPE_CHECKING:
    from persistence.database import Connection

# A delivery's last error is kept to this many characters.
LAST_ERROR_MAX_CHARS = 500


def event_payload(event: LedgerEvent) -> dict[str, Any]:
    """The event as receivers get it (Standard Webhooks' `type`/`timestamp`/`data`), in the API's units."""
    data: dict[str, Any] = {
        "user_id": event.user_id,
        "version": event.version,
        "plan": event.plan,
        "period_start": rfc3339(to_datetime(event.period_start_ms)),
        "period_end": rfc3339(to_datetime(event.period_end_ms)),
        "minutes_limit": to_minutes(event.limit_ms),
        "minutes_used": to_minutes(event.used_ms),
        "minutes_remaining": to_minutes(event.remaining_ms),
    }
    if event.kind == "plan_changed":
        data["previous_plan"] = event.previous_plan
        data["action"] = event.action
    if event.kind == "period_rolled":
        assert event.previous_period_start_ms is not None and event.previous_period_end_ms is not None
        data["previous_period"] = {
            "period_start": rfc3339(to_datetime(event.previous_period_start_ms)),
            "period_end": rfc3339(to_datetime(event.previous_period_end_ms)),
            "minutes_used": to_minutes(event.previous_used_ms or 0),
        }
    return {
        "id": event.event_id,
        "type": event.kind,
        "timestamp": rfc3339(to_datetime(event.occurred_at_ms)),
        "data": data,
    }


def _event_row(e: LedgerEvent) -> Row:
    payload = json.dumps(event_payload(e), separators=(",", ":"))
    return (e.event_id, e.user_id, e.kind, e.version, e.occurred_at_ms, payload)


EVENTS = Rows(
    "events",
    (
        ("event_id", "text"),
        ("user_id", "text"),
        ("kind", "text"),
        ("version", "bigint"),
        ("occurred_at", INSTANT),
        ("payload", "jsonb"),
    ),
    _event_row,
)

_INSERT_EVENTS = BatchStatement(
    EVENTS,
    """
    insert into usage_events ({columns})
    select {columns} from {rows}
    on conflict (event_id) do nothing
    """,
)


async def insert_events(batch: Batch, *, events: Sequence[LedgerEvent]) -> None:
    await batch.execute(_INSERT_EVENTS, events)


@dataclass(frozen=True, slots=True)
class DueEvent:
    """An event claimed for one delivery attempt (`attempts` counts this one)."""

    event_id: str
    body: bytes
    attempts: int
    occurred_at_ms: int
    created_at_ms: int


async def claim_due(connection: Connection, *, limit: int, lease_s: float) -> list[DueEvent]:
    """Up to `limit` undelivered events whose time has come, leased for `lease_s`, oldest first."""
    rows = await connection.fetch(
        """
        with due as (
            select event_id from usage_events
            where delivered_at is null and failed_at is null and next_attempt_at <= now()
            order by next_attempt_at
            limit $1
            for update skip locked
        )
        update usage_events e
        set attempts = e.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
        from due where e.event_id = due.event_id
        returning e.event_id, e.payload::text as body, e.attempts, e.occurred_at, e.created_at
        """,
        limit,
        lease_s,
    )
    due = [
        DueEvent(
            event_id=row["event_id"],
            body=row["body"].encode(),
            attempts=row["attempts"],
            occurred_at_ms=from_datetime(row["occurred_at"]),
            created_at_ms=from_datetime(row["created_at"]),
        )
        for row in rows
    ]
    return sorted(due, key=lambda event: (event.occurred_at_ms, event.event_id))


async def mark_delivered(connection: Connection, *, event_ids: Sequence[str]) -> None:
    await connection.execute(
        "update usage_events set delivered_at = now(), last_error = null where event_id = any($1::text[])",
        list(event_ids),
    )


async def retry_later(connection: Connection, *, event_id: str, delay_s: float, error: str) -> None:
    await connection.execute(
        """
        update usage_events set next_attempt_at = now() + make_interval(secs => $2), last_error = $3
        where event_id = $1 and delivered_at is null
        """,
        event_id,
        delay_s,
        error[:LAST_ERROR_MAX_CHARS],
    )


async def give_up(connection: Connection, *, event_id: str, error: str) -> None:
    await connection.execute(
        """
        update usage_events set failed_at = now(), last_error = $2
        where event_id = $1 and delivered_at is null
        """,
        event_id,
        error[:LAST_ERROR_MAX_CHARS],
    )


async def count_undelivered(connection: Connection) -> int:
    count: int = await connection.fetchval(
        "select count(*) from usage_events where delivered_at is null and failed_at is null"
    )
    return count
