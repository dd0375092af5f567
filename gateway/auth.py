"""Authentication: user JWTs, and Standard Webhooks signatures on internal calls.

Users: the user id is the token's `sub` and nothing else. The accepted
algorithms are fixed by configuration, never read from the token: HS256 with
`LEDGER_JWT_SECRET`, or, when `LEDGER_JWT_JWKS_URL` is set, RS256/ES256 with
the key the token's `kid` names in that JWKS (cached; fetched again for an
unknown `kid` at most once per `LEDGER_JWT_JWKS_REFETCH_S`, and when older
than `JWKS_MAX_AGE_S`, so a key rotation needs no restart). `exp` is
required; `nbf` and `iat` are honoured with `LEDGER_JWT_LEEWAY_S`; `aud`/`iss`
are checked when configured. Failures are 401 with `WWW-Authenticate: Bearer`
and only a coarse reason.

Internal (`/internal/...`): the body is verified against `webhook-id`,
`webhook-timestamp` (within ±5 minutes) and `webhook-signature` (several
space-separated signatures are accepted, for secret rotation) before any
route code runs, so an unsigned caller learns nothing, not even whether its
body would have been valid.
"""

from __future__ import annotations

import asyncio
import binascii
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

import httpx
import jwt
import structlog
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import ASGIApp, Receive, Scope, Send

from actors.times import EARLIEST_MS, LATEST_MS, MS_PER_SECOND
from gateway.asgi import read_body, replaying
from gateway.errors import Unauthorized, problem

log = structlog.get_logger("gateway.auth")

USER_ID_MAX_LENGTH = 255
# A user id: 1-255 characters, none of them control characters (Postgres text cannot hold NUL,
# and log lines should not carry the others), nor U+FFFD (what bytes that are not UTF-8 decode to,
# in a path's `%FF` say: two different ids would meet in one account); and text UTF-8 can hold
# (`is_user_id`).
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f\ufffd]{1,255}$"
WEBHOOK_ID_MAX_LENGTH = 255
_USER_ID = re.compile(USER_ID_PATTERN)
JWT_ALGORITHMS = ("HS256",)
# Verified HS256 tokens remembered per process (cleared when full).
VERIFIED_TOKENS_MAX = 65_536
JWKS_ALGORITHMS = ("RS256", "ES256")
# Keys fetched from the JWKS are used this long before they are fetched again.
JWKS_MAX_AGE_S = 600.0
JWKS_FETCH_TIMEOUT_S = 5.0
INTERNAL_PATH_PREFIX = "/internal/"

bearer_scheme = HTTPBearer(
    auto_error=False, description="A user JWT (HS256, or RS256/ES256 from a JWKS); its `sub` is the user id."
)
# Documents the signed internal calls in OpenAPI; the middleware does the checking.
webhook_signature_scheme = APIKeyHeader(
    name="webhook-signature",
    auto_error=False,
    description="Standard Webhooks signature (with webhook-id and webhook-timestamp headers).",
)


