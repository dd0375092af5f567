"""Errors of the persistence layer.

actors.store.StoreError
└── PersistenceError            a database operation failed; its transaction rolled back
    ├── DatabaseUnavailable     (also a StoreUnavailable) cannot reach Postgres, timed out,
    │                           server shutting down or out of connections: worth retrying
    └── MigrationError          a migration file is malformed or failed to apply
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from actors.store import StoreError, StoreOutcomeUnknown, StoreUnavailable


class PersistenceError(StoreError):
    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation}: {reason}")
        self.operation = operation
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(operation={self.operation!r}, reason={self.reason!r})"


class DatabaseUnavailable(PersistenceError, StoreUnavailable):
    pass


class CommitOutcomeUnknown(DatabaseUnavailable, StoreOutcomeUnknown):
    pass


class MigrationError(PersistenceError):
    pass


# Failures that say "Postgres is not there right now", not "this statement is wrong".
TRANSIENT_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cannot connect now, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.InterfaceError,  # pool closed or connection lost mid-call
)


@contextlib.contextmanager
def translate_errors(operation: str) -> Iterator[None]:
    """Re-raise asyncpg and socket errors as persistence errors naming `operation`."""
    try:
        yield
    except PersistenceError:
        raise
    except TRANSIENT_ERRORS as exc:
        raise DatabaseUnavailable(operation, f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise PersistenceError(operation, f"{type(exc).__name__}: {exc}") from exc
