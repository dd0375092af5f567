"""The plans file: built-in defaults and strict parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.plans import MeterSpec, PlanCatalog, PlansError, RateLimit, parse_plans
from actors.times import MS_PER_MINUTE


def test_builtin_plans_are_free_basic_pro() -> None:
    catalog = PlanCatalog.builtin()
    assert catalog.default_plan == "free"
    assert {name: plan.limit_ms // MS_PER_MINUTE for name, plan in catalog.plans.items()} == {
        "free": 10,
        "basic": 100,
        "pro": 500,
    }


def test_full_plan_file_parses(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(
        """
        default_plan = "starter"
        [plans.starter]
        minutes = 0.1
        [plans.starter.meters.generations]
        limit = 5
        window = "day"
        [plans.starter.meters.exports]
        limit = "unlimited"
        [plans.starter.rate_limit]
        requests_per_s = 5
        burst = 10
        """
    )
    catalog = PlanCatalog.from_file(path)
    starter = catalog.default
    assert starter.limit_ms == 6_000
    assert starter.meters == {
        "generations": MeterSpec(limit=5, window="day"),
        "exports": MeterSpec(limit=None, window="period"),
    }
    assert starter.rate_limit == RateLimit(requests_per_s=5.0, burst=10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[plans.free]\nminutes = -1", "must not be negative"),
        ("[plans.free]\nminutes = 'ten'", "must be a number"),
        ("[plans.free]\nminutes = 10\nminute = 3", "unknown key"),
        ("default_plan = 'gold'\n[plans.free]\nminutes = 1", "default_plan 'gold'"),
        ("[plans.free]\nminutes = 1\n[plans.free.meters.g]\nlimit = -2", "non-negative integer"),
        ("[plans.free]\nminutes = 1\n[plans.free.meters.g]\nlimit = 2\nwindow = 'week'", "window"),
        ("[plans.free]\nminutes = 1\n[plans.free.rate_limit]\nrequests_per_s = 0\nburst = 1", "positive"),
        ("plans = 3", "at least one plan"),
        ("[plans.free\nminutes = 1", "not valid TOML"),
        ("[plans.free]\nminutes = 1\n[billing.paddle]", "unknown key"),
        ("[plans.free]\nminutes = 1\n[billing.polar.plans]\nprod_1 = 'gold'", "must name a plan"),
        ("[plans.free]\nminutes = 1\n[billing.stripe.credit_packs]\nprice_1 = 0", "positive number"),
        ("[plans.free]\nminutes = 1\n[billing.stripe.credit_packs]\nprice_1 = true", "positive number"),
        (
            "[plans.free]\nminutes = 1\n[billing.polar.plans]\np = 'free'\n"
            "[billing.polar.credit_packs]\np = 5",
            "both a plan and a credit pack",
        ),
    ],
)
def test_malformed_plans_are_refused_with_the_entry_named(text: str, message: str) -> None:
    with pytest.raises(PlansError, match=message):
        parse_plans(text, source="plans.toml")


def test_billing_ids_map_to_plans_and_packs_per_provider() -> None:
    catalog = parse_plans(
        """
        [plans.free]
        minutes = 10
        [plans.pro]
        minutes = 500
        [billing.polar.plans]
        "prod-1" = "pro"
        [billing.polar.credit_packs]
        "prod-2" = 60
        [billing.stripe.plans]
        price_pro = "pro"
        """,
        source="plans.toml",
    )
    billing = catalog.billing
    assert billing.plan_for("polar", "prod-1") == "pro"
    assert billing.pack_minutes("polar", "prod-2") == 60.0
    assert billing.plan_for("stripe", "price_pro") == "pro"
    assert billing.plan_for("stripe", "prod-1") is None  # ids are per provider
    assert billing.pack_minutes("polar", "prod-1") is None
    assert PlanCatalog.builtin().billing.plan_for("polar", "prod-1") is None


def test_missing_file_is_a_plans_error(tmp_path: Path) -> None:
    with pytest.raises(PlansError, match="cannot read"):
        PlanCatalog.from_file(tmp_path / "absent.toml")
