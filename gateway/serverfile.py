"""`<data dir>/server.json`: where a running `usage-ledger serve` listens and how to reach its
database, so that every CLI command run from the same directory finds that server.

`serve` writes it once its port accepts connections and removes it when it exits. It is private
(mode 0600, like the development secrets beside it): it may name the embedded database. A file
left behind by a server that is gone (killed, say) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from actors.processes import alive

SERVER_FILE = "server.json"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    pid: int
    url: str  # the public API
    internal_url: str  # where /internal/ answers (the same as `url` without an internal listener)
    database: str | None  # the embedded Postgres's DSN; None when LEDGER_DATABASE_URL is set


def write(data_dir: Path, info: ServerInfo) -> None:
    """Replace the file atomically (never half-written, never world-readable)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SERVER_FILE
    temporary = path.with_name(f".{SERVER_FILE}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(asdict(info), handle)
    os.replace(temporary, path)


def read(data_dir: Path) -> ServerInfo | None:
    """The running server's, or None: no file, not one of ours, or its server is gone."""
    try:
        data = json.loads((data_dir / SERVER_FILE).read_text(encoding="utf-8"))
        info = ServerInfo(
            pid=int(data["pid"]),
            url=str(data["url"]),
            internal_url=str(data["internal_url"]),
            database=None if data.get("database") is None else str(data["database"]),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return info if alive(info.pid) else None


def remove(data_dir: Path, pid: int) -> None:
    """Remove the file if process `pid` wrote it (a newer server's is left alone)."""
    path = data_dir / SERVER_FILE
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        if int(json.loads(path.read_text(encoding="utf-8"))["pid"]) == pid:
            path.unlink()
