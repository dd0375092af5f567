"""A typed async Python client for a usage-ledger server (on httpx).

from usage_ledger_client import LedgerClient, LimitReached

async with LedgerClient("http://127.0.0.1:8000", token=token) as client:
    print((await client.usage()).minutes_remaining)
    try:
        async with client.session(topic="spanish", difficulty="beginner") as session:
            await talk(session.session_id)
    except LimitReached as ended:
        print("out of minutes after", ended.result.session_minutes)
"""

from usage_ledger_client.client import LedgerClient
from usage_ledger_client.errors import (
    LedgerError,
    LimitReached,
    NoCredits,
    SessionActive,
    SessionEnded,
    Unauthorized,
    Unavailable,
)
from usage_ledger_client.models import ActiveSession, SessionProgress, SessionStarted, Usage
from usage_ledger_client.session import LiveSession

__all__ = [
    "ActiveSession",
    "LedgerClient",
    "LedgerError",
    "LimitReached",
    "LiveSession",
    "NoCredits",
    "SessionActive",
    "SessionEnded",
    "SessionProgress",
    "SessionStarted",
    "Unauthorized",
    "Unavailable",
    "Usage",
]
