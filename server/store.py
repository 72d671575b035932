"""The storage interface. SQLite (server/sqlite_store.py) is the embedded default; a
distributed store will implement the same protocol later.

Every embedding crosses this interface in the clear and is encrypted by the implementation;
no raw audio is ever stored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

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


class VoiceprintStore(Protocol):
    """Agents, their pending enrollment utterances, their voiceprints, and the audit log.

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

    def append_audit(self, event: AuditEvent) -> None:
        """Appends one audit record."""

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        """Audit records, oldest first, optionally for one agent."""

    def close(self) -> None: ...


class ShiftStore(Protocol):
    """Shift states. Thread-safe, like VoiceprintStore."""

    def create_shift(self, shift: ShiftRecord) -> None:
        """Raises AgentNotFoundError if the agent does not exist."""

    def get_shift(self, shift_id: str) -> ShiftRecord:
        """Raises ShiftNotFoundError."""

    def update_shift(self, shift: ShiftRecord) -> None:
        """Replaces the stored state of an existing shift. Raises ShiftNotFoundError."""


class Store(VoiceprintStore, ShiftStore, Protocol):
    """Everything the service keeps: one interface, so a distributed store can replace SQLite."""
