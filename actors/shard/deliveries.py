"""Billing's deliveries (plan events, purchases), each applied at most once per delivery id.

A delivery is looked up by its id first (in the user's turn, so no two copies
race): found with the same content, its first answer is given again; found
with other content, `EventConflict`; not found, it is applied to a draft and
written with its record, in one transaction, before it is answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from actors.errors import EventConflict
from actors.ledger import UserLedger
from actors.records import CreditPurchaseRecord, PlanEvent, PlanEventRecord
from actors.replies import encode_result, from_document, result_document
from actors.shard.config import Purchase
from actors.shard.operations import Turn
from actors.shard.parts import ShardPart
from actors.store import LedgerStore
from actors.views import CreditsAdded, PlanChangeResult

R = TypeVar("R")
D = TypeVar("D", PlanEventRecord, CreditPurchaseRecord)


@dataclass(eq=False)
class Deliveries(ShardPart):
    """Billing's deliveries for the shard's users (see the module docstring)."""

    async def change_plan(self, turn: Turn, event: PlanEvent) -> PlanChangeResult:
        asked = PlanEventRecord(turn.user_id, event)

        def apply(draft: UserLedger, now: int) -> tuple[PlanChangeResult, PlanEventRecord]:
            applied = draft.change_plan(now, event)
            result = PlanChangeResult(applied, draft.usage(now))
            return result, replace(asked, applied=applied, response=result_document(result))

        return await self._deliver(
            turn,
            event.delivery_id,
            find=lambda store: store.find_plan_event(event.delivery_id),
            same=lambda known: known.same_event(asked),
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
            result = CreditsAdded(balance, draft.usage(now))
            return result, replace(asked, response=result_document(result))

        return await self._deliver(
            turn,
            purchase.delivery_id,
            find=lambda store: store.find_purchase(purchase.delivery_id),
            same=lambda known: known.same_request(asked),
            apply=apply,
        )

    async def _deliver(
        self,
        turn: Turn,
        delivery_id: str,
        *,
        find: Callable[[LedgerStore], Awaitable[D | None]],
        same: Callable[[D], bool],
        apply: Callable[[UserLedger, int], tuple[R, D]],
    ) -> R:
        """Look the delivery up; a known one is answered its first answer again (`response`, kept as
        every remembered answer is: `actors.replies`); a new one is applied and written with its
        record, and its answer, in one transaction."""
        store = self.residency.require_store()
        known = await self.durable.read("storage", find(store), deadline=turn.deadline)
        if known is not None:
            if not same(known):
                raise EventConflict(
                    "this delivery id was used for a different request", delivery_id=delivery_id
                )
            replayed: R = from_document(_current_form(known.response))
            return replayed
        draft = turn.ledger.clone()
        now = self.clock()
        result, record = apply(draft, now)
        if turn.idem is not None:
            draft.remember_reply(turn.idem, encode_result(result), now)
        await self.durable.commit(turn.user_id, draft, delivery=record)
        return result


def _current_form(response: dict[str, Any]) -> dict[str, Any]:
    """A first answer as `replies.result_document` keeps it. Migration 0009 converted the rows of
    older versions; one such shard still running through an upgrade may write another, which is
    converted here the same way (`{"applied"|"purchased_ms", "usage"}`, the usage flat)."""
    if "result" in response or "usage" not in response:
        return response
    usage = dict(response["usage"])
    session = usage.get("active_session")
    usage["active_session"] = {"type": "ActiveSessionView", "fields": session} if session else None
    typed_usage = {"type": "UsageView", "fields": usage}
    if "applied" in response:
        fields = {"applied": response["applied"], "usage": typed_usage}
        return {"result": {"type": "PlanChangeResult", "fields": fields}}
    fields = {"purchased_ms": response["purchased_ms"], "usage": typed_usage}
    return {"result": {"type": "CreditsAdded", "fields": fields}}
