"""How the API writes times: RFC 3339 in UTC with a `Z`, to the millisecond the ledger keeps."""

from __future__ import annotations

from datetime import datetime


def rfc3339(value: datetime) -> str:
    """Whole seconds print without a fraction; anything else to the millisecond."""
    spec = "seconds" if value.microsecond == 0 else "milliseconds"
    return value.isoformat(timespec=spec).replace("+00:00", "Z")
