"""The shard simulation (`tests.simulation.shard_sim`), seed by seed.

CI runs `SEEDS_IN_CI` seeds; `pytest -m soak tests/simulation` runs
`LEDGER_SIM_SEEDS` more (default 5,000), from `LEDGER_SIM_FIRST_SEED`; and
`LEDGER_SIM_SEED=n` runs seed n alone (a failure prints that command).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from tests.simulation.shard_sim import Simulation

SEEDS_IN_CI = 300
_ONE = os.environ.get("LEDGER_SIM_SEED")
_SOAK_FIRST = int(os.environ.get("LEDGER_SIM_FIRST_SEED", "100000"))
_SOAK_COUNT = int(os.environ.get("LEDGER_SIM_SEEDS", "5000"))


@pytest.mark.parametrize("seed", [int(_ONE)] if _ONE else range(SEEDS_IN_CI))
def test_seed(seed: int) -> None:
    report = Simulation(seed).run()
    assert report.calls["heartbeat"] > 0 and report.calls["start"] > 0, "the clients did their work"


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(_SOAK_FIRST, _SOAK_FIRST + _SOAK_COUNT))
def test_soak_seed(seed: int) -> None:
    Simulation(seed).run()


def test_a_seed_replays_exactly() -> None:
    """The same seed gives the same run, step for step (what makes a failing seed worth printing)."""
    first, second = Simulation(7).run(), Simulation(7).run()
    assert first.digest == second.digest
    assert first.calls == second.calls


def test_the_seeds_resize_and_cut_resizes_short_at_every_kind_of_point() -> None:
    """The resizes the nemesis makes finish, and are cut short by each kind of failure (the gateway
    running one dies, a shard dies under a step, the store fails one), and users move: the crash
    points of a resize are what the seeds run through, not a hope."""
    resizes: Counter[str] = Counter()
    moved = 0
    for seed in range(40):
        report = Simulation(seed).run()
        resizes.update(report.resizes)
        moved += report.users_moved
    assert resizes["finished"] > 0 and moved > 0, resizes
    assert resizes["stopped: CancelledError"] > 0, resizes  # the resizing gateway died
    assert resizes["stopped: ShardDied"] + resizes["stopped: Unavailable"] > 0, resizes
