"""The storage interface. SQLite (server/sqlite_store.py) is the embedded default; a
distributed store will implement the same protocol later.

Every embedding crosses this interface in the clear and is encrypted by the implementation;
no raw audio is ever stored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from models.embedder import Embedding
from server.security.assurances import SigningKeyStore
from server.security.audit import AuditLog


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


class ShiftState(enum.Enum):
    VERIFIED = "VERIFIED"
    """The last login check passed and fewer than the allowed checkpoints failed since."""
    UNVERIFIED = "UNVERIFIED"
    """The login check did not pass (rejected or too little speech); a new one may."""
    LOCKED = "LOCKED"
    """Too many consecutive checkpoints failed; only a passing login check unlocks it."""
    ENDED = "ENDED"


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
class AuditEvent:
    """One audited action. Never holds audio, embeddings or keys."""

    action: str  # e.g. "agent.create", "enrollment.finalize", "verify"
    agent_id: str
    outcome: str  # e.g. "ok", "ACCEPT", "REJECT", "not_found"
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)


class VoiceprintStore(AuditLog, Protocol):
    """Agents, their pending enrollment utterances, their voiceprints, and the audit log
    (read as a hash chain through AuditLog).

    Implementations are thread-safe: methods are called from worker threads.
    """

    def create_agent(self, agent: AgentRecord) -> None:
        """Raises AgentExistsError if the id is taken."""

    def get_agent(self, agent_id: str) -> AgentRecord:
        """Raises AgentNotFoundError."""

    def delete_agent(self, agent_id: str) -> None:
        """Erases the agent, its pending utterances and its voiceprint in one transaction.
        Raises AgentNotFoundError."""

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        """Adds a pending utterance. Raises AgentNotFoundError, or CapacityError when the
        agent already has max_pending utterances."""

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        """Pending utterances, oldest first. Raises AgentNotFoundError."""

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        """Discards the given pending utterances."""

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        """Stores the voiceprint, replacing any previous one, and discards the consumed pending
        utterances, all in one transaction. Returns True if a previous voiceprint was replaced.
        Raises AgentNotFoundError."""

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        """The agent's voiceprint, or None if not enrolled. Raises AgentNotFoundError."""

    def voiceprints(self, model_id: str) -> list[Voiceprint]:
        """Every agent's voiceprint made by `model_id`: the agents' part of the
        score-normalisation cohort."""

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        """Records that a check scored against the agent's voiceprint at `at` (never moves the
        time back). Does nothing if the agent has no voiceprint (any more)."""

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        """Erases every voiceprint last used before `unused_before` (the agents stay) and
        returns their agents' ids."""

    def append_audit(self, event: AuditEvent) -> None:
        """Appends one audit record to the chain and seals it. While the agent exists the
        record names it by pseudonym only, so erasing the agent unlinks its records."""

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        """Audit records, oldest first, optionally for one agent. Records of an erased agent
        come back with an empty agent_id, except the record of its erasure."""

    def latest_audit_event(self, action: str) -> AuditEvent | None:
        """The newest audit record of `action`, if any."""

    def close(self) -> None: ...


class ShiftStore(Protocol):
    """Shift states. Thread-safe, like VoiceprintStore."""

    def create_shift(self, shift: ShiftRecord) -> None:
        """Raises AgentNotFoundError if the agent does not exist."""

    def get_shift(self, shift_id: str) -> ShiftRecord:
        """Raises ShiftNotFoundError."""

    def update_shift(self, shift: ShiftRecord) -> None:
        """Replaces the stored state of an existing shift. Raises ShiftNotFoundError."""


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


class AssuranceStore(SigningKeyStore, Protocol):
    """Signing keys (sealed), the assurances issued with them and their revocations.
    Thread-safe."""

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        """Keeps `assurance` as its shift's latest, replacing an earlier one (whose revocation,
        if any, stands)."""

    def get_assurance(self, shift_id: str) -> AssuranceRecord | None: ...

    def revoke_assurance(
        self, shift_id: str, reason: RevocationReason, at: datetime
    ) -> AssuranceRevocation | None:
        """Revokes the shift's latest assurance in one atomic step and returns the revocation;
        None when the shift has no assurance or its latest is revoked already (the first
        revocation stands)."""

    def get_revocation(self, token_id: str) -> AssuranceRevocation | None:
        """The revocation of the assurance whose jti is `token_id`; None if it has none."""


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


class ThrottleStore(Protocol):
    """Throttling state per agent. Thread-safe, like VoiceprintStore."""

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        """Replaces the agent's state (ThrottleState() if it has none) with `update(state)` in
        one atomic step, and returns the state it replaced. An exception from `update` changes
        nothing and propagates; `update` must be quick and must not call the store. Raises
        AgentNotFoundError."""


@dataclass(frozen=True)
class ReencryptionReport:
    """Rows whose sealed embeddings `reencrypt_all` moved to the current key."""

    voiceprints: int
    pending_utterances: int


class KeyRotationStore(Protocol):
    """What rotating the encryption key needs of the store. Thread-safe."""

    def sealing_key_ids(self) -> dict[str, int]:
        """How many sealed values (embeddings, signing keys) each key id has sealed."""

    def reencrypt_all(self, batch_size: int) -> ReencryptionReport:
        """Re-seals under the current key every voiceprint and pending utterance sealed under
        a previous one, `batch_size` rows per transaction so the service keeps running."""


class Store(VoiceprintStore, ShiftStore, AssuranceStore, ThrottleStore, KeyRotationStore, Protocol):
    """Everything the service keeps: one interface, so a distributed store can replace SQLite."""
