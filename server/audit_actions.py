"""The actions the audit log records, one name each.

The values are stored in every audit record and hashed into its chain, and SIEM exports and
queries select by them: a value never changes once released. Add a member for a new action.
"""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    # Agents and enrollment.
    AGENT_CREATE = "agent.create"
    AGENT_DELETE = "agent.delete"
    """The agent's erasure: the one record that keeps naming the agent."""
    ENROLLMENT_ADD = "enrollment.add"
    ENROLLMENT_REJECT_UTTERANCE = "enrollment.reject_utterance"
    ENROLLMENT_FINALIZE = "enrollment.finalize"
    ENROLLMENT_PASSIVE = "enrollment.passive"
    """Passive enrollment asked for (outcome "requested") or collected from a shift
    (details: the shift, the stretch's net speech)."""
    ENROLLMENT_HOLD = "enrollment.hold"
    """A new voiceprint held for HR review (details: the reason, the agent or watchlist entry
    it matches, the score and the bound)."""
    VOICEPRINT_APPROVE = "voiceprint.approve"
    VOICEPRINT_REJECT = "voiceprint.reject"

    # Verification decisions.
    VERIFY = "verify"
    SHIFT_LOGIN = "shift.login"
    SHIFT_CHECKPOINT = "shift.checkpoint"
    PRESENTATION_ATTACK = "presentation_attack"
    """A check or enrollment utterance taken for a presentation attack or a replay (details:
    the check's action, the PAD score, threshold, decision and whether it was enforced)."""

    # Shift state changes.
    SHIFT_START = "shift.start"
    SHIFT_RELOGIN = "shift.relogin"
    SHIFT_LOCK = "shift.lock"
    SHIFT_ADMIN_UNLOCK = "shift.admin_unlock"
    SHIFT_END = "shift.end"
    SHIFT_VOICE_CHANGE = "shift.voice_change"
    """The change watch suspected a change of voice and started a checkpoint (details: the
    stretch's similarity and the threshold); the checkpoint's own record says trigger."""
    SHIFT_SECOND_VOICE = "shift.second_voice"
    """Speech unlike the agent's between the agent's own (outcome REPORTED, or LOCKED where
    the policy locks on it)."""
    ASSURANCE_REVOKE = "assurance.revoke"
    """A shift's assurance revoked because the shift ended or locked."""

    # Throttling of failed verifications.
    THROTTLE_DISABLE = "throttle.disable"
    THROTTLE_RE_ENABLE = "throttle.re_enable"

    # Retention, keys, configuration, access.
    VOICEPRINT_EXPIRE = "voiceprint.expire"
    # The watchlist.
    WATCHLIST_ADD = "watchlist.add"
    WATCHLIST_DELETE = "watchlist.delete"
    WATCHLIST_EXPIRE = "watchlist.expire"
    WATCHLIST_MATCH = "watchlist.match"
    """A check or a new voiceprint matched a watchlist entry: an alert (details: the check,
    the entry, the score and the bound)."""
    KEY_REENCRYPT = "key.reencrypt"
    STORAGE_RECOVER = "storage.recover"
    """Agents whose creation a crash cut short, removed when the store opened."""
    CONFIGURATION = "configuration"
    ACCESS_DENIED = "access.denied"
    CONSOLE_SIGN_IN = "console.sign_in"
    """A supervisor or admin signed in to the console (details: who, and how)."""
    CONSOLE_SIGN_OUT = "console.sign_out"
