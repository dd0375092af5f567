"""A deterministic simulation of one `LedgerShard`: many clients per user, faults, virtual time.

Modelled on TigerBeetle's VOPR and FoundationDB's simulation: one seed decides
everything (the clients' choices and timings, the store's faults, the shard's
crashes), the run happens on virtual time (`tests.simulation.loop`), so an hour
of traffic takes a fraction of a second and a failing seed replays exactly.

What runs: one real `LedgerShard` over a `MemoryStore` (through the faults of
`tests.simulation.faults`), driven by, for each user, a voice client (starts,
heartbeats, duplicate heartbeats, ends, silences, crashes mid-session), two
browser tabs holding live streams (`watch`) and reading usage, an app
(meter uses, credit and usage history, session lists, checks) and an AI app
(holds of minutes or of a meter: captured whole or in part, captured again,
released, extended, read, or left to expire; keyed or not); one billing
client for all (purchases and plan changes, redelivered and conflicting,
billing anchors of short periods, reconciliations); and a nemesis that makes
the store slow, takes it down, loses a commit's reply, cuts a write, holds a
commit in flight, and kills the shard (its connections severed, its calls
lost) for a new one to start from the store. The shard count changes as the run goes (between 1
and `MAX_SHARDS`, by the gateway's own `Resizer`), and a resize is cut short at any point: the
gateway running it dies, a shard dies under a handoff, the store loses a handoff's answer or goes
down; the next resize resumes it or rolls it back. Calls are made as Ray makes them
(`tests.simulation.calls`): a caller that stops waiting does not cancel the
shard's work; the hot ones (checks, heartbeats, meter uses, keyed starts) go
through the gateway's own `ShardBatcher`, as in production, so users share
batches. A bystander user, resident and only reading, is timed throughout.

Invariants, checked as the run goes and at its end:

Liveness
  L1  every call answers within its bound (the gateway's call timeout; a stream's
      wait plus that), whatever the other calls for the same user do;
  L2  once the clients stop, the shard's loop goes idle: only its timer and its
      flush wake it;
  L3  once the clients stop and the store is healthy, every session ends (a
      silent one as stale), every held tail is resolved and every user is
      written: nothing waits forever;
  L4  the bystander is answered within `BYSTANDER_WAIT_MAX_S` whatever the
      other users do: one user's waits delay no one else (a shard restart
      aside, after which it is loaded again).

Safety
  S1  nothing a client was told succeeded is lost: an acknowledged start, plan
      change or purchase is in the store when it is answered; a session a
      client was told ended is ended in the store with the reason and the
      minutes it was told;
  S2  never billed past the last sign of life: a session's billed time is at
      most the time from its start to the last call its client made for it
      (start, heartbeat, end), and a session no client learned of bills nothing;
  S3  the credit ledger's balance identity: per user and bucket, the entries'
      deltas add up to the balance the ledger holds, purchases are credited
      exactly once per delivery, and the minutes billed to sessions equal the
      ledger's consumption; `reconcile` finds no drift;
  S4  at most one open session per user, in memory and in the store;
  S5  a keyed retry of a request that succeeded gets the first answer again;
  S6  no call fails with anything but the domain's own refusals (no crash of
      the shard's code: a 500 at the gateway);
  H1  a hold is resolved exactly once: an acknowledged hold is in the store when
      it is answered; a resolution a client was told (captured n, released) is
      the one the store ends with, and every answer about the hold after it is
      the same; no hold's state changes once resolved; captured <= amount and
      captured + released = amount;
  H2  what holds and uses take of a meter never passes its limit (used + held),
      and captured minutes are billed (S3 counts them with the sessions' time);
  L5  once the clients stop, every hold is resolved by its deadline at the
      latest (expired by the shard's own alarm, even across a restart).

Placement
  P1  every slot has exactly one owner in the store, at every step; a user is
      served (resident, its slot owned) by one shard at most;
  P2  a resize cut short is finished, or rolled back, by asking again once
      the store is healthy.

Run one seed: `LEDGER_SIM_SEED=123 pytest tests/simulation -q`; a failure
prints its seed, the broken invariant and the trace's last lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from actors.errors import (
    DomainError,
    HoldResolved,
    IdempotencyInFlight,
    LedgerError,
    Overloaded,
    SessionEnded,
    SessionNotFound,
    Unavailable,
    UserMoved,
    UserMoving,
)
from actors.ledger import LedgerPolicy
from actors.plans import parse_plans
from actors.records import MONTHLY_BUCKET, PURCHASED_BUCKET
from actors.replies import IdempotencyKey
from actors.routing import SLOTS, ShardMap, owner_name, slot_of
from actors.shard import LANES, Handoff, LedgerShard, PlanEvent, Purchase, ShardConfig
from actors.store import LedgerStore, MemoryStore
from actors.times import MS_PER_MINUTE, MS_PER_SECOND, from_datetime
from actors.views import CreditsAdded, HoldView, PlanChangeResult, SessionProgress, SessionStarted
from gateway.metrics import Metrics
from gateway.resize import Resizer
from gateway.shards import ShardBatcher
from tests.simulation.calls import RemoteHandle, ShardDied
from tests.simulation.faults import Faults, FaultyStore
from tests.simulation.loop import Deadlock, VirtualLoop

PLANS = parse_plans(
    """
    default_plan = "free"
    [plans.free]
    minutes = 3
    [plans.free.meters.generations]
    limit = 5
    window = "day"
    [plans.basic]
    minutes = 6
    [plans.basic.meters.generations]
    limit = 20
    window = "period"
    [plans.pro]
    minutes = 12
    [plans.pro.rate_limit]
    requests_per_s = 5
    burst = 20
    [plans.pro.meters.generations]
    limit = "unlimited"
    window = "day"
    """,
    source="simulation",
)
STALE_S = 120
POLICY = LedgerPolicy(plans=PLANS, stale_session_ms=STALE_S * MS_PER_SECOND, low_balance_ms=MS_PER_MINUTE)
SYNC_INTERVAL_S = 5.0
# Where a run's virtual clock starts: mid-month, or shortly before a month (and a year) ends.
EPOCHS_MS = (
    from_datetime(datetime(2026, 11, 12, 9, 30, tzinfo=UTC)),
    from_datetime(datetime(2026, 11, 30, 23, 40, tzinfo=UTC)),
    from_datetime(datetime(2027, 12, 31, 23, 50, tzinfo=UTC)),
)
# Refusals and failures a call may end in; anything else is a bug in the shard (S6).
EXPECTED = (LedgerError, Unavailable, Overloaded, IdempotencyInFlight)
# L4: the longest the bystander (resident, only reading) may wait, whatever the others do.
BYSTANDER_WAIT_MAX_S = 0.1
BYSTANDER = "bystander"
TRACE_LINES_KEPT = 60
NAMESPACE = "sim"
MAX_SHARDS = 3  # resizes go between 1 and this many shards


class Violation(AssertionError):
    """An invariant broke; the message names it, the seed and how to replay."""


@dataclass
class SimConfig:
    users: int = 3
    clients_s: float = 1500.0  # how long the clients go on (virtual seconds)
    call_timeout_s: float = 12.0  # the gateway's bound on a call (L1)
    step_s: float = 0.001  # the virtual CPU cost of one loop iteration
    crashes: bool = True
    resizes: bool = True  # the nemesis changes the shard count (and crashes things mid-way)


@dataclass
class ShardGen:
    """One activation of shard `index`: its process, connection and the gateway's batchers to it."""

    index: int
    generation: int
    shard: LedgerShard
    connection: FaultyStore
    reads: ShardBatcher
    writes: ShardBatcher


