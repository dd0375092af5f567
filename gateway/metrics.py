"""Prometheus metrics of one gateway process, in its own registry (one per app, so tests can build many)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ledger_http_requests",
            "HTTP requests answered",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "ledger_http_request_duration_seconds",
            "HTTP request latency",
            ("method", "route"),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.shard_calls = Histogram(
            "ledger_shard_call_duration_seconds",
            "Latency of calls from this gateway to shard actors",
            ("method", "outcome"),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.shard_batch_size = Histogram(
            "ledger_shard_batch_size",
            "Calls carried by one batch call from this gateway to a shard",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.channel_connects = Counter(
            "ledger_channel_connects",
            "Connections this gateway process made to shards on the data plane (unix: same node)",
            ("via",),
            registry=self.registry,
        )
        self.rate_limited_at_gateway = Counter(
            "ledger_gateway_rate_limited",
            "Requests this gateway refused without a shard call: the user's shard had just rate limited them",
            registry=self.registry,
        )
        self.requests_in_flight = Gauge(
            "ledger_http_requests_in_flight",
            "Requests being answered by this process (streams, health and metrics not counted)",
            registry=self.registry,
        )
        self.errors = Counter(
            "ledger_http_errors",
            "Error answers (problem+json) by their stable code",
            ("code",),
            registry=self.registry,
        )
        self.shard_alarms = Gauge(
            "ledger_shard_alarms_fired_by_kind",
            "Alarms fired since the shard started, by kind (stale, release, expire, limit, period_end)",
            ("shard", "kind"),
            registry=self.registry,
        )
        self.shard_holds = Gauge(
            "ledger_shard_holds_by_outcome",
            "Holds since the shard started, by outcome (created, captured, released, extended, expired)",
            ("shard", "outcome"),
            registry=self.registry,
        )
        self.shard_flush_duration = Gauge(
            "ledger_shard_last_flush_duration_seconds",
            "How long the shard's last flush took",
            ("shard",),
            registry=self.registry,
        )
        self.shard_flush_lag = Gauge(
            "ledger_shard_flush_lag_seconds",
            "Seconds since the shard's last completed flush (a growing lag: writes are failing)",
            ("shard",),
            registry=self.registry,
        )
        self.event_deliveries = Counter(
            "ledger_event_deliveries",
            "Threshold-event webhook deliveries by outcome (delivered, retry, gave_up)",
            ("outcome",),
            registry=self.registry,
        )
        self.events_undelivered = Gauge(
            "ledger_events_undelivered",
            "Events in the outbox waiting for delivery (as of this gateway's last delivery round)",
            registry=self.registry,
        )
        self.shard_gauges = {
            name: Gauge(f"ledger_shard_{name}", help_text, ("shard",), registry=self.registry)
            for name, help_text in (
                ("resident_users", "Users whose ledger is in the shard's memory"),
                ("active_sessions", "Sessions running on the shard"),
                ("dirty_users", "Users with changes not yet written to Postgres"),
                ("pending_calls", "Calls in progress on the shard"),
                ("alarms_fired", "Alarms fired since the shard started"),
                ("flush_failures", "Failed flushes since the shard started"),
                ("activations", "Users loaded into the shard's memory since it started"),
                ("durable_writes", "Writes answered only once in Postgres, since the shard started"),
                ("durable_transactions", "Transactions those writes shared (group commit)"),
                ("open_holds", "Holds not yet resolved on the shard"),
                ("held_minutes_ms", "Minutes held by unresolved holds on the shard, in milliseconds"),
                ("held_meter_units", "Count-meter units held by unresolved holds on the shard"),
            )
        }

    def observe_request(self, method: str, route: str, status: int, duration_s: float) -> None:
        # The labelled children, looked up once per (method, route, status): routes are templates and
        # statuses few, so this stays small, and a request costs two dict lookups, not two `labels`.
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, route, str(status)),
                self.request_latency.labels(method, route),
            )
        children[0].inc()
        children[1].observe(duration_s)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
