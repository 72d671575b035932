"""The storage backend: plain rows and opaque sealed bytes, read and written inside explicit
transactions. SQLite (server/storage/sqlite/) is the embedded backend; another database
implements the same two protocols and passes the same contract suite (tests/contract).

A backend knows nothing of keys, hashes or pseudonyms: it stores what SecureStore
(server/storage/secure_store.py) gives it and hands it back unchanged. Every security
invariant (sealing, per-agent data keys, the audit chain and its sealed head, pseudonyms, what
audit details may hold) is SecureStore's, so every backend has it by construction.

How rows name an agent: the agent's own row by its handle (a keyed hash of its id), every
other row by its audit pseudonym (`agent_ref`), the name its audit records carry. Only the
agent's sealed identity links the two, so once its data key is destroyed nothing left in any
copy links its rows, or its audit records, to it.

Times are timezone-aware datetimes; a backend refuses a naive one with ValueError and hands
times back in UTC. Every id is a string.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.records import (
    AssuranceRevocation,
    ShiftCursor,
    ShiftLease,
    ShiftState,
    StoreCensus,
    ThrottleState,
)
from server.security.assurances import StoredSigningKey
from server.security.audit import AuditEntry, AuditHead


@dataclass(frozen=True)
class AgentRow:
    agent_handle: str
    """A keyed hash of the agent id: how the agent is found, revealing nothing of the id."""
    sealed_identity: bytes
    """The agent's id, display name, consent reference, creation time and audit pseudonym,
    sealed under its data key."""


@dataclass(frozen=True)
class AgentKeyRow:
    agent_handle: str
    wrapped_key: bytes
    """The agent's data key, sealed under the service key."""


@dataclass(frozen=True)
class UtteranceRow:
    """A pending utterance with its embeddings sealed."""

    utterance_id: str
    agent_ref: str
    model_id: str
    sealed_embedding: bytes
    duration_seconds: float
    net_speech_seconds: float
    speech_level_dbfs: float
    clipped_fraction: float
    received_at: datetime
    sealed_telephone_embedding: bytes | None


@dataclass(frozen=True)
class FingerprintRow:
    """A replay fingerprint with its embeddings sealed."""

    agent_ref: str
    model_id: str
    origin: str
    recorded_at: datetime
    sealed_embedding: bytes
    sealed_telephone_embedding: bytes | None


@dataclass(frozen=True)
class VoiceprintRow:
    """A voiceprint with its embeddings sealed."""

    agent_ref: str
    model_id: str
    sealed_embedding: bytes
    created_at: datetime
    utterance_count: int
    net_speech_seconds: float
    sealed_telephone_embedding: bytes | None
    last_used_at: datetime


@dataclass(frozen=True)
class HeldVoiceprintRow:
    """A voiceprint held for HR review (enrollment/review.py), its embeddings sealed under
    the agent's key as a held voiceprint (they do not open as an active one)."""

    voiceprint: VoiceprintRow
    reason: str
    held_at: datetime
    matched_agent_ref: str
    """The pseudonym of the agent it matches, "" for none."""
    matched_entry_id: str
    similarity: float


@dataclass(frozen=True)
class WatchlistRow:
    """A watchlist entry, its embeddings and its label and legal basis sealed under the
    store's watchlist key, each blob bound to the entry."""

    entry_id: str
    model_id: str
    sealed_embedding: bytes
    sealed_telephone_embedding: bytes | None
    sealed_details: bytes
    added_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class ShiftRow:
    shift_id: str
    agent_ref: str
    device_id: str
    state: ShiftState
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    consecutive_failures: int
    checkpoints_passed: int
    checkpoints_failed: int
    checkpoints_insufficient: int


@dataclass(frozen=True)
class AssuranceRow:
    """A shift's latest assurance, its token (a bearer credential naming the agent) sealed."""

    shift_id: str
    agent_ref: str
    token_id: str
    sealed_token: bytes
    issued_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class CompletedRequestRow:
    """A request id's completion (server/runtime/requests.py), found by a keyed hash of its
    key, its response sealed under the data key of the agent it names."""

    request_handle: str
    """A keyed hash of (caller, method, request id)."""
    request_digest: str
    """A keyed hash of the request's digest."""
    agent_ref: str | None
    """The pseudonym of the agent the response names, None for a response naming nobody
    (kept in clear); erasing the agent deletes the row."""
    response: bytes
    expires_at: datetime


