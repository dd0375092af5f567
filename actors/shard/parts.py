"""What every collaborator of a shard is given (`ShardPart`): the shard's settings and clock, who
is resident, and the durable writes. Each collaborator adds what else it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from actors.shard.config import ShardConfig
from actors.shard.durable import Durable
from actors.shard.residency import Residency


@dataclass(eq=False)
class ShardPart:
    config: ShardConfig
    clock: Callable[[], int]
    residency: Residency
    durable: Durable
