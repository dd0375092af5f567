"""`LedgerClient`: the user endpoints of a usage-ledger server, with retries done right.

Every `POST` carries an `Idempotency-Key` made once per operation, so a retry after a lost answer
has no second effect. A 503 (`unavailable`), a 429 (`rate_limited`), a 409 `idempotency_conflict`
(the first try is still running) and a request that got no answer are retried with exponential
backoff and jitter, waiting at least what `Retry-After` says, up to `max_attempts` tries; then
`Unavailable`. Any other error is raised at once as a `LedgerError` with the problem's `code`
(a 429 `too_many_holds` too: it lasts until a hold is resolved, not a moment).
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import certifi
import httpx

from usage_ledger_client.errors import ERRORS_BY_CODE, LedgerError, TooManyHolds, Unavailable
from usage_ledger_client.holds import LiveHold
from usage_ledger_client.models import Hold, SessionProgress, SessionStarted, Usage
from usage_ledger_client.session import LiveSession

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
# The server's `ledger_stale_session_s` defaults to 600 s; API.md asks clients for ~30 s.
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
DEFAULT_HOLD_TTL_S = 300  # the server's default too
_RETRIED_STATUSES = frozenset({429, 503})
# Jitter from a generator of the client's own: an application's global `random` state is its own.
_jitter = random.Random()

Difficulty = Literal["beginner", "intermediate", "advanced"]


class LedgerClient:
    """One user's view of the server: `token` is their bearer JWT (`usage-ledger token USER_ID`).

    Use it as an async context manager, or call `aclose()`; pass `http` to share your own
    `httpx.AsyncClient` (its base URL is then used, and it is not closed here)."""

    def __init__(
        self,
        base_url: str = "",
        *,
        token: str,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base_s: float = BACKOFF_BASE_S,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if http is None and not base_url:
            raise ValueError("give the server's base_url, or an httpx.AsyncClient that has one")
        self._owns_http = http is None
        self._http = (
            http
            if http is not None
            else httpx.AsyncClient(base_url=base_url, timeout=timeout_s, verify=tls_context())
        )
        self._headers = {"Authorization": f"Bearer {token}"}
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s

    async def __aenter__(self) -> LedgerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # ------------------------------------------------------------------ endpoints

    async def usage(self) -> Usage:
        return Usage.from_json(await self._request("GET", "/v1/usage"))

    async def start_session(
        self, *, topic: str | None = None, difficulty: Difficulty | None = None
    ) -> SessionStarted:
        body: dict[str, Any] = {}
        if topic is not None:
            body["topic"] = topic
        if difficulty is not None:
            body["difficulty"] = difficulty
        return SessionStarted.from_json(await self._request("POST", "/v1/sessions", body))

    async def heartbeat(self, session_id: str, *, seq: int | None = None) -> SessionProgress:
        """The session's progress; `state == "ended"` when this heartbeat found the balance gone.
        A session the server had already ended raises `LedgerError` with code `session_ended`."""
        body = {"seq": seq} if seq is not None else {}
        return SessionProgress.from_json(
            await self._request("POST", f"/v1/sessions/{session_id}/heartbeat", body)
        )

    async def end_session(self, session_id: str) -> SessionProgress:
        """Ends the session; for one that has already ended, its final account again."""
        return SessionProgress.from_json(await self._request("POST", f"/v1/sessions/{session_id}/end", {}))

    def session(
        self,
        *,
        topic: str | None = None,
        difficulty: Difficulty | None = None,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        on_low_balance: Callable[[SessionProgress], Awaitable[None] | None] | None = None,
        on_limit_reached: Callable[[SessionProgress], Awaitable[None] | None] | None = None,
    ) -> LiveSession:
        """`async with client.session(topic=...) as s:` starts a session, heartbeats it in the
        background and always ends it on the way out. See `LiveSession`."""
        return LiveSession(
            self,
            topic=topic,
            difficulty=difficulty,
            heartbeat_interval_s=heartbeat_interval_s,
            on_low_balance=on_low_balance,
            on_limit_reached=on_limit_reached,
        )

    # ------------------------------------------------------------------ holds

    async def create_hold(
        self,
        *,
        meter: str | None = None,
        amount: int | None = None,
        minutes: float | None = None,
        ttl_s: int = DEFAULT_HOLD_TTL_S,
        reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve `amount` of the count meter `meter`, or `minutes`, for `ttl_s` seconds (1-3600);
        unresolved by then, it is released whole. `NoCredits` when that much is not available,
        `MeterNotFound`, `TooManyHolds`."""
        body = _hold_body(meter=meter, amount=amount, minutes=minutes)
        body["ttl_s"] = ttl_s
        if reference is not None:
            body["reference"] = reference
        return Hold.from_json(await self._request("POST", "/v1/holds", body, idempotency_key=idempotency_key))

    async def get_hold(self, hold_id: str) -> Hold:
        return Hold.from_json(await self._request("GET", f"/v1/holds/{hold_id}"))

    async def list_holds(self) -> list[Hold]:
        """The user's unresolved holds, oldest first."""
        answer = await self._request("GET", "/v1/holds")
        return [Hold.from_json(hold) for hold in answer["holds"]]

    async def capture_hold(
        self, hold_id: str, amount: float | None = None, *, idempotency_key: str | None = None
    ) -> Hold:
        """Capture `amount` (in the hold's unit), or the whole hold; the rest is released at once.
        The same capture again answers the same; another resolution raises `HoldResolved`."""
        body = {"amount": amount} if amount is not None else {}
        return Hold.from_json(
            await self._request("POST", f"/v1/holds/{hold_id}/capture", body, idempotency_key=idempotency_key)
        )

    async def release_hold(self, hold_id: str, *, idempotency_key: str | None = None) -> Hold:
        """Release the whole hold; `HoldResolved` if it was captured or had expired."""
        return Hold.from_json(
            await self._request("POST", f"/v1/holds/{hold_id}/release", {}, idempotency_key=idempotency_key)
        )

    async def extend_hold(self, hold_id: str, ttl_s: int, *, idempotency_key: str | None = None) -> Hold:
        """The hold now expires `ttl_s` seconds from now; `HoldResolved` if it is resolved already."""
        return Hold.from_json(
            await self._request(
                "POST", f"/v1/holds/{hold_id}/extend", {"ttl_s": ttl_s}, idempotency_key=idempotency_key
            )
        )

    def hold(
        self,
        *,
        meter: str | None = None,
        amount: int | None = None,
        minutes: float | None = None,
        ttl_s: int = DEFAULT_HOLD_TTL_S,
        reference: str | None = None,
    ) -> LiveHold:
        """`async with client.hold(meter="tokens", amount=4000) as h: ...; await h.capture(used)`
        reserves, extends the hold in the background while the body runs, and releases it on the
        way out unless the body captured it. See `LiveHold`."""
        _hold_body(meter=meter, amount=amount, minutes=minutes)  # a mistake is raised here, not on entry
        return LiveHold(self, meter=meter, amount=amount, minutes=minutes, ttl_s=ttl_s, reference=reference)

    # ------------------------------------------------------------------ transport

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Any:
        headers = dict(self._headers)
        if method == "POST":
            # One per operation (the caller's, or made here), kept across retries.
            headers["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
        last: LedgerError | None = None
        for attempt in range(self._max_attempts):
            if attempt:
                await asyncio.sleep(_backoff_s(attempt, last, base_s=self._backoff_base_s))
            try:
                answer = await self._http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as exc:
                last = Unavailable(None, "unavailable", f"no answer: {exc!r}")
                continue
            if answer.is_success:
                return answer.json()
            last = _error(answer)
            if not _retried(answer, last):
                raise last
        assert last is not None
        raise Unavailable(
            last.status, last.code, f"gave up after {self._max_attempts} tries: {last.detail}", last.problem
        )


def _hold_body(*, meter: str | None, amount: int | None, minutes: float | None) -> dict[str, Any]:
    if minutes is not None:
        if meter is not None or amount is not None:
            raise ValueError("a hold is of minutes, or of a meter's amount: not both")
        return {"minutes": minutes}
    if meter is None or amount is None:
        raise ValueError("give meter= and amount=, or minutes=")
    return {"meter": meter, "amount": amount}


def _error(answer: httpx.Response) -> LedgerError:
    try:
        problem = answer.json()
        code, detail = str(problem["code"]), str(problem.get("detail", ""))
    except (ValueError, KeyError, TypeError):
        problem, code, detail = {}, "http_error", answer.text[:200]
    retry_after = answer.headers.get("Retry-After")
    if retry_after is not None and retry_after.isdigit():
        problem = {**problem, "retry_after_s": int(retry_after)}
    kind = ERRORS_BY_CODE.get(code, Unavailable if answer.status_code in _RETRIED_STATUSES else LedgerError)
    return kind(answer.status_code, code, detail, problem)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings httpx uses by default (certifi's CAs), made once per process: httpx makes
    a new context for every client otherwise, ~50 ms of CPU that blocks the event loop, so an app
    making a `LedgerClient` per session would stall its other sessions each time."""
    return ssl.create_default_context(cafile=certifi.where())


def _retried(answer: httpx.Response, error: LedgerError) -> bool:
    in_flight = answer.status_code == 409 and error.code == "idempotency_conflict"
    transient = answer.status_code in _RETRIED_STATUSES and not isinstance(error, TooManyHolds)
    return transient or in_flight


def _backoff_s(attempt: int, last: LedgerError | None, *, base_s: float = BACKOFF_BASE_S) -> float:
    """Exponential with full jitter, never shorter than the server's Retry-After."""
    wait_s = _jitter.uniform(0, min(BACKOFF_MAX_S, base_s * 2**attempt))
    retry_after_s = last.problem.get("retry_after_s") if last is not None else None
    return max(wait_s, float(retry_after_s)) if retry_after_s is not None else wait_s
