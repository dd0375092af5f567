"""Which shard hosts a user: a stable hash of the user id.

Python's `hash()` is salted per process, so it would send a user to a
different shard from each gateway process; blake2b is the same everywhere and
forever. Every gateway and every shard must agree on the shard count, which
is why shard actor names include it (see `hosting`).
"""

from __future__ import annotations

import hashlib


def shard_index(user_id: str, shard_count: int) -> int:
    assert shard_count > 0, "shard_count must be positive"
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count
