"""The shard: many user ledgers in one process (`LedgerShard`), one module per concern.

`shard` the façade (lifecycle, the declared operations) · `operations` how an
operation is declared · `execution` the per-user pipeline · `residency` who is
in memory, and the one place a change is recorded · `durable` writes before
answering, and writes in doubt · `writebehind` the periodic flush ·
`fencing` this activation's claim · `alarms` the timer · `watchers` streams ·
`deliveries` billing's deliveries, once each · `batching` several calls in one
Ray call · `parts` what every collaborator is given · `config` settings, bounds,
values and stats.
"""

from actors.records import PlanEvent
from actors.shard.config import (
    ACTIVATION_BATCH_USERS,
    USER_WAITERS_MAX,
    Handoff,
    Purchase,
    ShardConfig,
    ShardState,
    ShardStats,
)
from actors.shard.operations import Operation, declared, operation_of
from actors.shard.shard import BATCHABLE, LANES, LedgerShard

__all__ = [
    "ACTIVATION_BATCH_USERS",
    "BATCHABLE",
    "LANES",
    "USER_WAITERS_MAX",
    "Handoff",
    "LedgerShard",
    "Operation",
    "PlanEvent",
    "Purchase",
    "ShardConfig",
    "ShardState",
    "ShardStats",
    "declared",
    "operation_of",
]
