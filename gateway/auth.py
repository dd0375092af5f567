"""Authentication: user JWTs, and Standard Webhooks signatures on internal calls.

Users: the user id is the token's `sub` and nothing else. The accepted
algorithm is fixed here (HS256 with `LEDGER_JWT_SECRET`), never read from the
token; `exp` is required; `aud`/`iss` are checked when configured. Failures
are 401 with `WWW-Authenticate: Bearer` and only a coarse reason.

Internal (`/internal/...`): the body is verified against `webhook-id`,
`webhook-timestamp` (within ±5 minutes) and `webhook-signature` (several
space-separated signatures are accepted, for secret rotation) before any
route code runs, so an unsigned caller learns nothing, not even whether its
body would have been valid.
"""

from __future__ import annotations

import binascii
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.asgi import read_body, replaying
from gateway.errors import Unauthorized, problem

USER_ID_MAX_LENGTH = 255
# A user id: 1-255 characters, none of them control characters (Postgres text cannot hold NUL,
# and log lines should not carry the others).
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f]{1,255}$"
WEBHOOK_ID_MAX_LENGTH = 255
_USER_ID = re.compile(USER_ID_PATTERN)
JWT_ALGORITHMS = ("HS256",)
INTERNAL_PATH_PREFIX = "/internal/"

bearer_scheme = HTTPBearer(auto_error=False, description="A user JWT (HS256); its `sub` is the user id.")
# Documents the signed internal calls in OpenAPI; the middleware does the checking.
webhook_signature_scheme = APIKeyHeader(
    name="webhook-signature",
    auto_error=False,
    description="Standard Webhooks signature (with webhook-id and webhook-timestamp headers).",
)


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    secret: str
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = 30.0

    def __repr__(self) -> str:
        return f"TokenVerifier(audience={self.audience!r}, issuer={self.issuer!r})"

    def user_id(self, token: str) -> str:
        """The verified `sub` of `token`; raises `Unauthorized`."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=list(JWT_ALGORITHMS),
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
        if not isinstance(subject, str) or _USER_ID.match(subject) is None:
            raise Unauthorized("invalid token")
        return subject


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


async def current_user(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> str:
    """FastAPI dependency: the authenticated user's id."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing bearer token")
    verifier: TokenVerifier = request.app.state.token_verifier
    user_id = verifier.user_id(credentials.credentials)
    request.state.user_id = user_id
    return user_id


def delivery_id(request: Request) -> str:
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
