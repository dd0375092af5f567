"""The `replies` scenario: what remembering an `Idempotency-Key` costs a shard in memory.

A keyed request's outcome is kept in its user's ledger for 24 h (`actors.replies`), at most
`REPLIES_PER_USER_MAX` per user (then the oldest expire early). This measures, in this process
with `tracemalloc`, the bytes the ledgers hold per remembered reply and per user at the cap, for
replies as clients make them: a UUID key, the request's SHA-256, and the answer to a heartbeat
(`SessionProgress`, the largest common answer). Written replies only (the copy kept until the
next write is dropped then), as a shard holds them between flushes.
"""

from __future__ import annotations

import gc
import hashlib
import tracemalloc
import uuid
from typing import Any

from actors.ledger import LedgerPolicy, UserLedger
from actors.plans import PlanCatalog
from actors.replies import REPLIES_PER_USER_MAX, IdempotencyKey, encode_result
from actors.times import MS_PER_MINUTE
from actors.views import SessionProgress

# Replies made per measurement (users = this / keys per user, at least 50).
REPLIES_FULL = 50_000
REPLIES_SHORT = 5_000
KEYS_PER_USER = (1, 16, REPLIES_PER_USER_MAX, 2 * REPLIES_PER_USER_MAX)
NOW_MS = 1_796_083_200_000  # 2026-12-01: any instant will do, nothing here reads a clock


def _outcome(index: int) -> str:
    progress = SessionProgress(
        session_id=str(uuid.uuid4()),
        state="active",
        end_reason=None,
        session_used_ms=30_000 * index,
        used_ms=30_000 * index,
        remaining_ms=600_000 - 30_000 * index,
        warning=None,
        ends_at_ms=NOW_MS + 600_000,
        version=index,
    )
    return encode_result(progress)


def _measure(users: int, keys_per_user: int) -> dict[str, Any]:
    policy = LedgerPolicy(plans=PlanCatalog.builtin(), stale_session_ms=10 * MS_PER_MINUTE, low_balance_ms=0)
    ledgers = [UserLedger.new(f"user-{index}", policy, NOW_MS) for index in range(users)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for ledger in ledgers:
        for index in range(keys_per_user):
            body = f"{ledger.user_id}:{index}".encode()
            key = IdempotencyKey(str(uuid.uuid4()), hashlib.sha256(body).hexdigest())
            ledger.remember_reply(key, _outcome(index), NOW_MS + index)  # each its own string
        ledger.mark_synced(ledger.version + 1)  # written: only the kept replies remain
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    kept = sum(len(ledger._replies) for ledger in ledgers)
    grown = after - before
    return {
        "keys_per_user": keys_per_user,
        "kept_per_user": kept // users,
        "users": users,
        "bytes_per_kept_reply": round(grown / max(1, kept)),
        "bytes_per_user": round(grown / users),
    }


def scenario_replies(database_url: str, short: bool, shards: int) -> dict[str, Any]:
    """Memory an Idempotency-Key costs a shard: bytes per remembered reply (a UUID key, its request
    hash, a heartbeat's answer) and per user, up to and past the per-user cap, measured with
    tracemalloc in one process (no Ray, no Postgres: the ledgers are the shard's)."""
    replies = REPLIES_SHORT if short else REPLIES_FULL
    rows = []
    for keys in KEYS_PER_USER:
        row = _measure(max(50, replies // keys), keys)
        rows.append(row)
        print(
            f"  {keys} keys per user ({row['kept_per_user']} kept): {row['bytes_per_kept_reply']} bytes "
            f"per reply, {row['bytes_per_user']} bytes per user",
            flush=True,
        )
    return {"users": max(row["users"] for row in rows), "rows": rows}
