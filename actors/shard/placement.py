"""Placement: which users this shard serves (the slots it owns), and handing slots to another shard.

The store says which slots a shard owns (`LedgerStore.ownership`; slots are
kept with the shard's claim, see `actors.routing`). A call for a user of a
slot this shard does not own is answered `UserMoved` once the store confirms
it (a shard that was just given the slot learns it then), so the gateway
routes it again; a call for a user of a slot being handed off is answered
`UserMoving` (the gateway waits, bounded, and tries again).

A handoff (`release`), per slot set, on the giving shard:

1. the slots are marked leaving: new calls for their users are refused;
2. the shard takes each of their resident users' turns (the operations under
   way finish first; those that were waiting find the user leaving), and
   settles any write in doubt;
3. under the write-behind's lock (no flush interleaves), it writes those users'
   state through, then moves the slots to the other shard in the store: one
   transaction that waits for this shard's writes under way, after which the
   store refuses any write of this shard holding one of those users
   (`StoreMoved`): it can never write them again;
4. the users are dropped from memory (their alarms with them), and their
   streams woken, to be asked again of the new owner.

If a step fails before the move commits, the slots are this shard's again and
nothing changed. If the move's outcome is unknown, they stay leaving (refused)
until the store is asked again (the next `refresh`, or `release` repeated).
The receiving shard learns of its new slots from the store (`refresh`: on a
call for one of their users, at every sync, or when the resize asks it) and
loads their users with open sessions or holds, whose alarms must run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from actors.errors import Unavailable, UserMoved, UserMoving
from actors.routing import SLOTS, initial_slots, slot_of
from actors.shard.config import RETRY_DELAY_MAX_S, RETRY_DELAY_MIN_S, Handoff
from actors.shard.fencing import Fencing
from actors.shard.parts import ShardPart
from actors.store import Fence, StoreError, StoreOutcomeUnknown
from actors.turns import UserTurns

log = structlog.get_logger("actors.shard")

# A slot's state on this shard.
NOT_OWNED, OWNED, LEAVING = 0, 1, 2


@dataclass(eq=False)
class Placement(ShardPart):
    turns: UserTurns
    fencing: Fencing
    flush_lock: asyncio.Lock  # the write-behind's: no flush runs while slots are handed off
    forget: Callable[[str], None]  # drop what the shard keeps of a user beyond residency
    # Load the users of gained slots with alarms: those named (a handoff's), else found in the store.
    reactivate: Callable[[Sequence[int], Sequence[str] | None], Coroutine[Any, Any, None]]
    _state: bytearray = field(init=False)
    # Per slot, how many times its state changed: a load that began before a change is not kept.
    _stamps: list[int] = field(default_factory=lambda: [0] * SLOTS, init=False)
    _version: int = field(default=-1, init=False)  # of the newest ownership applied (older: stale)
    _loading_slots: set[int] = field(default_factory=set, init=False)  # gained, users still loading
    leaving: int = field(default=0, init=False)  # slots leaving now (begin re-checks while any)
    handed_off: int = field(default=0, init=False)  # users handed to other shards since start
    _release_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _refreshing: asyncio.Task[None] | None = field(default=None, init=False)
    _asked: int = field(default=0, init=False)  # refreshes asked for, and done (`confirm`)
    _done: int = field(default=0, init=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        # A shard run alone (no owner: tests, one process) owns what a brand-new map of its count
        # gives it; a hosted one owns nothing until the store says (`refresh`, before it serves).
        self._state = bytearray(SLOTS)  # NOT_OWNED
        if self.config.owner is None:
            for slot in self._first_slots():
                self._state[slot] = OWNED

    def _first_slots(self) -> list[int]:
        """What a brand-new map of the configured count gives this shard."""
        return initial_slots(self.config.shard_index, self.config.shard_count)

    @property
    def owned(self) -> list[int]:
        return [slot for slot in range(SLOTS) if self._state[slot] == OWNED]

    def owns(self, user_id: str) -> bool:
        return self._state[slot_of(user_id)] == OWNED

    def stamp(self, user_id: str) -> int:
        """Changes so far of the user's slot (a load keeps what it read only if none came since)."""
        return self._stamps[slot_of(user_id)]

    def _set(self, slot: int, state: int) -> None:
        if self._state[slot] == LEAVING:
            self.leaving -= 1
        if state == LEAVING:
            self.leaving += 1
        self._state[slot] = state
        self._stamps[slot] += 1

    def check(self, user_id: str) -> None:
        """Refuse at once a call for a user of a slot leaving (`UserMoving`); else nothing (a slot
        not owned is confirmed with the store by `confirm`)."""
        if self._state[slot_of(user_id)] == LEAVING:
            raise _moving()

    async def confirm(self, user_id: str) -> None:
        """Return if this shard serves `user_id`; else `UserMoving`, or `UserMoved` once the store
        has confirmed that this shard does not own the user's slot."""
        slot = slot_of(user_id)
        state = self._state[slot]
        if state == OWNED:
            return
        if state == LEAVING:
            raise _moving()
        await self._refreshed()
        if self._state[slot] != OWNED:
            raise UserMoved("this user is served by another shard", slot=slot)

    async def _refreshed(self) -> None:
        """Return once a refresh that began after this call was made has ended (one at a time:
        calls that arrive meanwhile share the next)."""
        self._asked += 1
        asked = self._asked
        while self._done < asked:
            if self._refreshing is None:
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh_upto(self._asked))
            refreshing = self._refreshing
            try:
                await asyncio.shield(refreshing)
            except (StoreError, TimeoutError) as exc:
                raise Unavailable.of_store() from exc

    async def _refresh_upto(self, asked: int) -> None:
        try:
            async with asyncio.timeout(self.config.resolve_timeout_s):
                await self.refresh()
            self._done = max(self._done, asked)
        finally:
            self._refreshing = None

    async def refresh(
        self,
        alarmed: Sequence[str] | None = None,
        *,
        load_gained: bool = True,
        settling: bool = False,
    ) -> list[int]:
        """Ask the store which slots this shard owns and follow it: slots gained are served from
        now on (their users with alarms are loaded in the background, unless `load_gained` is
        false: `alarmed`, as the handoff named them, else those the store finds); slots lost
        without a handoff of this shard's knowing (one whose outcome was unknown) are dropped.
        An answer older than one already applied (read before a handoff committed) changes
        nothing. Returns the slots gained."""
        ownership = await self.fencing.ownership()
        if ownership is None:
            return []  # unfenced: its slots never change
        if ownership.version < self._version:
            return []  # read before a change this shard has applied since: stale
        self._version = ownership.version
        owned = ownership.slots
        if owned is None:  # a shard of no map: what a brand-new map of its count gives it
            owned = frozenset(self._first_slots())
        gained = [slot for slot in sorted(owned) if self._state[slot] == NOT_OWNED]
        if self._release_lock.locked() and not settling:
            # A handoff is under way: it decides its own slots; only gains are taken here.
            lost: list[int] = []
        else:
            lost = [slot for slot in range(SLOTS) if self._state[slot] != NOT_OWNED and slot not in owned]
            for slot in range(SLOTS):
                if self._state[slot] == LEAVING and slot in owned:
                    self._set(slot, OWNED)  # an unknown handoff that did not happen
        for slot in gained:
            self._set(slot, OWNED)
        if lost:
            self._drop(set(lost))
            log.info("slots_lost", shard=self.config.shard_index, slots=len(lost))
        if gained:
            log.info("slots_gained", shard=self.config.shard_index, slots=len(gained))
            if load_gained:
                self._spawn(self._load_gained(gained, alarmed))
        return gained

    async def _load_gained(self, gained: list[int], alarmed: Sequence[str] | None) -> None:
        """Load the users with alarms of slots just gained; until done, a handoff of those slots
        cannot name them all (the receiver then looks them up itself)."""
        self._loading_slots.update(gained)
        try:
            await self.reactivate(gained, alarmed)
        finally:
            self._loading_slots.difference_update(gained)

    async def release(self, slots: Sequence[int], to_shard: int) -> Handoff:
        """Hand `slots` (those of them this shard owns) to shard `to_shard` (see the module's
        docstring). Returns what was handed off; `Unavailable` if the handoff could not be made
        (then nothing changed, or, if its outcome is unknown, the slots stay leaving until the
        store is asked again)."""
        async with self._release_lock:
            mine = sorted({slot for slot in slots if self._state[slot] == OWNED})
            if not mine:
                return Handoff(0, ())
            moving = set(mine)
            for slot in mine:
                self._set(slot, LEAVING)
            users = [user_id for user_id in self.residency.ledgers if slot_of(user_id) in moving]
            # Every user with an alarm is resident once the shard has loaded them (until then, the
            # receiver looks them up itself).
            complete = not self.residency.reactivating and not (moving & self._loading_slots)
            taken: list[str] = []
            outcome = "kept"
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.config.durable_call_max_s
                for user_id in users:
                    await self.turns.take(user_id, deadline=deadline)
                    taken.append(user_id)
                    if user_id in self.durable.in_doubt:
                        await self.durable.resolve(user_id)
                alarmed = tuple(
                    user_id
                    for user_id in users
                    if self.residency.ledgers[user_id].next_deadline_ms() is not None
                )
                async with self.flush_lock:
                    await self._write_through(users)
                    outcome = "unknown"
                    async with asyncio.timeout(self.config.write_timeout_s):
                        version = await self.residency.require_store().move_slots(
                            self._fence(), mine, to_shard
                        )
                    self._version = max(self._version, version)
                    outcome = "moved"
            except BaseException as exc:
                if (
                    outcome == "unknown"
                    and isinstance(exc, StoreError)
                    and not isinstance(exc, StoreOutcomeUnknown)
                ):
                    outcome = "kept"  # refused before it could commit
                if outcome == "kept":
                    for slot in mine:
                        self._set(slot, OWNED)
                else:  # the move may have committed: the slots stay leaving until the store tells
                    self._spawn(self._settle())
                log.warning(
                    "handoff_failed",
                    shard=self.config.shard_index,
                    to_shard=to_shard,
                    slots=len(mine),
                    outcome=outcome,
                    error=repr(exc),
                )
                if not isinstance(exc, Exception):
                    raise  # cancelled: as it is
                raise Unavailable("the handoff failed; nothing moved (or, if unsure, retry it)") from exc
            finally:
                if outcome == "moved":
                    self._drop(moving)
                for user_id in taken:
                    self.turns.release(user_id)
            self.handed_off += len(users)
            log.info(
                "slots_handed_off",
                shard=self.config.shard_index,
                to_shard=to_shard,
                slots=len(mine),
                users=len(users),
                slots_version=version,
            )
            return Handoff(len(users), alarmed if complete else None)

    async def _settle(self) -> None:
        """After a handoff of unknown outcome: ask the store until it answers (`refresh`)."""
        delay = RETRY_DELAY_MIN_S
        while self.leaving:
            try:
                async with self._release_lock:  # (waits for a handoff under way)
                    await self.refresh(settling=True)
                return
            except (StoreError, OSError) as exc:
                log.warning("handoff_unsettled", shard=self.config.shard_index, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX_S)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_through(self, users: Sequence[str]) -> None:
        ledgers = self.residency.ledgers
        snapshots = [ledgers[user_id].snapshot() for user_id in users if ledgers[user_id].is_dirty]
        if not snapshots:
            return
        async with asyncio.timeout(self.config.write_timeout_s):
            await self.fencing.save(snapshots)
        for snapshot in snapshots:
            ledgers[snapshot.user.user_id].mark_synced(snapshot.version)

    def _fence(self) -> Fence:
        fence = self.fencing.fence
        if fence is None:
            raise Unavailable("this shard is in no shard map: its slots cannot move")
        return fence

    def _drop(self, slots: set[int]) -> None:
        """This shard no longer owns `slots`: forget their users (and wake their streams)."""
        for slot in slots:
            self._set(slot, NOT_OWNED)
        for user_id in [user_id for user_id in self.residency.ledgers if slot_of(user_id) in slots]:
            self.residency.evict(user_id)
            self.forget(user_id)


def _moving() -> UserMoving:
    return UserMoving("this user is moving to another shard; retry shortly", retry_after_s=1)
