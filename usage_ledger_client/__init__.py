"""A typed async Python client for a usage-ledger server (on httpx).

from usage_ledger_client import LedgerClient, LimitReached

async with LedgerClient("http://127.0.0.1:8000", token=token) as client:
    print((await client.usage()).minutes_remaining)
    try:
        async with client.session(topic="spanish", difficulty="beginner") as session:
            await talk(session.session_id)
    except LimitReached as ended:
        print("out of minutes after", ended.result.session_minutes)
    async with client.hold(meter="tokens", amount=4000, ttl_s=120) as hold:
        await hold.capture(await generate(max_tokens=4000))  # the rest goes back at once
"""

from usage_ledger_client.client import LedgerClient
from usage_ledger_client.errors import (
    HoldNotFound,
    HoldResolved,
    LedgerError,
    LimitReached,
    MeterNotFound,
    NoCredits,
    SessionActive,
    SessionEnded,
    TooManyHolds,
    Unauthorized,
    Unavailable,
)
from usage_ledger_client.holds import LiveHold
from usage_ledger_client.models import ActiveSession, Hold, SessionProgress, SessionStarted, Usage
from usage_ledger_client.session import LiveSession

__all__ = [
    "ActiveSession",
    "Hold",
    "HoldNotFound",
    "HoldResolved",
    "LedgerClient",
    "LedgerError",
    "LimitReached",
    "LiveHold",
    "LiveSession",
    "MeterNotFound",
    "NoCredits",
    "SessionActive",
    "SessionEnded",
    "SessionProgress",
    "SessionStarted",
    "TooManyHolds",
    "Unauthorized",
    "Unavailable",
    "Usage",
]
