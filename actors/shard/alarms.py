"""Alarms: one timer fires the stale-session, limit and period-end alarms of every resident user.

A busy user's alarms fire in that user's line, when its turn comes (once,
however often asked); a user whose last write is in doubt is come back to once
the doubt is settled. One user's failing alarm never costs the others theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from actors.shard.config import DOUBT_RETRY_MS, TIMER_SLEEP_MAX_S
from actors.shard.parts import ShardPart
from actors.turns import UserTurns

log = structlog.get_logger("actors.shard")


@dataclass(eq=False)
class Alarms(ShardPart):
    turns: UserTurns
    _in_line: set[str] = field(default_factory=set, init=False)  # busy users whose due alarms wait

    def fire_due(self) -> int:
        """Fire every alarm due now."""
        now = self.clock()
        residency = self.residency
        fired = 0
        for user_id in residency.timers.pop_due(now):
            if user_id not in residency.ledgers:
                continue
            if user_id in self.durable.in_doubt:
                # Settled by the user's next operation, or by the flush loop; come back then.
                residency.timers.arm(user_id, now + DOUBT_RETRY_MS)
                continue
            if self.turns.busy(user_id):
                # Its alarms fire in its line, when its turn comes (once, however often asked).
                if user_id not in self._in_line:
                    self.turns.call_when_free(user_id, functools.partial(self._fire_in_turn, user_id))
                    self._in_line.add(user_id)
                continue
            fired += self._fire(user_id, now)
        return fired

    def _fire_in_turn(self, user_id: str) -> None:
        self._in_line.discard(user_id)
        now = self.clock()
        if user_id in self.durable.in_doubt:
            self.residency.timers.arm(user_id, now + DOUBT_RETRY_MS)  # come back once it is settled
        elif user_id in self.residency.ledgers:
            self._fire(user_id, now)

    def _fire(self, user_id: str, now: int) -> int:
        """Fire the user's alarms due at `now` (the caller holds, or could take, the user's turn)."""
        if not self.residency.mine(user_id):
            # Its slot is being handed off: the shard that gets it fires them (a handoff that fails
            # gives the slot back, and they fire here a moment later).
            self.residency.timers.arm(user_id, now + DOUBT_RETRY_MS)
            return 0
        try:
            return self.residency.advance(user_id, self.residency.ledgers[user_id], now)
        except Exception:
            # One user's failure must not cost the others their alarms.
            log.exception("alarm_failed", shard=self.config.shard_index, user_id=user_id)
            self.residency.timers.arm(user_id, now + DOUBT_RETRY_MS)
            return 0

    async def run(self, running: Callable[[], bool]) -> None:
        """Sleep until the next alarm (or an earlier one is armed), fire what is due, while `running()`.

        Waits with `asyncio.timeout`, not `asyncio.wait_for` (see `WriteBehind.run`)."""
        residency = self.residency
        while running():
            residency.timer_wakeup.clear()
            try:
                self.fire_due()
            except Exception:
                log.exception("alarm_failed", shard=self.config.shard_index)
            deadline = residency.timers.next_deadline_ms()
            sleep_s = TIMER_SLEEP_MAX_S
            if deadline is not None:
                sleep_s = min(sleep_s, max(0.0, (deadline - self.clock()) / 1000))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep_s):
                    await residency.timer_wakeup.wait()
