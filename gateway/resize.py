"""Resizing: changing the shard count while serving, one handoff of slots at a time.

`Resizer.resize(count)` records the target in the map (so any gateway can say a
resize is under way), makes sure every shard that owns slots or will own some
is running, then hands slots over in steps of `STEP_SLOTS` (each a
`LedgerShard.release` on the giving shard, then `refresh_slots` on the
receiving one, see `actors.shard.placement`), and finally records the new count
and retires the shards left with no slot. Only the users of a step's slots wait
during that step (about one write-through).

Every step is planned from the map as the store holds it now
(`routing.rebalanced`), so a resize interrupted anywhere (this process killed,
a shard killed, Postgres down) is resumed by asking for the same count again,
or rolled back by asking for the old one: the slots already moved are simply
where the new plan starts from. At every point each slot has exactly one owner
in the store, and only that owner writes its users.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from actors.errors import Unavailable
from actors.routing import SLOTS, ShardMap, moves, rebalanced
from actors.shard import Handoff
from actors.store import ShardMapStore

log = structlog.get_logger("gateway.resize")

# How many times a resize plans again from the map before it gives up (see `resize`).
PLANS_MAX = 3
# Slots handed over per step: the users of 32 slots (1/32 of a 1-shard cluster's) wait at most
# about one write of their state.
STEP_SLOTS = 32


class ShardSteps(Protocol):
    """What a resize asks of the shards (`gateway.shards.ShardClient`, or the simulation's)."""

    async def release(self, shard: int, slots: list[int], to_shard: int) -> Handoff: ...

    async def refresh_slots(self, shard: int, alarmed: list[str] | None = None) -> list[int]: ...

    async def read_map(self) -> ShardMap: ...


@dataclass(frozen=True, slots=True)
class ResizeStep:
    from_shard: int
    to_shard: int
    slots: list[int]


def plan(current: ShardMap, count: int) -> list[ResizeStep]:
    """The handoffs that take `current` to `count` shards, in steps of at most `STEP_SLOTS`."""
    steps = []
    for (source, target), slots in sorted(moves(current.owners, rebalanced(current.owners, count)).items()):
        for begin in range(0, len(slots), STEP_SLOTS):
            steps.append(ResizeStep(source, target, slots[begin : begin + STEP_SLOTS]))
    return steps


class Resizer:
    def __init__(
        self,
        *,
        namespace: str,
        maps: ShardMapStore,
        shards: ShardSteps,
        start_shards: Callable[[int], Awaitable[None]],
        retire_shards: Callable[[list[int]], Awaitable[None]],
    ) -> None:
        """`start_shards(n)`: make shards 0..n-1 run (and be routed to); `retire_shards(indexes)`:
        stop and remove shards that own no slot."""
        self._namespace = namespace
        self._maps = maps
        self._shards = shards
        self._start_shards = start_shards
        self._retire_shards = retire_shards
        self.moved_users = 0  # users handed over by this process's resizes

    async def resize(self, count: int) -> ShardMap:
        assert 1 <= count <= SLOTS, f"a shard count is between 1 and {SLOTS}"
        current = await self._maps.set_target(self._namespace, count)
        log.info("resize_started", count=count, from_count=current.count, epoch=current.epoch)
        await self._start_shards(max(count, current.shards))
        current = await self._shards.read_map()
        # A resize interrupted between a handoff and its receiver's refresh: every shard asks now.
        for index in range(current.shards):
            await self._shards.refresh_slots(index)
        # Planned again from the map as it stands until nothing is left to move: a handoff an earlier,
        # interrupted resize left running on a shard may have moved slots meanwhile.
        for _ in range(PLANS_MAX):
            steps = plan(current, count)
            if not steps:
                break
            for number, step in enumerate(steps, 1):
                handoff = await self._shards.release(step.from_shard, step.slots, step.to_shard)
                alarmed = list(handoff.alarmed) if handoff.alarmed is not None else None
                await self._shards.refresh_slots(step.to_shard, alarmed)
                self.moved_users += handoff.users
                log.info(
                    "resize_step",
                    step=number,
                    steps=len(steps),
                    from_shard=step.from_shard,
                    to_shard=step.to_shard,
                    slots=len(step.slots),
                    users=handoff.users,
                )
            current = await self._shards.read_map()
        else:
            raise Unavailable(f"the shard map did not settle at {count} shards; ask again")
        finished = await self._maps.set_target(self._namespace, None)
        await self._shards.read_map()
        # Retired: the shards past the count that own no slot, as each confirms itself.
        retired = [
            index for index in range(count, current.shards) if not await self._shards.refresh_slots(index)
        ]
        if retired:
            await self._retire_shards(retired)
        log.info("resize_finished", count=finished.count, epoch=finished.epoch, retired=retired)
        return finished
