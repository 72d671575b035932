"""Sealing above the backend. Each agent has a data key of its own, stored only wrapped under
the service key: everything of the agent that could identify it or is biometric (its id,
display name, consent reference and audit pseudonym; its embeddings; its assurance tokens) is
sealed under that key before any backend sees it, each blob bound to its row. Destroying the
wrapped key, as erasure does, leaves every copy of those blobs unreadable (crypto-shredding).

The agent's own row is found by a handle, a keyed hash of its id under a key of the store, so
no row holds the id in clear. Which service key wrapped a key is read from the blob's own
header here, in Python, so every backend gets the same check of the keys a database needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from models.embedder import Embedding
from server.errors import ConfigurationError, StorageError
from server.records import (
    AgentRecord,
    AssuranceRecord,
    HeldVoiceprint,
    HoldReason,
    RecordingOrigin,
    ReplayFingerprint,
    ShiftRecord,
    UtteranceRecord,
    Voiceprint,
    WatchlistEntry,
)
from server.security.crypto import (
    DataKey,
    RecordKind,
    VoiceprintCipher,
    associated_data,
    binding,
    sealing_key_id,
)
from server.storage.backend import (
    AgentKeyRow,
    AgentRow,
    AssuranceRow,
    FingerprintRow,
    HeldVoiceprintRow,
    ShiftRow,
    Transaction,
    UtteranceRow,
    VoiceprintRow,
    WatchlistRow,
)

HANDLE_KEY = "agent handles"
"""The store key that agent handles are computed with."""
WATCHLIST_KEY = "watchlist"
"""The store key that watchlist entries are sealed under."""
STORE_KEYS = (HANDLE_KEY, WATCHLIST_KEY)
_HANDLE_HEX = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class AgentIdentity:
    """What an agent's sealed identity holds."""

    agent_id: str
    display_name: str
    consent_reference: str
    created_at: datetime
    audit_pseudonym: str
    """The random name the agent's audit records and its other rows carry."""

    def record(self) -> AgentRecord:
        return AgentRecord(
            self.agent_id, self.display_name, self.consent_reference, self.created_at
        )


