"""The outcome of one verification, shared by the service that decides it and the throttle that
counts the failures."""

from __future__ import annotations

import enum


class Decision(enum.Enum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    INCONCLUSIVE = "INCONCLUSIVE"
    """Too little speech to decide: not a failure, the caller should ask for more speech."""
