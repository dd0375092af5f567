"""The storage a shard needs, as a protocol, and a real in-memory implementation.

`LedgerStore` is what `persistence.PostgresStore` implements; the shard knows
nothing else about storage. `MemoryStore` keeps the same guarantees in a
process (version-guarded writes, at most one open session per user, one
record per delivery id, credit-ledger entries written once) and can be
switched off to play a storage outage; unit tests and the in-process property
tests use it. `CountingStore` counts calls per operation, which the shard
reports so anyone can see how many storage round trips a workload cost.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeVar

from actors.credits import CreditKey
from actors.records import (
    CreditEntry,
    CreditPurchaseRecord,
    Delivery,
    HoldRecord,
    LedgerEvent,
    LedgerSnapshot,
    MeterRecord,
    PeriodRecord,
    PlanEventRecord,
    ReplyRecord,
    SessionRecord,
    StoredLedger,
    UserRecord,
)
from actors.routing import (
    SLOTS,
    ShardMap,
    initial_slots,
    namespace_of,
    owner_name,
    shard_of_owner,
    slot_of,
)


class StoreError(Exception):
    """A store operation failed; nothing it was asked to write was written."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (connection refused, timed out, shutting down).

    Nothing was written: the failure came before the write was committed.
    """


class StoreFenced(StoreUnavailable):
    """A newer activation of this shard has claimed its users (`LedgerStore.claim`): this write was
    refused whole, and every later one by this activation will be."""


class StoreMoved(StoreUnavailable):
    """The write holds a user whose slot this shard no longer owns (it was handed to another
    shard: `LedgerStore.move_slots`): refused whole."""


@dataclass(frozen=True, slots=True)
class Fence:
    """A shard activation's claim on its users: writes carrying it land only while `epoch` is the
    newest claim of `owner`."""

    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Ownership:
    """What the store says of a shard activation: whether its claim is still the newest, and the
    slots its shard owns (None: its shard is in no shard map, so it owns what its index gives it
    in a brand-new map of its count: tests, a shard run alone)."""

    current: bool
    slots: frozenset[int] | None
    version: int = 0  # grows with every change of `slots` (an older answer is stale)


@dataclass(frozen=True, slots=True)
class UnreadableLedger:
    """What `load` returns for a user whose stored rows cannot make a ledger (a time an older
    version let in, say): that user is refused until the rows are repaired; the others load."""

    user_id: str
    reason: str


class StoreOutcomeUnknown(StoreUnavailable):
    """The commit itself failed (the connection broke or timed out during COMMIT): the write may
    or may not have landed. Read it back before deciding."""


WriteOutcome = Literal["committed", "aborted", "unknown"]


@dataclass(slots=True)
class WriteReceipt:
    """Filled in by `save` once its transaction has begun, so its outcome can be asked for later
    (a write whose answer was lost may still commit; only the transaction's own status tells)."""

    transaction_id: int | None = None


class LedgerStore(Protocol):
    async def load(
        self, user_ids: Sequence[str], *, now_ms: int
    ) -> dict[str, StoredLedger | UnreadableLedger]:
        """What is stored of each user as of `now_ms` (the shard's clock: replies expired by then are
        left out); users never seen are absent from the result, users whose rows cannot be read
        are `UnreadableLedger` (the others are loaded all the same)."""
        ...

    async def open_session_users(self) -> list[str]:
        """Users with a session that has not ended, a held tail or a hold not resolved yet (all
        have alarms that must run)."""
        ...

    async def claim(self, owner: str) -> Fence:
        """Become the newest activation of `owner` (a shard, by name): writes carrying an older
        fence of it fail with `StoreFenced` from now on. Waits for writes of older activations
        that are in progress, so nothing they write lands after the claim."""
        ...

    async def ownership(self, fence: Fence) -> Ownership:
        """Whether `fence` is still its owner's newest claim, and the slots its shard owns now."""
        ...

    async def move_slots(self, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
        """Hand `slots` from `fence`'s shard to shard `to_shard` of the same map, atomically, and
        return the new version of the giving shard's slots (`Ownership.version`). Waits for the
        writes of `fence`'s shard under way; once done, a write of that shard holding a user of
        those slots fails (`StoreMoved`). Slots the shard no longer owns are left as they are (a
        repeated move changes nothing more); `StoreFenced` if `fence` is not its owner's newest
        claim."""
        ...

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Write snapshots (and a delivery record) atomically; older versions never overwrite newer
        ones, and a credit-ledger entry already written is not written again (one written again
        with other content is an error). With a `fence`, nothing is written (`StoreFenced`) unless
        it is its owner's newest claim, and (`StoreMoved`) unless its shard owns the slot of every
        user written."""
        ...

    async def write_outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        """What became of the write `receipt` belongs to; `unknown` while it cannot be told."""
        ...

    async def prune_replies(self, now_ms: int) -> int:
        """Forget the replies to keyed requests that expired by `now_ms`; returns how many."""
        ...

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None: ...

    async def find_hold(self, user_id: str, hold_id: str) -> HoldRecord | None: ...

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        """The user's sessions, newest first."""
        ...

    async def list_periods(self, user_id: str, limit: int) -> list[PeriodRecord]:
        """The user's periods, newest first."""
        ...

    async def credit_history(self, user_id: str, limit: int) -> list[CreditEntry]:
        """The user's credit-ledger entries, newest first."""
        ...

    async def credit_balances(self, user_id: str) -> dict[CreditKey, tuple[int, int]]:
        """Per bucket and window: the sum of the entries' deltas, and the last `balance_after`."""
        ...

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None: ...

    async def find_purchase(self, delivery_id: str) -> CreditPurchaseRecord | None: ...

    async def close(self) -> None: ...


class ShardMapStore(Protocol):
    """Where the shard maps are kept (one per Ray namespace): what gateways route by and resizes
    change. The slots themselves move with `LedgerStore.move_slots`, by the shard that gives them."""

    async def read_map(self, namespace: str) -> ShardMap | None:
        """The namespace's map (None: none was made yet)."""
        ...

    async def create_map(self, namespace: str, count: int) -> ShardMap:
        """The namespace's map, made first (`count` shards, `routing.initial_owners`) if there is none."""
        ...

    async def set_target(self, namespace: str, target: int | None) -> ShardMap:
        """Record that a resize to `target` shards is under way (None: it is done, and the count is
        now the shards that own slots)."""
        ...


class MemoryStore:
    """A `LedgerStore` in dicts: what tests and the simulation run shards on. (It has no fault
    switches: the tests' `FaultyMemoryStore` and the simulation's `FaultyStore` add them.)"""

    def __init__(self) -> None:
        self._transactions: dict[int, WriteOutcome] = {}
        self._next_transaction = 1
        self.users: dict[str, UserRecord] = {}
        self.periods: dict[tuple[str, int], PeriodRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.meters: dict[tuple[str, str], MeterRecord] = {}
        self.entries: dict[tuple[str, int], CreditEntry] = {}
        self.plan_events: dict[str, PlanEventRecord] = {}
        self.purchases: dict[str, CreditPurchaseRecord] = {}
        self.replies: dict[tuple[str, str], ReplyRecord] = {}
        self.events: dict[str, LedgerEvent] = {}  # the outbox, by event id
        self.hold_records: dict[str, HoldRecord] = {}
        self.epochs: dict[str, int] = {}  # the newest claim of each owner
        # The shard maps (`ShardMapStore`): per namespace (epoch, count, target), per owner its slots.
        self.maps: dict[str, tuple[int, int, int | None]] = {}
        self.owned: dict[str, frozenset[int]] = {}
        self.slot_versions: Counter[str] = Counter()

    async def load(
        self, user_ids: Sequence[str], *, now_ms: int
    ) -> dict[str, StoredLedger | UnreadableLedger]:
        found: dict[str, StoredLedger | UnreadableLedger] = {}
        for user_id in user_ids:
            user = self.users.get(user_id)
            if user is None:
                continue
            mine = [p for (owner, _), p in self.periods.items() if owner == user_id]
            open_sessions = [s for s in self.sessions.values() if s.user_id == user_id and s.is_open]
            pending = [s for s in self.sessions.values() if s.user_id == user_id and s.is_pending]
            periods = [p for p in mine if not p.archived][:1]
            if open_sessions:
                heard = open_sessions[0].last_heartbeat_at_ms
                periods += [p for p in mine if p.archived and p.start_ms <= heard < p.end_ms][:1]
            holds = sorted(
                (h for h in self.hold_records.values() if h.user_id == user_id and h.is_held),
                key=lambda h: (h.created_at_ms, h.hold_id),
            )
            held_in = {start for record in pending for start, *_ in record.pending}
            held_in |= {start for hold in holds for start, *_ in hold.draws}
            periods += [p for p in mine if p.archived and p.start_ms in held_in and p not in periods]
            applied = [
                (record.event.occurred_at_ms, record.delivery_id)
                for record in self.plan_events.values()
                if record.user_id == user_id and record.applied
            ]
            found[user_id] = StoredLedger(
                last_applied_plan_event=max(applied, default=None),
                user=user,
                periods=tuple(periods),
                pending_sessions=tuple(pending),
                holds=tuple(holds),
                open_session=open_sessions[0] if open_sessions else None,
                meters=tuple(m for (owner, _), m in self.meters.items() if owner == user_id),
                replies=tuple(
                    replace(r, version=0)
                    for (owner, _), r in self.replies.items()
                    if owner == user_id and r.expires_at_ms > now_ms
                ),
            )
        return found

    async def claim(self, owner: str) -> Fence:
        self.epochs[owner] = self.epochs.get(owner, 0) + 1
        if namespace_of(owner) in self.maps and owner not in self.owned:
            self.owned[owner] = frozenset()  # a shard new to its namespace's map owns nothing yet
        return Fence(owner, self.epochs[owner])

    async def ownership(self, fence: Fence) -> Ownership:
        return Ownership(
            self.epochs.get(fence.owner) == fence.epoch,
            self.owned.get(fence.owner),
            self.slot_versions[fence.owner],
        )

    async def move_slots(self, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
        if self.epochs.get(fence.owner) != fence.epoch:
            raise StoreFenced(f"{fence.owner} was claimed after epoch {fence.epoch}")
        namespace = namespace_of(fence.owner)
        mine = self.owned.get(fence.owner, frozenset())
        moving = mine & set(slots)
        if not moving:  # moved already (a repeat): nothing changes
            return self.slot_versions[fence.owner]
        destination = owner_name(namespace, to_shard)
        self.owned[fence.owner] = mine - moving
        self.owned[destination] = self.owned.get(destination, frozenset()) | moving
        self.slot_versions[fence.owner] += 1
        self.slot_versions[destination] += 1
        epoch, count, target = self.maps[namespace]
        self.maps[namespace] = (epoch + 1, count, target)
        return self.slot_versions[fence.owner]

    async def read_map(self, namespace: str) -> ShardMap | None:
        if namespace not in self.maps:
            return None
        epoch, count, target = self.maps[namespace]
        owners = [-1] * SLOTS
        for owner, slots in self.owned.items():
            if namespace_of(owner) == namespace:
                for slot in slots:
                    owners[slot] = shard_of_owner(owner)
        return ShardMap(epoch, count, tuple(owners), target)

    async def create_map(self, namespace: str, count: int) -> ShardMap:
        if namespace not in self.maps:
            self.maps[namespace] = (1, count, None)
            for shard in range(count):
                self.owned[owner_name(namespace, shard)] = frozenset(initial_slots(shard, count))
        found = await self.read_map(namespace)
        assert found is not None
        return found

    async def set_target(self, namespace: str, target: int | None) -> ShardMap:
        epoch, count, _ = self.maps[namespace]
        self.maps[namespace] = (
            epoch + 1,
            count if target is not None else _shards_owning(self, namespace),
            target,
        )
        found = await self.read_map(namespace)
        assert found is not None
        return found

    async def open_session_users(self) -> list[str]:
        return sorted(
            {s.user_id for s in self.sessions.values() if s.is_open or s.is_pending}
            | {h.user_id for h in self.hold_records.values() if h.is_held}
        )

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        if fence is not None and self.epochs.get(fence.owner) != fence.epoch:
            raise StoreFenced(f"{fence.owner} was claimed after epoch {fence.epoch}")
        if fence is not None and (owned := self.owned.get(fence.owner)) is not None:
            strangers = [s.user.user_id for s in snapshots if slot_of(s.user.user_id) not in owned]
            if strangers:
                raise StoreMoved(f"{fence.owner} no longer owns the slot of {strangers[0]}")
        transaction = self._next_transaction
        self._next_transaction += 1
        if receipt is not None:
            receipt.transaction_id = transaction
        self._transactions[transaction] = "aborted"  # until it commits
        users, periods, sessions = dict(self.users), dict(self.periods), dict(self.sessions)
        meters, entries, replies = dict(self.meters), dict(self.entries), dict(self.replies)
        events, holds = dict(self.events), dict(self.hold_records)
        for snapshot in snapshots:
            _keep_newer(users, snapshot.user.user_id, snapshot.user)
            for period in snapshot.periods:
                _keep_newer(periods, (period.user_id, period.start_ms), period)
            for session in snapshot.sessions:
                _keep_newer(sessions, session.session_id, session)
            for meter in snapshot.meters:
                _keep_newer(meters, (meter.user_id, meter.meter), meter)
            for hold in snapshot.holds:
                if hold.hold_id not in holds or holds[hold.hold_id].user_id == hold.user_id:
                    _keep_newer(holds, hold.hold_id, hold)
            for entry in snapshot.entries:
                kept_entry = entries.setdefault((entry.user_id, entry.seq), entry)
                if replace(kept_entry, version=0) != replace(entry, version=0):
                    raise StoreError(f"credit entry {entry.user_id}#{entry.seq} exists with other content")
            for reply in snapshot.replies:
                kept = replies.get((reply.user_id, reply.key))
                if kept is None or kept.expires_at_ms <= reply.created_at_ms:
                    replies[(reply.user_id, reply.key)] = reply
            for event in snapshot.events:
                events.setdefault(event.event_id, event)
        for user_id in {s.user.user_id for s in snapshots}:
            open_count = sum(1 for s in sessions.values() if s.user_id == user_id and s.is_open)
            if open_count > 1:
                raise StoreError(f"user {user_id} would have {open_count} open sessions")
        if delivery is not None and delivery.delivery_id in self._deliveries_of(delivery):
            raise StoreError(f"delivery {delivery.delivery_id} already recorded")
        # All checked: the transaction commits, all of it at once.
        self.users, self.periods, self.sessions = users, periods, sessions
        self.meters, self.entries, self.replies, self.events = meters, entries, replies, events
        self.hold_records = holds
        if isinstance(delivery, PlanEventRecord):
            self.plan_events[delivery.delivery_id] = delivery
        elif isinstance(delivery, CreditPurchaseRecord):
            self.purchases[delivery.delivery_id] = delivery
        self._transactions[transaction] = "committed"

    async def prune_replies(self, now_ms: int) -> int:
        expired = [slot for slot, reply in self.replies.items() if reply.expires_at_ms <= now_ms]
        for slot in expired:
            del self.replies[slot]
        return len(expired)

    async def write_outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        if receipt.transaction_id is None:
            return "aborted"
        return self._transactions.get(receipt.transaction_id, "unknown")

    def _deliveries_of(
        self, delivery: Delivery
    ) -> dict[str, PlanEventRecord] | dict[str, CreditPurchaseRecord]:
        return self.plan_events if isinstance(delivery, PlanEventRecord) else self.purchases

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        session = self.sessions.get(session_id)
        return session if session is not None and session.user_id == user_id else None

    async def find_hold(self, user_id: str, hold_id: str) -> HoldRecord | None:
        hold = self.hold_records.get(hold_id)
        return hold if hold is not None and hold.user_id == user_id else None

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        mine = [s for s in self.sessions.values() if s.user_id == user_id]
        return sorted(mine, key=lambda s: (-s.started_at_ms, s.session_id))[:limit]

    async def list_periods(self, user_id: str, limit: int) -> list[PeriodRecord]:
        mine = [p for (owner, _), p in self.periods.items() if owner == user_id]
        return sorted(mine, key=lambda p: -p.start_ms)[:limit]

    async def credit_history(self, user_id: str, limit: int) -> list[CreditEntry]:
        mine = [e for (owner, _), e in self.entries.items() if owner == user_id]
        return sorted(mine, key=lambda e: -e.seq)[:limit]

    async def credit_balances(self, user_id: str) -> dict[CreditKey, tuple[int, int]]:
        chains: dict[CreditKey, list[CreditEntry]] = defaultdict(list)
        for (owner, _), entry in self.entries.items():
            if owner == user_id:
                chains[(entry.bucket, entry.window_start_ms)].append(entry)
        return {
            key: (sum(e.delta for e in chain), max(chain, key=lambda e: e.seq).balance_after)
            for key, chain in chains.items()
        }

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None:
        return self.plan_events.get(delivery_id)

    async def find_purchase(self, delivery_id: str) -> CreditPurchaseRecord | None:
        return self.purchases.get(delivery_id)

    async def close(self) -> None:
        return None


def _shards_owning(store: MemoryStore, namespace: str) -> int:
    """The map's count once a resize is done: one past the highest shard that owns a slot."""
    return 1 + max(
        shard_of_owner(owner)
        for owner, slots in store.owned.items()
        if slots and namespace_of(owner) == namespace
    )


_Key = TypeVar("_Key")
_Versioned = TypeVar("_Versioned", UserRecord, PeriodRecord, SessionRecord, MeterRecord, HoldRecord)


def _keep_newer(table: dict[_Key, _Versioned], key: _Key, record: _Versioned) -> None:
    kept = table.get(key)
    if kept is None or kept.version < record.version:
        table[key] = record


class CountingStore:
    """Wraps a store and counts calls per operation (reported in shard stats)."""

    def __init__(self, inner: LedgerStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def claim(self, owner: str) -> Fence:
        self.calls["claim"] += 1
        return await self.inner.claim(owner)

    async def ownership(self, fence: Fence) -> Ownership:
        self.calls["ownership"] += 1
        return await self.inner.ownership(fence)

    async def move_slots(self, fence: Fence, slots: Sequence[int], to_shard: int) -> int:
        self.calls["move_slots"] += 1
        return await self.inner.move_slots(fence, slots, to_shard)

    async def load(
        self, user_ids: Sequence[str], *, now_ms: int
    ) -> dict[str, StoredLedger | UnreadableLedger]:
        self.calls["load"] += 1
        return await self.inner.load(user_ids, now_ms=now_ms)

    async def open_session_users(self) -> list[str]:
        self.calls["open_session_users"] += 1
        return await self.inner.open_session_users()

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.calls["save"] += 1
        await self.inner.save(snapshots, delivery=delivery, receipt=receipt, fence=fence)

    async def prune_replies(self, now_ms: int) -> int:
        self.calls["prune_replies"] += 1
        return await self.inner.prune_replies(now_ms)

    async def write_outcome(self, receipt: WriteReceipt) -> WriteOutcome:
        self.calls["write_outcome"] += 1
        return await self.inner.write_outcome(receipt)

    async def find_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        self.calls["find_session"] += 1
        return await self.inner.find_session(user_id, session_id)

    async def find_hold(self, user_id: str, hold_id: str) -> HoldRecord | None:
        self.calls["find_hold"] += 1
        return await self.inner.find_hold(user_id, hold_id)

    async def list_sessions(self, user_id: str, limit: int) -> list[SessionRecord]:
        self.calls["list_sessions"] += 1
        return await self.inner.list_sessions(user_id, limit)

    async def list_periods(self, user_id: str, limit: int) -> list[PeriodRecord]:
        self.calls["list_periods"] += 1
        return await self.inner.list_periods(user_id, limit)

    async def credit_history(self, user_id: str, limit: int) -> list[CreditEntry]:
        self.calls["credit_history"] += 1
        return await self.inner.credit_history(user_id, limit)

    async def credit_balances(self, user_id: str) -> dict[CreditKey, tuple[int, int]]:
        self.calls["credit_balances"] += 1
        return await self.inner.credit_balances(user_id)

    async def find_plan_event(self, delivery_id: str) -> PlanEventRecord | None:
        self.calls["find_plan_event"] += 1
        return await self.inner.find_plan_event(delivery_id)

    async def find_purchase(self, delivery_id: str) -> CreditPurchaseRecord | None:
        self.calls["find_purchase"] += 1
        return await self.inner.find_purchase(delivery_id)

    async def close(self) -> None:
        await self.inner.close()
