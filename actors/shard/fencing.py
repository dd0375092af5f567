"""Fencing: this activation's claim on its users, carried by every write the shard makes.

A shard that was replaced (its node cut off from the cluster, say) may still
run. Before it loads anyone, an activation claims its shard in the store
(`claim`); every save it makes carries that claim, and the store refuses one
whose claim was superseded (`StoreFenced`). The first such refusal, or a
periodic `check`, tells the shard it was replaced (`on_lost`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from actors.records import Delivery, LedgerSnapshot
from actors.store import Fence, LedgerStore, Ownership, StoreFenced, WriteReceipt

log = structlog.get_logger("actors.shard")


class Fencing:
    def __init__(self, store: Callable[[], LedgerStore], on_lost: Callable[[], None]) -> None:
        self._store = store  # the shard's store, once connected
        self._on_lost = on_lost
        self.fence: Fence | None = None  # unset: this shard writes unfenced (tests, one process)

    async def claim(self, owner: str) -> Fence:
        self.fence = await self._store().claim(owner)
        return self.fence

    async def save(
        self,
        snapshots: Sequence[LedgerSnapshot],
        *,
        delivery: Delivery | None = None,
        receipt: WriteReceipt | None = None,
    ) -> None:
        """The store's `save`, under this activation's claim."""
        try:
            await self._store().save(snapshots, delivery=delivery, receipt=receipt, fence=self.fence)
        except StoreFenced:
            self._on_lost()
            raise

    async def ownership(self) -> Ownership | None:
        """What the store says of this activation (None: unfenced). Asked even when there is nothing
        to write: a replaced shard that only serves reads learns of it within one sync interval."""
        if self.fence is None:
            return None
        found = await self._store().ownership(self.fence)
        if not found.current:
            self._on_lost()
        return found
