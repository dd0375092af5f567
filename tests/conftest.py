"""Fixtures of real components (Postgres, Ray, servers) for every test directory that needs them,
and the markers that name the suites: integration, reliability, security."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.harness"]

_TESTS = Path(__file__).parent
_MARKED_BY_DIRECTORY = {
    _TESTS / "integration": pytest.mark.integration,
    _TESTS / "reliability": pytest.mark.reliability,
}

# The security suite (`pytest -m security`): whole modules (None), or the named tests of a module.
# A named test that no longer exists fails the collection, so the list cannot rot.
SECURITY: dict[str, frozenset[str] | None] = {
    # User tokens: HS256 and JWKS (RS256/ES256) matrices; 401 with WWW-Authenticate over HTTP.
    "unit/gateway/test_auth.py": None,
    "unit/gateway/test_jwks.py": None,
    "integration/test_jwks_tokens.py": None,
    "integration/test_sessions.py": frozenset(
        {
            "test_user_routes_need_a_valid_token",
            "test_another_users_session_is_not_found",
            "test_bad_input_is_refused_and_changes_nothing",
            "test_unknown_query_parameters_and_undecodable_bodies_are_422",
            "test_body_over_16_kib_is_413",
            "test_chunked_body_over_16_kib_is_413",
        }
    ),
    # Internal calls: the signature matrix, replays, the separate listener.
    "integration/test_internal.py": frozenset(
        {
            "test_bad_or_old_signatures_are_401",
            "test_unsigned_call_learns_nothing_about_its_body",
            "test_replayed_delivery_returns_first_answer_with_no_new_effect",
            "test_delivery_id_reused_with_another_body_is_a_conflict",
        }
    ),
    "integration/test_internal_listener.py": None,
    # Isolation and mass assignment; rate limits; bounds; fuzzing; Postgres roles.
    "integration/test_isolation.py": None,
    "integration/test_rate_limit.py": None,
    "unit/actors/test_shard.py": frozenset({"TestRateLimit", "TestBounds"}),
    "integration/test_bounds.py": None,
    "integration/test_fuzz.py": None,
    "integration/test_postgres_roles.py": None,
    # Secrets: production refuses weak ones, names the setting, never logs a secret.
    "unit/gateway/test_settings.py": frozenset(
        {
            "test_production_refuses_generated_or_short_secrets",
            "test_production_with_a_jwks_needs_no_jwt_secret",
        }
    ),
    "unit/gateway/test_cli.py": frozenset({"test_bad_configuration_names_the_setting_but_not_its_value"}),
    "e2e/test_cli.py": frozenset({"test_new_user_runs_a_session_and_usage_survives_restart"}),
    # Billing providers' signatures: Standard Webhooks (Polar), Stripe-Signature with its tolerance.
    "integration/test_billing_webhooks.py": frozenset(
        {"test_polar_bad_signatures_are_401_and_change_nothing", "test_stripe_signature_rules"}
    ),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    gone = [module for module in SECURITY if not (_TESTS / module).is_file()]
    if gone:
        raise pytest.UsageError(f"tests/conftest.py SECURITY names modules that do not exist: {gone}")
    for item in items:
        path = Path(item.path)
        for directory, marker in _MARKED_BY_DIRECTORY.items():
            if directory in path.parents:
                item.add_marker(marker)
        module = path.relative_to(_TESTS).as_posix() if _TESTS in path.parents else ""
        if module not in SECURITY:
            continue
        names = SECURITY[module]
        if names is None:
            item.add_marker(pytest.mark.security)
            continue
        missing = [name for name in names if not hasattr(item.module, name)]  # type: ignore[attr-defined]
        if missing:
            raise pytest.UsageError(f"tests/conftest.py SECURITY names {missing}, not in tests/{module}")
        # A test's own name, or its class's (item.name carries parametrize ids).
        owner = item.parent.name if isinstance(item.parent, pytest.Class) else item.name.split("[")[0]
        if owner in names:
            item.add_marker(pytest.mark.security)