class KeyRing:
    """The store's keys: the service cipher, and the handle key it wraps. Thread-safe (holds
    no mutable state)."""

    def __init__(self, cipher: VoiceprintCipher, handle_key: DataKey) -> None:
        self.cipher = cipher
        self._handle_key = handle_key.raw

    @classmethod
    def load(cls, txn: Transaction, cipher: VoiceprintCipher, *, may_create: bool) -> KeyRing:
        """The key ring of the store `txn` belongs to, its handle key created when missing if
        `may_create` (a store with agents but no handle key has lost its key file)."""
        wrapped = txn.store_key(HANDLE_KEY)
        if wrapped is None:
            if not may_create:
                raise StorageError(
                    "the database holds agents but not the keys they are sealed under: its key "
                    "file (next to the database, ending in -keys) is missing; restore it with "
                    "the database"
                )
            key = DataKey.generate()
            txn.put_store_key(HANDLE_KEY, cipher.wrap_key(key, associated=_store_binding()))
            return cls(cipher, key)
        return cls(cipher, cipher.unwrap_key(wrapped, associated=_store_binding()))

    def handle(self, agent_id: str) -> str:
        """The agent's handle: the same for the same id, meaningless without the key."""
        digest = hmac.new(self._handle_key, agent_id.encode(), hashlib.sha256).hexdigest()
        return digest[:_HANDLE_HEX]

    def new_agent_key(self, agent_handle: str) -> tuple[DataKey, AgentKeyRow]:
        key = DataKey.generate()
        return key, AgentKeyRow(agent_handle, self.wrap(agent_handle, key))

    def wrap(self, agent_handle: str, key: DataKey) -> bytes:
        return self.cipher.wrap_key(key, associated=_agent_key_binding(agent_handle))

    def agent_key(self, agent_handle: str, wrapped: bytes) -> DataKey:
        """The agent's data key; StorageError if it is not the key of this handle."""
        return self.cipher.unwrap_key(wrapped, associated=_agent_key_binding(agent_handle))

    def rewrap_store_key(self, txn: Transaction) -> bool:
        """Wraps the handle key anew under the current service key unless it is already;
        whether it was."""
        wrapped = txn.store_key(HANDLE_KEY)
        if wrapped is None or sealing_key_id(wrapped) == self.cipher.key_id:
            return False
        txn.put_store_key(HANDLE_KEY, self.cipher.reseal(wrapped, associated=_store_binding()))
        return True

    def watchlist_key(self, txn: Transaction, *, create: bool) -> DataKey | None:
        """The key watchlist entries are sealed under, made (in a write transaction) the first
        time one is added; None when there is none and `create` is False."""
        associated = _store_binding(WATCHLIST_KEY)
        wrapped = txn.store_key(WATCHLIST_KEY)
        if wrapped is not None:
            return self.cipher.unwrap_key(wrapped, associated=associated)
        if not create:
            return None
        key = DataKey.generate()
        txn.put_store_key(WATCHLIST_KEY, self.cipher.wrap_key(key, associated=associated))
        return key

    def rewrap_watchlist_key(self, txn: Transaction) -> bool:
        """As `rewrap_store_key`, for the watchlist key."""
        wrapped = txn.store_key(WATCHLIST_KEY)
        if wrapped is None or sealing_key_id(wrapped) == self.cipher.key_id:
            return False
        associated = _store_binding(WATCHLIST_KEY)
        txn.put_store_key(WATCHLIST_KEY, self.cipher.reseal(wrapped, associated=associated))
        return True

    def rewrap_agent_key(self, txn: Transaction, row: AgentKeyRow) -> bool:
        """As `rewrap_store_key`, for one agent's data key."""
        if sealing_key_id(row.wrapped_key) == self.cipher.key_id:
            return False
        associated = _agent_key_binding(row.agent_handle)
        txn.put_agent_key(
            AgentKeyRow(
                row.agent_handle, self.cipher.reseal(row.wrapped_key, associated=associated)
            )
        )
        return True


