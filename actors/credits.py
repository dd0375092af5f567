"""CreditBook: one user's append-only credit ledger, as kept in memory until it is written.

Every change to a balance becomes a `CreditEntry` with the next sequence
number of the user. Consumption is frequent (every heartbeat bills time), so
it is added up per bucket and window and turned into one `consume` entry
when the ledger is written (`materialize`), not one row per heartbeat. Any
other entry first materializes what is open, so within a bucket and window
every entry's `balance_after` is the running sum of the deltas before it.

An entry, once materialized, never changes: a write that is repeated or
replayed carries the same entries with the same numbers, and the store keeps
the first copy of each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from actors.empty import EMPTY, writable
from actors.records import CreditEntry, CreditReason

# A bucket and the window its balance belongs to: ("monthly", period start),
# ("purchased", None), ("meter:<name>", window start).
CreditKey = tuple[str, int | None]


@dataclass(slots=True)
class _Open:
    amount: int
    last_at_ms: int


class CreditBook:
    __slots__ = ("_next_seq", "_open", "_pending", "_user_id")

    def __init__(self, user_id: str, *, next_seq: int = 1) -> None:
        assert next_seq >= 1, "sequence numbers start at 1"
        self._user_id = user_id
        self._next_seq = next_seq
        # Usually empty (see `actors.empty`): nothing open, nothing waiting to be written.
        self._open: Mapping[CreditKey, _Open] = EMPTY
        self._pending: tuple[CreditEntry, ...] = ()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def pending(self) -> tuple[CreditEntry, ...]:
        """Entries not yet known to be written, oldest first."""
        return self._pending

    def consume(self, key: CreditKey, amount: int, at_ms: int) -> None:
        """Add consumption to the open total of `key` (a no-op for nothing)."""
        assert amount >= 0, "consumption is never negative"
        if amount == 0:
            return
        current = self._open.get(key)
        if current is None:
            opened = self._open = writable(self._open)
            opened[key] = _Open(amount, at_ms)
        else:
            current.amount += amount
            current.last_at_ms = max(current.last_at_ms, at_ms)

    def open_amount(self, key: CreditKey) -> int:
        current = self._open.get(key)
        return current.amount if current is not None else 0

    def record(
        self,
        key: CreditKey,
        *,
        delta: int,
        balance_after: int,
        reason: CreditReason,
        at_ms: int,
        version: int,
        balance_of: Callable[[CreditKey], int],
        reference: str | None = None,
    ) -> CreditEntry:
        """Append an entry (after materializing what is open, so every running sum stays right)."""
        self.materialize(version=version, balance_of=balance_of)
        bucket, window = key
        entry = CreditEntry(
            user_id=self._user_id,
            seq=self._next_seq,
            occurred_at_ms=at_ms,
            bucket=bucket,
            window_start_ms=window,
            delta=delta,
            balance_after=balance_after,
            reason=reason,
            reference=reference,
            version=version,
        )
        self._next_seq += 1
        self._pending = (*self._pending, entry)
        return entry

    def materialize(self, *, version: int, balance_of: Callable[[CreditKey], int]) -> None:
        """Turn open consumption into `consume` entries, with each bucket's balance now."""
        opened, self._open = self._open, EMPTY
        for key, current in opened.items():
            self.record(
                key,
                delta=-current.amount,
                balance_after=balance_of(key),
                reason="consume",
                at_ms=current.last_at_ms,
                version=version,
                balance_of=balance_of,
            )

    def mark_synced(self, version: int) -> None:
        self._pending = tuple(entry for entry in self._pending if entry.version > version)

    def clone(self) -> CreditBook:
        twin = CreditBook(self._user_id, next_seq=self._next_seq)
        twin._open = {key: _Open(o.amount, o.last_at_ms) for key, o in self._open.items()} or EMPTY
        twin._pending = self._pending  # a tuple: shared until either appends
        return twin
