"""The storage backend: plain rows and opaque sealed bytes, read and written inside explicit
transactions. SQLite (server/storage/sqlite/) is the embedded backend; another database
implements the same two protocols and passes the same contract suite (tests/contract).

A backend knows nothing of keys, hashes or pseudonyms: it stores what SecureStore
(server/storage/secure_store.py) gives it and hands it back unchanged. Every security
invariant (sealing, the audit chain and its sealed head, pseudonyms, what audit details may
hold) is SecureStore's, so every backend has it by construction.

Times are timezone-aware datetimes; a backend refuses a naive one with ValueError and hands
times back in UTC. Every id is a string.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.security.assurances import StoredSigningKey
from server.security.audit import AuditEntry, AuditHead
from server.storage.records import AssuranceRecord, ShiftRecord, ThrottleState


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    display_name: str
    consent_reference: str
    created_at: datetime
    audit_pseudonym: str
    """The random name the agent's audit records carry; unique among agents."""


@dataclass(frozen=True)
class UtteranceRow:
    """A pending utterance with its embeddings sealed."""

    utterance_id: str
    agent_id: str
    model_id: str
    sealed_embedding: bytes
    duration_seconds: float
    net_speech_seconds: float
    speech_level_dbfs: float
    clipped_fraction: float
    received_at: datetime
    sealed_telephone_embedding: bytes | None


@dataclass(frozen=True)
class VoiceprintRow:
    """A voiceprint with its embeddings sealed."""

    agent_id: str
    model_id: str
    sealed_embedding: bytes
    created_at: datetime
    utterance_count: int
    net_speech_seconds: float
    sealed_telephone_embedding: bytes | None
    last_used_at: datetime


@dataclass(frozen=True)
class AuditRow:
    """One stored record of the audit chain, exactly as written (see server/security/audit.py)."""

    seq: int
    entry: AuditEntry
    prev_hash: str
    hash: str
    key_id: str | None
    mac: str | None


class Transaction(Protocol):
    """One open transaction. Used by one thread at a time, only inside its `with` block.

    Deleting an agent deletes everything that names it except audit rows: its pending
    utterances, its voiceprint, its shifts with their assurances, its throttling state.
    """

    # --- agents ----------------------------------------------------------------------------

    def insert_agent(self, row: AgentRow) -> bool:
        """False (and nothing written) if an agent with the id exists."""

    def agent(self, agent_id: str) -> AgentRow | None: ...

    def agents(self) -> list[AgentRow]:
        """Every agent, in no particular order."""

    def agents_by_pseudonym(self, pseudonyms: Collection[str]) -> list[AgentRow]:
        """The agents with any of these audit pseudonyms, in no particular order."""

    def delete_agent(self, agent_id: str) -> bool:
        """False if there was no such agent."""

    # --- pending utterances ----------------------------------------------------------------

    def insert_utterance(self, row: UtteranceRow) -> None: ...

    def utterances(self, agent_id: str) -> list[UtteranceRow]:
        """The agent's pending utterances, by time received, then by insertion."""

    def utterance_page(self, after_utterance_id: str, limit: int) -> list[UtteranceRow]:
        """At most `limit` pending utterances of any agent with an id after the given one,
        by id: a walk over all of them."""

    def update_utterance(self, row: UtteranceRow) -> None:
        """Replaces the stored utterance with the same id."""

    def delete_utterances(self, agent_id: str, utterance_ids: Sequence[str]) -> None:
        """Deletes those of the ids that are the agent's pending utterances."""

    # --- voiceprints -----------------------------------------------------------------------

    def voiceprint(self, agent_id: str) -> VoiceprintRow | None: ...

    def voiceprints(self, model_id: str) -> list[VoiceprintRow]:
        """Every voiceprint made by the model, by agent id."""

    def voiceprint_page(self, after_agent_id: str, limit: int) -> list[VoiceprintRow]:
        """At most `limit` voiceprints of agents with an id after the given one, by agent
        id: a walk over all of them."""

    def put_voiceprint(self, row: VoiceprintRow) -> bool:
        """Stores the agent's voiceprint, replacing any; True if one was replaced."""

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        """Moves the voiceprint's last use to `at` unless it is later already; nothing if
        the agent has no voiceprint."""

    def delete_voiceprints_unused_before(self, cutoff: datetime) -> list[str]:
        """Deletes the voiceprints last used before `cutoff`; their agents' ids, sorted."""

    # --- shifts, throttling, signing keys, assurances --------------------------------------

    def insert_shift(self, shift: ShiftRecord) -> None: ...

    def shift(self, shift_id: str) -> ShiftRecord | None: ...

    def update_shift(self, shift: ShiftRecord) -> bool:
        """False if there is no shift with the id."""

    def throttle_state(self, agent_id: str) -> ThrottleState:
        """ThrottleState() for an agent without one."""

    def put_throttle_state(self, agent_id: str, state: ThrottleState) -> None: ...

    def signing_keys(self) -> list[StoredSigningKey]: ...

    def replace_signing_keys(self, keys: Sequence[StoredSigningKey]) -> None:
        """The stored signing keys become exactly `keys`."""

    def put_assurance(self, assurance: AssuranceRecord) -> None:
        """Keeps it as its shift's assurance, replacing any."""

    def assurance(self, shift_id: str) -> AssuranceRecord | None: ...

    # --- the audit chain -------------------------------------------------------------------

    def audit_head(self) -> AuditHead | None: ...

    def put_audit_head(self, head: AuditHead) -> None: ...

    def insert_audit_row(self, row: AuditRow) -> None: ...

    def update_audit_row(self, row: AuditRow) -> None:
        """Replaces the stored row with the same seq."""

    def audit_rows(self, after_seq: int, limit: int) -> list[AuditRow]:
        """At most `limit` rows with seq > after_seq, by seq. A value someone rewrote with
        another type comes back as text, so it fails its hash rather than the read."""

    def latest_audit_row(self, action: str) -> AuditRow | None:
        """The row of `action` with the highest seq."""

    def audit_rows_sealed_by_other_keys(self, key_id: str, limit: int) -> list[AuditRow]:
        """At most `limit` sealed rows whose key_id is not `key_id`, by seq."""


class StorageBackend(Protocol):
    """A database holding the rows. Thread-safe: transactions from several threads run one
    after another (or, for a backend that can, side by side with the same outcome).

    Errors of the database become StorageError naming `what`; an exception raised inside a
    transaction's block rolls it back and propagates unchanged.
    """

    def transaction(self, what: str, *, write: bool) -> AbstractContextManager[Transaction]:
        """Begins a transaction, commits it when the block ends, rolls it back if it raises.
        A write transaction holds the write lock from its start, so a read-then-write in it
        is never overtaken by another writer."""

    def discard_erased(self) -> None:
        """After a commit that erased rows: removes the backend's own leftover copies of
        them (old log frames, free pages) as far as it can now, and logs what it could not."""

    def close(self) -> None: ...