class AgentSealer:
    """One agent with its data key open: seals its rows, and opens them. Thread-safe (holds
    no mutable state)."""

    def __init__(self, agent_handle: str, key: DataKey, identity: AgentIdentity) -> None:
        self.agent_handle = agent_handle
        self.identity = identity
        self._key = key

    @classmethod
    def open(cls, row: AgentRow, key: DataKey) -> AgentSealer:
        """The agent of `row`; StorageError if its identity does not open under `key` (swapped
        with another agent's, or altered)."""
        plain = key.open(
            row.sealed_identity,
            associated=_identity_binding(row.agent_handle),
            what=f"the identity of agent row {row.agent_handle[:12]}",
        )
        fields = json.loads(plain)
        return cls(
            row.agent_handle,
            key,
            AgentIdentity(
                fields["agent_id"],
                fields["display_name"],
                fields["consent_reference"],
                _from_micros(fields["created_at"]),
                fields["audit_pseudonym"],
            ),
        )

    @classmethod
    def new(
        cls, agent_handle: str, key: DataKey, identity: AgentIdentity
    ) -> tuple[AgentSealer, AgentRow]:
        """A new agent and its row."""
        sealer = cls(agent_handle, key, identity)
        fields = {
            "agent_id": identity.agent_id,
            "display_name": identity.display_name,
            "consent_reference": identity.consent_reference,
            "created_at": to_micros(identity.created_at),
            "audit_pseudonym": identity.audit_pseudonym,
        }
        sealed = key.seal(
            json.dumps(fields, sort_keys=True).encode(),
            associated=_identity_binding(agent_handle),
        )
        return sealer, AgentRow(agent_handle, sealed)

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    @property
    def agent_ref(self) -> str:
        return self.identity.audit_pseudonym

    def utterance_row(self, utterance: UtteranceRecord) -> UtteranceRow:
        model_id = utterance.model_id
        return UtteranceRow(
            utterance.utterance_id,
            self.agent_ref,
            model_id,
            self._seal(utterance.embedding, "pending_utterance", model_id),
            utterance.duration_seconds,
            utterance.net_speech_seconds,
            utterance.speech_level_dbfs,
            utterance.clipped_fraction,
            utterance.received_at,
            self._seal_optional(
                utterance.telephone_embedding, "telephone_pending_utterance", model_id
            ),
        )

    def utterance(self, row: UtteranceRow) -> UtteranceRecord:
        model_id = row.model_id
        return UtteranceRecord(
            row.utterance_id,
            self.agent_id,
            model_id,
            self._open(row.sealed_embedding, "pending_utterance", model_id),
            row.duration_seconds,
            row.net_speech_seconds,
            row.speech_level_dbfs,
            row.clipped_fraction,
            row.received_at,
            self._open_optional(
                row.sealed_telephone_embedding, "telephone_pending_utterance", model_id
            ),
        )

    def fingerprint_row(self, fingerprint: ReplayFingerprint) -> FingerprintRow:
        model_id = fingerprint.model_id
        return FingerprintRow(
            self.agent_ref,
            model_id,
            fingerprint.origin.value,
            fingerprint.recorded_at,
            self._seal(fingerprint.embedding, "replay_fingerprint", model_id),
            self._seal_optional(
                fingerprint.telephone_embedding, "telephone_replay_fingerprint", model_id
            ),
        )

    def fingerprint(self, row: FingerprintRow) -> ReplayFingerprint:
        model_id = row.model_id
        return ReplayFingerprint(
            self.agent_id,
            model_id,
            RecordingOrigin(row.origin),
            row.recorded_at,
            self._open(row.sealed_embedding, "replay_fingerprint", model_id),
            self._open_optional(
                row.sealed_telephone_embedding, "telephone_replay_fingerprint", model_id
            ),
        )

    def voiceprint_row(self, voiceprint: Voiceprint, last_used_at: datetime) -> VoiceprintRow:
        model_id = voiceprint.model_id
        return VoiceprintRow(
            self.agent_ref,
            model_id,
            self._seal(voiceprint.embedding, "voiceprint", model_id),
            voiceprint.created_at,
            voiceprint.utterance_count,
            voiceprint.net_speech_seconds,
            self._seal_optional(voiceprint.telephone_embedding, "telephone_voiceprint", model_id),
            last_used_at,
        )

    def voiceprint(self, row: VoiceprintRow) -> Voiceprint:
        model_id = row.model_id
        return Voiceprint(
            self.agent_id,
            model_id,
            self._open(row.sealed_embedding, "voiceprint", model_id),
            row.created_at,
            row.utterance_count,
            row.net_speech_seconds,
            self._open_optional(row.sealed_telephone_embedding, "telephone_voiceprint", model_id),
            row.last_used_at,
        )

    def held_voiceprint_row(
        self, held: HeldVoiceprint, matched_agent_ref: str
    ) -> HeldVoiceprintRow:
        """Sealed as a held voiceprint: its blobs do not open as an active voiceprint's, so
        moving the row into the voiceprints table does not make it active."""
        voiceprint = held.voiceprint
        model_id = voiceprint.model_id
        return HeldVoiceprintRow(
            VoiceprintRow(
                self.agent_ref,
                model_id,
                self._seal(voiceprint.embedding, "held_voiceprint", model_id),
                voiceprint.created_at,
                voiceprint.utterance_count,
                voiceprint.net_speech_seconds,
                self._seal_optional(
                    voiceprint.telephone_embedding, "telephone_held_voiceprint", model_id
                ),
                voiceprint.created_at,
            ),
            held.reason.value,
            held.held_at,
            matched_agent_ref,
            held.matched_entry_id,
            held.similarity,
        )

    def held_voiceprint(self, row: HeldVoiceprintRow, matched_agent_id: str) -> HeldVoiceprint:
        stored = row.voiceprint
        model_id = stored.model_id
        return HeldVoiceprint(
            Voiceprint(
                self.agent_id,
                model_id,
                self._open(stored.sealed_embedding, "held_voiceprint", model_id),
                stored.created_at,
                stored.utterance_count,
                stored.net_speech_seconds,
                self._open_optional(
                    stored.sealed_telephone_embedding, "telephone_held_voiceprint", model_id
                ),
            ),
            HoldReason(row.reason),
            row.held_at,
            matched_agent_id,
            row.matched_entry_id,
            row.similarity,
        )

    def shift_row(self, shift: ShiftRecord) -> ShiftRow:
        return ShiftRow(
            shift.shift_id,
            self.agent_ref,
            shift.device_id,
            shift.state,
            shift.started_at,
            shift.updated_at,
            shift.ended_at,
            shift.consecutive_failures,
            shift.checkpoints_passed,
            shift.checkpoints_failed,
            shift.checkpoints_insufficient,
        )

    def shift(self, row: ShiftRow) -> ShiftRecord:
        return ShiftRecord(
            shift_id=row.shift_id,
            agent_id=self.agent_id,
            device_id=row.device_id,
            state=row.state,
            started_at=row.started_at,
            updated_at=row.updated_at,
            consecutive_failures=row.consecutive_failures,
            checkpoints_passed=row.checkpoints_passed,
            checkpoints_failed=row.checkpoints_failed,
            checkpoints_insufficient=row.checkpoints_insufficient,
            ended_at=row.ended_at,
        )

    def assurance_row(self, assurance: AssuranceRecord) -> AssuranceRow:
        return AssuranceRow(
            assurance.shift_id,
            self.agent_ref,
            assurance.token_id,
            self._key.seal(
                assurance.token.encode(), associated=self._token_binding(assurance.shift_id)
            ),
            assurance.issued_at,
            assurance.expires_at,
        )

    def assurance(self, row: AssuranceRow) -> AssuranceRecord:
        token = self._key.open(
            row.sealed_token,
            associated=self._token_binding(row.shift_id),
            what=f"the assurance token of shift {row.shift_id}",
        )
        return AssuranceRecord(
            row.shift_id, self.agent_id, row.token_id, token.decode(), row.issued_at, row.expires_at
        )

    def seal_response(self, request_handle: str, response: bytes) -> bytes:
        """A completed request's response, which names the agent, bound to its request."""
        return self._key.seal(response, associated=self._response_binding(request_handle))

    def open_response(self, request_handle: str, sealed: bytes) -> bytes:
        return self._key.open(
            sealed,
            associated=self._response_binding(request_handle),
            what="the response of a completed request",
        )

    def seal_event(self, payload: bytes) -> bytes:
        """A shift event (server/shifts/event_bus.py), which names the agent."""
        return self._key.seal(payload, associated=binding(self.agent_ref, "shift_event", ""))

    def open_event(self, sealed: bytes) -> bytes:
        return self._key.open(
            sealed, associated=binding(self.agent_ref, "shift_event", ""), what="a shift event"
        )

    def _response_binding(self, request_handle: str) -> bytes:
        return binding(self.agent_ref, "request_response", request_handle)

    def _token_binding(self, shift_id: str) -> bytes:
        return binding(self.agent_ref, "assurance_token", shift_id)

    def _seal(self, embedding: Embedding, kind: RecordKind, model_id: str) -> bytes:
        return self._key.encrypt_embedding(
            embedding,
            associated=associated_data(
                agent_id=self.agent_ref, record_kind=kind, model_id=model_id
            ),
        )

    def _seal_optional(
        self, embedding: Embedding | None, kind: RecordKind, model_id: str
    ) -> bytes | None:
        return None if embedding is None else self._seal(embedding, kind, model_id)

    def _open(self, blob: bytes, kind: RecordKind, model_id: str) -> Embedding:
        return self._key.decrypt_embedding(
            blob,
            associated=associated_data(
                agent_id=self.agent_ref, record_kind=kind, model_id=model_id
            ),
        )

    def _open_optional(
        self, blob: bytes | None, kind: RecordKind, model_id: str
    ) -> Embedding | None:
        return None if blob is None else self._open(blob, kind, model_id)


