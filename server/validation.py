"""Rules for agent identifiers and names, shared by enrollment and verification."""

from __future__ import annotations

import re

from server.errors import InvalidRequestError

_AGENT_ID = re.compile(r"[A-Za-z0-9._@-]{1,128}")


def validate_agent_id(agent_id: str) -> str:
    if not agent_id:
        raise InvalidRequestError("agent_id is required", field="agent_id")
    if not _AGENT_ID.fullmatch(agent_id):
        raise InvalidRequestError(
            "agent_id must be 1-128 characters from A-Z, a-z, 0-9 and . _ @ -", field="agent_id"
        )
    return agent_id


def validate_text(value: str, field: str, max_length: int) -> str:
    """A required free-text field: trimmed, non-empty, bounded, no control characters."""
    value = value.strip()
    if not value:
        raise InvalidRequestError(f"{field} is required", field=field)
    if len(value) > max_length:
        raise InvalidRequestError(f"{field} is longer than {max_length} characters", field=field)
    if any(ord(c) < 32 for c in value):
        raise InvalidRequestError(f"{field} contains control characters", field=field)
    return value
