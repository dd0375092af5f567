"""A per-user token bucket, decided in the user's shard with no I/O (see `Plan.rate_limit`).

A bucket holds at most `burst` tokens and gains `requests_per_s` of them per
second; each request takes one. A request that finds less than one is refused
with the time until one is there. Buckets are kept per resident user, in
memory only: a restarted shard starts everyone with a full bucket.
"""

from __future__ import annotations

from actors.plans import RateLimit


class TokenBucket:
    __slots__ = ("tokens", "updated_ms")

    def __init__(self, tokens: float, now_ms: int) -> None:
        self.tokens = tokens
        self.updated_ms = now_ms

    def take(self, limit: RateLimit, now_ms: int) -> float:
        """Take a token; return 0 if there was one, else the seconds until there will be."""
        elapsed_s = max(0, now_ms - self.updated_ms) / 1000
        self.tokens = min(float(limit.burst), self.tokens + elapsed_s * limit.requests_per_s)
        self.updated_ms = now_ms
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / limit.requests_per_s
