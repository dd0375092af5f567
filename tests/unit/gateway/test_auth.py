"""User tokens: what is accepted and what is refused (no server needed)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt
import pytest

from gateway.auth import TokenVerifier, issue_token
from gateway.errors import Unauthorized

SECRET = "unit-test-secret-" + "s" * 48
verifier = TokenVerifier(secret=SECRET, leeway_s=5)


def test_issued_token_is_accepted() -> None:
    assert verifier.user_id(issue_token(secret=SECRET, user_id="u-1", ttl_s=60)) == "u-1"


def _claims(**claims: object) -> dict[str, object]:
    return {"exp": int(time.time()) + 60, **claims}


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: issue_token(secret=SECRET, user_id="u", ttl_s=-60), "token expired"),
        (lambda: issue_token(secret="another-secret-" + "x" * 50, user_id="u", ttl_s=60), "invalid token"),
        (lambda: jwt.encode({"sub": "u"}, SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="u"), SECRET, algorithm="HS512"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="u"), None, algorithm="none"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="u\x00x"), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(sub=""), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="u" * 256), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: "not.a.token", "invalid token"),
        (
            lambda: jwt.encode(_claims(sub="u", exp=str(int(time.time()) + 60)), SECRET, algorithm="HS256"),
            "invalid token",
        ),
        (lambda: jwt.encode(_claims(sub="u", exp=10**20), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="u", iat=1), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="u", nbf="0"), SECRET, algorithm="HS256"), "invalid token"),
        (lambda: jwt.encode(_claims(sub="x\ud800"), SECRET, algorithm="HS256"), "invalid token"),
    ],
    ids=[
        "expired",
        "wrong-key",
        "no-exp",
        "no-sub",
        "hs512",
        "alg-none",
        "nul-in-sub",
        "empty-sub",
        "long-sub",
        "junk",
        "exp-a-string",
        "exp-past-2200",
        "iat-in-1970",
        "nbf-a-string",
        "sub-a-lone-surrogate",
    ],
)
def test_bad_tokens_are_refused(make_token: Callable[[], str], reason: str) -> None:
    with pytest.raises(Unauthorized, match=reason):
        verifier.user_id(make_token())


def test_audience_and_issuer_are_checked_when_configured() -> None:
    strict = TokenVerifier(secret=SECRET, audience="ledger", issuer="https://auth.example")
    good = issue_token(secret=SECRET, user_id="u", ttl_s=60, audience="ledger", issuer="https://auth.example")
    assert strict.user_id(good) == "u"
    for wrong in (
        issue_token(secret=SECRET, user_id="u", ttl_s=60, audience="other", issuer="https://auth.example"),
        issue_token(secret=SECRET, user_id="u", ttl_s=60, audience="ledger", issuer="https://evil.example"),
        issue_token(secret=SECRET, user_id="u", ttl_s=60),
    ):
        with pytest.raises(Unauthorized):
            strict.user_id(wrong)


def test_leeway_allows_small_clock_skew_only() -> None:
    now = int(time.time())
    just_expired = issue_token(secret=SECRET, user_id="u", ttl_s=1, now_s=now - 3)
    assert verifier.user_id(just_expired) == "u"
    long_expired = issue_token(secret=SECRET, user_id="u", ttl_s=1, now_s=now - 30)
    with pytest.raises(Unauthorized, match="expired"):
        verifier.user_id(long_expired)


def test_secret_never_appears_in_repr() -> None:
    assert SECRET not in repr(verifier)


def test_a_remembered_token_is_refused_once_it_expires() -> None:
    strict = TokenVerifier(secret=SECRET, leeway_s=0)
    token = issue_token(secret=SECRET, user_id="u", ttl_s=1)
    assert strict.user_id(token) == "u"
    assert strict.user_id(token) == "u"  # remembered
    time.sleep(1.2)
    with pytest.raises(Unauthorized, match="expired"):
        strict.user_id(token)