@dataclass
class SessionTrack:
    user: str
    started_at_ms: int
    last_contact_ms: int  # when the latest start, heartbeat or end call for it finished
    told: tuple[str | None, int] | None = None  # (end_reason, used_ms) a client was told


@dataclass
class HoldTrack:
    user: str
    view: HoldView  # as acknowledged at creation
    told: HoldView | None = None  # the resolution a client was told


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    lost: bool = False  # the shard died under the call: its effect is unknown

    @property
    def ok(self) -> bool:
        return self.error is None and not self.lost


@dataclass
class SimReport:
    seed: int
    calls: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    virtual_s: float = 0.0
    busy_iterations: int = 0
    digest: str = ""
    # Resizes: finished, stopped part way (a gateway, shard or the store failed under one), and the
    # users they moved; handoffs whose commit's answer was lost (the shard asked the store after).
    resizes: Counter[str] = field(default_factory=Counter)
    users_moved: int = 0


class Simulation:
    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self.epoch_ms = self.rng.choice(EPOCHS_MS) + self.rng.randrange(0, 20 * MS_PER_MINUTE)
        self.users = [f"u{index}" for index in range(self.config.users)]
        self.memory = MemoryStore()
        self.faults = Faults()
        self.report = SimReport(seed)
        self.trace: deque[str] = deque(maxlen=TRACE_LINES_KEPT)
        self._digest = hashlib.blake2b(digest_size=16)
        self._session_ids = itertools.count(1)
        self._hold_ids = itertools.count(1)
        self.holds: dict[str, HoldTrack] = {}
        self._delivery_ids = itertools.count(1)
        self._keys = itertools.count(1)
        self.sessions: dict[str, SessionTrack] = {}
        self.purchases: dict[str, tuple[str, Purchase, CreditsAdded]] = {}
        self.plan_events: dict[str, tuple[str, PlanEvent, PlanChangeResult]] = {}
        self.keyed: dict[tuple[str, str], tuple[str, Any]] = {}  # (user, key) -> (hash, first answer)
        self.clients_done = False
        self.generation = 0  # of shard activations, across shards
        self.loop: VirtualLoop | None = None
        self.live: dict[int, ShardGen] = {}  # the running activation of each shard
        self.retired: list[FaultyStore] = []  # connections of shards gone (their commits may land)
        self.map: ShardMap | None = None  # the shard map as the gateway knows it
        self.resizing: asyncio.Task[Any] | None = None
        self.map_changes = 0  # resizes begun and ended (a bystander that moved is loaded again)
        self.metrics = Metrics()
        # Per shard generation, its calls under way (a dict, not a set: the order they are
        # cancelled in when the shard dies must not depend on where tasks live in memory).
        self._calls_in_flight: dict[int, dict[asyncio.Task[Any], None]] = {}
        self._violation: Violation | None = None

    # ------------------------------------------------------------------ running

    def run(self) -> SimReport:
        loop = self.loop = VirtualLoop(step_s=self.config.step_s)
        try:
            loop.run_until_complete(self._main())
        except Deadlock as exc:
            self._fail(f"L1: {exc}")
        finally:
            self._close(loop)
        if self._violation is not None:
            raise self._violation
        self.report.virtual_s = loop.time()
        self.report.busy_iterations = loop.busy_iterations
        self.report.digest = self._digest.hexdigest()
        return self.report

    def _close(self, loop: VirtualLoop) -> None:
        with contextlib.suppress(Deadlock, RuntimeError):
            tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    def now_ms(self) -> int:
        assert self.loop is not None
        return self.epoch_ms + int(self.loop.time() * 1000)

    def note(self, line: str) -> None:
        assert self.loop is not None
        entry = f"{self.loop.time():10.3f}  {line}"
        self.trace.append(entry)
        self._digest.update(entry.encode())

    def _fail(self, message: str) -> None:
        if self._violation is None:
            trace = "\n".join(self.trace)
            self._violation = Violation(
                f"seed {self.seed}: {message}\n"
                f"replay: LEDGER_SIM_SEED={self.seed} pytest tests/simulation -q\n"
                f"last {len(self.trace)} steps:\n{trace}"
            )

    def violated(self, message: str) -> Violation:
        self._fail(message)
        assert self._violation is not None
        return self._violation

    async def _main(self) -> None:
        try:
            self.map = await self.memory.create_map(NAMESPACE, 1)
            await self._start_shard(0)
            clients = [self._voice(user, 0) for user in self.users]
            clients += [self._tab(user, tab) for user in self.users for tab in range(2)]
            clients += [self._app(user) for user in self.users]
            clients += [self._ai(user) for user in self.users]
            clients += [self._billing(), self._bystander()]
            nemesis = asyncio.get_running_loop().create_task(self._nemesis())
            await asyncio.gather(*clients)
            self.clients_done = True
            nemesis.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nemesis
            await self._heal_and_settle()
        except Violation:
            return

    # ----------------------------------------------------------------- the shard

    def _new_shard(self, index: int) -> ShardGen:
        self.generation += 1
        connection = FaultyStore(self.memory, self.faults, random.Random(self.rng.random()))

        async def factory() -> LedgerStore:
            return connection

        config = ShardConfig(
            shard_index=index,
            shard_count=MAX_SHARDS,
            policy=POLICY,
            sync_interval_s=SYNC_INTERVAL_S,
            max_pending_calls=10_000,
            start_wait_s=3.0,
            owner=owner_name(NAMESPACE, index),
        )
        shard = LedgerShard(
            config,
            factory,
            clock=self.now_ms,
            new_session_id=lambda: f"s{next(self._session_ids)}",
            new_hold_id=lambda: f"h{next(self._hold_ids)}",
        )
        in_flight = self._calls_in_flight[self.generation] = {}
        handle = RemoteHandle(shard, in_flight)
        # As a gateway does: hot calls in batches, starts and ends in batches of their own.
        return ShardGen(
            index,
            self.generation,
            shard,
            connection,
            ShardBatcher(handle, self.metrics),
            ShardBatcher(handle, self.metrics),
        )

    async def _start_shard(self, index: int) -> None:
        gen = self.live[index] = self._new_shard(index)
        self.note(f"shard {index} generation {gen.generation} starting")
        starting = asyncio.get_running_loop().create_task(gen.shard.start())
        self._background(starting)

    def _background(self, task: asyncio.Task[Any]) -> None:
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def _crash(self, index: int) -> None:
        """Shard `index`'s process dies: its connection is severed, its calls are lost, a new one starts."""
        self.report.crashes += 1
        old = self.live.pop(index)
        self.note(f"shard {index} generation {old.generation} killed")
        self._kill(old)
        await self._start_shard(index)

    def _kill(self, gen: ShardGen) -> None:
        gen.connection.sever()
        self.retired.append(gen.connection)
        for task in self._calls_in_flight.pop(gen.generation):
            task.cancel()
        stopping = asyncio.get_running_loop().create_task(gen.shard.stop())
        self._background(stopping)

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        label: str,
        operation: Callable[[LedgerShard], Awaitable[Any]],
        *,
        user: str,
        bound_s: float = 0.0,
    ) -> Outcome:
        """Call the shard that owns `user` as the gateway would (see `route`)."""
        return await self.route(label, user, lambda gen: operation(gen.shard), bound_s=bound_s)

    async def route(
        self, label: str, user: str, operation: Callable[[ShardGen], Awaitable[Any]], *, bound_s: float = 0.0
    ) -> Outcome:
        """Send a call for `user` to the shard the gateway's map names, as `ShardRouter` does: told
        the user moved (or is moving), read the map and send it again, within the gateway's bound
        (then the last refusal is the answer: a 503)."""
        assert self.loop is not None and self.map is not None
        self.report.calls[label.split(" ")[0]] += 1
        give_up_at = self.loop.time() + self.config.call_timeout_s
        delay = 0.05
        while True:
            index = self.map.shard_of(user)
            gen = self.live.get(index)
            if gen is None:  # retired by a resize the gateway has not heard of yet
                outcome = Outcome(error=UserMoved("the shard is gone", slot=slot_of(user)))
            else:
                outcome = await self._call_on(gen, label, operation, bound_s=bound_s)
            if not isinstance(outcome.error, UserMoved | UserMoving) or self.loop.time() >= give_up_at:
                return outcome
            self.map = await self.memory.read_map(NAMESPACE)
            assert self.map is not None
            if isinstance(outcome.error, UserMoving) or self.map.shard_of(user) == index:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _call_on(
        self,
        gen: ShardGen,
        label: str,
        operation: Callable[[ShardGen], Awaitable[Any]],
        *,
        bound_s: float = 0.0,
    ) -> Outcome:
        """Call one shard activation as Ray would: the caller's timeout does not cancel the shard's work."""
        if self._violation is not None:
            raise self._violation
        generation = gen.generation
        task = asyncio.get_running_loop().create_task(operation(gen))
        in_flight = self._calls_in_flight[generation]
        in_flight[task] = None
        task.add_done_callback(lambda done: in_flight.pop(done, None))
        bound = bound_s + self.config.call_timeout_s
        assert self.loop is not None
        busy_before = self.loop.busy_iterations
        done, _ = await asyncio.wait({task}, timeout=bound)
        if not done:
            if self.live.get(gen.index) is not gen:
                outcome = Outcome(lost=True)
            else:
                busy = self.loop.busy_iterations - busy_before
                raise self.violated(
                    f"L1: {label} did not answer within {bound:.0f} s "
                    f"(the loop ran {busy} busy iterations meanwhile, {busy / bound:.0f} a second)"
                )
        elif task.cancelled() or isinstance(task.exception(), ShardDied):
            outcome = Outcome(lost=True)
        elif (error := task.exception()) is not None:
            if not isinstance(error, EXPECTED):
                raise self.violated(f"S6: {label} failed with {error!r}") from error
            outcome = Outcome(error=error)
        else:
            outcome = Outcome(value=task.result())
        self.note(f"{label} -> {_describe(outcome)}")
        return outcome

    async def hot(self, label: str, method: str, *args: Any, **kwargs: Any) -> Outcome:
        """A call the gateway batches (declared with a lane; the "write" lane in batches of its
        own), through the batchers of the live activation of the user's shard (`args[0]`)."""
        write = LANES[method] == "write"
        return await self.route(
            label, args[0], lambda gen: (gen.writes if write else gen.reads).call(method, args, kwargs)
        )

    async def think(self, rng: random.Random, low_s: float, high_s: float) -> None:
        await asyncio.sleep(rng.uniform(low_s, high_s))

    def clients_go_on(self) -> bool:
        assert self.loop is not None
        return self.loop.time() < self.config.clients_s and self._violation is None

    def key(self, rng: random.Random) -> str | None:
        return f"k{next(self._keys)}" if rng.random() < 0.3 else None

    def check_keyed(self, user: str, idem: IdempotencyKey | None, outcome: Outcome, label: str) -> None:
        """S5: a key's first successful answer is every later answer to the same request."""
        if idem is None or not outcome.ok:
            return
        first = self.keyed.get((user, idem.key))
        if first is None:
            self.keyed[(user, idem.key)] = (idem.request_hash, outcome.value)
        elif first[0] == idem.request_hash and first[1] != outcome.value:
            raise self.violated(
                f"S5: {label} with key {idem.key} answered {outcome.value!r}, first {first[1]!r}"
            )

    # ---------------------------------------------------------------- sessions

    def contact(self, session_id: str) -> None:
        track = self.sessions.get(session_id)
        if track is not None:
            track.last_contact_ms = max(track.last_contact_ms, self.now_ms())

    def told_ended(self, session_id: str, end_reason: str | None, used_ms: int) -> None:
        track = self.sessions.get(session_id)
        if track is None:
            return
        if track.told is not None and track.told != (end_reason, used_ms):
            raise self.violated(
                f"S1: session {session_id} was told it ended {track.told}, now {(end_reason, used_ms)}"
            )
        track.told = (end_reason, used_ms)

    async def _voice(self, user: str, index: int) -> None:
        rng = random.Random(self.rng.random())
        name = f"voice {user}"
        await self.think(rng, 0, 30)
        while self.clients_go_on():
            key = self.key(rng)
            idem = IdempotencyKey(key, "start") if key else None
            started = await self._start(user, idem, name)
            if started is None and idem is not None and rng.random() < 0.7:
                started = await self._start(user, idem, name + " retry")  # the same key again
            if started is None:
                await self.think(rng, 5, 60)
                continue
            await self._run_session(user, started, rng, name)
            await self.think(rng, 1, 90)

    async def _start(self, user: str, idem: IdempotencyKey | None, name: str) -> SessionStarted | None:
        outcome = await self.hot(
            f"start {user} key={idem.key if idem else None}", "start_session", user, topic="sim", idem=idem
        )
        self.check_keyed(user, idem, outcome, "start")
        if not outcome.ok:
            return None
        started: SessionStarted = outcome.value
        stored = self.memory.sessions.get(started.session_id)
        if stored is None:
            raise self.violated(f"S1: session {started.session_id} was acknowledged but is not in the store")
        track = self.sessions.setdefault(
            started.session_id, SessionTrack(user, started.started_at_ms, self.now_ms())
        )
        track.last_contact_ms = max(track.last_contact_ms, self.now_ms())
        return started

    async def _run_session(self, user: str, started: SessionStarted, rng: random.Random, name: str) -> None:
        session_id = started.session_id
        beats = rng.randrange(1, 30)
        for seq in range(1, beats + 1):
            if not self.clients_go_on():
                break
            gap = rng.choice((rng.uniform(5, 40), rng.uniform(5, 40), rng.uniform(40, STALE_S + 60)))
            await asyncio.sleep(gap)
            copies = 2 if rng.random() < 0.15 else 1  # a client retrying a heartbeat it thinks was lost
            answers = await asyncio.gather(
                *(self._heartbeat(user, session_id, seq, rng) for _ in range(copies))
            )
            if any(answer == "ended" for answer in answers):
                return
        fate = rng.random()
        if fate < 0.25:
            self.note(f"{name} goes silent (session {session_id})")
            return  # the client died: its session must end stale, billed to its last sign of life
        copies = 2 if rng.random() < 0.2 else 1
        await asyncio.gather(*(self._end(user, session_id, rng) for _ in range(copies)))

    async def _heartbeat(self, user: str, session_id: str, seq: int, rng: random.Random) -> str:
        key = self.key(rng)
        idem = IdempotencyKey(key, f"heartbeat:{session_id}:{seq}") if key else None
        outcome = await self.hot(
            f"heartbeat {user} {session_id} seq={seq}", "heartbeat", user, session_id, seq=seq, idem=idem
        )
        self.contact(session_id)
        self.check_keyed(user, idem, outcome, "heartbeat")
        if outcome.ok:
            progress: SessionProgress = outcome.value
            if progress.state == "ended":
                self.told_ended(session_id, progress.end_reason, progress.session_used_ms)
                return "ended"
            return "active"
        if isinstance(outcome.error, SessionEnded):
            fields = outcome.error.fields
            self.told_ended(session_id, fields.get("end_reason"), fields.get("session_used_ms", 0))
            return "ended"
        if isinstance(outcome.error, SessionNotFound):
            raise self.violated(f"S1: heartbeat for acknowledged session {session_id} found no session")
        return "unknown"

    async def _end(self, user: str, session_id: str, rng: random.Random) -> None:
        for _attempt in range(3):
            key = self.key(rng)
            idem = IdempotencyKey(key, f"end:{session_id}") if key else None
            outcome = await self.hot(f"end {user} {session_id}", "end_session", user, session_id, idem=idem)
            self.contact(session_id)
            self.check_keyed(user, idem, outcome, "end")
            if outcome.ok:
                progress: SessionProgress = outcome.value
                self.told_ended(session_id, progress.end_reason, progress.session_used_ms)
                return
            if isinstance(outcome.error, SessionNotFound):
                raise self.violated(f"S1: end of acknowledged session {session_id} found no session")
            await self.think(rng, 0.5, 5)

    # -------------------------------------------------------------- readers

    async def _tab(self, user: str, tab: int) -> None:
        """A browser tab with the live stream open: long polls, and a usage read now and then."""
        rng = random.Random(self.rng.random())
        seen = -1
        await self.think(rng, 0, 5)
        while self.clients_go_on():
            if rng.random() < 0.2:
                await self.hot(f"usage {user}", "usage", user)
                continue
            after = seen
            timeout_s = rng.uniform(5, 25)
            outcome = await self.call(
                f"watch {user} after={after}",
                lambda shard, after=after, timeout_s=timeout_s: shard.watch(user, after, timeout_s),
                user=user,
                bound_s=timeout_s,
            )
            if outcome.ok and outcome.value is not None:
                seen = outcome.value.usage.version
            elif not outcome.ok:
                await self.think(rng, 0.5, 3)

    async def _app(self, user: str) -> None:
        rng = random.Random(self.rng.random())
        reads: list[tuple[str, Callable[[LedgerShard], Awaitable[Any]]]] = [
            ("has_credits", lambda shard: shard.has_credits(user)),
            ("credits", lambda shard: shard.credits(user)),
            ("current_session", lambda shard: shard.current_session(user)),
            ("list_sessions", lambda shard: shard.list_sessions(user, 5)),
            ("usage_history", lambda shard: shard.usage_history(user, 3)),
            ("credit_history", lambda shard: shard.credit_history(user, 10)),
            ("usage_of", lambda shard: shard.usage_of(user)),
        ]
        while self.clients_go_on():
            await self.think(rng, 0.1, 20)
            if rng.random() < 0.35:
                amount = rng.choice((1, 1, 2, 5))
                key = self.key(rng)
                idem = IdempotencyKey(key, f"consume:generations:{amount}") if key else None
                outcome = await self.hot(
                    f"consume {user} {amount}", "consume_meter", user, "generations", amount, idem=idem
                )
                self.check_keyed(user, idem, outcome, "consume")
                continue
            label, read = rng.choice(reads)
            burst = rng.choice((1, 1, 1, 3))  # a page that fires several reads at once
            await asyncio.gather(*(self.call(f"{label} {user}", read, user=user) for _ in range(burst)))

    async def _ai(self, user: str) -> None:
        """An AI app: reserves before the work, then captures what it cost (or gives up)."""
        rng = random.Random(self.rng.random())
        while self.clients_go_on():
            await self.think(rng, 1, 40)
            if rng.random() < 0.5:
                meter, amount = None, rng.choice((15, 30, 60)) * MS_PER_SECOND
            else:
                meter, amount = "generations", rng.choice((1, 2, 3))
            ttl_ms = rng.choice((5, 30, 120)) * MS_PER_SECOND
            key = self.key(rng)
            idem = IdempotencyKey(key, f"hold:{meter}:{amount}:{ttl_ms}") if key else None
            created = await self.hot(
                f"hold {user} {meter or 'minutes'} {amount}",
                "create_hold",
                user,
                meter=meter,
                amount=amount,
                ttl_ms=ttl_ms,
                idem=idem,
            )
            self.check_keyed(user, idem, created, "hold")
            if not created.ok:
                continue
            view: HoldView = created.value
            if view.hold_id not in self.memory.hold_records:
                raise self.violated(f"H1: hold {view.hold_id} was acknowledged but is not in the store")
            self.holds.setdefault(view.hold_id, HoldTrack(user, view))
            self._check_meter_limit(user, view)
            await self._work_on_hold(user, view, rng)

    async def _work_on_hold(self, user: str, view: HoldView, rng: random.Random) -> None:
        hold_id = view.hold_id
        await asyncio.sleep(rng.uniform(0, view.expires_at_ms - view.created_at_ms) / 1000 * 1.3)
        fate = rng.random()
        if fate < 0.15:
            self.note(f"ai {user} forgets hold {hold_id}")
            return  # it expires
        if fate < 0.25:
            ttl_ms = rng.choice((5, 60)) * MS_PER_SECOND
            await self.hot(f"extend {user} {hold_id}", "extend_hold", user, hold_id, ttl_ms)
            await asyncio.sleep(rng.uniform(0, 10))
        if fate < 0.35:
            verb, args = "release_hold", (user, hold_id)
        else:
            whole = view.amount if view.meter is not None else view.amount / MS_PER_MINUTE
            part = rng.choice((None, whole, 0, whole / 2 if view.meter is None else max(0, view.amount - 1)))
            verb, args = "capture_hold", (user, hold_id, part)
        for _attempt in range(rng.choice((1, 2, 3))):  # a capture sent again gets the same answer
            key = self.key(rng)
            idem = IdempotencyKey(key, f"{verb}:{args[1:]}") if key else None
            outcome = await self.hot(f"{verb} {user} {hold_id} {args[2:]}", verb, *args, idem=idem)
            self.check_keyed(user, idem, outcome, verb)
            self._told_hold(hold_id, outcome)
        read = await self.hot(f"get_hold {user} {hold_id}", "get_hold", user, hold_id)
        self._told_hold(hold_id, read, reading=True)

    def _told_hold(self, hold_id: str, outcome: Outcome, *, reading: bool = False) -> None:
        """H1: once a client was told how a hold was resolved, every later answer says the same."""
        track = self.holds[hold_id]
        if outcome.ok:
            view: HoldView = outcome.value
            if view.state == "held":
                if track.told is not None:
                    raise self.violated(f"H1: hold {hold_id} was told {track.told.state}, now held again")
                return
            if view.captured + view.released != view.amount or view.captured > view.amount:
                raise self.violated(f"H1: hold {hold_id} resolved as {view}")
            if track.told is not None and track.told != view:
                raise self.violated(f"H1: hold {hold_id} was told {track.told}, now {view}")
            track.told = view
            stored = self.memory.hold_records.get(hold_id)
            if not reading and (stored is None or stored.state != view.state):
                raise self.violated(f"H1: hold {hold_id} was answered {view.state}, the store has {stored}")
        elif isinstance(outcome.error, HoldResolved):
            state = outcome.error.fields["state"]
            if track.told is not None and track.told.state != state:
                raise self.violated(f"H1: hold {hold_id} was told {track.told.state}, now {state}")

    def _check_meter_limit(self, user: str, view: HoldView) -> None:
        """H2: right after a hold of the meter, with nothing else changed since (a plan lowered
        under what was used or held is no new use past the limit), used + held is within it."""
        gen = self.live.get(self.map.shard_of(user)) if self.map is not None else None
        ledger = gen.shard._residency.ledgers.get(user) if gen is not None else None
        if ledger is None or ledger.version != view.version or view.meter is None:
            return
        meter = ledger.credits(self.now_ms()).meters.get("generations")
        if meter is not None and meter.limit is not None and meter.used + meter.held > meter.limit:
            raise self.violated(
                f"H2: {user} generations used {meter.used} + held {meter.held} > {meter.limit}"
            )

    async def _bystander(self) -> None:
        """L4: a user who only reads, timed: nothing the others do may keep it waiting."""
        rng = random.Random(self.rng.random())
        assert self.loop is not None
        resident_in: tuple[int, int] | None = None  # (shard generation, map changes) it was loaded in
        while self.clients_go_on():
            await self.think(rng, 0.2, 3)
            began = self.loop.time()
            generation = self._serving(BYSTANDER)
            method = rng.choice(("usage", "has_credits", "credits"))
            outcome = await self.hot(f"{method} {BYSTANDER}", method, BYSTANDER)
            took = self.loop.time() - began
            if (
                outcome.ok
                and generation is not None
                and resident_in == generation == self._serving(BYSTANDER)
                and took > BYSTANDER_WAIT_MAX_S
            ):
                raise self.violated(
                    f"L4: a bystander's {method} took {took * 1000:.0f} ms "
                    f"(at most {BYSTANDER_WAIT_MAX_S * 1000:.0f} ms)"
                )
            if outcome.ok and generation == self._serving(BYSTANDER):
                resident_in = generation

    def _serving(self, user: str) -> tuple[int, int] | None:
        """Which activation serves `user` now, and how many map changes there were (a bystander
        loaded by one activation, with no resize since, is answered from memory)."""
        assert self.map is not None
        gen = self.live.get(self.map.shard_of(user))
        if gen is None or (self.resizing is not None and not self.resizing.done()):
            return None
        return gen.generation, self.map_changes

    # ---------------------------------------------------------------- billing

    async def _billing(self) -> None:
        rng = random.Random(self.rng.random())
        while self.clients_go_on():
            await self.think(rng, 5, 60)
            user = rng.choice(self.users)
            choice = rng.random()
            if choice < 0.4:
                await self._purchase(user, rng)
            elif choice < 0.8:
                await self._plan_change(user, rng)
            else:
                outcome = await self.call(
                    f"reconcile {user}", lambda shard, user=user: shard.reconcile(user), user=user
                )
                if outcome.ok and outcome.value.drifting:
                    raise self.violated(f"S3: reconcile of {user} found drift: {outcome.value.drifting}")

    async def _purchase(self, user: str, rng: random.Random) -> None:
        if self.purchases and rng.random() < 0.3:  # a redelivery, or the same id with another amount
            delivery_id = rng.choice(sorted(self.purchases))
            owner, purchase, first = self.purchases[delivery_id]
            if rng.random() < 0.3:
                purchase = Purchase(delivery_id, purchase.minutes_ms + MS_PER_MINUTE, "purchase")
            outcome = await self.call(
                f"purchase {owner} {delivery_id} again",
                lambda shard: shard.add_credits(owner, purchase),
                user=owner,
            )
            if outcome.ok and outcome.value != first:
                raise self.violated(f"S5: redelivered purchase {delivery_id} answered otherwise")
            if outcome.ok and purchase != self.purchases[delivery_id][1]:
                raise self.violated(f"S1: purchase {delivery_id} with another amount was accepted")
            return
        delivery_id = f"p{next(self._delivery_ids)}"
        minutes_ms = rng.choice((1, 2, 5)) * MS_PER_MINUTE // rng.choice((1, 2))
        purchase = Purchase(delivery_id, minutes_ms, rng.choice(("purchase", "grant")), reference=delivery_id)
        for _attempt in range(3):
            outcome = await self.call(
                f"purchase {user} {delivery_id} {minutes_ms}",
                lambda shard: shard.add_credits(user, purchase),
                user=user,
            )
            if outcome.ok:
                if delivery_id not in self.memory.purchases:
                    raise self.violated(f"S1: purchase {delivery_id} was acknowledged but is not stored")
                self.purchases.setdefault(delivery_id, (user, purchase, outcome.value))
                return
            await self.think(rng, 1, 10)

    async def _plan_change(self, user: str, rng: random.Random) -> None:
        now = self.now_ms()
        plan = rng.choice(("free", "basic", "pro"))
        action = rng.choice(("upgrade", "downgrade", "cancel"))
        occurred_at = now - rng.choice((0, 0, 0, 60_000, 3_600_000))
        period: tuple[int | None, int | None] = (None, None)
        if rng.random() < 0.3:  # billing anchors the user to a short subscription period
            start = now - rng.randrange(0, 10 * MS_PER_MINUTE)
            period = (start, start + rng.choice((20, 30, 45)) * MS_PER_MINUTE)
        event = PlanEvent(
            delivery_id=f"e{next(self._delivery_ids)}",
            plan=plan,
            action=action,
            occurred_at_ms=occurred_at,
            reset_usage=rng.random() < 0.1,
            period_start_ms=period[0],
            period_end_ms=period[1],
        )
        for attempt in range(2):
            outcome = await self.call(
                f"plan {user} {event.delivery_id} {action} {plan} try={attempt}",
                lambda shard: shard.change_plan(user, event),
                user=user,
            )
            if outcome.ok:
                if event.delivery_id not in self.memory.plan_events:
                    raise self.violated(f"S1: plan event {event.delivery_id} acknowledged but not stored")
                first = self.plan_events.setdefault(event.delivery_id, (user, event, outcome.value))
                if first[2] != outcome.value:
                    raise self.violated(f"S5: redelivered plan event {event.delivery_id} answered otherwise")
            if not outcome.ok and not isinstance(outcome.error, Unavailable):
                return
            if rng.random() < 0.5:
                return
            await self.think(rng, 0.5, 5)

    # ----------------------------------------------------------------- nemesis

    async def _nemesis(self) -> None:
        rng = random.Random(self.rng.random())
        faults = self.faults
        while True:
            await self.think(rng, 10, 120)
            choice = rng.random()
            if choice < 0.25:
                faults.latency_s = rng.choice(((0.0, 0.0), (0.001, 0.05), (0.01, 0.4), (0.5, 4.0)))
                self.note(f"nemesis: store latency {faults.latency_s}")
            elif choice < 0.4:
                faults.down = True
                self.note("nemesis: store down")
                await self.think(rng, 2, 60)
                faults.down = False
                self.note("nemesis: store up")
            elif choice < 0.75:
                faults.next_write = rng.choice(("lose_reply", "cut", "hold"))
                self.note(f"nemesis: next write {faults.next_write}")
            elif self.config.resizes and choice < 0.87:
                self._resize_or_interrupt(rng)
            elif self.config.crashes:
                await self._crash(rng.choice(sorted(self.live)))
            self._check_owners()

    # ----------------------------------------------------------------- resizes

    def _resize_or_interrupt(self, rng: random.Random) -> None:
        """Begin a resize (to another count; while one was cut short: resume it, roll it back, or
        go elsewhere); or, while one runs, kill the gateway running it."""
        if self.resizing is not None and not self.resizing.done():
            if rng.random() < 0.5:
                self.note("nemesis: the resizing gateway dies")
                self.resizing.cancel()
            return
        _, count, target = self.memory.maps[NAMESPACE]
        if target is not None and rng.random() < 0.7:
            to = rng.choice((target, count))  # run it again, or roll it back
        else:
            to = rng.choice([n for n in range(1, MAX_SHARDS + 1) if n != count])
        self.note(f"nemesis: resize {count} -> {to} (target was {target})")
        self.resizing = asyncio.get_running_loop().create_task(self._resize(to))
        self._background(self.resizing)
        if rng.random() < 0.6:  # a crash point of the resize, somewhere in its steps
            interrupting = asyncio.get_running_loop().create_task(self._interrupt(self.resizing, rng))
            self._background(interrupting)

    async def _interrupt(self, resizing: asyncio.Task[Any], rng: random.Random) -> None:
        """Fail something part way through a resize: the gateway running it dies, a shard dies
        (giving or taking slots, or neither), or the store loses a handoff's answer or goes down."""
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        if resizing.done():
            return
        what = rng.choice(("gateway", "shard", "write", "down"))
        self.note(f"nemesis: during the resize, {what}")
        if what == "gateway":
            resizing.cancel()
        elif what == "shard" and self.config.crashes:
            await self._crash(rng.choice(sorted(self.live)))
        elif what == "write":
            self.faults.next_write = rng.choice(("lose_reply", "cut", "hold"))
        elif what == "down":
            self.faults.down = True
            await asyncio.sleep(rng.uniform(0.1, 5.0))
            self.faults.down = False

    async def _resize(self, count: int) -> None:
        """Resize as a gateway does (`gateway.resize.Resizer`), its steps sent to the live shards."""
        self.map_changes += 1
        steps = _SimSteps(self)
        resizer = Resizer(
            namespace=NAMESPACE,
            maps=FaultyStore(self.memory, self.faults, random.Random(self.rng.random())),
            shards=steps,
            start_shards=steps.start_shards,
            retire_shards=steps.retire_shards,
        )
        try:
            done = await resizer.resize(count)
            self.note(f"resize to {count} done: map epoch {done.epoch}, {resizer.moved_users} users moved")
            self.report.resizes["finished"] += 1
        except BaseException as exc:
            self.note(f"resize to {count} stopped: {exc!r}")
            self.report.resizes[f"stopped: {type(exc).__name__}"] += 1
            raise
        finally:
            self.report.users_moved += resizer.moved_users
            self.map_changes += 1
            self._check_owners()

    def _check_owners(self) -> None:
        """P1: every slot has exactly one owner in the store; a user is served (resident, its slot
        owned) by one shard at most."""
        owned: Counter[int] = Counter()
        for owner, slots in self.memory.owned.items():
            if owner.startswith(f"{NAMESPACE}/"):
                owned.update(slots)
        if sorted(owned) != list(range(SLOTS)) or max(owned.values()) != 1:
            twice = sorted(slot for slot, n in owned.items() if n > 1)
            raise self.violated(f"P1: slots owned twice {twice[:5]}, unowned {SLOTS - len(owned)}")
        serving: Counter[str] = Counter()
        for gen in self.live.values():
            placement = gen.shard._placement
            serving.update(user for user in gen.shard._residency.ledgers if placement.owns(user))
        for user, shards in serving.items():
            if shards > 1:
                raise self.violated(f"P1: {user} is served by {shards} shards at once")

    # -------------------------------------------------------------- the end

    async def _heal_and_settle(self) -> None:
        assert self.loop is not None
        self.faults.down = False
        self.faults.latency_s = (0.0, 0.0)
        self.faults.next_write = None
        self.note("clients stopped, store healed")
        if self.resizing is not None and not self.resizing.done():
            self.note("the resizing gateway dies with the clients")
            self.resizing.cancel()
            await asyncio.gather(self.resizing, return_exceptions=True)
        for gen in list(self.live.values()):
            await gen.connection.settle()
        for connection in self.retired:
            await connection.settle()
        # A resize cut short is finished (or rolled back) by asking again, as an operator would.
        _, count, target = self.memory.maps[NAMESPACE]
        if target is not None:
            to = target if self.rng.random() < 0.5 else count
            for _attempt in range(5):
                self.resizing = asyncio.get_running_loop().create_task(self._resize(to))
                try:
                    await self.resizing
                    break
                except Exception:
                    await asyncio.sleep(SYNC_INTERVAL_S)
            else:
                raise self.violated(
                    f"P2: a resize cut short could not be finished, to {to}, with the store healthy"
                )
            self.resizing = None
        # L3: silent sessions end stale (and their held tails are resolved), every user is written
        # within a few sync intervals of its last change (a period may roll at any time).
        await asyncio.sleep(STALE_S + 30)
        for _ in range(int(3 * SYNC_INTERVAL_S)):
            stats = [await gen.shard.stats() for gen in self.live.values()]
            left = [(st.active_sessions, st.dirty_users, st.users_in_doubt, st.slots_leaving) for st in stats]
            if not any(any(counts) for counts in left):
                break
            await asyncio.sleep(1.0)
        else:
            raise self.violated(
                f"L3: clients gone for {STALE_S + 30 + 3 * SYNC_INTERVAL_S:.0f} s, yet per shard "
                f"(open sessions, unwritten users, in doubt, slots leaving): {left}"
            )
        self._check_owners()
        # L2: nothing but the timer and the flush wakes the loop now.
        before, quiet_s = self.loop.busy_iterations, 300.0
        await asyncio.sleep(quiet_s)
        busy = self.loop.busy_iterations - before
        allowed = 40 * quiet_s / SYNC_INTERVAL_S * len(self.live)
        if busy > allowed:
            raise self.violated(f"L2: the shard's loop ran {busy} busy iterations in {quiet_s:.0f} quiet s")
        await self._check_store()
        for user in self.users:
            outcome = await self.call(
                f"reconcile {user}", lambda shard, user=user: shard.reconcile(user), user=user
            )
            if not outcome.ok:
                raise self.violated(f"S3: reconcile of {user} failed with the store healthy: {outcome}")
            if outcome.value.drifting:
                raise self.violated(f"S3: reconcile of {user} found drift: {outcome.value.drifting}")
        for gen in self.live.values():
            await gen.shard.stop()

    async def _check_store(self) -> None:
        memory = self.memory
        open_sessions = Counter(s.user_id for s in memory.sessions.values() if s.is_open)
        if open_sessions:
            raise self.violated(f"S4/L3: sessions still open in the store: {dict(open_sessions)}")
        pending = [s.session_id for s in memory.sessions.values() if s.is_pending]
        if pending:
            raise self.violated(f"L3: held tails never resolved, long after their deadline: {pending}")
        for hold_id, track in self.holds.items():
            stored = memory.hold_records.get(hold_id)
            if stored is None or stored.is_held:
                raise self.violated(f"L5: hold {hold_id} never resolved, long after its deadline: {stored}")
            if stored.captured + stored.released != stored.amount or stored.captured > stored.amount:
                raise self.violated(f"H1: hold {hold_id} is stored resolved as {stored}")
            told = track.told
            if told is not None and (told.state, told.captured, told.released) != (
                stored.state,
                stored.captured,
                stored.released,
            ):
                raise self.violated(f"H1: hold {hold_id} was told {told}; the store has {stored}")
        for session_id, record in memory.sessions.items():
            track = self.sessions.get(session_id)
            if track is None:
                if record.used_ms != 0:
                    raise self.violated(
                        f"S2: session {session_id} that no client learned of billed {record.used_ms} ms"
                    )
                continue
            contact_ms = track.last_contact_ms - record.started_at_ms
            if record.used_ms > contact_ms:
                raise self.violated(
                    f"S2: session {session_id} billed {record.used_ms} ms, its last sign of life was "
                    f"{contact_ms} ms after its start ({record.end_reason})"
                )
            if track.told is not None and track.told != (record.end_reason, record.used_ms):
                raise self.violated(
                    f"S1: session {session_id} was told it ended {track.told}; the store has "
                    f"{(record.end_reason, record.used_ms)}"
                )
        for user in self.users:
            self._check_credit_ledger(user)

    def _check_credit_ledger(self, user: str) -> None:
        memory = self.memory
        entries = sorted(
            (e for (owner, _), e in memory.entries.items() if owner == user), key=lambda e: e.seq
        )
        chains: dict[tuple[str, int | None], list[Any]] = {}
        for entry in entries:
            chains.setdefault((entry.bucket, entry.window_start_ms), []).append(entry)
        for key, chain in chains.items():
            total = 0
            for entry in chain:
                total += entry.delta
                if total != entry.balance_after:
                    raise self.violated(
                        f"S3: {user} {key}: entry #{entry.seq} says {entry.balance_after}, "
                        f"deltas add up to {total}"
                    )
        purchased = sum(
            e.delta for e in entries if e.bucket == PURCHASED_BUCKET and e.reason in ("purchase", "grant")
        )
        delivered = sum(p.minutes_ms for p in memory.purchases.values() if p.user_id == user)
        if purchased != delivered:
            raise self.violated(f"S3: {user}: {delivered} ms delivered, {purchased} ms credited")
        consumed = -sum(
            e.delta
            for e in entries
            if e.reason == "consume" and e.bucket in (MONTHLY_BUCKET, PURCHASED_BUCKET)
        )
        billed = sum(s.used_ms for s in memory.sessions.values() if s.user_id == user)
        captured = sum(
            h.captured for h in memory.hold_records.values() if h.user_id == user and h.meter is None
        )
        if consumed != billed + captured:
            raise self.violated(
                f"S3: {user}: sessions billed {billed} ms and holds captured {captured} ms, "
                f"the credit ledger consumed {consumed}"
            )
        stored_user = memory.users.get(user)
        purchased_chain = chains.get((PURCHASED_BUCKET, None))
        if stored_user is not None and purchased_chain is not None:  # noqa: SIM102
            if purchased_chain[-1].balance_after != stored_user.purchased_ms:
                raise self.violated(
                    f"S3: {user}: purchased balance {stored_user.purchased_ms}, "
                    f"the credit ledger says {purchased_chain[-1].balance_after}"
                )


