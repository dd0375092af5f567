"""Reliability #5, node loss: the node hosting some shards goes away; they move to the survivor.

The scenario (node_loss_scenario.py) runs in a process of its own, because it
needs a two-node Ray cluster and this process is already attached to the
harness's local Ray. Every process it starts runs in a new session, so this
test can find and kill all of them, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).with_name("node_loss_scenario.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
# Ray's processes exit a moment after the cluster is shut down.
EXIT_GRACE_S = 10.0


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (the scenario and everything it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            members.append(int(entry.name))
    return members


def reap(sid: int) -> list[int]:
    """Wait for the session's processes to exit; SIGKILL the ones that stay. Returns those."""
    deadline = time.monotonic() + EXIT_GRACE_S
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def test_a_lost_node_moves_its_shards_and_loses_nothing(postgres_dsn: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["NODE_LOSS_DATABASE_URL"] = postgres_dsn
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    finally:
        left = reap(process.pid)
    elapsed = time.monotonic() - began
    assert process.returncode == 0, (
        f"scenario exited {process.returncode} after {elapsed:.0f} s\n--- stderr (tail)\n{stderr[-6000:]}"
    )
    assert not left, f"processes still running after the scenario: {left}"
    figures = json.loads(stdout.strip().splitlines()[-1])
    print(f"node loss ({elapsed:.0f} s): {json.dumps(figures)}")
