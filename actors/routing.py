"""Which shard hosts a user: a fixed set of slots, each assigned to one shard (the shard map).

A user's slot is a stable hash of their id modulo `SLOTS`, the same in every
process and forever (Python's `hash()` is salted per process; blake2b is not).
Which shard owns each slot is cluster state: the shard map, kept in the store
with an epoch that grows with every change (`persistence.shardmap`). A brand-new
map gives slot `s` to shard `s mod count`; a resize reassigns the fewest slots
that leave every shard with ⌊SLOTS/count⌋ or ⌈SLOTS/count⌉ of them
(`rebalanced`), so going from N to M shards moves only the users of the
reassigned slots: |M - N| / max(M, N) of them at best, and no more than that
plus a slot's worth.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Fixed forever (a user's slot must never change): also the most shards a cluster can have.
SLOTS = 1024


def slot_of(user_id: str) -> int:
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOTS


def initial_owners(count: int) -> tuple[int, ...]:
    """A brand-new map of `count` shards: slot `s` belongs to shard `s mod count`."""
    assert 0 < count <= SLOTS, f"a shard count is between 1 and {SLOTS}"
    return tuple(slot % count for slot in range(SLOTS))


def initial_slots(shard: int, count: int) -> list[int]:
    """The slots shard `shard` owns in a brand-new map of `count` shards (`initial_owners`)."""
    return [slot for slot, owner in enumerate(initial_owners(count)) if owner == shard]


def rebalanced(owners: Sequence[int], count: int) -> tuple[int, ...]:
    """`owners` reassigned to shards 0..count-1 with the fewest slots moved, each shard ending with
    ⌊SLOTS/count⌋ or ⌈SLOTS/count⌉ slots. Deterministic: the same map and count give the same
    result, so a resize interrupted part way is resumed (or rolled back) by planning again from
    where it stopped."""
    assert 0 < count <= SLOTS, f"a shard count is between 1 and {SLOTS}"
    assert len(owners) == SLOTS, "one owner per slot"
    held: dict[int, list[int]] = defaultdict(list)
    for slot, shard in enumerate(owners):
        held[shard].append(slot)
    base, extra = divmod(SLOTS, count)
    # The shards that keep one slot more are those that hold the most now (fewest moves).
    by_holding = sorted(range(count), key=lambda shard: (-len(held[shard]), shard))
    quota = {shard: base + (1 if rank < extra else 0) for rank, shard in enumerate(by_holding)}
    free: list[int] = []
    for shard in sorted(held):
        slots = held[shard]
        keep = quota.get(shard, 0)
        if len(slots) > keep:
            free.extend(slots[keep:])  # the highest slots go
    free.sort()
    result = list(owners)
    for shard in range(count):
        for _ in range(quota[shard] - len(held.get(shard, ()))):
            result[free.pop(0)] = shard
    assert not free, "every freed slot has a new owner"
    return tuple(result)


def moves(before: Sequence[int], after: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    """The slots whose owner differs, by (from shard, to shard)."""
    found: dict[tuple[int, int], list[int]] = defaultdict(list)
    for slot, (old, new) in enumerate(zip(before, after, strict=True)):
        if old != new:
            found[(old, new)].append(slot)
    return dict(found)


def moved_fraction(user_ids: Iterable[str], before: Sequence[int], after: Sequence[int]) -> tuple[int, int]:
    """(users whose shard differs between the two maps, users)."""
    moved = total = 0
    for user_id in user_ids:
        slot = slot_of(user_id)
        total += 1
        moved += before[slot] != after[slot]
    return moved, total


@dataclass(frozen=True, slots=True)
class ShardMap:
    """The cluster's shard map as one process knows it: `owners[slot]` is the shard that owns the
    slot; `epoch` grows with every change; `target` is set while a resize to it is under way."""

    epoch: int
    count: int
    owners: tuple[int, ...]
    target: int | None = None

    @classmethod
    def initial(cls, count: int) -> ShardMap:
        return cls(epoch=1, count=count, owners=initial_owners(count))

    def shard_of(self, user_id: str) -> int:
        return self.owners[slot_of(user_id)]

    @property
    def moving(self) -> bool:
        return self.target is not None

    @property
    def shards(self) -> int:
        """How many shards exist (during a resize, the larger of the two counts)."""
        return max(self.count, self.target or 0, max(self.owners) + 1)

    def slots_of(self, shard: int) -> list[int]:
        return [slot for slot, owner in enumerate(self.owners) if owner == shard]


def shard_index(user_id: str, shard_count: int) -> int:
    """A user's shard in a brand-new map of `shard_count` shards (no resize since)."""
    return slot_of(user_id) % shard_count


# A shard's owner name, `<namespace>/ledger-shard-<index>`: what it claims in the store (fencing)
# and the row its slots are kept in.
SHARD_NAME_PREFIX = "ledger-shard-"


def shard_name(index: int) -> str:
    return f"{SHARD_NAME_PREFIX}{index}"


def owner_name(namespace: str, shard: int) -> str:
    return f"{namespace}/{shard_name(shard)}"


def namespace_of(owner: str) -> str:
    return owner.rsplit("/", 1)[0]


def shard_of_owner(owner: str) -> int:
    return int(owner.rsplit(SHARD_NAME_PREFIX, 1)[1])
