"""The shard map: slots, the brand-new map, and resizes that move the fewest users."""

from __future__ import annotations

import hashlib
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.routing import (
    SLOTS,
    ShardMap,
    initial_owners,
    moved_fraction,
    moves,
    rebalanced,
    shard_index,
    slot_of,
)


def test_a_users_slot_never_changes() -> None:
    """A slot is a user's home forever: these are the values slots were introduced with."""
    assert [slot_of(user) for user in ("user-1", "alice", "")] == [392, 649, 692]


def test_a_brand_new_map_of_a_power_of_two_routes_as_the_hash_modulo_the_count() -> None:
    """What shards a user was on before the map existed (hash mod count) is kept for 1, 2, 4, 8..."""
    for count in (1, 2, 4, 8, 16):
        owners = initial_owners(count)
        for user in (f"user-{n}" for n in range(200)):
            digest = hashlib.blake2b(user.encode(), digest_size=8).digest()
            assert owners[slot_of(user)] == int.from_bytes(digest, "big") % count == shard_index(user, count)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6))
def test_any_sequence_of_resizes_keeps_shards_balanced_and_moves_the_fewest_slots(counts: list[int]) -> None:
    owners = initial_owners(counts[0])
    for count in counts[1:]:
        after = rebalanced(owners, count)
        held = Counter(after)
        assert set(held) == set(range(count)), "every shard of the new count owns slots, no other does"
        assert max(held.values()) - min(held.values()) <= 1, "balanced to a slot"
        # The fewest moves: each shard keeps as many of its slots as its new quota lets it.
        before = Counter(owners)
        kept = SLOTS - sum(len(slots) for slots in moves(owners, after).values())
        base, extra = divmod(SLOTS, count)
        quotas = sorted([base + 1] * extra + [base] * (count - extra), reverse=True)
        holdings = sorted((before.get(shard, 0) for shard in range(count)), reverse=True)
        assert kept == sum(min(h, q) for h, q in zip(holdings, quotas, strict=True))
        assert rebalanced(owners, count) == after, "deterministic: a resize planned again is the same"
        owners = after


def test_growing_and_shrinking_move_the_least_possible_fraction_of_users() -> None:
    users = [f"user-{n}" for n in range(20_000)]
    for before, after in ((4, 5), (4, 8), (8, 4), (2, 4), (4, 3)):
        start = initial_owners(before)
        moved, total = moved_fraction(users, start, rebalanced(start, after))
        ideal = abs(after - before) / max(after, before)
        assert abs(moved / total - ideal) < 0.02, (before, after, moved / total)


def test_a_map_routes_by_its_owners_and_knows_its_shards() -> None:
    shard_map = ShardMap(epoch=3, count=2, owners=rebalanced(initial_owners(2), 3), target=3)
    assert shard_map.moving and shard_map.shards == 3
    assert shard_map.shard_of("user-9") == shard_map.owners[slot_of("user-9")]
    assert sorted(slot for shard in range(3) for slot in shard_map.slots_of(shard)) == list(range(SLOTS))
