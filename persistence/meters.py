"""`usage_meters`: each user's count meters in their current window (write-behind, guarded by version)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from actors.records import MeterRecord
from actors.times import to_datetime
from persistence.decode import instant_ms

if TYPE_CHECKING:
    from persistence.database import Connection


async def upsert_meters(connection: Connection, *, meters: Sequence[MeterRecord]) -> None:
    await connection.execute(
        """
        insert into usage_meters as m (user_id, meter, window_start, window_end, used, version)
        select * from unnest(
            $1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[], $6::bigint[]
        )
        on conflict (user_id, meter) do update
            set window_start = excluded.window_start,
                window_end = excluded.window_end,
                used = excluded.used,
                version = excluded.version,
                updated_at = now()
            where m.version < excluded.version
        """,
        [m.user_id for m in meters],
        [m.meter for m in meters],
        [to_datetime(m.window_start_ms) for m in meters],
        [to_datetime(m.window_end_ms) for m in meters],
        [m.used for m in meters],
        [m.version for m in meters],
    )


async def fetch_meters(connection: Connection, *, user_ids: Sequence[str]) -> dict[str, list[MeterRecord]]:
    rows = await connection.fetch(
        """
        select user_id, meter, window_start, window_end, used, version
        from usage_meters where user_id = any($1::text[])
        """,
        list(user_ids),
    )
    found: dict[str, list[MeterRecord]] = defaultdict(list)
    for row in rows:
        found[row["user_id"]].append(
            MeterRecord(
                user_id=row["user_id"],
                meter=row["meter"],
                window_start_ms=instant_ms(row["window_start"], "usage_meters.window_start"),
                window_end_ms=instant_ms(row["window_end"], "usage_meters.window_end"),
                used=row["used"],
                version=row["version"],
            )
        )
    return found
