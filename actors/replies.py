"""Idempotency-Key replies: what a keyed request answered, so that its retry gets that again.

A client sends `Idempotency-Key` with a `POST`; the gateway hashes the request
(method, path, body) and passes both to the user's shard. The first request
with a key runs and its outcome, a result or a refusal, is remembered in the
user's ledger as a `ReplyRecord` for `REPLY_TTL_MS`, or until the user has
`REPLIES_PER_USER_MAX` newer ones (then the oldest expire early: a retry of
it after that runs again). A retry with the same
key and hash gets that outcome again and has no effect; another hash is
`IdempotencyMismatch`; a retry while the first still runs is
`IdempotencyInFlight`.

A reply is written with the change it answers: in the same transaction for
the operations durable before they answer (start, end, plan change,
purchase), in the same write-behind batch for the others (heartbeat, meter
use). A crash can lose a write-behind reply only together with its effect, so
the retry then has the effect once. Refusals change nothing; theirs are
written with the user's next write. Failures of the shard itself
(`Unavailable`, `Overloaded`) are not remembered: nothing was done, so the
retry runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from actors import errors, views
from actors.empty import EMPTY, writable
from actors.records import ReplyRecord

C = TypeVar("C")

REPLY_TTL_MS = 24 * 60 * 60 * 1000
MAX_KEY_LENGTH = 255
# Replies one user's ledger keeps: past this many, the oldest expire early (each costs memory in
# the shard as long as it is kept; bench `python -m bench memory` measures how much).
REPLIES_PER_USER_MAX = 256


def _by_name(*classes: type[C]) -> dict[str, type[C]]:
    return {cls.__name__: cls for cls in classes}


# What a reply may hold, by name: the results of keyed operations and what they embed...
_RESULTS: dict[str, type[Any]] = _by_name(
    views.ActiveSessionView,
    views.CreditsAdded,
    views.HoldView,
    views.MeterConsumed,
    views.PlanChangeResult,
    views.SessionProgress,
    views.SessionStarted,
    views.UsageView,
)
# ...and the refusals they can end in.
_REFUSALS: dict[str, type[errors.LedgerError]] = _by_name(
    errors.InvalidCapture,
    errors.EventConflict,
    errors.HoldNotFound,
    errors.HoldResolved,
    errors.MeterNotFound,
    errors.NoCredits,
    errors.SessionActive,
    errors.SessionEnded,
    errors.SessionNotFound,
    errors.UnknownPlan,
)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's key for one request, with the hash of that request (method, path, body)."""

    key: str
    request_hash: str


def encode_result(result: object) -> str:
    return _json(result_document(result))


def result_document(result: object) -> dict[str, Any]:
    """A result as every remembered answer holds it (`encode_result` is its text): a keyed
    request's reply, and the first answer to a billing delivery."""
    return {"result": _encode(result)}


def from_document(document: Mapping[str, Any]) -> Any:
    """The result a `result_document` holds."""
    return _decode(document["result"])


def encode_refusal(refusal: errors.LedgerError) -> str:
    return _json(
        {"refusal": {"type": type(refusal).__name__, "detail": refusal.detail, "fields": refusal.fields}}
    )


def encode_outcome(outcome: object) -> str | None:
    """How an outcome is remembered: a result, or a refusal a retry should get again; None for
    one it should not (`is_replayable`)."""
    if isinstance(outcome, errors.LedgerError):
        return encode_refusal(outcome) if is_replayable(outcome) else None
    return encode_result(outcome)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def is_replayable(refusal: errors.LedgerError) -> bool:
    """Whether a retry should get this refusal again (not so for a mismatched key itself)."""
    return _REFUSALS.get(type(refusal).__name__) is type(refusal)


def replay(record: ReplyRecord, request: IdempotencyKey) -> Any:
    """The outcome `record` holds: returned if a result, raised if a refusal. A different request
    under the same key is `IdempotencyMismatch`."""
    if record.request_hash != request.request_hash:
        raise errors.IdempotencyMismatch(
            "this Idempotency-Key was used for a different request", idempotency_key=request.key
        )
    outcome = json.loads(record.outcome)
    if "refusal" in outcome:
        refusal = outcome["refusal"]
        raise _REFUSALS[refusal["type"]](refusal["detail"], **refusal["fields"])
    return from_document(outcome)


def _encode(value: object) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        assert type(value).__name__ in _RESULTS, f"{type(value).__name__} is not a replayable result"
        encoded = {field.name: _encode(getattr(value, field.name)) for field in fields(value)}
        return {"type": type(value).__name__, "fields": encoded}
    assert value is None or isinstance(value, str | int | float | bool), f"cannot encode {value!r}"
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        cls = _RESULTS[value["type"]]
        return cls(**{name: _decode(item) for name, item in value["fields"].items()})
    return value


class ReplyBook:
    """One user's replies not yet expired, and which of them are not written yet."""

    __slots__ = ("_pending", "_replies", "_user_id")

    def __init__(self, user_id: str, replies: tuple[ReplyRecord, ...] = ()) -> None:
        self._user_id = user_id
        # Oldest first, so expired replies are found at the front. Both usually empty (`actors.empty`).
        kept = sorted(replies, key=lambda r: r.expires_at_ms)[-REPLIES_PER_USER_MAX:]
        self._replies: Mapping[str, ReplyRecord] = {r.key: r for r in kept} or EMPTY
        self._pending: Mapping[str, ReplyRecord] = EMPTY

    def get(self, key: str, now_ms: int) -> ReplyRecord | None:
        record = self._replies.get(key)
        return record if record is not None and now_ms < record.expires_at_ms else None

    def remember(self, request: IdempotencyKey, outcome: str, now_ms: int, *, version: int) -> ReplyRecord:
        """Keep a new reply, written by the first write of the ledger at `version` or later."""
        self._forget_expired(now_ms)
        replies = self._replies = writable(self._replies)
        replies.pop(request.key, None)  # an expired reply's key, used again: to the back
        record = ReplyRecord(
            user_id=self._user_id,
            key=request.key,
            request_hash=request.request_hash,
            outcome=outcome,
            created_at_ms=now_ms,
            expires_at_ms=now_ms + REPLY_TTL_MS,
            version=version,
        )
        replies[request.key] = record
        while len(replies) > REPLIES_PER_USER_MAX:
            del replies[next(iter(replies))]  # the oldest expires early
        pending = self._pending = writable(self._pending)
        pending[request.key] = record
        return record

    def _forget_expired(self, now_ms: int) -> None:
        expired = []
        for key, record in self._replies.items():
            if record.expires_at_ms > now_ms:
                break  # the rest expire later
            expired.append(key)
        if expired:
            replies = self._replies = writable(self._replies)
            for key in expired:
                del replies[key]
            self._replies = replies or EMPTY

    @property
    def pending(self) -> tuple[ReplyRecord, ...]:
        return tuple(self._pending.values())

    def mark_synced(self, version: int) -> None:
        self._pending = {key: r for key, r in self._pending.items() if r.version > version} or EMPTY

    def clone(self) -> ReplyBook:
        twin = ReplyBook(self._user_id)
        twin._replies = dict(self._replies) if self._replies else EMPTY
        twin._pending = dict(self._pending) if self._pending else EMPTY
        return twin

    def __len__(self) -> int:
        return len(self._replies)
