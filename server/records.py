"""What the service keeps, as the domain sees it: frozen records that cross the storage
interface (server/storage/interface.py). Embeddings appear here in the clear; the store seals
them before any backend sees them. No raw audio is ever stored.

Below both server.storage and server.security: the store seals and chains these records with
security's primitives, and security's services (the assurance desk, key rotation, the
configuration audit) build them, so neither package needs the other's records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from models.embedder import Embedding


@dataclass(frozen=True)
class AgentRecord:
    agent_id: str
    display_name: str
    consent_reference: str
    created_at: datetime


@dataclass(frozen=True)
class UtteranceRecord:
    """One accepted enrollment utterance: its embedding and quality figures, not its audio."""

    utterance_id: str
    agent_id: str
    model_id: str
    embedding: Embedding
    duration_seconds: float
    net_speech_seconds: float
    speech_level_dbfs: float
    clipped_fraction: float
    received_at: datetime
    telephone_embedding: Embedding | None = None
    """The utterance's speech as heard over a simulated G.711 call, embedded: what the
    companion voiceprint is made of (None for utterances stored before it existed)."""


class RecordingOrigin(enum.Enum):
    """Where a replay fingerprint comes from."""

    ENROLLMENT = "enrollment"
    """An utterance the voiceprint was made of: kept as long as the voiceprint."""
    CHECK = "check"
    """A verification, login check or checkpoint: kept for the replay window."""


@dataclass(frozen=True)
class ReplayFingerprint:
    """What a recording of the agent is recognised by when it is played again: the embedding
    of its speech (and, for enrollment utterances, their telephone companion), which says
    nothing recoverable about the audio."""

    agent_id: str
    model_id: str
    origin: RecordingOrigin
    recorded_at: datetime
    embedding: Embedding
    telephone_embedding: Embedding | None = None


@dataclass(frozen=True)
class Voiceprint:
    agent_id: str
    model_id: str
    embedding: Embedding
    created_at: datetime
    utterance_count: int
    net_speech_seconds: float
    telephone_embedding: Embedding | None = None
    """The companion voiceprint that telephone-band checks are compared with, made from the
    same enrollment speech through a simulated G.711 call; None for voiceprints made before
    companions existed (their telephone checks are scored across channels)."""
    last_used_at: datetime | None = None
    """When a check last scored against it (its enrollment until then), to the hour: what
    retention counts from. None in a voiceprint not yet stored."""


@dataclass(frozen=True)
class AgentOverview:
    """One agent as HR lists it: its record, its pending enrollment and its voiceprint."""

    agent: AgentRecord
    pending_utterances: int
    pending_net_speech_seconds: float
    voiceprint: Voiceprint | None


class ShiftState(enum.Enum):
    VERIFIED = "VERIFIED"
    """The last login check passed and fewer than the allowed checkpoints failed since."""
    UNVERIFIED = "UNVERIFIED"
    """The login check did not pass (rejected or too little speech); a new one may."""
    LOCKED = "LOCKED"
    """Too many consecutive checkpoints failed; only a passing login check unlocks it."""
    ENDED = "ENDED"
    NOT_ENROLLED = "NOT_ENROLLED"
    """The agent has no voiceprint yet: its passive enrollment collects the shift's speech.
    Never verified, no assurance: voice is not a factor of this shift."""


@dataclass(frozen=True)
class ShiftRecord:
    """A shift's state: what survives a restart. Never any audio."""

    shift_id: str
    agent_id: str
    device_id: str
    state: ShiftState
    started_at: datetime
    updated_at: datetime
    consecutive_failures: int = 0
    checkpoints_passed: int = 0
    checkpoints_failed: int = 0
    checkpoints_insufficient: int = 0
    ended_at: datetime | None = None


@dataclass(frozen=True)
class ShiftCursor:
    """Where a page of shifts (latest started first) ended: the last shift it held."""

    started_at: datetime
    shift_id: str

    @classmethod
    def after(cls, shift: ShiftRecord) -> ShiftCursor:
        return cls(shift.started_at, shift.shift_id)


