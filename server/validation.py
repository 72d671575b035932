"""Rules for identifiers (agents, shifts) and free text, shared by every service that takes them."""

from __future__ import annotations

import re
import unicodedata

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


_MAX_SHIFT_ID = 64
_SHIFT_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{_MAX_SHIFT_ID}}}")


def validate_shift_id(shift_id: str) -> str:
    """A shift id as ShiftService issues them (secrets.token_urlsafe). The message never
    repeats a refused value: it may hold NUL, newlines or bidi overrides, or a megabyte that
    would overflow the status trailer."""
    if not shift_id:
        raise InvalidRequestError("shift_id is required", field="shift_id")
    if len(shift_id) > _MAX_SHIFT_ID:
        raise InvalidRequestError(
            f"shift_id is {len(shift_id)} characters long; at most {_MAX_SHIFT_ID} are allowed",
            field="shift_id",
        )
    if not _SHIFT_ID.fullmatch(shift_id):
        raise InvalidRequestError(
            f"shift_id must be 1-{_MAX_SHIFT_ID} characters from A-Z, a-z, 0-9, _ and -",
            field="shift_id",
        )
    return shift_id


# Controls (C0, DEL, C1), format characters (bidi overrides and isolates, zero-width marks),
# line and paragraph separators, surrogates, private use and unassigned code points: none
# belongs in a name, a consent reference or a reason, and each can make a record read other
# than it is.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
# Zero-width non-joiner and joiner are part of correct spelling in Persian and Indic scripts,
# and they change no character's order or meaning.
_JOINERS = frozenset({"\u200c", "\u200d"})


def validate_text(value: str, field: str, max_length: int) -> str:
    """A required free-text field: trimmed, non-empty, bounded, nothing hidden or invisible."""
    value = value.strip()
    if not value:
        raise InvalidRequestError(f"{field} is required", field=field)
    if len(value) > max_length:
        raise InvalidRequestError(f"{field} is longer than {max_length} characters", field=field)
    for position, character in enumerate(value):
        if unicodedata.category(character) in _HIDDEN_CATEGORIES and character not in _JOINERS:
            name = unicodedata.name(character, "a control character")
            raise InvalidRequestError(
                f"{field} contains U+{ord(character):04X} ({name}) at position {position}: "
                "control and formatting characters are refused, since they can disguise what "
                "an audit export or a SIEM feed shows",
                field=field,
            )
    return value
