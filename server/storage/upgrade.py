"""Upgrading a database from before per-agent keys (server/storage/legacy.py): every agent is
written anew with its identity, embeddings and assurance tokens sealed under a data key of its
own, its audit pseudonym kept, so the audit chain over its records stays as it was."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from models.embedder import Embedding
from server.errors import StorageError
from server.records import UtteranceRecord, Voiceprint
from server.security.audit import AuditKey
from server.security.crypto import RecordKind, VoiceprintCipher, associated_data
from server.storage import audit_chain
from server.storage.backend import Transaction, UtteranceRow, VoiceprintRow
from server.storage.legacy import LegacyAgent
from server.storage.sealing import AgentIdentity, AgentSealer, KeyRing


class SealingUpgrade:
    """The store's side of the upgrade (legacy.Upgrade), for a store opened with `cipher`
    (whose keys must open what the old database sealed) and `audit_key`."""

    def __init__(self, cipher: VoiceprintCipher, audit_key: AuditKey | None) -> None:
        self._cipher = cipher
        self._audit_key = audit_key

    def prepare_keys(self, txn: Transaction, agent_ids: Sequence[str]) -> None:
        keys = KeyRing.load(txn, self._cipher, may_create=True)
        for agent_id in agent_ids:
            handle = keys.handle(agent_id)
            # Kept if a run of the upgrade cut short made it: rows may already rely on it.
            if txn.agent_key(handle) is None:
                _, row = keys.new_agent_key(handle)
                txn.put_agent_key(row)

    def chain_carried_over_audit(self, txn: Transaction, pseudonyms: Mapping[str, str]) -> None:
        audit_chain.chain_carried_over(txn, self._audit_key, pseudonyms)

    def seal_agents(self, txn: Transaction, agents: Iterable[LegacyAgent]) -> None:
        keys = KeyRing.load(txn, self._cipher, may_create=True)
        for legacy in agents:
            agent = legacy.agent
            handle = keys.handle(agent.agent_id)
            wrapped = txn.agent_key(handle)
            if wrapped is None:
                raise StorageError(f"agent {agent.agent_id!r} has no data key to upgrade with")
            identity = AgentIdentity(
                agent.agent_id,
                agent.display_name,
                agent.consent_reference,
                agent.created_at,
                legacy.audit_pseudonym,
            )
            sealer, row = AgentSealer.new(handle, keys.agent_key(handle, wrapped), identity)
            txn.insert_agent(row)
            for utterance in legacy.utterances:
                txn.insert_utterance(
                    sealer.utterance_row(self._utterance(agent.agent_id, utterance))
                )
            if legacy.voiceprint is not None:
                old = legacy.voiceprint
                txn.put_voiceprint(
                    sealer.voiceprint_row(self._voiceprint(agent.agent_id, old), old.last_used_at)
                )
            for shift in legacy.shifts:
                txn.insert_shift(shift)
            for assurance in legacy.assurances:
                txn.put_assurance(sealer.assurance_row(assurance))
            txn.put_throttle_state(sealer.agent_ref, legacy.throttle)

    def _utterance(self, agent_id: str, row: UtteranceRow) -> UtteranceRecord:
        model_id = row.model_id
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

    def _voiceprint(self, agent_id: str, row: VoiceprintRow) -> Voiceprint:
        model_id = row.model_id
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
        )

    def _open(self, blob: bytes, agent_id: str, kind: RecordKind, model_id: str) -> Embedding:
        # Sealed under the service key, bound to the agent id, as before data keys.
        return self._cipher.decrypt_embedding(
            blob, associated=associated_data(agent_id=agent_id, record_kind=kind, model_id=model_id)
        )

    def _open_optional(
        self, blob: bytes | None, agent_id: str, kind: RecordKind, model_id: str
    ) -> Embedding | None:
        return None if blob is None else self._open(blob, agent_id, kind, model_id)
