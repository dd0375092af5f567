"""The domain and its hosting.

`ledger` is the pure per-user state machine (no I/O, no Ray, time passed in);
`shard` hosts many ledgers in one process with their timers and write-behind;
`hosting` is the one module that applies `ray.remote`. Nothing here imports
`gateway`; storage is reached only through the `store.LedgerStore` protocol.
"""
