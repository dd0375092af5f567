"""Delivery of threshold events from the outbox to LEDGER_EVENTS_WEBHOOK_URL, as Standard Webhooks.

Every gateway with the URL set runs one `EventDelivery` loop. Each round claims a batch of due
events (`persistence.events.claim_due`: `for update skip locked`, then a lease), POSTs each, and
records the outcome: delivered on any 2xx; otherwise retried with jittered exponential backoff
(1 s, 2 s, 4 s … up to LEDGER_EVENTS_RETRY_MAX_S). An event older than
LEDGER_EVENTS_MAX_AGE_S when its turn comes is not sent but marked failed and logged (so turning
delivery on late does not send months-old events). Delivery is at least once: a
receiver that answered 2xx too late, or a gateway that died after sending, means a second
delivery with the same `webhook-id`, which is the event id receivers deduplicate by.

Each request carries `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,` + base64
HMAC-SHA256 of `id.timestamp.body` with the `whsec_` secret), so any Standard Webhooks library
verifies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import httpx
import structlog
from standardwebhooks.webhooks import Webhook

from actors.times import MS_PER_SECOND, wall_clock_ms
from gateway.metrics import Metrics
from persistence import events
from persistence.events import DueEvent

if TYPE_CHECKING:
    from persistence.database import Connection

log = structlog.get_logger("gateway.events")

# Events claimed per round, and how long one delivery may take.
BATCH_SIZE = 32
SEND_TIMEOUT_S = 10.0
# A claimed event is not claimed again for this long (a gateway that died mid-send lets go then).
# Every send of a round is bounded by SEND_TIMEOUT_S, so a live round records its outcomes well
# within its lease and no other gateway sends its events meanwhile.
LEASE_S = SEND_TIMEOUT_S + 20.0
assert LEASE_S >= 2 * SEND_TIMEOUT_S
# The loop looks for due events this often, unless a full batch was just delivered.
POLL_INTERVAL_S = 1.0
# The undelivered count (a metric) is taken at most this often.
COUNT_INTERVAL_S = 15.0
FIRST_RETRY_S = 1.0
# A response body is quoted in `last_error` up to this many characters.
QUOTED_RESPONSE_CHARS = 200
# Jitter from a generator of our own: the process's global `random` state is not ours to move.
_jitter = random.Random()


def retry_delay_s(attempts: int, retry_max_s: float) -> float:
    """The wait after the `attempts`-th failed delivery: doubling from 1 s, capped, ±20% jitter."""
    base = min(retry_max_s, FIRST_RETRY_S * 2 ** min(attempts - 1, 30))
    return float(base * _jitter.uniform(0.8, 1.2))


class EventDelivery:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool[asyncpg.Record],
        url: str,
        secret: str,
        retry_max_s: float,
        max_age_s: float,
        metrics: Metrics,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._pool = pool
        self._url = url
        self._signer = Webhook(secret)
        self._retry_max_s = retry_max_s
        self._max_age_ms = round(max_age_s * MS_PER_SECOND)
        self._metrics = metrics
        self._client = client or httpx.AsyncClient(
            timeout=SEND_TIMEOUT_S, headers={"user-agent": "usage-ledger"}, follow_redirects=False
        )
        self._task: asyncio.Task[None] | None = None
        self._counted_at = float("-inf")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-delivery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _run(self) -> None:
        log.info("event_delivery_started", url=self._url)
        while True:
            try:
                claimed, delivered = await self.deliver_due()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("event_delivery_round_failed", error=f"{type(exc).__name__}: {exc}")
                claimed = delivered = 0
            except Exception:
                log.exception("event_delivery_round_failed")
                claimed = delivered = 0
            # Straight on only while full batches are getting through: a receiver that is down
            # gets at most a batch per interval, however long the backlog.
            if claimed < BATCH_SIZE or delivered == 0:
                await asyncio.sleep(POLL_INTERVAL_S)

    async def deliver_due(self) -> tuple[int, int]:
        """One round: claim due events, send them, record each outcome. Returns (claimed, delivered)."""
        loop = asyncio.get_running_loop()
        async with self._pool.acquire() as connection:
            due = await events.claim_due(connection, limit=BATCH_SIZE, lease_s=LEASE_S)
            if loop.time() - self._counted_at >= COUNT_INTERVAL_S:
                self._metrics.events_undelivered.set(await events.count_undelivered(connection))
                self._counted_at = loop.time()
        if not due:
            return 0, 0
        now_ms = wall_clock_ms()
        expired = [event for event in due if now_ms - event.created_at_ms >= self._max_age_ms]
        sending = [event for event in due if event not in expired]
        errors = await asyncio.gather(*(self._send(event) for event in sending))
        delivered = [event.event_id for event, error in zip(sending, errors, strict=True) if error is None]
        async with self._pool.acquire() as connection:
            if delivered:
                await events.mark_delivered(connection, event_ids=delivered)
            for event, error in zip(sending, errors, strict=True):
                if error is not None:
                    await self._failed(connection, event, error)
            for event in expired:
                await self._give_up(connection, event)
        self._metrics.event_deliveries.labels("delivered").inc(len(delivered))
        return len(due), len(delivered)

    async def _give_up(self, connection: Connection, event: DueEvent) -> None:
        """An event older than LEDGER_EVENTS_MAX_AGE_S is not sent (again): it is marked failed."""
        error = f"undelivered after {self._max_age_ms // MS_PER_SECOND} s (LEDGER_EVENTS_MAX_AGE_S)"
        await events.give_up(connection, event_id=event.event_id, error=error)
        self._metrics.event_deliveries.labels("gave_up").inc()
        log.error("event_delivery_gave_up", event_id=event.event_id, attempts=event.attempts - 1)

    async def _failed(self, connection: Connection, event: DueEvent, error: str) -> None:
        """Schedule the next attempt."""
        attempts = event.attempts
        delay_s = retry_delay_s(attempts, self._retry_max_s)
        await events.retry_later(connection, event_id=event.event_id, delay_s=delay_s, error=error)
        self._metrics.event_deliveries.labels("retry").inc()
        log.warning(
            "event_delivery_failed",
            event_id=event.event_id,
            attempts=attempts,
            retry_in_s=round(delay_s, 1),
            error=error,
        )

    async def _send(self, event: DueEvent) -> str | None:
        """POST one event; None when the receiver took it (2xx), else what went wrong."""
        now = datetime.now(UTC)
        body = event.body.decode()
        headers = {
            "content-type": "application/json",
            "webhook-id": event.event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(event.event_id, now, body),
        }
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):  # httpx's timeout bounds each read, not the whole
                response = await self._client.post(self._url, content=event.body, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # recorded as a failed attempt, so the round still records the rest
            log.exception("event_delivery_send_failed", event_id=event.event_id)
            return f"{type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}: {response.text[:QUOTED_RESPONSE_CHARS]}"
