"""Plans: how many minutes a period allows, read from a TOML file.

The file's shape (see DESIGN.md):

    default_plan = "free"
    [plans.free]
    minutes = 10
    [plans.free.meters.generations]
    limit = 5            # or "unlimited"
    window = "day"       # or "period"
    [plans.free.rate_limit]
    requests_per_s = 5
    burst = 10

    # What billing sells (optional): Polar product ids, Stripe price ids.
    [billing.polar.plans]
    "5d1b0c6e-...-polar-product" = "basic"
    [billing.polar.credit_packs]
    "8f0e2a3b-...-polar-product" = 60     # minutes
    [billing.stripe.plans]
    price_1PbasicMonthly = "basic"
    [billing.stripe.credit_packs]
    price_1Ppack60 = 60

Parsing is strict: an unknown key, a negative amount or a `default_plan` that
is not defined is a `PlansError` naming the offending entry, so a typo in an
operator's file stops the server at start instead of silently granting
minutes. Count meters and rate limits are parsed and validated here; they are
enforced by the ledger (meters) and the shard (`actors.ratelimit`). A plan
without `rate_limit` is not rate limited.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.times import minutes_to_ms

MeterWindow = Literal["day", "period"]

BUILTIN_PLANS_TOML = """
default_plan = "free"

# A voice client makes a request every ~30 s; these bounds leave a hundredfold room.
[plans.free]
minutes = 10
[plans.free.rate_limit]
requests_per_s = 5
burst = 20

[plans.basic]
minutes = 100
[plans.basic.rate_limit]
requests_per_s = 10
burst = 40

[plans.pro]
minutes = 500
[plans.pro.rate_limit]
requests_per_s = 20
burst = 80
"""


class PlansError(ValueError):
    """The plans file is malformed; the message names the entry."""


@dataclass(frozen=True, slots=True)
class MeterSpec:
    limit: int | None  # None: unlimited
    window: MeterWindow


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limit_ms: int
    meters: Mapping[str, MeterSpec] = field(default_factory=dict)
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class PlanCatalog:
    plans: Mapping[str, Plan]
    default_plan: str
    billing: BillingCatalog = field(default_factory=lambda: BillingCatalog({}, {}))

    def __post_init__(self) -> None:
        assert self.default_plan in self.plans, "default plan must be defined"

    def get(self, name: str) -> Plan | None:
        return self.plans.get(name)

    @property
    def default(self) -> Plan:
        return self.plans[self.default_plan]

    @classmethod
    def builtin(cls) -> PlanCatalog:
        return parse_plans(BUILTIN_PLANS_TOML, source="built-in plans")

    @classmethod
    def from_file(cls, path: Path) -> PlanCatalog:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlansError(f"cannot read plans file {path}: {exc.strerror}") from exc
        return parse_plans(text, source=str(path))


BillingProvider = Literal["polar", "stripe"]
BILLING_PROVIDERS: tuple[BillingProvider, ...] = ("polar", "stripe")


@dataclass(frozen=True, slots=True)
class BillingCatalog:
    """What a billing provider's product (Polar) or price (Stripe) id buys: a plan, or a pack of
    minutes. Keyed by (provider, id); from the plans file's `[billing.<provider>]` tables."""

    plans: Mapping[tuple[BillingProvider, str], str]
    credit_packs: Mapping[tuple[BillingProvider, str], float]

    def plan_for(self, provider: BillingProvider, product_id: str) -> str | None:
        return self.plans.get((provider, product_id))

    def pack_minutes(self, provider: BillingProvider, product_id: str) -> float | None:
        return self.credit_packs.get((provider, product_id))


def parse_plans(text: str, *, source: str) -> PlanCatalog:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlansError(f"{source}: not valid TOML: {exc}") from exc
    _only_keys(document, {"default_plan", "plans", "billing"}, where=source)
    raw_plans = document.get("plans")
    if not isinstance(raw_plans, dict) or not raw_plans:
        raise PlansError(f"{source}: [plans] must define at least one plan")
    plans = {name: _parse_plan(name, body, source) for name, body in raw_plans.items()}
    default_plan = document.get("default_plan", "free")
    if not isinstance(default_plan, str) or default_plan not in plans:
        raise PlansError(f"{source}: default_plan {default_plan!r} is not one of {sorted(plans)}")
    billing = _parse_billing(document.get("billing", {}), plans, source)
    return PlanCatalog(plans=plans, default_plan=default_plan, billing=billing)


