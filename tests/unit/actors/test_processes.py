"""`actors.processes`: whether a process exists, and freezing what a serving process holds."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.processes import alive, freeze_long_lived


def test_alive_tells_a_running_process_from_one_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    assert alive(1) and not alive(child.pid)


def test_a_process_that_exited_but_is_not_reaped_yet_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited; nobody has waited for it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not alive(child.pid)
    finally:
        child.wait()


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on collecting as usual


@pytest.mark.usefixtures("unfrozen")
def test_freeze_keeps_what_lives_out_of_the_collectors_walk_and_collects_what_does_not() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    kept = Node()
    garbage = weakref.ref(Node())  # unreachable already: collected by the freeze, not frozen
    assert any(obj is kept for obj in gc.get_objects())
    frozen = freeze_long_lived()
    assert frozen == gc.get_freeze_count() > 0
    assert not any(obj is kept for obj in gc.get_objects())  # frozen: out of every generation
    assert garbage() is None
