"""The shard's settings, bounds, the values its callers send, and its stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from actors.ledger import LedgerPolicy
from actors.records import PurchaseReason

# `fenced`: a newer activation of this shard claimed its users (this process was replaced but
# still runs, e.g. on a node cut off from the cluster); it refuses every call from then on.
ShardState = Literal["starting", "running", "draining", "stopped", "fenced"]

# A timer sleep never exceeds this, so a stepped wall clock is noticed soon.
TIMER_SLEEP_MAX_S = 30.0
# A user whose stored state could not be read is refused this long before it is tried again.
UNREADABLE_RETRY_MS = 60_000
# Operations one user may have waiting for their turn; more are refused (`Overloaded`).
USER_WAITERS_MAX = 64
# A batch answers the calls done by then; the others are fetched one by one (`collect`).
BATCH_WAIT_MAX_S = 0.02
# The answer of a batched call that was not collected is dropped this long after it is ready.
DEFERRED_KEPT_S = 60.0
# Sessions ended by an alarm are written within this delay (coalescing several).
ALARM_FLUSH_DELAY_S = 0.2
# Store connection and restart recovery retry between these bounds.
RETRY_DELAY_MIN_S = 0.1
RETRY_DELAY_MAX_S = 5.0
# Users loaded per store call when re-activating open sessions after a restart.
ACTIVATION_BATCH_USERS = 500
# Users written per store call by one flush.
FLUSH_BATCH_USERS = 5_000
# An alarm for a user whose last write is in doubt is retried this much later.
DOUBT_RETRY_MS = 1_000
# Expired `Idempotency-Key` replies are deleted from the store this often (by shard 0).
PRUNE_EVERY_S = 600


@dataclass(frozen=True, slots=True)
class ShardConfig:
    shard_index: int
    shard_count: int
    policy: LedgerPolicy
    sync_interval_s: float = 30.0
    max_pending_calls: int = 10_000
    start_wait_s: float = 3.0
    # A durable operation: time to begin (start, activation, the user's gate),
    # then time for its write, then time to read back a write that failed
    # ambiguously. Their sum stays below the gateway's call timeout, so the
    # shard gives up (and says so) before the caller stops listening.
    wait_budget_s: float = 3.0
    write_timeout_s: float = 6.0
    resolve_timeout_s: float = 2.0
    # Set (`<namespace>/<shard name>`, by `actors.hosting`): the shard claims it in the store on
    # start, and its writes land only while no newer activation has claimed it (fencing).
    owner: str | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.shard_index < self.shard_count, "shard_index out of range"
        assert self.sync_interval_s > 0, "sync_interval_s must be positive"
        assert self.max_pending_calls > 0, "max_pending_calls must be positive"
        assert min(self.wait_budget_s, self.write_timeout_s, self.resolve_timeout_s) > 0, (
            "budgets must be positive"
        )

    @property
    def durable_call_max_s(self) -> float:
        """The longest a durable operation can take inside the shard."""
        return self.wait_budget_s + self.write_timeout_s + self.resolve_timeout_s


@dataclass(frozen=True, slots=True)
class Purchase:
    """Minutes billing added; `delivery_id` is the webhook id that deduplicates retries."""

    delivery_id: str
    minutes_ms: int
    reason: PurchaseReason
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class Handoff:
    """What a shard handed off (`LedgerShard.release`): how many users, and those of them with
    alarms to run (open sessions, held tails, holds), for the receiving shard to load at once
    (None: the giving shard could not tell, still loading its own; the receiver looks them up)."""

    users: int
    alarmed: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class ShardStats:
    shard_index: int
    shard_count: int
    state: ShardState
    resident_users: int
    active_sessions: int
    dirty_users: int
    pending_calls: int
    armed_timers: int
    alarms_fired: int
    flushes: int
    flush_failures: int
    last_flush_at_ms: int | None
    users_in_doubt: int = 0
    unwritable_users: int = 0
    unreadable_users: int = 0  # stored state that cannot make a ledger (see `user_unreadable` logs)
    watchers: int = 0
    store_calls: dict[str, int] = field(default_factory=dict)
    # Still loading the users with open sessions after a start (it serves meanwhile).
    reactivating: bool = False
    activations: int = 0  # users loaded into memory since the shard started
    alarms_by_kind: dict[str, int] = field(default_factory=dict)  # stale, limit, period_end
    last_flush_duration_ms: float | None = None
    host: str = ""  # where the shard runs: its node's host name and its process id
    pid: int = 0
    # Durable writes (session starts and ends, ...) and the transactions they shared.
    durable_writes: int = 0
    durable_transactions: int = 0
    busy_users: int = 0  # users with an operation running now
    # Holds: made and resolved since the shard started (created, captured, released, expired), and
    # those unresolved now with what they hold (minutes in ms, meter units).
    holds_by_outcome: dict[str, int] = field(default_factory=dict)
    open_holds: int = 0
    held_minutes_ms: int = 0
    held_meter_units: int = 0
    # The shard map (`actors.routing`): slots this shard owns, being handed off now, and the users
    # it handed to other shards since it started.
    slots: int = 0
    slots_leaving: int = 0
    users_handed_off: int = 0