def _parse_billing(raw: Any, plans: Mapping[str, Plan], source: str) -> BillingCatalog:
    """`[billing.polar]` / `[billing.stripe]`, each with `plans = {id = "plan"}` and
    `credit_packs = {id = minutes}`; an id names one thing only."""
    where = f"{source}: billing"
    if not isinstance(raw, dict):
        raise PlansError(f"{where} must be a table")
    _only_keys(raw, set(BILLING_PROVIDERS), where=where)
    by_plan: dict[tuple[BillingProvider, str], str] = {}
    packs: dict[tuple[BillingProvider, str], float] = {}
    for provider in BILLING_PROVIDERS:
        section = raw.get(provider, {})
        at = f"{where}.{provider}"
        if not isinstance(section, dict):
            raise PlansError(f"{at} must be a table")
        _only_keys(section, {"plans", "credit_packs"}, where=at)
        for product_id, plan in _table(section, "plans", at).items():
            if not isinstance(plan, str) or plan not in plans:
                raise PlansError(f"{at}.plans.{product_id} must name a plan, one of {sorted(plans)}")
            by_plan[provider, product_id] = plan
        for product_id, minutes in _table(section, "credit_packs", at).items():
            valid = isinstance(minutes, int | float) and not isinstance(minutes, bool)
            if not valid or not math.isfinite(minutes) or minutes <= 0:
                raise PlansError(f"{at}.credit_packs.{product_id} must be a positive number of minutes")
            if (provider, product_id) in by_plan:
                raise PlansError(f"{at}: {product_id!r} is both a plan and a credit pack")
            packs[provider, product_id] = float(minutes)
    return BillingCatalog(plans=by_plan, credit_packs=packs)


def _table(section: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = section.get(name, {})
    if not isinstance(value, dict):
        raise PlansError(f"{where}.{name} must be a table")
    return value


def _parse_plan(name: str, body: Any, source: str) -> Plan:
    where = f"{source}: plans.{name}"
    if not isinstance(body, dict):
        raise PlansError(f"{where} must be a table")
    _only_keys(body, {"minutes", "meters", "rate_limit"}, where=where)
    minutes = body.get("minutes")
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not math.isfinite(minutes):
        raise PlansError(f"{where}.minutes must be a number")
    if minutes < 0:
        raise PlansError(f"{where}.minutes must not be negative")
    meters_raw = body.get("meters", {})
    if not isinstance(meters_raw, dict):
        raise PlansError(f"{where}.meters must be a table")
    meters = {meter: _parse_meter(meter, spec, f"{where}.meters") for meter, spec in meters_raw.items()}
    rate_limit = _parse_rate_limit(body["rate_limit"], where) if "rate_limit" in body else None
    return Plan(name=name, limit_ms=minutes_to_ms(minutes), meters=meters, rate_limit=rate_limit)


def _parse_meter(name: str, spec: Any, where: str) -> MeterSpec:
    where = f"{where}.{name}"
    if not isinstance(spec, dict):
        raise PlansError(f"{where} must be a table")
    _only_keys(spec, {"limit", "window"}, where=where)
    limit = spec.get("limit")
    if limit == "unlimited":
        parsed_limit: int | None = None
    elif isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        parsed_limit = limit
    else:
        raise PlansError(f'{where}.limit must be a non-negative integer or "unlimited"')
    window = spec.get("window", "period")
    if window not in ("day", "period"):
        raise PlansError(f'{where}.window must be "day" or "period"')
    return MeterSpec(limit=parsed_limit, window=window)


def _parse_rate_limit(spec: Any, where: str) -> RateLimit:
    where = f"{where}.rate_limit"
    if not isinstance(spec, dict):
        raise PlansError(f"{where} must be a table")
    _only_keys(spec, {"requests_per_s", "burst"}, where=where)
    rate = spec.get("requests_per_s")
    burst = spec.get("burst")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise PlansError(f"{where}.requests_per_s must be a positive number")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise PlansError(f"{where}.burst must be a positive integer")
    return RateLimit(requests_per_s=float(rate), burst=burst)


def _only_keys(table: Mapping[str, Any], allowed: set[str], *, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PlansError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