class WatchlistSealer:
    """Seals and opens watchlist entries under the store's watchlist key, each blob bound to
    its entry id and model."""

    def __init__(self, key: DataKey) -> None:
        self._key = key

    def row(self, entry: WatchlistEntry) -> WatchlistRow:
        details = {
            "label": entry.label,
            "legal_basis": entry.legal_basis,
            "net_speech_seconds": entry.net_speech_seconds,
        }
        return WatchlistRow(
            entry.entry_id,
            entry.model_id,
            self._key.encrypt_embedding(
                entry.embedding, associated=self._binding(entry, "watchlist_entry")
            ),
            None
            if entry.telephone_embedding is None
            else self._key.encrypt_embedding(
                entry.telephone_embedding,
                associated=self._binding(entry, "telephone_watchlist_entry"),
            ),
            self._key.seal(
                json.dumps(details, sort_keys=True).encode(),
                associated=binding("watchlist details", entry.entry_id),
            ),
            entry.added_at,
            entry.expires_at,
        )

    def entry(self, row: WatchlistRow) -> WatchlistEntry:
        details = json.loads(
            self._key.open(
                row.sealed_details,
                associated=binding("watchlist details", row.entry_id),
                what=f"watchlist entry {row.entry_id}",
            )
        )
        return WatchlistEntry(
            entry_id=row.entry_id,
            label=details["label"],
            legal_basis=details["legal_basis"],
            model_id=row.model_id,
            embedding=self._key.decrypt_embedding(
                row.sealed_embedding,
                associated=_entry_binding(row.entry_id, "watchlist_entry", row.model_id),
            ),
            added_at=row.added_at,
            expires_at=row.expires_at,
            net_speech_seconds=float(details["net_speech_seconds"]),
            telephone_embedding=None
            if row.sealed_telephone_embedding is None
            else self._key.decrypt_embedding(
                row.sealed_telephone_embedding,
                associated=_entry_binding(row.entry_id, "telephone_watchlist_entry", row.model_id),
            ),
        )

    @staticmethod
    def _binding(entry: WatchlistEntry, kind: RecordKind) -> bytes:
        return _entry_binding(entry.entry_id, kind, entry.model_id)