@dataclass(frozen=True)
class EventRow:
    """A shift event for the replicas' event bus (server/shifts/event_bus.py), sealed under
    its agent's data key; erased with the agent."""

    event_id: int
    """Increasing in commit order (writes commit one after another), never reused."""
    agent_ref: str
    sealed_payload: bytes
    at: datetime


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
    """One open transaction. Used by one thread at a time, only inside its `with` block."""

    # --- agents ------------------------------------------------------------------------------

    def insert_agent(self, row: AgentRow) -> bool:
        """False (and nothing written) if an agent with the handle exists."""

    def agent(self, agent_handle: str) -> AgentRow | None: ...

    def agents(self) -> list[AgentRow]:
        """Every agent, in no particular order."""

    def delete_agent(self, agent_handle: str, agent_ref: str) -> bool:
        """Deletes the agent's row and every row under `agent_ref` except audit rows: pending
        utterances, voiceprint, held voiceprint, passive enrollment mark, replay fingerprints,
        shifts with their assurances, revocations and leases, throttling state, completed
        requests, shift events. False if there was no such agent."""

    # --- data keys ---------------------------------------------------------------------------
    # Kept apart from the rows, so that deleting one destroys it in every copy the backend
    # controls when the transaction commits (SQLite: a rollback-journal file with
    # secure_delete, outside the WAL whose old frames outlive a commit).

    def agent_key(self, agent_handle: str) -> bytes | None:
        """The agent's wrapped data key."""

    def put_agent_key(self, row: AgentKeyRow) -> None:
        """Stores the agent's wrapped key, replacing (and destroying) any it had."""

    def delete_agent_key(self, agent_handle: str) -> None: ...

    def agent_key_page(self, after_handle: str, limit: int) -> list[AgentKeyRow]:
        """At most `limit` agent keys with a handle after the given one, by handle: a walk
        over all of them."""

    def store_key(self, name: str) -> bytes | None:
        """A wrapped key of the store itself (not of one agent)."""

    def put_store_key(self, name: str, wrapped_key: bytes) -> None: ...

    # --- pending utterances ------------------------------------------------------------------

    def insert_utterance(self, row: UtteranceRow) -> None: ...

    def utterances(self, agent_ref: str) -> list[UtteranceRow]:
        """The agent's pending utterances, by time received, then by insertion."""

    def delete_utterances(self, agent_ref: str, utterance_ids: Sequence[str]) -> None:
        """Deletes those of the ids that are the agent's pending utterances."""

    # --- replay fingerprints ------------------------------------------------------------------

    def insert_fingerprint(self, row: FingerprintRow) -> None: ...

    def fingerprints(self, agent_ref: str) -> list[FingerprintRow]:
        """The agent's replay fingerprints, oldest first."""

    def prune_fingerprints(
        self, agent_ref: str, origin: str, recorded_before: datetime, keep: int
    ) -> None:
        """Deletes the agent's fingerprints of `origin` recorded before `recorded_before`, and
        all but the newest `keep` of the rest."""

    # --- voiceprints -------------------------------------------------------------------------

    def voiceprint(self, agent_ref: str) -> VoiceprintRow | None: ...

    def voiceprints(self, model_id: str) -> list[VoiceprintRow]:
        """Every voiceprint made by the model, in no particular order."""

    def put_voiceprint(self, row: VoiceprintRow) -> bool:
        """Stores the agent's voiceprint, replacing any; True if one was replaced."""

    def mark_voiceprint_used(self, agent_ref: str, at: datetime) -> None:
        """Moves the voiceprint's last use to `at` unless it is later already; nothing if
        the agent has no voiceprint."""

    def delete_voiceprints_unused_before(self, cutoff: datetime) -> list[str]:
        """Deletes the voiceprints last used before `cutoff`; their agent_refs."""

    # --- passive enrollment and held voiceprints ---------------------------------------------

    def put_passive_enrollment(self, agent_ref: str, requested_at: datetime) -> None:
        """Marks the agent for passive enrollment from its shifts (replacing any mark)."""

    def passive_enrollment(self, agent_ref: str) -> datetime | None:
        """When passive enrollment was asked for; None if it was not (or has ended)."""

    def delete_passive_enrollment(self, agent_ref: str) -> None: ...

    def put_held_voiceprint(self, row: HeldVoiceprintRow) -> None:
        """Keeps it as the agent's held voiceprint, replacing any."""

    def held_voiceprint(self, agent_ref: str) -> HeldVoiceprintRow | None: ...

    def delete_held_voiceprint(self, agent_ref: str) -> bool:
        """False if the agent had none."""

    # --- the watchlist -----------------------------------------------------------------------

    def insert_watchlist_entry(self, row: WatchlistRow) -> None: ...

    def watchlist(self) -> list[WatchlistRow]:
        """Every entry, oldest first."""

    def delete_watchlist_entry(self, entry_id: str) -> bool:
        """False if there was no such entry."""

    def delete_watchlist_expired(self, at: datetime) -> list[str]:
        """Deletes the entries expired at `at` (expires_at <= at); their ids."""

    # --- shifts, throttling, signing keys, assurances ----------------------------------------

    def insert_shift(self, row: ShiftRow) -> None: ...

    def shift(self, shift_id: str) -> ShiftRow | None: ...

    def update_shift(self, row: ShiftRow) -> bool:
        """False if there is no shift with the id."""

    def shifts_page(
        self, states: Collection[ShiftState], limit: int, before: ShiftCursor | None
    ) -> list[ShiftRow]:
        """Up to `limit` shifts in `states` (any state when empty), the latest started first
        (ties by shift id, descending), starting after `before`."""

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        """The shift's lease (server/shifts/lease.py); None if it never had one."""

    def put_shift_lease(self, lease: ShiftLease) -> None:
        """Stores the lease of an existing shift, replacing any; it goes with the shift."""

    def throttle_state(self, agent_ref: str) -> ThrottleState:
        """ThrottleState() for an agent without one."""

    def put_throttle_state(self, agent_ref: str, state: ThrottleState) -> None: ...

    def census(self, delay_after_failures: int) -> StoreCensus:
        """Open shifts by state and throttled agents (see CensusStore)."""

    def signing_keys(self) -> list[StoredSigningKey]: ...

    def replace_signing_keys(self, keys: Sequence[StoredSigningKey]) -> None:
        """The stored signing keys become exactly `keys`."""

    def put_assurance(self, row: AssuranceRow) -> None:
        """Keeps it as its shift's assurance, replacing any."""

    def assurance(self, shift_id: str) -> AssuranceRow | None: ...

    def insert_revocation(self, revocation: AssuranceRevocation) -> None:
        """Keeps the revocation, under its token id, for as long as its shift is kept."""

    def revocation(self, token_id: str) -> AssuranceRevocation | None: ...

    # --- completed requests ------------------------------------------------------------------

    def completed_request(self, request_handle: str) -> CompletedRequestRow | None: ...

    def put_completed_request(self, row: CompletedRequestRow) -> None:
        """Keeps it, replacing any row with the handle."""

    def delete_completed_requests_expired(self, at: datetime) -> int:
        """Deletes the rows expired at `at` (expires_at <= at); how many."""

    # --- shift events ------------------------------------------------------------------------

    def insert_event(self, agent_ref: str, sealed_payload: bytes, at: datetime) -> int:
        """Keeps the event; its id, higher than every id before it. A backend that can wake
        other replicas (PostgreSQL's NOTIFY) tells them of it when the transaction commits."""

    def events_after(self, after_id: int, limit: int) -> list[EventRow]:
        """At most `limit` events with an id above `after_id`, by id."""

    def latest_event_id(self) -> int:
        """The highest id given so far; 0 before any. Never one of a write still in progress
        (its event not yet readable): every event up to it that commits has committed."""

    def delete_events_before(self, at: datetime) -> None: ...

    # --- the audit chain ---------------------------------------------------------------------

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
        is never overtaken by another writer, and its commit cannot fail for a lock."""

    def discard_erased(self) -> None:
        """After a commit that erased rows: removes the backend's own leftover copies of
        them (old log frames, free pages) as far as it can now. Erasure does not depend on
        it (the erased data's key is gone); it only leaves less ciphertext behind."""

    def interrupted_commit(self) -> bool:
        """Whether the backend found, when it opened, a commit a crash had cut short: the
        one way an agent can be left without its data key."""

    def close(self) -> None: ...
