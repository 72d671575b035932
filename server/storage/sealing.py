"""Sealing above the backend: embeddings become AES-GCM blobs bound to their row (agent, kind,
model) before any backend sees them, and open only in the row they were sealed for.

Which key sealed a value is read from the value's own header here, in Python, so every
backend gets the same check of the keys a database needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime

from models.embedder import Embedding
from server.errors import ConfigurationError
from server.security.crypto import (
    RecordKind,
    VoiceprintCipher,
    associated_data,
    sealing_key_id,
)
from server.storage.backend import UtteranceRow, VoiceprintRow
from server.storage.records import UtteranceRecord, Voiceprint


class RowSealer:
    """Turns records into rows with their embeddings sealed, and back. Thread-safe (holds no
    mutable state)."""

    def __init__(self, cipher: VoiceprintCipher) -> None:
        self._cipher = cipher

    @property
    def key_id(self) -> str:
        """The id of the key new values are sealed with."""
        return self._cipher.key_id

    def utterance_row(self, utterance: UtteranceRecord) -> UtteranceRow:
        agent_id, model_id = utterance.agent_id, utterance.model_id
        return UtteranceRow(
            utterance.utterance_id,
            agent_id,
            model_id,
            self._seal(utterance.embedding, agent_id, "pending_utterance", model_id),
            utterance.duration_seconds,
            utterance.net_speech_seconds,
            utterance.speech_level_dbfs,
            utterance.clipped_fraction,
            utterance.received_at,
            self._seal_optional(
                utterance.telephone_embedding, agent_id, "telephone_pending_utterance", model_id
            ),
        )

    def utterance(self, row: UtteranceRow) -> UtteranceRecord:
        agent_id, model_id = row.agent_id, row.model_id
        return UtteranceRecord(
            row.utterance_id,
            agent_id,
            model_id,
            self._open(row.sealed_embedding, agent_id, "pending_utterance", model_id),
            row.duration_seconds,
            row.net_speech_seconds,
            row.speech_level_dbfs,
            row.clipped_fraction,
            row.received_at,
            self._open_optional(
                row.sealed_telephone_embedding, agent_id, "telephone_pending_utterance", model_id
            ),
        )

    def voiceprint_row(self, voiceprint: Voiceprint, last_used_at: datetime) -> VoiceprintRow:
        agent_id, model_id = voiceprint.agent_id, voiceprint.model_id
        return VoiceprintRow(
            agent_id,
            model_id,
            self._seal(voiceprint.embedding, agent_id, "voiceprint", model_id),
            voiceprint.created_at,
            voiceprint.utterance_count,
            voiceprint.net_speech_seconds,
            self._seal_optional(
                voiceprint.telephone_embedding, agent_id, "telephone_voiceprint", model_id
            ),
            last_used_at,
        )

    def voiceprint(self, row: VoiceprintRow) -> Voiceprint:
        agent_id, model_id = row.agent_id, row.model_id
        return Voiceprint(
            agent_id,
            model_id,
            self._open(row.sealed_embedding, agent_id, "voiceprint", model_id),
            row.created_at,
            row.utterance_count,
            row.net_speech_seconds,
            self._open_optional(
                row.sealed_telephone_embedding, agent_id, "telephone_voiceprint", model_id
            ),
            row.last_used_at,
        )

    def is_current(self, row: UtteranceRow | VoiceprintRow) -> bool:
        """Whether every embedding of the row is sealed under the current key."""
        return all(
            sealing_key_id(blob) == self.key_id
            for blob in (row.sealed_embedding, row.sealed_telephone_embedding)
            if blob is not None
        )

    def resealed_utterance(self, row: UtteranceRow) -> UtteranceRow:
        """The row with its embeddings sealed anew under the current key."""
        return self.utterance_row(self.utterance(row))

    def resealed_voiceprint(self, row: VoiceprintRow) -> VoiceprintRow:
        """The row with its embeddings sealed anew under the current key."""
        return self.voiceprint_row(self.voiceprint(row), row.last_used_at)

    def require_known_keys(self, key_ids: Counter[str]) -> None:
        """Refuses a store holding values sealed under a key this cipher does not have (counts
        by key id, as `count_key_ids` gives), before the service starts rather than at the
        first read of each."""
        unknown = {
            key_id: count
            for key_id, count in key_ids.items()
            if key_id not in self._cipher.known_key_ids
        }
        if unknown:
            listed = ", ".join(f"{key_id} ({count} values)" for key_id, count in unknown.items())
            raise ConfigurationError(
                f"the database holds values sealed with key {listed}, which is neither the "
                f"current key {self._cipher.key_id} (VOXAUTH_KEY / VOXAUTH_KEY_FILE) nor a "
                "previous key (VOXAUTH_PREVIOUS_KEYS / VOXAUTH_PREVIOUS_KEYS_FILE)"
            )

    def _seal(self, embedding: Embedding, agent_id: str, kind: RecordKind, model_id: str) -> bytes:
        return self._cipher.encrypt_embedding(
            embedding,
            associated=associated_data(agent_id=agent_id, record_kind=kind, model_id=model_id),
        )

    def _seal_optional(
        self, embedding: Embedding | None, agent_id: str, kind: RecordKind, model_id: str
    ) -> bytes | None:
        return None if embedding is None else self._seal(embedding, agent_id, kind, model_id)

    def _open(self, blob: bytes, agent_id: str, kind: RecordKind, model_id: str) -> Embedding:
        return self._cipher.decrypt_embedding(
            blob,
            associated=associated_data(agent_id=agent_id, record_kind=kind, model_id=model_id),
        )

    def _open_optional(
        self, blob: bytes | None, agent_id: str, kind: RecordKind, model_id: str
    ) -> Embedding | None:
        return None if blob is None else self._open(blob, agent_id, kind, model_id)


def count_key_ids(sealed: Iterable[bytes | None]) -> Counter[str]:
    """How many of the sealed values each key id sealed (None: no value)."""
    return Counter(sealing_key_id(blob) for blob in sealed if blob is not None)