def _describe(outcome: Outcome) -> str:
    if outcome.lost:
        return "lost (shard died)"
    if outcome.error is not None:
        error = outcome.error
        return f"{type(error).__name__}({error.detail if isinstance(error, DomainError) else error})"
    value = outcome.value
    if isinstance(value, SessionProgress):
        return f"{value.state} {value.end_reason} used={value.session_used_ms} v{value.version}"
    if isinstance(value, SessionStarted):
        return f"started {value.session_id} v{value.version}"
    if isinstance(value, HoldView):
        return f"hold {value.hold_id} {value.state} {value.captured}/{value.amount} v{value.version}"
    version = getattr(value, "version", None)
    return f"{type(value).__name__} v{version}" if version is not None else type(value).__name__


class _SimSteps:
    """A resize's steps (`gateway.resize.ShardSteps`), sent to the simulation's live shards as Ray
    calls (a shard that dies under one fails the step, as `RayActorError` would)."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim

    async def _ask(self, index: int, label: str, operation: Callable[[LedgerShard], Awaitable[Any]]) -> Any:
        gen = self._sim.live.get(index)
        if gen is None:
            raise Unavailable(f"shard {index} is not running")
        outcome = await self._sim._call_on(gen, label, lambda gen: operation(gen.shard))
        if outcome.lost:
            raise ShardDied(f"shard {index} died under {label}")
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    async def release(self, shard: int, slots: list[int], to_shard: int) -> Handoff:
        handoff: Handoff = await self._ask(
            shard, f"release {shard}->{to_shard} {len(slots)} slots", lambda s: s.release(slots, to_shard)
        )
        return handoff

    async def refresh_slots(self, shard: int, alarmed: list[str] | None = None) -> list[int]:
        found: list[int] = await self._ask(
            shard, f"refresh_slots {shard}", lambda s: s.refresh_slots(alarmed)
        )
        return found

    async def read_map(self) -> ShardMap:
        found = await self._sim.memory.read_map(NAMESPACE)
        assert found is not None
        self._sim.map = found
        return found

    async def start_shards(self, count: int) -> None:
        for index in range(count):
            if index not in self._sim.live:
                await self._sim._start_shard(index)
        for index in range(count):
            await self._ask(index, f"ready {index}", lambda s: s.ready())

    async def retire_shards(self, indexes: list[int]) -> None:
        for index in indexes:
            gen = self._sim.live.pop(index, None)
            if gen is not None:
                self._sim.note(f"shard {index} generation {gen.generation} retired")
                await gen.shard.stop()
                self._sim._kill(gen)
