"""The one Store: the domain's storage interface (server/storage/interface.py) over any backend
(server/storage/backend.py), with the security invariants built in.

- Embeddings are sealed before the backend sees them, bound to their row
  (server/storage/sealing.py); a database holding values sealed under a key the store was not
  given does not open.
- Every audit record is chained and sealed, an existing agent is named by its pseudonym only,
  and details that could hold biometric data are refused (server/storage/audit_chain.py).
- Erasing an agent erases everything that names it, and the backend's leftover copies.
- Writes that belong together run in one unit of work: one backend transaction.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    CapacityError,
    ConfigurationError,
    ShiftNotFoundError,
)
from server.security.assurances import StoredSigningKey
from server.security.audit import AuditHead, AuditKey, AuditRecord, new_agent_pseudonym
from server.security.crypto import VoiceprintCipher
from server.storage import audit_chain
from server.storage.backend import AgentRow, StorageBackend, Transaction
from server.storage.interface import UnitOfWork
from server.storage.records import (
    AgentRecord,
    AssuranceRecord,
    AuditEvent,
    ReencryptionReport,
    ShiftRecord,
    ThrottleState,
    UtteranceRecord,
    Voiceprint,
)
from server.storage.sealing import RowSealer, count_key_ids


class SecureStore:
    """Store over a StorageBackend. Thread-safe as its backend is."""

    def __init__(
        self,
        backend: StorageBackend,
        cipher: VoiceprintCipher,
        audit_key: AuditKey | None = None,
    ) -> None:
        """`audit_key` seals the audit chain; without it records are chained but unsealed,
        and `voxauth audit verify` reports them as unverifiable. Use `open`, which checks the
        keys first."""
        self._backend = backend
        self._sealer = RowSealer(cipher)
        self._audit_key = audit_key
        self._thread = threading.local()

    @classmethod
    def open(
        cls,
        backend: StorageBackend,
        cipher: VoiceprintCipher,
        audit_key: AuditKey | None = None,
    ) -> SecureStore:
        """The store over `backend` (closed again if the store refuses it): ConfigurationError
        if it holds values sealed under a key `cipher` does not have."""
        store = cls(backend, cipher, audit_key)
        try:
            store._sealer.require_known_keys(store._key_id_counts())
        except BaseException:
            store.close()
            raise
        return store

    # --- units of work -----------------------------------------------------------------------

    @contextmanager
    def unit_of_work(self, what: str = "write to the store") -> Iterator[UnitOfWork]:
        with self._transaction(what, write=True) as unit:
            yield unit
        if unit.erased:
            self._backend.discard_erased()

    # --- agents, utterances, voiceprints ----------------------------------------------------

    def create_agent(self, agent: AgentRecord) -> None:
        with self.unit_of_work(f"create agent {agent.agent_id!r}") as unit:
            unit.create_agent(agent)

    def get_agent(self, agent_id: str) -> AgentRecord:
        with self._transaction(f"read agent {agent_id!r}", write=False) as unit:
            return unit.get_agent(agent_id)

    def delete_agent(self, agent_id: str) -> None:
        with self.unit_of_work(f"delete agent {agent_id!r}") as unit:
            unit.delete_agent(agent_id)

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        with self.unit_of_work(f"add utterance for agent {utterance.agent_id!r}") as unit:
            unit.add_utterance(utterance, max_pending)

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        with self._transaction(f"read utterances of agent {agent_id!r}", write=False) as unit:
            return unit.pending_utterances(agent_id)

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        with self.unit_of_work(f"remove utterances of agent {agent_id!r}") as unit:
            unit.remove_utterances(agent_id, utterance_ids)

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        with self.unit_of_work(f"store voiceprint of agent {voiceprint.agent_id!r}") as unit:
            return unit.replace_voiceprint(voiceprint, consumed_utterance_ids)

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        with self._transaction(f"read voiceprint of agent {agent_id!r}", write=False) as unit:
            return unit.get_voiceprint(agent_id)

    def voiceprints(self, model_id: str) -> list[Voiceprint]:
        with self._transaction("read voiceprints", write=False) as unit:
            rows = unit.txn.voiceprints(model_id)
        # Opened outside the transaction: the slow part needs no database state.
        return [self._sealer.voiceprint(row) for row in rows]

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        with self.unit_of_work(f"record the use of agent {agent_id!r}'s voiceprint") as unit:
            unit.mark_voiceprint_used(agent_id, at)

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        with self.unit_of_work("expire unused voiceprints") as unit:
            return unit.expire_voiceprints(unused_before)

    # --- shifts, assurances, signing keys, throttling -----------------------------------------

    def create_shift(self, shift: ShiftRecord) -> None:
        with self.unit_of_work(f"start shift {shift.shift_id!r}") as unit:
            unit.create_shift(shift)

    def get_shift(self, shift_id: str) -> ShiftRecord:
        with self._transaction(f"read shift {shift_id!r}", write=False) as unit:
            return unit.get_shift(shift_id)

    def update_shift(self, shift: ShiftRecord) -> None:
        with self.unit_of_work(f"update shift {shift.shift_id!r}") as unit:
            unit.update_shift(shift)

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        with self.unit_of_work(f"save assurance of shift {assurance.shift_id!r}") as unit:
            unit.save_assurance(assurance)

    def get_assurance(self, shift_id: str) -> AssuranceRecord | None:
        with self._transaction(f"read assurance of shift {shift_id!r}", write=False) as unit:
            return unit.txn.assurance(shift_id)

    def load_signing_keys(self) -> list[StoredSigningKey]:
        with self._transaction("read signing keys", write=False) as unit:
            return unit.txn.signing_keys()

    def save_signing_keys(self, keys: list[StoredSigningKey]) -> None:
        with self._transaction("save signing keys", write=True) as unit:
            unit.txn.replace_signing_keys(keys)

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        with self.unit_of_work(f"update the throttling of agent {agent_id!r}") as unit:
            return unit.update_throttle_state(agent_id, update)

    # --- the audit log -------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> None:
        with self.unit_of_work(f"append audit event {event.action!r}") as unit:
            unit.append_audit(event)

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        with self._transaction("read audit events", write=False) as unit:
            rows = audit_chain.all_rows(unit.txn)
            if agent_id is not None:
                agent = unit.txn.agent(agent_id)
                rows = audit_chain.about(
                    rows, agent_id, None if agent is None else agent.audit_pseudonym
                )
            records = audit_chain.records(unit.txn, rows)
        return [audit_chain.event(record) for record in records]

    def latest_audit_event(self, action: str) -> AuditEvent | None:
        with self._transaction("read the latest audit event", write=False) as unit:
            row = unit.txn.latest_audit_row(action)
            records = audit_chain.records(unit.txn, [] if row is None else [row])
        return audit_chain.event(records[0]) if records else None

    def audit_head(self) -> AuditHead | None:
        with self._transaction("read the audit chain head", write=False) as unit:
            return unit.txn.audit_head()

    def audit_records(self, after_seq: int, limit: int) -> list[AuditRecord]:
        with self._transaction("read audit records", write=False) as unit:
            return audit_chain.records(unit.txn, unit.txn.audit_rows(after_seq, limit))

    def reseal_audit(self, keys: Sequence[AuditKey], batch_size: int) -> int:
        current = self._audit_key
        if current is None:
            raise ConfigurationError("re-sealing the audit log needs the audit key")
        known = {key.key_id: key for key in keys}
        resealed = 0
        while True:
            with self._transaction("re-seal audit records", write=True) as unit:
                count = audit_chain.reseal_page(unit.txn, current, known, batch_size)
            if not count:
                return resealed
            resealed += count

    # --- key rotation --------------------------------------------------------------------------

    def sealing_key_ids(self) -> dict[str, int]:
        return dict(self._key_id_counts())

    def reencrypt_all(self, batch_size: int) -> ReencryptionReport:
        report = ReencryptionReport(
            voiceprints=self._reseal_voiceprints(batch_size),
            pending_utterances=self._reseal_utterances(batch_size),
        )
        if report.voiceprints or report.pending_utterances:
            # Old copies still hold the blobs sealed under the key about to be retired.
            self._backend.discard_erased()
        return report

    def close(self) -> None:
        self._backend.close()

    # --- internals -------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, what: str, *, write: bool) -> Iterator[_Unit]:
        """A backend transaction as a unit. Refuses to nest: the store's own methods called
        inside a unit would wait for it forever."""
        if getattr(self._thread, "in_unit", False):
            raise RuntimeError(
                f"cannot {what} while this thread has a unit of work open: call the unit's "
                "methods inside it"
            )
        self._thread.in_unit = True
        try:
            with self._backend.transaction(what, write=write) as txn:
                yield _Unit(txn, self._sealer, self._audit_key)
        finally:
            self._thread.in_unit = False

    def _key_id_counts(self) -> Counter[str]:
        """How many sealed values each key id has sealed, read from the values' headers."""
        with self._transaction("count sealed values by key", write=False) as unit:
            txn = unit.txn
            counts = count_key_ids(key.sealed_private_key for key in txn.signing_keys())
            after = ""
            while voiceprints := txn.voiceprint_page(after, _PAGE_SIZE):
                counts += count_key_ids(
                    blob
                    for row in voiceprints
                    for blob in (row.sealed_embedding, row.sealed_telephone_embedding)
                )
                after = voiceprints[-1].agent_id
            after = ""
            while utterances := txn.utterance_page(after, _PAGE_SIZE):
                counts += count_key_ids(
                    blob
                    for row in utterances
                    for blob in (row.sealed_embedding, row.sealed_telephone_embedding)
                )
                after = utterances[-1].utterance_id
        return counts

    def _reseal_voiceprints(self, batch_size: int) -> int:
        """Re-seals, `batch_size` rows per transaction, the voiceprints with an embedding
        sealed under another key than the current one; returns how many."""
        resealed, after = 0, ""
        while True:
            with self._transaction("re-encrypt voiceprints", write=True) as unit:
                page = unit.txn.voiceprint_page(after, batch_size)
                for row in page:
                    if not self._sealer.is_current(row):
                        unit.txn.put_voiceprint(self._sealer.resealed_voiceprint(row))
                        resealed += 1
            if not page:
                return resealed
            after = page[-1].agent_id

    def _reseal_utterances(self, batch_size: int) -> int:
        """As `_reseal_voiceprints`, for pending utterances."""
        resealed, after = 0, ""
        while True:
            with self._transaction("re-encrypt pending utterances", write=True) as unit:
                page = unit.txn.utterance_page(after, batch_size)
                for row in page:
                    if not self._sealer.is_current(row):
                        unit.txn.update_utterance(self._sealer.resealed_utterance(row))
                        resealed += 1
            if not page:
                return resealed
            after = page[-1].utterance_id


