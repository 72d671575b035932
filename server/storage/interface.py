"""The storage interface the domain uses. One implementation, `SecureStore`
(server/storage/secure_store.py), holds the security invariants (sealing under per-agent data
keys, the audit chain, pseudonyms) over any backend (server/storage/backend.py); SQLite is the
embedded backend.

Every embedding crosses this interface in the clear and is sealed by the store; no raw audio
is ever stored. Writes that belong together, above all an action and its audit record, go
through one unit of work: they commit together or not at all.

The records are defined in server/records.py, and the protocols of what security's services
need of the store (AssuranceStore, KeyRotationStore) in the services' own modules, so
server.security never imports server.storage; so is what the request ledger needs
(CompletedRequestStore, in server/runtime/requests.py). All are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Protocol

from server.audit_actions import AuditAction
from server.records import (
    AgentOverview,
    AgentRecord,
    AssuranceRecord,
    AssuranceRevocation,
    AuditEvent,
    HeldVoiceprint,
    HoldReason,
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
from server.runtime.requests import CompletedRequest, CompletedRequestStore
from server.security.assurance_desk import AssuranceStore
from server.security.audit import AuditLog
from server.security.key_rotation import KeyRotationStore

__all__ = [
    "AgentOverview",
    "AgentRecord",
    "AssuranceRecord",
    "AssuranceRevocation",
    "AssuranceStore",
    "AuditEvent",
    "CompletedRequest",
    "CompletedRequestStore",
    "EventStore",
    "EventWakeups",
    "HeldVoiceprint",
    "HoldReason",
    "KeyRotationStore",
    "RecordingOrigin",
    "ReencryptionReport",
    "ReplayFingerprint",
    "RevocationReason",
    "ShiftCursor",
    "ShiftLease",
    "ShiftRecord",
    "ShiftState",
    "ShiftStore",
    "Store",
    "StoreCensus",
    "ThrottleState",
    "ThrottleStore",
    "UnitOfWork",
    "UtteranceRecord",
    "Voiceprint",
    "VoiceprintStore",
    "WatchlistEntry",
]


class UnitOfWork(Protocol):
    """Reads and writes that commit together when the `with` block ends, and are rolled back
    together if it raises. Open one with `Store.unit_of_work()`; inside it, call only the
    unit (the store's own methods would wait for the unit to end). Keep it short: it holds
    the store's write transaction."""

    def create_agent(self, agent: AgentRecord) -> None:
        """Raises AgentExistsError if the id is taken."""

    def get_agent(self, agent_id: str) -> AgentRecord:
        """Raises AgentNotFoundError."""

    def delete_agent(self, agent_id: str) -> None:
        """Erases the agent, its pending utterances, its voiceprint, its replay fingerprints,
        its shifts with their assurances and revocations, and its throttling state, and
        destroys its data key: any copy of them left anywhere (old log frames, backups of the
        database) no longer opens. Raises AgentNotFoundError."""

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        """Adds a pending utterance. Raises AgentNotFoundError, or CapacityError when the
        agent already has max_pending utterances."""

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        """Pending utterances, oldest first. Raises AgentNotFoundError."""

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        """Discards the given pending utterances of the agent (another agent's ids are out
        of reach)."""

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        """Stores the voiceprint, replacing any previous one, and discards the consumed pending
        utterances. Returns True if a previous voiceprint was replaced. Raises
        AgentNotFoundError."""

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        """The agent's voiceprint, or None if not enrolled. Raises AgentNotFoundError."""

    def add_fingerprint(
        self, fingerprint: ReplayFingerprint, *, keep_after: datetime, keep: int
    ) -> None:
        """Stores a replay fingerprint of the agent, then drops its fingerprints of the same
        origin recorded before `keep_after` and all but the newest `keep`. Raises
        AgentNotFoundError."""

    def fingerprints(self, agent_id: str) -> list[ReplayFingerprint]:
        """The agent's replay fingerprints, oldest first. Raises AgentNotFoundError."""

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        """Records that a check scored against the agent's voiceprint at `at` (never moves the
        time back). Does nothing if the agent has no voiceprint (any more)."""

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        """Erases every voiceprint last used before `unused_before`, with the agent's replay
        fingerprints (the agents stay), and returns their agents' ids."""

    def set_passive_enrollment(self, agent_id: str, requested_at: datetime) -> None:
        """Marks the agent for passive enrollment from its shifts. Raises AgentNotFoundError."""

    def passive_enrollment(self, agent_id: str) -> datetime | None:
        """When passive enrollment was asked for; None when it was not or has ended. Raises
        AgentNotFoundError."""

    def end_passive_enrollment(self, agent_id: str) -> None:
        """Removes the mark (nothing if there is none or no such agent)."""

    def hold_voiceprint(self, held: HeldVoiceprint, consumed_utterance_ids: list[str]) -> None:
        """Keeps the voiceprint held for review (replacing one held before) and discards the
        consumed pending utterances; the active voiceprint, if any, stays. Raises
        AgentNotFoundError."""

    def held_voiceprint(self, agent_id: str) -> HeldVoiceprint | None:
        """The agent's held voiceprint. Raises AgentNotFoundError."""

    def release_held_voiceprint(self, agent_id: str) -> HeldVoiceprint | None:
        """Removes the agent's held voiceprint and returns it. Raises AgentNotFoundError."""

    def add_watchlist_entry(self, entry: WatchlistEntry) -> None:
        """Seals and keeps the entry (its id must be new)."""

    def watchlist_entries(self) -> list[WatchlistEntry]:
        """Every entry not yet deleted, oldest first (expired ones until the sweep)."""

    def delete_watchlist_entry(self, entry_id: str) -> bool:
        """Erases the entry; False if there was none."""

    def expire_watchlist(self, at: datetime) -> list[str]:
        """Erases the entries expired at `at`; their ids."""

    def create_shift(self, shift: ShiftRecord) -> None:
        """Raises AgentNotFoundError if the agent does not exist."""

    def get_shift(self, shift_id: str) -> ShiftRecord:
        """Raises ShiftNotFoundError."""

    def update_shift(self, shift: ShiftRecord) -> None:
        """Replaces the stored state of an existing shift. Raises ShiftNotFoundError."""

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        """The shift's lease (server/shifts/lease.py); None if no replica ever took it."""

    def take_shift_lease(
        self, shift_id: str, owner: str, *, attached: bool, expires_at: datetime
    ) -> ShiftLease:
        """Makes `owner` the shift's owner with the next fencing token, keeping the checkpoint
        schedule; every write carrying an older token is refused from now on. Raises
        ShiftNotFoundError."""

    def fence_shift(self, lease: ShiftLease) -> None:
        """Refuses the unit, with ShiftLeaseLostError, unless `lease`'s owner still holds the
        shift with its token (a shift write calls it first, so a replica that lost the lease
        writes nothing); then stores `lease` (its expiry and checkpoint schedule)."""

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        """Replaces the agent's state (ThrottleState() if it has none) with `update(state)`,
        and returns the state it replaced. `update` must be quick and must not call the
        store; an exception from it propagates (and rolls the unit back). Raises
        AgentNotFoundError."""

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        """Keeps `assurance` as its shift's latest, replacing an earlier one (whose revocation,
        if any, stands). Raises AgentNotFoundError."""

    def revoke_assurance(
        self, shift_id: str, reason: RevocationReason, at: datetime
    ) -> AssuranceRevocation | None:
        """Revokes the shift's latest assurance and returns the revocation; None when the
        shift has no assurance or its latest is revoked already (the first revocation
        stands)."""

    def record_request(self, completed: CompletedRequest) -> None:
        """Keeps a request id's completion, so a retry returns its response
        (server/runtime/requests.py): in this unit, it commits with the action it answers.
        A response naming an agent is sealed under the agent's data key and erased with it;
        if that agent does not exist, nothing is kept."""

    def append_event(
        self, agent_id: str, payload: bytes, at: datetime, keep_after: datetime
    ) -> int:
        """EventStore.append_event in this unit: the event commits with the change it
        reports."""

    def append_audit(self, event: AuditEvent) -> None:
        """Appends one audit record to the chain and seals it. While the agent exists the
        record names it by pseudonym only, so erasing the agent unlinks its records; an id
        that is no agent (any more), as in the record of an erasure, is recorded in clear.
        Raises ValueError for details that could hold biometric data (binary values, long
        lists of numbers) or that are not plain JSON."""


class VoiceprintStore(AuditLog, Protocol):
    """Agents, their pending enrollment utterances, their voiceprints, and the audit log
    (read as a hash chain through AuditLog).

    Implementations are thread-safe: methods are called from worker threads. Each method is
    one transaction of its own; `unit_of_work` groups several.
    """

    def unit_of_work(self, what: str = "write to the store") -> AbstractContextManager[UnitOfWork]:
        """A unit of work (see UnitOfWork); `what` names it in a StorageError."""

    def create_agent(self, agent: AgentRecord) -> None:
        """UnitOfWork.create_agent on its own."""

    def get_agent(self, agent_id: str) -> AgentRecord:
        """Raises AgentNotFoundError."""

    def delete_agent(self, agent_id: str) -> None:
        """UnitOfWork.delete_agent on its own."""

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        """UnitOfWork.add_utterance on its own."""

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        """Pending utterances, oldest first. Raises AgentNotFoundError."""

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        """UnitOfWork.remove_utterances on its own."""

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        """UnitOfWork.replace_voiceprint on its own."""

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        """The agent's voiceprint, or None if not enrolled. Raises AgentNotFoundError."""

    def add_fingerprint(
        self, fingerprint: ReplayFingerprint, *, keep_after: datetime, keep: int
    ) -> None:
        """See UnitOfWork.add_fingerprint."""

    def fingerprints(self, agent_id: str) -> list[ReplayFingerprint]:
        """See UnitOfWork.fingerprints."""

    def voiceprints(self, model_id: str) -> list[Voiceprint]:
        """Every agent's voiceprint made by `model_id`: the agents' part of the
        score-normalisation cohort."""

    def agent_overviews(self) -> list[AgentOverview]:
        """Every agent with its pending enrollment and voiceprint, in agent id order."""

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        """UnitOfWork.mark_voiceprint_used on its own."""

    def passive_enrollment(self, agent_id: str) -> datetime | None:
        """See UnitOfWork.passive_enrollment."""

    def held_voiceprint(self, agent_id: str) -> HeldVoiceprint | None:
        """See UnitOfWork.held_voiceprint."""

    def watchlist_entries(self) -> list[WatchlistEntry]:
        """See UnitOfWork.watchlist_entries."""

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        """UnitOfWork.expire_voiceprints on its own."""

    def append_audit(self, event: AuditEvent) -> None:
        """UnitOfWork.append_audit on its own."""

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        """Audit records, oldest first, optionally for one agent. Records of an erased agent
        come back with an empty agent_id, except the record of its erasure."""

    def latest_audit_event(self, action: AuditAction) -> AuditEvent | None:
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

    def list_shifts(
        self,
        states: Collection[ShiftState] = (),
        limit: int = 100,
        before: ShiftCursor | None = None,
    ) -> list[ShiftRecord]:
        """Up to `limit` shifts in `states` (any state when empty), the latest started first,
        after the shift `before` names (ShiftCursor.after(the last shift of a page))."""

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        """See UnitOfWork.shift_lease."""

    def take_shift_lease(
        self, shift_id: str, owner: str, *, attached: bool, expires_at: datetime
    ) -> tuple[ShiftLease, ShiftRecord]:
        """UnitOfWork.take_shift_lease on its own; with the shift's state as stored when it
        was taken (another replica may have changed it since this one last looked)."""

    def renew_shift_leases(
        self, leases: Sequence[ShiftLease], expires_at: datetime
    ) -> dict[str, ShiftLease | None]:
        """Moves to `expires_at` the expiry of each of `leases` its owner still holds, in one
        transaction; returns the stored lease (None: the shift is gone) of each one lost."""


class EventStore(Protocol):
    """Shift events kept for the replicas' event bus (server/shifts/event_bus.py): payloads
    the store seals under their agent's key and erases with it. Thread-safe."""

    def append_event(
        self, agent_id: str, payload: bytes, at: datetime, keep_after: datetime
    ) -> int:
        """Keeps the event, drops those from before `keep_after`, and returns its id: higher
        than any before it. Raises AgentNotFoundError."""

    def events_after(self, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        """At most `limit` events (id, payload) after `after_id`, by id; an erased agent's are
        gone."""

    def latest_event_id(self) -> int:
        """The highest id given so far; 0 before any. Never one of a write still in progress
        (its event not yet readable): every event up to it that commits has committed."""

    def oldest_event_id(self) -> int | None:
        """The lowest id still kept (the older ones are dropped); None when none is."""


class EventWakeups(Protocol):
    """A backend's way of telling a replica that another committed shift events (PostgreSQL:
    LISTEN/NOTIFY). Only a hint to read the store: a missed one loses nothing."""

    def start(self, woken: Callable[[], None]) -> None:
        """Calls `woken` (from any thread) after events commit, and once after each
        reconnection, since events may have been missed while disconnected."""

    def close(self) -> None: ...


class ThrottleStore(Protocol):
    """Throttling state per agent. Thread-safe, like VoiceprintStore."""

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        """UnitOfWork.update_throttle_state in one atomic step of its own: an exception from
        `update` changes nothing."""

    def throttle_state(self, agent_id: str) -> ThrottleState:
        """The agent's state (ThrottleState() if it has none), read only. Raises
        AgentNotFoundError."""


class CensusStore(Protocol):
    def census(self, delay_after_failures: int) -> StoreCensus:
        """Counts for monitoring: open shifts by state; agents with at least
        `delay_after_failures` consecutive failures (whose next attempt waits) and not
        disabled; disabled agents."""


class Store(
    VoiceprintStore,
    ShiftStore,
    AssuranceStore,
    ThrottleStore,
    CensusStore,
    KeyRotationStore,
    CompletedRequestStore,
    EventStore,
    Protocol,
):
    """Everything the service keeps: one interface over any backend."""
