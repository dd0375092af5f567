"""The shard maps in Postgres (table `shard_map`, slots on `shard_activations`; migration 0012).

`PostgresShardMaps` is what gateways read the map from and a resize records its
progress in; a shard moves its own slots (`move_slots`, called by
`PostgresStore.move_slots`) in one transaction that locks its activation row
first, so it waits for that shard's writes under way (each share-locks the row)
and every later write of it sees the slots it has left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from actors.routing import SLOTS, ShardMap, initial_slots, namespace_of, owner_name
from actors.store import Fence, Ownership, StoreFenced
from persistence.errors import TRANSIENT_ERRORS, CommitOutcomeUnknown, translate_errors


async def read_map(connection: Any, namespace: str) -> ShardMap | None:
    head = await connection.fetchrow(
        "select epoch, count, target from shard_map where namespace = $1", namespace
    )
    if head is None:
        return None
    owners = [-1] * SLOTS
    for row in await connection.fetch(
        "select shard, slots from shard_activations where namespace = $1 and slots is not null", namespace
    ):
        for slot in row["slots"]:
            owners[slot] = row["shard"]
    return ShardMap(head["epoch"], head["count"], tuple(owners), head["target"])


async def create_map(connection: Any, namespace: str, count: int) -> ShardMap:
    async with connection.transaction():
        made = await connection.fetchval(
            """
            insert into shard_map (namespace, epoch, count) values ($1, 1, $2)
            on conflict (namespace) do nothing
            returning true
            """,
            namespace,
            count,
        )
        if made:
            await connection.executemany(
                """
                insert into shard_activations as a (owner, epoch, namespace, shard, slots)
                values ($1, 0, $2, $3, $4)
                on conflict (owner) do update set namespace = $2, shard = $3, slots = $4
                """,
                [
                    (owner_name(namespace, shard), namespace, shard, initial_slots(shard, count))
                    for shard in range(count)
                ],
            )
    found = await read_map(connection, namespace)
    assert found is not None
    return found


async def set_target(connection: Any, namespace: str, target: int | None) -> ShardMap:
    async with connection.transaction():
        if target is None:
            await connection.execute(
                """
                update shard_map set epoch = epoch + 1, target = null, updated_at = now(),
                    count = (select 1 + max(shard) from shard_activations
                             where namespace = $1 and cardinality(slots) > 0)
                where namespace = $1
                """,
                namespace,
            )
        else:
            await connection.execute(
                """
                update shard_map set epoch = epoch + 1, target = $2, updated_at = now()
                where namespace = $1
                """,
                namespace,
                target,
            )
    found = await read_map(connection, namespace)
    assert found is not None, f"no shard map for {namespace}"
    return found


async def ownership(connection: Any, fence: Fence) -> Ownership:
    # FOR SHARE: a handoff of this shard's slots still committing (its answer lost, say) is waited
    # for, so what is read is what it did, never the state from before it.
    row = await connection.fetchrow(
        "select epoch, slots, slots_version from shard_activations where owner = $1 for share", fence.owner
    )
    if row is None:
        return Ownership(False, None)
    slots = row["slots"]
    return Ownership(
        row["epoch"] == fence.epoch, frozenset(slots) if slots is not None else None, row["slots_version"]
    )


async def move_slots(connection: Any, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
    namespace = namespace_of(fence.owner)
    transaction = connection.transaction()
    await transaction.start()
    try:
        # First the giving row, locked for update: this waits for its shard's writes under way.
        row = await connection.fetchrow(
            "select epoch, slots, slots_version from shard_activations where owner = $1 for update",
            fence.owner,
        )
        if row is None or row["epoch"] != fence.epoch:
            raise StoreFenced(f"{fence.owner} was claimed after epoch {fence.epoch}")
        mine = set(row["slots"] or ())
        moving = sorted(mine & set(slots))
        if not moving:  # moved already (a repeat): nothing changes
            await transaction.rollback()
            return int(row["slots_version"])
        version: int = await connection.fetchval(
            """
            update shard_activations set slots = $2, slots_version = slots_version + 1
            where owner = $1 returning slots_version
            """,
            fence.owner,
            sorted(mine - set(moving)),
        )
        await connection.execute(
            """
            insert into shard_activations as a (owner, epoch, namespace, shard, slots)
            values ($1, 0, $2, $3, $4)
            on conflict (owner) do update
                set namespace = $2, shard = $3, slots_version = a.slots_version + 1,
                    slots = array(select distinct s from unnest(coalesce(a.slots, '{}') || $4) s order by s)
            """,
            owner_name(namespace, to_shard),
            namespace,
            to_shard,
            moving,
        )
        await connection.execute(
            "update shard_map set epoch = epoch + 1, updated_at = now() where namespace = $1", namespace
        )
    except BaseException:
        await transaction.rollback()
        raise
    try:
        await transaction.commit()
    except TRANSIENT_ERRORS as exc:  # the handoff may or may not have landed: its caller asks again
        raise CommitOutcomeUnknown(
            "move_slots", f"COMMIT got no answer: {type(exc).__name__}: {exc}"
        ) from exc
    return version


class PostgresShardMaps:
    """`actors.store.ShardMapStore` over a pool (the gateway's)."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    async def read_map(self, namespace: str) -> ShardMap | None:
        with translate_errors("read_map"):
            async with self._pool.acquire() as connection:
                return await read_map(connection, namespace)

    async def create_map(self, namespace: str, count: int) -> ShardMap:
        with translate_errors("create_map"):
            async with self._pool.acquire() as connection:
                return await create_map(connection, namespace, count)

    async def set_target(self, namespace: str, target: int | None) -> ShardMap:
        with translate_errors("set_target"):
            async with self._pool.acquire() as connection:
                return await set_target(connection, namespace, target)