@dataclass(frozen=True)
class ShiftLease:
    """Which replica owns a shift now, and where its checkpoint schedule stands
    (server/shifts/lease.py). Holds no personal data: a replica id, counters and times."""

    shift_id: str
    owner: str
    """The replica that took it last."""
    token: int
    """The fencing token: one more on every takeover. A shift write carries the token its
    writer holds and is refused unless it is still the stored one."""
    attached: bool
    """Whether the owner took it for a softphone's stream (False: for a one-off write, such
    as an unlock, that the stream's replica may take back)."""
    expires_at: datetime
    """Renewed while the owner holds the stream; past it, the owner stops serving the stream
    (it cannot reach the store) so the softphone moves to another replica."""
    checkpoint_seq: int = 0
    """How many checkpoints the shift has decided: the next one is number seq + 1."""
    next_checkpoint_at: datetime | None = None
    """When the next checkpoint is due; None until one is drawn (or while not verified)."""


@dataclass(frozen=True)
class AuditEvent:
    """One audited action. Never holds audio, embeddings or keys."""

    action: str  # e.g. "agent.create", "enrollment.finalize", "verify"
    agent_id: str
    outcome: str  # e.g. "ok", "ACCEPT", "REJECT", "not_found"
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AssuranceRecord:
    """The latest signed assurance of a shift, kept for the MFA provider to fetch."""

    shift_id: str
    agent_id: str
    token_id: str
    token: str
    issued_at: datetime
    expires_at: datetime


class RevocationReason(enum.Enum):
    """Why an assurance no longer stands. The values are stored: they never change."""

    SHIFT_ENDED = "shift ended"
    SHIFT_LOCKED = "shift locked"


@dataclass(frozen=True)
class AssuranceRevocation:
    """One revoked assurance, named by its token id (jti). Kept as long as its shift, so the
    token stays refused after a newer assurance of the shift replaces its record."""

    token_id: str
    shift_id: str
    reason: RevocationReason
    revoked_at: datetime


@dataclass(frozen=True)
class ThrottleState:
    """An agent's run of failed verification attempts: what throttling needs to survive a
    restart."""

    consecutive_failures: int = 0
    """Failed attempts since the last ACCEPT, counting attempts still being decided."""
    last_failure_at: datetime | None = None
    """When the latest of them failed (or, while being decided, began)."""
    disabled_at: datetime | None = None
    """When too many failures disabled the agent's verification; None while enabled."""


@dataclass(frozen=True)
class ReencryptionReport:
    """What `reencrypt_all` moved to the current key."""

    data_keys: int
    """Data keys (the agents' and the store's own) wrapped anew; what they seal stays."""


@dataclass(frozen=True)
class StoreCensus:
    """What monitoring counts in the store, read in one transaction (no agent is named)."""

    open_shifts: dict[ShiftState, int]
    """Shifts not ended, by state (every state but ENDED present, zero where none)."""
    agents_delayed: int
    """Agents whose next verification attempt must wait (throttled), not disabled."""
    agents_disabled: int
    """Agents whose biometric verification is disabled until an administrator re-enables it."""


class HoldReason(enum.Enum):
    """Why a new voiceprint waits for HR instead of becoming active. The values are stored."""

    DUPLICATE = "duplicate"
    """It matches another agent's voiceprint: one person under two agent ids, or a voiceprint
    enrolled from someone else's voice."""
    WATCHLIST = "watchlist"
    """It matches a watchlist entry."""
    APPROVAL = "approval"
    """Policy: a passively enrolled voiceprint becomes active only once HR approves it."""


@dataclass(frozen=True)
class HeldVoiceprint:
    """A voiceprint built but not active: no check scores against it until HR approves it."""

    voiceprint: Voiceprint
    reason: HoldReason
    held_at: datetime
    matched_agent_id: str = ""
    """DUPLICATE: the agent it matches ("" once that agent is erased)."""
    matched_entry_id: str = ""
    """WATCHLIST: the entry it matches."""
    similarity: float = 0.0
    """The calibrated score (AS-norm) of the match; 0 for APPROVAL."""


@dataclass(frozen=True)
class WatchlistEntry:
    """The voice of a known fraudster or dismissed employee: sealed like a voiceprint, kept
    only until `expires_at` and only under a recorded legal basis."""

    entry_id: str
    label: str
    legal_basis: str
    model_id: str
    embedding: Embedding
    added_at: datetime
    expires_at: datetime
    net_speech_seconds: float
    telephone_embedding: Embedding | None = None
