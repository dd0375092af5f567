"""An asyncio event loop on virtual time, for deterministic simulations.

`VirtualLoop` is the standard selector loop with two changes:

- **Time is virtual.** `time()` starts at 0 and moves only when the loop has
  nothing ready to run: it then jumps straight to the next timer, so a run of
  hours of `asyncio.sleep` and `asyncio.timeout` takes milliseconds. Nothing
  sleeps for real, and the same program gives the same schedule every time.
- **Work costs time.** Each loop iteration that runs callbacks advances the
  clock by `step_s`, as CPU would. A program that never waits for anything (a
  livelock: two tasks handing a lock back and forth) therefore still moves the
  clock, so the timeouts around it fire and a simulation can see that a call
  did not answer within its bound, instead of hanging forever.

If nothing is ready and no timer is armed, nothing can ever happen again: the
loop raises `Deadlock` rather than wait for I/O that will not come.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Deadlock(RuntimeError):
    """Every task waits on something no timer or callback will ever resolve."""


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, *, step_s: float = 0.001) -> None:
        super().__init__()
        self._virtual_s = 0.0
        self._step_s = step_s
        self.busy_iterations = 0  # iterations that ran at least one callback
        select = self._selector.select

        def virtual_select(timeout: float | None = None) -> list[Any]:
            events = select(0)  # the loop's own self-pipe only; never waits for real
            if events or timeout == 0:
                return events
            if timeout is None:
                raise Deadlock("nothing is ready and no timer is armed: every task waits forever")
            self._virtual_s += timeout
            return events

        self._selector.select = virtual_select  # type: ignore[method-assign]

    def time(self) -> float:
        return self._virtual_s

    def _run_once(self) -> None:
        if self._ready:  # type: ignore[attr-defined]
            self._virtual_s += self._step_s
            self.busy_iterations += 1
        super()._run_once()  # type: ignore[misc]
