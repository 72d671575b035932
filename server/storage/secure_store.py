"""The one Store: the domain's storage interface (server/storage/interface.py) over any backend
(server/storage/backend.py), with the security invariants built in.

- Each agent's data is sealed under a data key of its own, itself wrapped under the service
  key (server/storage/sealing.py): its id, display name, consent reference and pseudonym, its
  embeddings, its assurance tokens. No row holds the agent id in clear; rows name the agent by
  a keyed hash (its own row) or by its audit pseudonym (every other row).
- Erasing an agent destroys its data key in the transaction that deletes its rows, so any copy
  left behind (old log frames, free pages, a backup of the database file) holds only
  ciphertext nothing can open: crypto-shredding.
- Every audit record is chained and sealed, an existing agent is named by its pseudonym only,
  and details that could hold biometric data are refused (server/storage/audit_chain.py). The
  pseudonym of each agent is sealed with it, so swapping or replacing one is found.
- A database holding values sealed under a key the store was not given does not open.
- Writes that belong together run in one unit of work: one backend transaction.
- A completed request (a retry's answer) is found by a keyed hash of its key; a response that
  names an agent is sealed under the agent's data key and erased with it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

from server.audit_actions import AuditAction
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    CapacityError,
    ConfigurationError,
    ShiftLeaseLostError,
    ShiftNotFoundError,
    StorageError,
)
from server.records import (
    AgentOverview,
    AgentRecord,
    AssuranceRecord,
    AssuranceRevocation,
    AuditEvent,
    HeldVoiceprint,
    RecordingOrigin,
    ReencryptionReport,
    ReplayFingerprint,
    RevocationReason,
    ShiftCursor,
    ShiftLease,
    ShiftRecord,
    ShiftState,
    StoreCensus,
    ThrottleState,
    UtteranceRecord,
    Voiceprint,
    WatchlistEntry,
)
from server.runtime.requests import CompletedRequest, RecordedResponse, RequestKey
from server.security.assurances import KeyChange, StoredSigningKey
from server.security.audit import AuditHead, AuditKey, AuditRecord, new_agent_pseudonym
from server.security.crypto import VoiceprintCipher
from server.storage import audit_chain
from server.storage.backend import (
    AgentKeyRow,
    AgentRow,
    AuditRow,
    CompletedRequestRow,
    StorageBackend,
    Transaction,
)
from server.storage.interface import UnitOfWork
from server.storage.sealing import (
    STORE_KEYS,
    AgentIdentity,
    AgentSealer,
    KeyRing,
    WatchlistSealer,
    count_key_ids,
    require_known_keys,
)

logger = logging.getLogger(__name__)

_PAGE_SIZE = 500
_END_OF_TIME = datetime.max.replace(tzinfo=UTC)


class SecureStore:
    """Store over a StorageBackend. Thread-safe as its backend is."""

    def __init__(self, backend: StorageBackend, keys: KeyRing, audit_key: AuditKey | None) -> None:
        """Use `open`, which loads and checks the keys first."""
        self._backend = backend
        self._keys = keys
        self._audit_key = audit_key
        self._agents = _AgentDirectory(keys)
        self._thread = threading.local()
        self._audit_listeners: list[Callable[[AuditEvent], None]] = []

    @classmethod
    def open(
        cls,
        backend: StorageBackend,
        cipher: VoiceprintCipher,
        audit_key: AuditKey | None = None,
    ) -> SecureStore:
        """The store over `backend` (closed again if the store refuses it). `audit_key` seals
        the audit chain; without it records are chained but unsealed, and `voxauth audit
        verify` reports them as unverifiable. Raises ConfigurationError if the backend holds
        values sealed under a key `cipher` does not have, StorageError if the agents' keys
        are missing."""
        try:
            with backend.transaction("load the store's keys", write=True) as txn:
                require_known_keys(cipher, _service_key_ids(txn))
                keys = KeyRing.load(txn, cipher, may_create=not txn.agents())
            store = cls(backend, keys, audit_key)
            store._recover()
        except BaseException:
            backend.close()
            raise
        return store

    def on_audit(self, listener: Callable[[AuditEvent], None]) -> None:
        """`listener` hears of each audit record once its transaction has committed (so a
        rolled-back decision is never counted): how monitoring counts decisions, locks and
        refusals without the domain knowing of it. It runs on the committing thread and must
        be quick; what it raises is logged, never the writer's failure."""
        self._audit_listeners.append(listener)

    # --- units of work -----------------------------------------------------------------------

    @contextmanager
    def unit_of_work(self, what: str = "write to the store") -> Iterator[UnitOfWork]:
        with self._transaction(what, write=True) as unit:
            yield unit
        if unit.erased:
            self._backend.discard_erased()

    # --- agents, utterances, voiceprints ------------------------------------------------------

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

    def add_fingerprint(
        self, fingerprint: ReplayFingerprint, *, keep_after: datetime, keep: int
    ) -> None:
        with self.unit_of_work(f"store a fingerprint of agent {fingerprint.agent_id!r}") as unit:
            unit.add_fingerprint(fingerprint, keep_after=keep_after, keep=keep)

    def fingerprints(self, agent_id: str) -> list[ReplayFingerprint]:
        with self._transaction(f"read fingerprints of agent {agent_id!r}", write=False) as unit:
            return unit.fingerprints(agent_id)

    def voiceprints(self, model_id: str) -> list[Voiceprint]:
        with self._transaction("read voiceprints", write=False) as unit:
            rows = unit.txn.voiceprints(model_id)
            agents = self._agents.by_ref(unit.txn, {row.agent_ref for row in rows})
        # Opened outside the transaction: the slow part needs no database state.
        opened = [agents[row.agent_ref].voiceprint(row) for row in rows if row.agent_ref in agents]
        return sorted(opened, key=lambda voiceprint: voiceprint.agent_id)

    def agent_overviews(self) -> list[AgentOverview]:
        with self._transaction("list the agents", write=False) as unit:
            found = [
                (agent, unit.txn.utterances(agent.agent_ref), unit.txn.voiceprint(agent.agent_ref))
                for agent in self._agents.all(unit.txn)
            ]
        # Opened outside the transaction, as `voiceprints`: the slow part needs no database.
        overviews = [
            AgentOverview(
                agent.identity.record(),
                pending_utterances=len(pending),
                pending_net_speech_seconds=sum(row.net_speech_seconds for row in pending),
                voiceprint=None if row is None else agent.voiceprint(row),
            )
            for agent, pending, row in found
        ]
        return sorted(overviews, key=lambda overview: overview.agent.agent_id)

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        with self.unit_of_work(f"record the use of agent {agent_id!r}'s voiceprint") as unit:
            unit.mark_voiceprint_used(agent_id, at)

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        with self.unit_of_work("expire unused voiceprints") as unit:
            return unit.expire_voiceprints(unused_before)

    def passive_enrollment(self, agent_id: str) -> datetime | None:
        with self._transaction(f"read the enrollment of agent {agent_id!r}", write=False) as unit:
            return unit.passive_enrollment(agent_id)

    def held_voiceprint(self, agent_id: str) -> HeldVoiceprint | None:
        with self._transaction(f"read the held voiceprint of {agent_id!r}", write=False) as unit:
            return unit.held_voiceprint(agent_id)

    def watchlist_entries(self) -> list[WatchlistEntry]:
        with self._transaction("read the watchlist", write=False) as unit:
            return unit.watchlist_entries()

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

    def list_shifts(
        self,
        states: Collection[ShiftState] = (),
        limit: int = 100,
        before: ShiftCursor | None = None,
    ) -> list[ShiftRecord]:
        with self._transaction("list shifts", write=False) as unit:
            return unit.list_shifts(states, limit, before)

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        with self._transaction(f"read the lease of shift {shift_id!r}", write=False) as unit:
            return unit.shift_lease(shift_id)

    def take_shift_lease(
        self, shift_id: str, owner: str, *, attached: bool, expires_at: datetime
    ) -> tuple[ShiftLease, ShiftRecord]:
        with self.unit_of_work(f"take the lease of shift {shift_id!r}") as unit:
            lease = unit.take_shift_lease(shift_id, owner, attached=attached, expires_at=expires_at)
            return lease, unit.get_shift(shift_id)

    def renew_shift_leases(
        self, leases: Sequence[ShiftLease], expires_at: datetime
    ) -> dict[str, ShiftLease | None]:
        with self._transaction("renew shift leases", write=True) as unit:
            lost: dict[str, ShiftLease | None] = {}
            for lease in leases:
                stored = unit.txn.shift_lease(lease.shift_id)
                if stored is not None and _same_holder(stored, lease):
                    unit.txn.put_shift_lease(replace(stored, expires_at=expires_at))
                else:
                    lost[lease.shift_id] = stored
            return lost

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        with self.unit_of_work(f"save assurance of shift {assurance.shift_id!r}") as unit:
            unit.save_assurance(assurance)

    def get_assurance(self, shift_id: str) -> AssuranceRecord | None:
        with self._transaction(f"read assurance of shift {shift_id!r}", write=False) as unit:
            return unit.get_assurance(shift_id)

    def revoke_assurance(
        self, shift_id: str, reason: RevocationReason, at: datetime
    ) -> AssuranceRevocation | None:
        with self.unit_of_work(f"revoke the assurance of shift {shift_id!r}") as unit:
            return unit.revoke_assurance(shift_id, reason, at)

    def get_revocation(self, token_id: str) -> AssuranceRevocation | None:
        with self._transaction("read an assurance revocation", write=False) as unit:
            return unit.txn.revocation(token_id)

    def load_signing_keys(self) -> list[StoredSigningKey]:
        with self._transaction("read signing keys", write=False) as unit:
            return unit.txn.signing_keys()

    def save_signing_keys(self, keys: list[StoredSigningKey]) -> None:
        with self._transaction("save signing keys", write=True) as unit:
            unit.txn.replace_signing_keys(keys)

    def census(self, delay_after_failures: int) -> StoreCensus:
        with self._transaction("count shifts and throttled agents", write=False) as unit:
            return unit.txn.census(delay_after_failures)

    def update_signing_keys(self, change: KeyChange) -> list[StoredSigningKey]:
        with self._transaction("rotate signing keys", write=True) as unit:
            changed = change(unit.txn.signing_keys())
            if changed is None:
                return unit.txn.signing_keys()
            unit.txn.replace_signing_keys(changed)
            return list(changed)

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        with self.unit_of_work(f"update the throttling of agent {agent_id!r}") as unit:
            return unit.update_throttle_state(agent_id, update)

    def throttle_state(self, agent_id: str) -> ThrottleState:
        with self._transaction(f"read the throttling of agent {agent_id!r}", write=False) as unit:
            return unit.throttle_state(agent_id)

    # --- completed requests --------------------------------------------------------------------

    def recorded_response(
        self, key: RequestKey, request_digest: bytes, at: datetime
    ) -> RecordedResponse | None:
        with self._transaction("read a completed request", write=False) as unit:
            return unit.recorded_response(key, request_digest, at)

    def record_request(self, completed: CompletedRequest) -> None:
        with self.unit_of_work(f"record a completed {completed.key.method} request") as unit:
            unit.record_request(completed)

    def forget_expired_requests(self, at: datetime) -> int:
        with self._transaction("forget expired request ids", write=True) as unit:
            return unit.txn.delete_completed_requests_expired(at)

    # --- shift events ----------------------------------------------------------------------------

    def append_event(
        self, agent_id: str, payload: bytes, at: datetime, keep_after: datetime
    ) -> int:
        with self._transaction("append a shift event", write=True) as unit:
            return unit.append_event(agent_id, payload, at, keep_after)

    def events_after(self, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        with self._transaction("read shift events", write=False) as unit:
            rows = unit.txn.events_after(after_id, limit)
            agents = self._agents.by_ref(unit.txn, {row.agent_ref for row in rows})
            return [
                (row.event_id, agents[row.agent_ref].open_event(row.sealed_payload))
                for row in rows
                if row.agent_ref in agents
            ]

    def latest_event_id(self) -> int:
        with self._transaction("read the latest shift event id", write=False) as unit:
            return unit.txn.latest_event_id()

    def oldest_event_id(self) -> int | None:
        with self._transaction("read the oldest shift event id", write=False) as unit:
            # The rows stay sealed: only the id is read.
            rows = unit.txn.events_after(0, 1)
        return rows[0].event_id if rows else None

    # --- the audit log -------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> None:
        with self.unit_of_work(f"append audit event {event.action!r}") as unit:
            unit.append_audit(event)

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        with self._transaction("read audit events", write=False) as unit:
            rows = audit_chain.all_rows(unit.txn)
            if agent_id is not None:
                agent = unit.find(agent_id)
                rows = audit_chain.about(rows, agent_id, None if agent is None else agent.agent_ref)
            records = audit_chain.records(rows, self._agent_ids(unit.txn, rows))
        return [audit_chain.event(record) for record in records]

    def latest_audit_event(self, action: AuditAction) -> AuditEvent | None:
        with self._transaction("read the latest audit event", write=False) as unit:
            row = unit.txn.latest_audit_row(action)
            rows = [] if row is None else [row]
            records = audit_chain.records(rows, self._agent_ids(unit.txn, rows))
        return audit_chain.event(records[0]) if records else None

    def audit_head(self) -> AuditHead | None:
        with self._transaction("read the audit chain head", write=False) as unit:
            return unit.txn.audit_head()

    def audit_records(self, after_seq: int, limit: int) -> list[AuditRecord]:
        with self._transaction("read audit records", write=False) as unit:
            rows = unit.txn.audit_rows(after_seq, limit)
            return audit_chain.records(rows, self._agent_ids(unit.txn, rows))

    def attribution_faults(self) -> list[str]:
        """Why records could be attributed to the wrong agent: each agent whose sealed
        identity, which holds its pseudonym, does not open under its own key and handle
        (swapped with another agent's, replaced or altered), and pseudonyms shared."""
        faults = []
        owners: dict[str, list[str]] = {}
        with self._transaction("check the agents' pseudonyms", write=False) as unit:
            for row in unit.txn.agents():
                try:
                    agent = self._agents.open_fresh(unit.txn, row)
                except StorageError as error:
                    faults.append(error.message)
                    continue
                owners.setdefault(agent.agent_ref, []).append(agent.agent_id)
        faults += [
            f"agents {', '.join(sorted(agent_ids))} share the audit pseudonym {pseudonym}"
            for pseudonym, agent_ids in owners.items()
            if len(agent_ids) > 1
        ]
        return faults

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
        with self._transaction("count sealed values by key", write=False) as unit:
            return dict(_service_key_ids(unit.txn))

    def reencrypt_all(self, batch_size: int) -> ReencryptionReport:
        """Wraps every data key anew under the current service key, `batch_size` keys per
        transaction; the data they seal stays as it is."""
        with self._transaction("re-wrap the store's keys", write=True) as unit:
            rewrapped = int(self._keys.rewrap_store_key(unit.txn))
            rewrapped += int(self._keys.rewrap_watchlist_key(unit.txn))
        after = ""
        while True:
            with self._transaction("re-wrap agent keys", write=True) as unit:
                page = unit.txn.agent_key_page(after, batch_size)
                rewrapped += sum(self._keys.rewrap_agent_key(unit.txn, row) for row in page)
            if not page:
                return ReencryptionReport(data_keys=rewrapped)
            after = page[-1].agent_handle

    def close(self) -> None:
        self._backend.close()

    # --- internals -----------------------------------------------------------------------------

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
                unit = _Unit(txn, self._keys, self._agents, self._audit_key)
                yield unit
        finally:
            self._thread.in_unit = False
        for event in unit.appended:
            for listener in self._audit_listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("an audit listener failed on %s", event.action)

    def _agent_ids(self, txn: Transaction, rows: Sequence[AuditRow]) -> dict[str, str]:
        """The id of each existing agent whose pseudonym one of the audit rows carries."""
        refs = {row.entry.agent_ref for row in rows if row.entry.agent_ref}
        return {ref: agent.agent_id for ref, agent in self._agents.by_ref(txn, refs).items()}

    def _recover(self) -> None:
        """Finishes what a crash between the commit of the rows and the commit of the keys
        cut short (the two are written one after the other): the key of an erased agent is
        destroyed; an agent whose creation lost its key, which nothing can open and which
        was never reported created, is removed (and that is audited)."""
        with self._transaction("recover from an interrupted commit", write=True) as unit:
            txn = unit.txn
            agents = {row.agent_handle for row in txn.agents()}
            keyed = {row.agent_handle for row in _agent_keys(txn)}
            for handle in keyed - agents:
                txn.delete_agent_key(handle)
            keyless = agents - keyed
            if not keyless:
                return
            if not self._backend.interrupted_commit():
                raise StorageError(
                    f"{len(keyless)} of the database's {len(agents)} agents have no data key in "
                    "its key file: the key file is not this database's own (restored from "
                    "another backup?); restore the key file that belongs with the database"
                )
            for handle in keyless:
                # Its rows beyond its own are unreachable without its identity; none of them
                # can hold more than its creation's unit wrote, sealed under the lost key.
                txn.delete_agent(handle, "")
            unit.append_audit(
                AuditEvent(
                    AuditAction.STORAGE_RECOVER,
                    "",
                    "ok",
                    datetime.now(UTC),
                    {"interrupted_agent_creations": len(keyless)},
                )
            )
        logger.warning(
            "removed %d agent(s) whose creation a crash interrupted before its key was stored",
            len(keyless),
        )


class _AgentDirectory:
    """Open agents (identity and data key) by their sealed identity and by pseudonym, so a
    lookup costs a row read, not a decryption. Entries are checked against the row before
    use, and dropped when the agent is erased or no longer found. Thread-safe."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys
        self._lock = threading.Lock()
        self._by_identity: dict[bytes, AgentSealer] = {}
        self._by_ref: dict[str, bytes] = {}

    def open(self, txn: Transaction, row: AgentRow) -> AgentSealer:
        with self._lock:
            known = self._by_identity.get(row.sealed_identity)
        if known is not None and known.agent_handle == row.agent_handle:
            return known
        agent = self.open_fresh(txn, row)
        with self._lock:
            self._by_identity[row.sealed_identity] = agent
            self._by_ref[agent.agent_ref] = row.sealed_identity
        return agent

    def open_fresh(self, txn: Transaction, row: AgentRow) -> AgentSealer:
        """The agent of `row` opened from its stored key, whatever is remembered."""
        wrapped = txn.agent_key(row.agent_handle)
        if wrapped is None:
            raise StorageError(f"agent row {row.agent_handle[:12]} has no data key")
        return AgentSealer.open(row, self._keys.agent_key(row.agent_handle, wrapped))

    def by_ref(self, txn: Transaction, refs: Collection[str]) -> dict[str, AgentSealer]:
        """The existing agents among those with these pseudonyms."""
        found: dict[str, AgentSealer] = {}
        for ref in refs:
            agent = self._remembered(txn, ref)
            if agent is None:
                # One walk over all agents finds every pseudonym not remembered.
                return {
                    agent.agent_ref: agent for agent in self.all(txn) if agent.agent_ref in refs
                }
            found[ref] = agent
        return found

    def forget(self, agent: AgentSealer) -> None:
        with self._lock:
            sealed = self._by_ref.pop(agent.agent_ref, None)
            if sealed is not None:
                self._by_identity.pop(sealed, None)

    def _remembered(self, txn: Transaction, ref: str) -> AgentSealer | None:
        with self._lock:
            sealed = self._by_ref.get(ref)
            agent = None if sealed is None else self._by_identity.get(sealed)
        if agent is None:
            return None
        row = txn.agent(agent.agent_handle)
        return agent if row is not None and row.sealed_identity == sealed else None

    def all(self, txn: Transaction) -> list[AgentSealer]:
        """Every agent that opens. One that does not is left out (its records read as nobody's)
        and logged: `SecureStore.attribution_faults` reports it."""
        rows = txn.agents()
        agents = []
        for row in rows:
            try:
                agents.append(self.open(txn, row))
            except StorageError as error:
                logger.warning("agent left out: %s", error.message)
        current = {row.sealed_identity for row in rows}
        with self._lock:
            # Agents erased elsewhere leave memory too.
            self._by_identity = {
                sealed: agent for sealed, agent in self._by_identity.items() if sealed in current
            }
            self._by_ref = {
                ref: sealed for ref, sealed in self._by_ref.items() if sealed in current
            }
        return agents


class _Unit:
    """A UnitOfWork on one backend transaction."""

    def __init__(
        self,
        txn: Transaction,
        keys: KeyRing,
        agents: _AgentDirectory,
        audit_key: AuditKey | None,
    ) -> None:
        self.txn = txn
        self.erased = False
        """Whether the unit erased rows: the backend's leftover copies go once it commits."""
        self.appended: list[AuditEvent] = []
        """The audit events appended, for the store's listeners once the unit commits."""
        self._keys = keys
        self._agents = agents
        self._audit_key = audit_key

    def find(self, agent_id: str) -> AgentSealer | None:
        row = self.txn.agent(self._keys.handle(agent_id))
        return None if row is None else self._agents.open(self.txn, row)

    def create_agent(self, agent: AgentRecord) -> None:
        handle = self._keys.handle(agent.agent_id)
        if self.txn.agent(handle) is not None:
            raise AgentExistsError(f"agent {agent.agent_id!r} already exists")
        key, key_row = self._keys.new_agent_key(handle)
        identity = AgentIdentity(
            agent.agent_id,
            agent.display_name,
            agent.consent_reference,
            agent.created_at,
            new_agent_pseudonym(),
        )
        _, row = AgentSealer.new(handle, key, identity)
        # Replaces, and so destroys, a key an interrupted erasure of the same id left behind.
        self.txn.put_agent_key(key_row)
        self.txn.insert_agent(row)

    def get_agent(self, agent_id: str) -> AgentRecord:
        return self._agent(agent_id).identity.record()

    def delete_agent(self, agent_id: str) -> None:
        agent = self._agent(agent_id)
        self.txn.delete_agent(agent.agent_handle, agent.agent_ref)
        # In the same transaction: whatever copy of the rows survives is sealed under a key
        # that no longer exists anywhere.
        self.txn.delete_agent_key(agent.agent_handle)
        self._agents.forget(agent)
        self.erased = True

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        agent = self._agent(utterance.agent_id)
        row = agent.utterance_row(utterance)
        pending = len(self.txn.utterances(agent.agent_ref))
        if pending >= max_pending:
            raise CapacityError(
                f"agent {utterance.agent_id!r} already has {pending} pending utterances "
                f"(the limit is {max_pending}); finalize or discard some first"
            )
        self.txn.insert_utterance(row)

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        agent = self._agent(agent_id)
        return [agent.utterance(row) for row in self.txn.utterances(agent.agent_ref)]

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        agent = self.find(agent_id)
        if agent is not None:
            self.txn.delete_utterances(agent.agent_ref, utterance_ids)

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        agent = self._agent(voiceprint.agent_id)
        # Enrollment is the first use: retention counts from it.
        replaced = self.txn.put_voiceprint(
            agent.voiceprint_row(voiceprint, last_used_at=voiceprint.created_at)
        )
        self.txn.delete_utterances(agent.agent_ref, consumed_utterance_ids)
        return replaced

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        agent = self._agent(agent_id)
        row = self.txn.voiceprint(agent.agent_ref)
        return None if row is None else agent.voiceprint(row)

    def add_fingerprint(
        self, fingerprint: ReplayFingerprint, *, keep_after: datetime, keep: int
    ) -> None:
        agent = self._agent(fingerprint.agent_id)
        self.txn.insert_fingerprint(agent.fingerprint_row(fingerprint))
        self.txn.prune_fingerprints(agent.agent_ref, fingerprint.origin.value, keep_after, keep)

    def fingerprints(self, agent_id: str) -> list[ReplayFingerprint]:
        agent = self._agent(agent_id)
        return [agent.fingerprint(row) for row in self.txn.fingerprints(agent.agent_ref)]

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        agent = self.find(agent_id)
        if agent is not None:
            self.txn.mark_voiceprint_used(agent.agent_ref, at)

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        refs = self.txn.delete_voiceprints_unused_before(unused_before)
        # The fingerprints are of the same voice: they go with the voiceprint.
        for ref in refs:
            for origin in RecordingOrigin:
                self.txn.prune_fingerprints(ref, origin.value, _END_OF_TIME, keep=0)
        self.erased = self.erased or bool(refs)
        agents = self._agents.by_ref(self.txn, refs)
        return sorted(agents[ref].agent_id for ref in refs if ref in agents)

    def set_passive_enrollment(self, agent_id: str, requested_at: datetime) -> None:
        self.txn.put_passive_enrollment(self._agent(agent_id).agent_ref, requested_at)

    def passive_enrollment(self, agent_id: str) -> datetime | None:
        return self.txn.passive_enrollment(self._agent(agent_id).agent_ref)

    def end_passive_enrollment(self, agent_id: str) -> None:
        agent = self.find(agent_id)
        if agent is not None:
            self.txn.delete_passive_enrollment(agent.agent_ref)

    def hold_voiceprint(self, held: HeldVoiceprint, consumed_utterance_ids: list[str]) -> None:
        agent = self._agent(held.voiceprint.agent_id)
        matched_ref = ""
        if held.matched_agent_id:
            matched = self.find(held.matched_agent_id)
            matched_ref = "" if matched is None else matched.agent_ref
        self.txn.put_held_voiceprint(agent.held_voiceprint_row(held, matched_ref))
        self.txn.delete_utterances(agent.agent_ref, consumed_utterance_ids)

    def held_voiceprint(self, agent_id: str) -> HeldVoiceprint | None:
        agent = self._agent(agent_id)
        row = self.txn.held_voiceprint(agent.agent_ref)
        if row is None:
            return None
        matched = ""
        if row.matched_agent_ref:
            found = self._agents.by_ref(self.txn, [row.matched_agent_ref])
            if row.matched_agent_ref in found:
                matched = found[row.matched_agent_ref].agent_id
        return agent.held_voiceprint(row, matched)

    def release_held_voiceprint(self, agent_id: str) -> HeldVoiceprint | None:
        held = self.held_voiceprint(agent_id)
        if held is not None:
            self.txn.delete_held_voiceprint(self._agent(agent_id).agent_ref)
            self.erased = True
        return held

    def add_watchlist_entry(self, entry: WatchlistEntry) -> None:
        key = self._keys.watchlist_key(self.txn, create=True)
        assert key is not None
        self.txn.insert_watchlist_entry(WatchlistSealer(key).row(entry))

    def watchlist_entries(self) -> list[WatchlistEntry]:
        key = self._keys.watchlist_key(self.txn, create=False)
        if key is None:
            return []
        sealer = WatchlistSealer(key)
        return [sealer.entry(row) for row in self.txn.watchlist()]

    def delete_watchlist_entry(self, entry_id: str) -> bool:
        deleted = self.txn.delete_watchlist_entry(entry_id)
        self.erased = self.erased or deleted
        return deleted

    def expire_watchlist(self, at: datetime) -> list[str]:
        expired = self.txn.delete_watchlist_expired(at)
        self.erased = self.erased or bool(expired)
        return expired

    def create_shift(self, shift: ShiftRecord) -> None:
        self.txn.insert_shift(self._agent(shift.agent_id).shift_row(shift))

    def get_shift(self, shift_id: str) -> ShiftRecord:
        row = self.txn.shift(shift_id)
        agent = (
            None
            if row is None
            else self._agents.by_ref(self.txn, [row.agent_ref]).get(row.agent_ref)
        )
        if row is None or agent is None:
            raise ShiftNotFoundError(f"no shift {shift_id!r}")
        return agent.shift(row)

    def list_shifts(
        self, states: Collection[ShiftState], limit: int, before: ShiftCursor | None
    ) -> list[ShiftRecord]:
        # Erasing an agent deletes its shifts in the same transaction: every row has its agent.
        rows = self.txn.shifts_page(states, limit, before)
        agents = self._agents.by_ref(self.txn, {row.agent_ref for row in rows})
        return [agents[row.agent_ref].shift(row) for row in rows if row.agent_ref in agents]

    def update_shift(self, shift: ShiftRecord) -> None:
        agent = self.find(shift.agent_id)
        if agent is None or not self.txn.update_shift(agent.shift_row(shift)):
            raise ShiftNotFoundError(f"no shift {shift.shift_id!r}")

    def throttle_state(self, agent_id: str) -> ThrottleState:
        return self.txn.throttle_state(self._agent(agent_id).agent_ref)

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        return self.txn.shift_lease(shift_id)

    def take_shift_lease(
        self, shift_id: str, owner: str, *, attached: bool, expires_at: datetime
    ) -> ShiftLease:
        if self.txn.shift(shift_id) is None:
            raise ShiftNotFoundError(f"no shift {shift_id!r}")
        old = self.txn.shift_lease(shift_id)
        if old is None:
            lease = ShiftLease(shift_id, owner, 1, attached, expires_at)
        else:
            lease = replace(
                old, owner=owner, token=old.token + 1, attached=attached, expires_at=expires_at
            )
        self.txn.put_shift_lease(lease)
        return lease

    def append_event(
        self, agent_id: str, payload: bytes, at: datetime, keep_after: datetime
    ) -> int:
        agent = self._agent(agent_id)
        event_id = self.txn.insert_event(agent.agent_ref, agent.seal_event(payload), at)
        self.txn.delete_events_before(keep_after)
        return event_id

    def fence_shift(self, lease: ShiftLease) -> None:
        stored = self.txn.shift_lease(lease.shift_id)
        if stored is None or not _same_holder(stored, lease):
            raise ShiftLeaseLostError(
                f"shift {lease.shift_id} moved to another replica (fencing token "
                f"{lease.token} is stale)"
            )
        self.txn.put_shift_lease(lease)

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        agent_ref = self._agent(agent_id).agent_ref
        before = self.txn.throttle_state(agent_ref)
        self.txn.put_throttle_state(agent_ref, update(before))
        return before

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        self.txn.put_assurance(self._agent(assurance.agent_id).assurance_row(assurance))

    def get_assurance(self, shift_id: str) -> AssuranceRecord | None:
        row = self.txn.assurance(shift_id)
        if row is None:
            return None
        agent = self._agents.by_ref(self.txn, [row.agent_ref]).get(row.agent_ref)
        return None if agent is None else agent.assurance(row)

    def revoke_assurance(
        self, shift_id: str, reason: RevocationReason, at: datetime
    ) -> AssuranceRevocation | None:
        row = self.txn.assurance(shift_id)
        # Within the write transaction: no other revocation can come between check and write.
        if row is None or self.txn.revocation(row.token_id) is not None:
            return None
        revocation = AssuranceRevocation(row.token_id, shift_id, reason, at)
        self.txn.insert_revocation(revocation)
        return revocation

    def record_request(self, completed: CompletedRequest) -> None:
        handle = self._request_handle(completed.key)
        agent = self.find(completed.agent_id) if completed.agent_id else None
        if completed.agent_id and agent is None:
            # Nothing to seal it under, and nobody's to keep: a retry acts again.
            return
        self.txn.put_completed_request(
            CompletedRequestRow(
                handle,
                self._keys.handle(f"request digest {completed.request_digest.hex()}"),
                None if agent is None else agent.agent_ref,
                completed.response
                if agent is None
                else agent.seal_response(handle, completed.response),
                completed.expires_at,
            )
        )

    def recorded_response(
        self, key: RequestKey, request_digest: bytes, at: datetime
    ) -> RecordedResponse | None:
        handle = self._request_handle(key)
        row = self.txn.completed_request(handle)
        if row is None or row.expires_at <= at:
            return None
        response = row.response
        if row.agent_ref is not None:
            agent = self._agents.by_ref(self.txn, [row.agent_ref]).get(row.agent_ref)
            if agent is None:
                return None
            response = agent.open_response(handle, row.response)
        same = row.request_digest == self._keys.handle(f"request digest {request_digest.hex()}")
        return RecordedResponse(same, response)

    def _request_handle(self, key: RequestKey) -> str:
        # Length-prefixed parts: no two keys hash alike; keyed, so the row says nothing of
        # who asked what.
        parts = (key.caller, key.method, key.request_id)
        return self._keys.handle("request " + "".join(f"{len(p)}:{p}" for p in parts))

    def append_audit(self, event: AuditEvent) -> None:
        agent = self.find(event.agent_id) if event.agent_id else None
        audit_chain.append(
            self.txn, self._audit_key, event, "" if agent is None else agent.agent_ref
        )
        self.appended.append(event)

    def _agent(self, agent_id: str) -> AgentSealer:
        agent = self.find(agent_id)
        if agent is None:
            raise AgentNotFoundError(f"no agent {agent_id!r}")
        return agent


def _same_holder(stored: ShiftLease, held: ShiftLease) -> bool:
    """Whether `held` is still the stored lease's holder: the token moves on every takeover."""
    return stored.token == held.token and stored.owner == held.owner


def _agent_keys(txn: Transaction) -> Iterator[AgentKeyRow]:
    after = ""
    while page := txn.agent_key_page(after, _PAGE_SIZE):
        yield from page
        after = page[-1].agent_handle


def _service_key_ids(txn: Transaction) -> Counter[str]:
    """How many values each service key id has sealed: the wrapped data keys and the sealed
    signing keys, read from their headers. What a key rotation must move, and what opening
    the store needs the keys of."""
    sealed = [key.sealed_private_key for key in txn.signing_keys()]
    sealed += [row.wrapped_key for row in _agent_keys(txn)]
    for name in STORE_KEYS:
        store_key = txn.store_key(name)
        if store_key is not None:
            sealed.append(store_key)
    return count_key_ids(sealed)
