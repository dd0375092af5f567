"""The per-user ledger: a pure state machine over one user's minutes and counts (`UserLedger`).

One module per concern, stacked: `state` (fields, values, snapshot, clone) < `alerts`
(threshold events) < `allowance` (periods, billing, held tails, alarms) < `meters` <
`holds` < `ledger` (the operations and their answers; its docstring says what the ledger promises).
"""

from actors.ledger.holds import HoldVerb
from actors.ledger.ledger import UserLedger
from actors.ledger.state import (
    MAX_ALARMS_PER_ADVANCE,
    RECENT_EVENTS_KEPT,
    RESTORE_VERSION_GAP,
    Alarm,
    AlarmKind,
    LedgerPolicy,
    StoredStateError,
)
from actors.records import PlanEvent

__all__ = [
    "MAX_ALARMS_PER_ADVANCE",
    "RECENT_EVENTS_KEPT",
    "RESTORE_VERSION_GAP",
    "Alarm",
    "AlarmKind",
    "HoldVerb",
    "LedgerPolicy",
    "PlanEvent",
    "StoredStateError",
    "UserLedger",
]
