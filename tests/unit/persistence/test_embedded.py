"""The embedded Postgres forgets the processes that died holding it (SIGKILL), so it is stopped again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from persistence.embedded import EmbeddedPostgres


def test_dead_users_are_forgotten_and_the_living_kept(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    dead = int(finished.stdout)
    listed = tmp_path / "pg" / ".handle_pids.json"
    listed.parent.mkdir()
    listed.write_text(json.dumps([dead, os.getpid()]))
    EmbeddedPostgres(tmp_path / "pg")._forget_dead_users()
    assert json.loads(listed.read_text()) == [os.getpid()]


def test_a_missing_or_unreadable_list_is_left_alone(tmp_path: Path) -> None:
    embedded = EmbeddedPostgres(tmp_path / "pg")
    embedded._forget_dead_users()  # no directory, no list
    listed = tmp_path / "pg" / ".handle_pids.json"
    listed.parent.mkdir()
    listed.write_text("not json")
    embedded._forget_dead_users()
    assert listed.read_text() == "not json"