_PAGE_SIZE = 500


class _Unit:
    """A UnitOfWork on one backend transaction."""

    def __init__(self, txn: Transaction, sealer: RowSealer, audit_key: AuditKey | None) -> None:
        self.txn = txn
        self.erased = False
        """Whether the unit erased rows: the backend's leftover copies go once it commits."""
        self._sealer = sealer
        self._audit_key = audit_key

    def create_agent(self, agent: AgentRecord) -> None:
        row = AgentRow(
            agent.agent_id,
            agent.display_name,
            agent.consent_reference,
            agent.created_at,
            new_agent_pseudonym(),
        )
        if not self.txn.insert_agent(row):
            raise AgentExistsError(f"agent {agent.agent_id!r} already exists")

    def get_agent(self, agent_id: str) -> AgentRecord:
        row = self._agent(agent_id)
        return AgentRecord(row.agent_id, row.display_name, row.consent_reference, row.created_at)

    def delete_agent(self, agent_id: str) -> None:
        if not self.txn.delete_agent(agent_id):
            raise _not_found(agent_id)
        self.erased = True

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        row = self._sealer.utterance_row(utterance)
        self._agent(utterance.agent_id)
        pending = len(self.txn.utterances(utterance.agent_id))
        if pending >= max_pending:
            raise CapacityError(
                f"agent {utterance.agent_id!r} already has {pending} pending utterances "
                f"(the limit is {max_pending}); finalize or discard some first"
            )
        self.txn.insert_utterance(row)

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        self._agent(agent_id)
        return [self._sealer.utterance(row) for row in self.txn.utterances(agent_id)]

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        self.txn.delete_utterances(agent_id, utterance_ids)

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        # Enrollment is the first use: retention counts from it.
        row = self._sealer.voiceprint_row(voiceprint, last_used_at=voiceprint.created_at)
        self._agent(voiceprint.agent_id)
        replaced = self.txn.put_voiceprint(row)
        self.txn.delete_utterances(voiceprint.agent_id, consumed_utterance_ids)
        return replaced

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        self._agent(agent_id)
        row = self.txn.voiceprint(agent_id)
        return None if row is None else self._sealer.voiceprint(row)

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        self.txn.mark_voiceprint_used(agent_id, at)

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        expired = self.txn.delete_voiceprints_unused_before(unused_before)
        self.erased = self.erased or bool(expired)
        return expired

    def create_shift(self, shift: ShiftRecord) -> None:
        self._agent(shift.agent_id)
        self.txn.insert_shift(shift)

    def get_shift(self, shift_id: str) -> ShiftRecord:
        shift = self.txn.shift(shift_id)
        if shift is None:
            raise ShiftNotFoundError(f"no shift {shift_id!r}")
        return shift

    def update_shift(self, shift: ShiftRecord) -> None:
        if not self.txn.update_shift(shift):
            raise ShiftNotFoundError(f"no shift {shift.shift_id!r}")

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        self._agent(agent_id)
        before = self.txn.throttle_state(agent_id)
        self.txn.put_throttle_state(agent_id, update(before))
        return before

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        self.txn.put_assurance(assurance)

    def append_audit(self, event: AuditEvent) -> None:
        audit_chain.append(self.txn, self._audit_key, event)

    def _agent(self, agent_id: str) -> AgentRow:
        row = self.txn.agent(agent_id)
        if row is None:
            raise _not_found(agent_id)
        return row


def _not_found(agent_id: str) -> AgentNotFoundError:
    return AgentNotFoundError(f"no agent {agent_id!r}")
