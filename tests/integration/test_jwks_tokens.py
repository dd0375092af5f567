"""A server configured with LEDGER_JWT_JWKS_URL accepts RS256/ES256 tokens from it, and nothing else."""

from __future__ import annotations

from tests.harness import ServerFactory, auth, new_user
from tests.unit.gateway.test_jwks import EC_KEY, RSA_KEY, JwksServer, public_jwk, token


async def test_tokens_are_verified_with_the_jwks_only(start_server: ServerFactory) -> None:
    jwks = JwksServer()
    jwks.keys = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")]
    try:
        server = await start_server(jwt_jwks_url=jwks.url)
        user = new_user()
        async with server.client() as http:
            for signed_token in (token(RSA_KEY, "rsa-1", sub=user), token(EC_KEY, "ec-1", "ES256", sub=user)):
                answer = await http.get("/v1/usage", headers={"Authorization": f"Bearer {signed_token}"})
                assert answer.status_code == 200, answer.text
                assert answer.json()["user_id"] == user
            hs256 = await http.get("/v1/usage", headers=auth(user))  # valid for a secret-configured server
            assert hs256.status_code == 401 and hs256.json()["code"] == "unauthorized"
            assert hs256.headers["www-authenticate"].startswith("Bearer")
        await server.stop()
    finally:
        jwks.close()
