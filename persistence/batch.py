"""Batch statements: one statement per table for any number of rows, and how the rows travel.

A table module declares once the rows a statement takes (`Rows`: column names and Postgres
types, and the row of a record) and writes the statement against `{rows}`, a relation `t` with
those columns, and `{columns}`, their names. A `Batch` (one per transaction) sends the rows one
of two ways:

- fewer than `STAGED_ROWS_MIN` (a durable write of one user): as `unnest($1::text[], ...)`
  arrays, the statement's only round trip, prepared once per connection;
- more (a flush): by binary `COPY` into the temporary table `pg_temp.staged_<name>`, then the
  statement reading it. Two round trips more (the table's `create ... if not exists`, the COPY),
  but asyncpg encodes a COPY row with none of the
  per-element checks its array encoder makes (`isinstance` against `collections.abc` types, for
  every value): with instants as integers (below), the client's share of a flush is a tenth of
  what it was.
  The rows are made as COPY takes them, one at a time: a flush's hundreds of thousands of tuples
  never live at once to set off the garbage collector's full passes over a shard's heap.

Times travel as epoch milliseconds (`INSTANT`: `bigint` on the wire, `timestamptz` in `t`):
building a `datetime` per value cost the client about 3 µs, the largest part of encoding a
flush. Postgres turns them into `timestamptz` exactly (whole seconds, then the milliseconds as
an interval: no rounding through a fraction).

The temporary tables are made on first use in a transaction (`create temp table if not
exists`: a connection made after a `DISCARD`, or new, gets them again) and emptied by every
commit that touched them (`on commit delete rows`); a rolled-back COPY leaves nothing visible.
Each needs the `TEMPORARY` privilege on the database, which Postgres grants to every role
unless an administrator revoked it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import asyncpg

    from persistence.database import Connection

# Rows from which a statement's rows go by COPY into a temporary table rather than as arrays.
# Measured on the 2-core development machine (users with an open session, four tables): at 64
# users arrays took 6.5 ms and COPY 8.8 ms; at 256, 21 ms both; at 1,024, 100 ms and 86 ms.
STAGED_ROWS_MIN = 256

# A column holding a time: epoch milliseconds from Python, `timestamptz` in the statement.
INSTANT = "instant"

Row = tuple[Any, ...]
R = TypeVar("R")


def _timestamptz(column: str) -> str:
    """SQL for the `timestamptz` of epoch milliseconds in `column` (NULL stays NULL), exact: the
    whole seconds through `to_timestamp` (an integral double), the rest as a whole number of
    milliseconds (a `double * interval` that stays integral)."""
    return f"(to_timestamp({column} / 1000) + ({column} % 1000) * interval '1 millisecond')"


@dataclass(frozen=True, slots=True)
class Rows(Generic[R]):
    """The rows a batch statement takes: their columns, by name and Postgres type (`INSTANT` for
    a time in epoch milliseconds), and `row`, a record's values in that order."""

    name: str
    columns: tuple[tuple[str, str], ...]
    row: Callable[[R], Row]
    staged_table: str = field(init=False)
    create_staged_table: str = field(init=False)
    from_arrays: str = field(init=False)
    from_staged: str = field(init=False)

    def __post_init__(self) -> None:
        assert self.name.isidentifier() and self.columns, "a name and at least one column"
        names = [name for name, _ in self.columns]
        wire = [("bigint" if kind == INSTANT else kind) for _, kind in self.columns]
        # `r` holds the values as they travel; `t` is what the statement reads.
        select = ", ".join(
            f"{_timestamptz('r.' + name)} as {name}" if kind == INSTANT else f"r.{name}"
            for name, kind in self.columns
        )
        arrays = ", ".join(f"${number}::{kind}[]" for number, kind in enumerate(wire, start=1))
        staged_table = f"staged_{self.name}"
        set_ = object.__setattr__  # a frozen dataclass sets its derived fields once, here
        set_(self, "staged_table", staged_table)
        set_(
            self,
            "create_staged_table",
            f"create temp table if not exists {staged_table} "
            f"({', '.join(f'{name} {kind}' for name, kind in zip(names, wire, strict=True))}) "
            "on commit delete rows",
        )
        set_(self, "from_arrays", f"(select {select} from unnest({arrays}) as r ({', '.join(names)})) as t")
        set_(self, "from_staged", f"(select {select} from pg_temp.{staged_table} as r) as t")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.columns]


@dataclass(frozen=True, slots=True)
class BatchStatement(Generic[R]):
    """A statement over a batch of `rows`: `sql` reads them from `{rows}` (the relation `t`);
    `{columns}` stands for their names, comma-separated."""

    rows: Rows[R]
    sql: str
    with_arrays: str = field(init=False)
    with_staged: str = field(init=False)

    def __post_init__(self) -> None:
        assert "{rows}" in self.sql, "the statement must read its rows from {rows}"
        sql = self.sql.replace("{columns}", ", ".join(self.rows.names))
        object.__setattr__(self, "with_arrays", sql.replace("{rows}", self.rows.from_arrays))
        object.__setattr__(self, "with_staged", sql.replace("{rows}", self.rows.from_staged))


class Batch:
    """The batch statements of one transaction. Not shared between transactions or tasks."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._staged: set[str] = set()

    async def execute(self, statement: BatchStatement[R], records: Sequence[R]) -> None:
        sql, arguments = await self._send(statement, records)
        await self.connection.execute(sql, *arguments)

    async def fetch(self, statement: BatchStatement[R], records: Sequence[R]) -> list[asyncpg.Record]:
        sql, arguments = await self._send(statement, records)
        return await self.connection.fetch(sql, *arguments)

    async def _send(self, statement: BatchStatement[R], records: Sequence[R]) -> tuple[str, list[list[Any]]]:
        """Send the records' rows ahead of the statement if they go by COPY; returns the
        statement's SQL and its arguments (the arrays, if the rows go as arrays)."""
        assert records, "a batch statement needs at least one row"
        shape = statement.rows
        if len(records) < STAGED_ROWS_MIN:
            rows = [shape.row(record) for record in records]
            return statement.with_arrays, [list(column) for column in zip(*rows, strict=True)]
        # A staged table is emptied only by COMMIT: a second batch of it in this transaction would
        # read the first one's rows too.
        assert shape.name not in self._staged, f"{shape.name} rows staged twice in one transaction"
        self._staged.add(shape.name)
        await self.connection.execute(shape.create_staged_table)
        await self.connection.copy_records_to_table(
            shape.staged_table, records=map(shape.row, records), columns=shape.names, schema_name="pg_temp"
        )
        return statement.with_staged, []