def _entry_binding(entry_id: str, kind: RecordKind, model_id: str) -> bytes:
    return associated_data(agent_id=f"watchlist {entry_id}", record_kind=kind, model_id=model_id)


def require_known_keys(cipher: VoiceprintCipher, key_ids: Counter[str]) -> None:
    """Refuses a store holding values sealed under a service key `cipher` does not have
    (counts by key id, as `count_key_ids` gives), before the service starts rather than at
    the first read of each."""
    unknown = {
        key_id: count for key_id, count in key_ids.items() if key_id not in cipher.known_key_ids
    }
    if unknown:
        listed = ", ".join(f"{key_id} ({count} values)" for key_id, count in unknown.items())
        raise ConfigurationError(
            f"the database holds values sealed with key {listed}, which is neither the current "
            f"key {cipher.key_id} (VOXAUTH_KEY / VOXAUTH_KEY_FILE) nor a previous key "
            "(VOXAUTH_PREVIOUS_KEYS / VOXAUTH_PREVIOUS_KEYS_FILE)"
        )


def count_key_ids(sealed: Iterable[bytes]) -> Counter[str]:
    """How many of the sealed values each key id sealed."""
    return Counter(sealing_key_id(blob) for blob in sealed)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch; ValueError for a naive time."""
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment}: voxauth stores timezone-aware times only")
    return (moment - _EPOCH) // _MICROSECOND


def _from_micros(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def _store_binding(name: str = HANDLE_KEY) -> bytes:
    return binding("store key", name)


def _agent_key_binding(agent_handle: str) -> bytes:
    return binding("agent key", agent_handle)


def _identity_binding(agent_handle: str) -> bytes:
    return binding("identity", agent_handle)