class JwksKeys:
    """The signing keys a JWKS URL publishes, by `kid`, fetched when needed.

    An unknown `kid` causes a fetch at most once per `refetch_min_s` (a flood of
    made-up `kid`s cannot turn into a flood of fetches); keys older than
    `max_age_s` are fetched again on their next use, so removed keys stop working."""

    def __init__(
        self,
        url: str,
        *,
        refetch_min_s: float = 30.0,
        max_age_s: float = JWKS_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.fetches = 0
        self._refetch_min_s = refetch_min_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = self._clock()
        fresh = self._fetched_at is not None and now - self._fetched_at < self._max_age_s
        if fresh and kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            now = self._clock()
            may_fetch = self._fetched_at is None or now - self._fetched_at >= self._refetch_min_s
            if may_fetch and (kid not in self._keys or not fresh):
                await self._fetch(now)
        return self._keys.get(kid)

    async def _fetch(self, now: float) -> None:
        self._fetched_at = now  # a failed fetch also waits `refetch_min_s` before the next
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_S) as http:
                response = await http.get(self.url)
            response.raise_for_status()
            listed = response.json()["keys"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("jwks_fetch_failed", url=self.url, error=repr(exc))
            return  # keep the keys we had
        keys: dict[str, jwt.PyJWK] = {}
        for data in listed if isinstance(listed, list) else []:
            try:
                key = jwt.PyJWK(data)
            except (jwt.PyJWKError, jwt.InvalidKeyError, TypeError, ValueError):
                continue  # a key we cannot use (an unknown type, an encryption key)
            if key.key_id and key.algorithm_name in JWKS_ALGORITHMS and data.get("use", "sig") == "sig":
                keys[key.key_id] = key
        self._keys = keys
        log.info("jwks_fetched", url=self.url, keys=len(keys))


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    secret: str | None = None
    jwks: JwksKeys | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = 30.0
    _verified: dict[str, tuple[str, float]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert (self.secret is None) != (self.jwks is None), "one way to verify: a secret or a JWKS"

    def __repr__(self) -> str:
        return f"TokenVerifier(audience={self.audience!r}, issuer={self.issuer!r})"

    async def verify(self, token: str) -> str:
        """The verified `sub` of `token`, however this server verifies; raises `Unauthorized`."""
        if self.jwks is None:
            return self.user_id(token)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        kid, algorithm = header.get("kid"), header.get("alg")
        if not isinstance(kid, str) or algorithm not in JWKS_ALGORITHMS:
            raise Unauthorized("invalid token")
        key = await self.jwks.key(kid)
        if key is None or key.algorithm_name != algorithm:
            raise Unauthorized("invalid token")
        return self._decode(token, key.key, [algorithm])[0]

    def user_id(self, token: str) -> str:
        """The verified `sub` of an HS256 `token`; raises `Unauthorized`.

        A token verified once is remembered until it expires (a client sends the same token on
        every request, and checking an HMAC through PyJWT costs more than the rest of a credit
        check). Only successes are remembered; what made it valid (signature, `nbf`, `iat`,
        `aud`, `iss`) cannot change, so only `exp` is checked again."""
        assert self.secret is not None, "this verifier uses a JWKS: call verify()"
        known = self._verified.get(token)
        if known is not None and time.time() <= known[1] + self.leeway_s:
            return known[0]
        subject, expires_at = self._decode(token, self.secret, list(JWT_ALGORITHMS))
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            self._verified.clear()
        self._verified[token] = (subject, expires_at)
        return subject

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> tuple[str, float]:
        """The verified `sub` and `exp` of `token`; raises `Unauthorized`."""
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        subject = claims.get("sub")
        if not is_user_id(subject):
            raise Unauthorized("invalid token")
        for claim in ("exp", "iat", "nbf"):  # times from outside lie between 2000 and 2200
            value = claims.get(claim)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Unauthorized("invalid token")  # (PyJWT takes "1790000000" for a number)
            if not EARLIEST_MS <= value * MS_PER_SECOND < LATEST_MS:  # NaN fails this too
                raise Unauthorized("invalid token")
        return subject, float(claims["exp"])


def is_user_id(value: object) -> TypeGuard[str]:
    """Whether `value` is a user id: `USER_ID_PATTERN`, and no lone surrogate (JSON can carry
    "\ud800", but no UTF-8 text holds it: not Postgres, not the hash that routes users)."""
    if not isinstance(value, str) or _USER_ID.match(value) is None:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def issue_token(
    *,
    secret: str,
    user_id: str,
    ttl_s: int,
    audience: str | None = None,
    issuer: str | None = None,
    now_s: int | None = None,
) -> str:
    """A user token the server accepts (for `usage-ledger token`, tests and examples)."""
    issued = int(time.time()) if now_s is None else now_s
    claims: dict[str, Any] = {"sub": user_id, "iat": issued, "exp": issued + ttl_s}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHMS[0])


def signed_headers(
    secret: str, content: str, *, message_id: str | None = None, timestamp: datetime | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers that sign `content` for an internal call (for `usage-ledger
    internal ...`, tests and the deploy scripts): a fresh `webhook-id` unless one is given."""
    message_id = message_id or f"msg_{uuid.uuid4().hex}"
    moment = timestamp or datetime.now(UTC)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, moment, content),
    }


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for anything else. (The one
    reading of the header: the routes' `current_user` and the hot path both use it.)"""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token if scheme.lower() == "bearer" and token else None


async def current_user(
    request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> str:
    """FastAPI dependency: the authenticated user's id. (`bearer_scheme` declares the scheme in
    OpenAPI; the header is read by `bearer_token`.)"""
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise Unauthorized("missing bearer token")
    verifier: TokenVerifier = request.app.state.token_verifier
    user_id = await verifier.verify(token)
    request.state.user_id = user_id
    return user_id


async def delivery_id(request: Request) -> str:
    """FastAPI dependency: the verified `webhook-id` of a signed internal call."""
    value = request.scope.get("state", {}).get("webhook_id")
    assert isinstance(value, str), "InternalSignatureMiddleware runs before internal routes"
    return value


class InternalSignatureMiddleware:
    """Rejects any `/internal/` request whose Standard Webhooks signature does not verify."""

    def __init__(self, app: ASGIApp, *, secret: str) -> None:
        self.app = app
        self._webhook = Webhook(secret)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(INTERNAL_PATH_PREFIX):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client went away
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        webhook_id = headers.get("webhook-id", "")
        try:
            if len(webhook_id) > WEBHOOK_ID_MAX_LENGTH:
                raise WebhookVerificationError("webhook-id too long")
            self._webhook.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error, UnicodeDecodeError):
            response = problem(401, "unauthorized", "missing or invalid webhook signature")
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["webhook_id"] = webhook_id
        await self.app(scope, replaying(body, receive), send)
