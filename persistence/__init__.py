"""Postgres: migrations, the store that loads and writes ledgers, the embedded server.

Knows nothing of HTTP or Ray. Implements `actors.store.LedgerStore`; every
asyncpg error is turned into `persistence.errors` (subclasses of the
protocol's `StoreError`) before it leaves this package.
"""
