"""User tokens from a JWKS (RS256/ES256), against a real JWKS served over HTTP on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth import JwksKeys, TokenVerifier
from gateway.errors import Unauthorized

pytestmark = pytest.mark.asyncio(loop_scope="function")


class JwksServer:
    """Serves `keys` as a JWKS document at /jwks.json and counts the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private: Any, kid: str) -> dict[str, Any]:
    if isinstance(private, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        data["alg"] = "RS256"
    else:
        data = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        data["alg"] = "ES256"
    return {**data, "kid": kid, "use": "sig"}


def token(private: Any, kid: str, algorithm: str = "RS256", **claims: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(body, private, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")]
    yield server
    server.close()


def verifier_for(server: JwksServer, clock: Clock, **options: Any) -> TokenVerifier:
    return TokenVerifier(jwks=JwksKeys(server.url, refetch_min_s=30, max_age_s=600, clock=clock), **options)


async def test_rs256_and_es256_tokens_from_the_jwks_are_accepted(jwks: JwksServer) -> None:
    verifier = verifier_for(jwks, Clock())
    assert await verifier.verify(token(RSA_KEY, "rsa-1")) == "alice"
    assert await verifier.verify(token(EC_KEY, "ec-1", "ES256")) == "alice"
    assert jwks.fetches == 1, "the keys are cached"


def _public_pem() -> bytes:
    return RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: jwt.encode({"sub": "alice"}, None, algorithm="none", headers={"kid": "rsa-1"}),
            id="alg-none",
        ),
        pytest.param(lambda: _hs256_with_public_key(), id="hs256-with-the-public-key"),
        pytest.param(lambda: token(RSA_KEY, "rsa-1", exp=int(time.time()) - 120), id="expired"),
        pytest.param(lambda: token(RSA_KEY, "rsa-1", nbf=int(time.time()) + 120), id="future-nbf"),
        pytest.param(lambda: token(RSA_KEY, "rsa-1", iat=int(time.time()) + 120), id="future-iat"),
        pytest.param(lambda: token(RSA_KEY_2, "rsa-1"), id="signed-by-another-key"),
        pytest.param(lambda: token(EC_KEY, "rsa-1", "ES256"), id="alg-does-not-match-the-kid"),
        pytest.param(lambda: token(RSA_KEY, "nobody"), id="unknown-kid"),
        pytest.param(
            lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, RSA_KEY, algorithm="RS256"),
            id="no-kid",
        ),
        pytest.param(lambda: token(RSA_KEY, "rsa-1", exp=None), id="no-exp"),
    ],
)
async def test_bad_tokens_are_refused(jwks: JwksServer, make: Any) -> None:
    verifier = verifier_for(jwks, Clock(), leeway_s=5)
    with pytest.raises(Unauthorized):
        await verifier.verify(make())


def _hs256_with_public_key() -> str:
    """The algorithm-confusion attack: an HMAC token keyed with the server's public key."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 60}).encode())
    signature = hmac.new(_public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


async def test_audience_and_issuer_are_checked_when_configured(jwks: JwksServer) -> None:
    verifier = verifier_for(jwks, Clock(), audience="ledger", issuer="https://auth.example")
    good = token(RSA_KEY, "rsa-1", aud="ledger", iss="https://auth.example")
    assert await verifier.verify(good) == "alice"
    for wrong in (
        token(RSA_KEY, "rsa-1", aud="other", iss="https://auth.example"),
        token(RSA_KEY, "rsa-1", aud="ledger", iss="https://evil.example"),
    ):
        with pytest.raises(Unauthorized):
            await verifier.verify(wrong)


async def test_unknown_kids_fetch_at_most_once_per_interval_and_rotation_needs_no_restart(
    jwks: JwksServer,
) -> None:
    clock = Clock()
    verifier = verifier_for(jwks, clock)
    assert await verifier.verify(token(RSA_KEY, "rsa-1")) == "alice"
    for i in range(20):  # a flood of made-up kids
        with pytest.raises(Unauthorized):
            await verifier.verify(token(RSA_KEY, f"made-up-{i}"))
    assert jwks.fetches == 1, "no fetch within the refetch interval"
    # The issuer rotates: a new key is published beside the old one...
    jwks.keys = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(RSA_KEY_2, "rsa-2")]
    clock.now += 31
    assert await verifier.verify(token(RSA_KEY_2, "rsa-2")) == "alice"
    assert jwks.fetches == 2
    # ...and the old one withdrawn later: cached keys serve until they are old, then go.
    jwks.keys = [public_jwk(RSA_KEY_2, "rsa-2")]
    assert await verifier.verify(token(RSA_KEY, "rsa-1")) == "alice"
    assert jwks.fetches == 2
    clock.now += 600
    with pytest.raises(Unauthorized):
        await verifier.verify(token(RSA_KEY, "rsa-1"))
    assert jwks.fetches == 3


async def test_an_unreachable_jwks_refuses_unknown_keys_and_keeps_known_ones(jwks: JwksServer) -> None:
    clock = Clock()
    verifier = verifier_for(jwks, clock)
    assert await verifier.verify(token(RSA_KEY, "rsa-1")) == "alice"
    jwks.close()
    clock.now += 31
    with pytest.raises(Unauthorized):
        await verifier.verify(token(RSA_KEY_2, "rsa-2"))
    assert await verifier.verify(token(RSA_KEY, "rsa-1")) == "alice"
