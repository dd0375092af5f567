"""`plan_events`: every plan change billing delivered, applied or not, keyed by delivery id."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from actors.records import PlanEvent, PlanEventRecord
from actors.times import to_datetime
from persistence.decode import instant_ms, optional_instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


async def insert_plan_event(connection: Connection, *, record: PlanEventRecord) -> bool:
    """Record the event; False when its delivery id is already recorded."""
    event = record.event
    status = await connection.execute(
        """
        insert into plan_events (
            delivery_id, user_id, plan, action, occurred_at, reset_usage,
            period_start, period_end, applied, response
        ) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
        on conflict (delivery_id) do nothing
        """,
        event.delivery_id,
        record.user_id,
        event.plan,
        event.action,
        to_datetime(event.occurred_at_ms),
        event.reset_usage,
        to_datetime(event.period_start_ms) if event.period_start_ms is not None else None,
        to_datetime(event.period_end_ms) if event.period_end_ms is not None else None,
        record.applied,
        json.dumps(record.response),
    )
    return bool(status == "INSERT 0 1")


async def fetch_plan_event(connection: Connection, *, delivery_id: str) -> PlanEventRecord | None:
    row = await connection.fetchrow(
        """
        select delivery_id, user_id, plan, action, occurred_at, reset_usage,
               period_start, period_end, applied, response::text as response
        from plan_events where delivery_id = $1
        """,
        delivery_id,
    )
    if row is None:
        return None
    event = PlanEvent(
        delivery_id=row["delivery_id"],
        plan=row["plan"],
        action=row["action"],
        occurred_at_ms=instant_ms(row["occurred_at"], "plan_events.occurred_at"),
        reset_usage=row["reset_usage"],
        period_start_ms=optional_instant_ms(row["period_start"], "plan_events.period_start"),
        period_end_ms=optional_instant_ms(row["period_end"], "plan_events.period_end"),
    )
    return PlanEventRecord(
        user_id=row["user_id"],
        event=event,
        applied=row["applied"],
        response=json.loads(row["response"]),
    )
