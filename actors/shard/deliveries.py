"""Billing's deliveries (plan events, purchases), each applied at most once per delivery id.

A delivery is looked up by its id first (in the user's turn, so no two copies
race): found with the same content, its first answer is given again; found
with other content, `EventConflict`; not found, it is applied to a draft and
written with its record, in one transaction, before it is answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from actors.errors import EventConflict
from actors.ledger import UserLedger
from actors.records import CreditPurchaseRecord, PlanEvent, PlanEventRecord
from actors.replies import encode_result
from actors.shard.config import Purchase
from actors.shard.durable import Durable
from actors.shard.operations import Turn
from actors.shard.residency import Residency
from actors.store import LedgerStore
from actors.views import CreditsAdded, PlanChangeResult, UsageView

R = TypeVar("R")
D = TypeVar("D", PlanEventRecord, CreditPurchaseRecord)


class Deliveries:
    def __init__(self, clock: Callable[[], int], residency: Residency, durable: Durable) -> None:
        self._clock = clock
        self._residency = residency
        self._durable = durable

    async def change_plan(self, turn: Turn, event: PlanEvent) -> PlanChangeResult:
        asked = PlanEventRecord(turn.user_id, event)

        def apply(draft: UserLedger, now: int) -> tuple[PlanChangeResult, PlanEventRecord]:
            applied = draft.change_plan(now, event)
            usage = draft.usage(now)
            response = {"applied": applied, "usage": usage.to_dict()}
            return PlanChangeResult(applied, usage), replace(asked, applied=applied, response=response)

        return await self._deliver(
            turn,
            event.delivery_id,
            find=lambda store: store.find_plan_event(event.delivery_id),
            same=lambda known: known.same_event(asked),
            replay=lambda known: PlanChangeResult(
                known.applied, UsageView.from_dict(known.response["usage"])
            ),
            apply=apply,
        )

    async def add_credits(self, turn: Turn, purchase: Purchase) -> CreditsAdded:
        asked = CreditPurchaseRecord(
            delivery_id=purchase.delivery_id,
            user_id=turn.user_id,
            minutes_ms=purchase.minutes_ms,
            reason=purchase.reason,
            reference=purchase.reference,
            response={},
        )

        def apply(draft: UserLedger, now: int) -> tuple[CreditsAdded, CreditPurchaseRecord]:
            balance = draft.add_credits(
                now, purchase.minutes_ms, reason=purchase.reason, reference=purchase.reference
            )
            usage = draft.usage(now)
            response = {"purchased_ms": balance, "usage": usage.to_dict()}
            return CreditsAdded(balance, usage), replace(asked, response=response)

        return await self._deliver(
            turn,
            purchase.delivery_id,
            find=lambda store: store.find_purchase(purchase.delivery_id),
            same=lambda known: known.same_request(asked),
            replay=lambda known: CreditsAdded(
                known.response["purchased_ms"], UsageView.from_dict(known.response["usage"])
            ),
            apply=apply,
        )

    async def _deliver(
        self,
        turn: Turn,
        delivery_id: str,
        *,
        find: Callable[[LedgerStore], Awaitable[D | None]],
        same: Callable[[D], bool],
        replay: Callable[[D], R],
        apply: Callable[[UserLedger, int], tuple[R, D]],
    ) -> R:
        store = self._residency.require_store()
        known = await self._durable.read("storage", find(store), deadline=turn.deadline)
        if known is not None:
            if not same(known):
                raise EventConflict(
                    "this delivery id was used for a different request", delivery_id=delivery_id
                )
            return replay(known)
        draft = turn.ledger.clone()
        now = self._clock()
        result, record = apply(draft, now)
        if turn.idem is not None:
            draft.remember_reply(turn.idem, encode_result(result), now)
        await self._durable.commit(turn.user_id, draft, delivery=record)
        return result
