"""The embedded VoiceprintStore: one SQLite file, embeddings sealed by VoiceprintCipher.

Durability and erasure are set per connection: WAL with synchronous=FULL (a committed write
survives a crash), and secure_delete so erased rows leave no bytes behind in free pages.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from models.embedder import Embedding
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    CapacityError,
    ConfigurationError,
    ShiftNotFoundError,
    StorageError,
)
from server.security.assurances import StoredSigningKey
from server.security.audit import (
    ERASURE_ACTION,
    GENESIS_HASH,
    AuditEntry,
    AuditHead,
    AuditKey,
    AuditRecord,
    canonical_details,
    chain_hash,
    new_agent_pseudonym,
)
from server.security.crypto import KEY_ID_BYTES, RecordKind, VoiceprintCipher, associated_data
from server.storage.interface import (
    AgentRecord,
    AssuranceRecord,
    AssuranceRevocation,
    AuditEvent,
    ReencryptionReport,
    RevocationReason,
    ShiftRecord,
    ShiftState,
    ThrottleState,
    UtteranceRecord,
    Voiceprint,
)

logger = logging.getLogger(__name__)

# The hash-chained audit log (server/audit.py), an entry of _MIGRATIONS. Named, because its
# hashes and seals need Python: _migrate runs _chain_carried_over_audit right after it.
_AUDIT_CHAIN_MIGRATION = (
    # Audit records name an agent by this random pseudonym, so erasing the agent's row unlinks
    # them while the chain over them stays intact.
    "ALTER TABLE agents ADD COLUMN audit_pseudonym TEXT",
    "UPDATE agents SET audit_pseudonym = lower(hex(randomblob(16)))",
    "CREATE UNIQUE INDEX agents_by_audit_pseudonym ON agents (audit_pseudonym)",
    # seq counts from 1 without gaps; key_id and mac are NULL only when written by a store
    # opened without the audit key.
    """CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        action TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        agent_ref TEXT NOT NULL,
        outcome TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        key_id TEXT,
        mac TEXT
    )""",
    "CREATE INDEX audit_log_by_agent_ref ON audit_log (agent_ref)",
    "CREATE INDEX audit_log_by_agent_id ON audit_log (agent_id)",
    """INSERT INTO audit_log (seq, at, action, agent_id, agent_ref, outcome, details,
        prev_hash, hash)
        SELECT row_number() OVER (ORDER BY id), at, action, agent_id, '', outcome, details, '', ''
        FROM audit""",
    "DROP TABLE audit",
    # The sealed head: how many records the chain has and the last one's hash.
    """CREATE TABLE audit_head (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL,
        key_id TEXT,
        mac TEXT
    )""",
)

# _MIGRATIONS[n] takes the schema from user_version n to n + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE agents (
            agent_id TEXT PRIMARY KEY,
            display_name TEXT NOT NULL,
            consent_reference TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )""",
        """CREATE TABLE pending_utterances (
            utterance_id TEXT PRIMARY KEY,
            agent_id TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
            model_id TEXT NOT NULL,
            embedding BLOB NOT NULL,
            duration_seconds REAL NOT NULL,
            net_speech_seconds REAL NOT NULL,
            speech_level_dbfs REAL NOT NULL,
            clipped_fraction REAL NOT NULL,
            received_at INTEGER NOT NULL
        )""",
        "CREATE INDEX pending_utterances_by_agent ON pending_utterances (agent_id, received_at)",
        """CREATE TABLE voiceprints (
            agent_id TEXT PRIMARY KEY REFERENCES agents (agent_id) ON DELETE CASCADE,
            model_id TEXT NOT NULL,
            embedding BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            utterance_count INTEGER NOT NULL,
            net_speech_seconds REAL NOT NULL
        )""",
        # No foreign key: audit rows outlive the agent (they hold no biometrics).
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at INTEGER NOT NULL,
            action TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            outcome TEXT NOT NULL,
            details TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_agent ON audit (agent_id, id)",
    ),
    (
        # Shift state only, never audio. Erasing the agent erases its shifts.
        """CREATE TABLE shifts (
            shift_id TEXT PRIMARY KEY,
            agent_id TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            state TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            ended_at INTEGER,
            consecutive_failures INTEGER NOT NULL,
            checkpoints_passed INTEGER NOT NULL,
            checkpoints_failed INTEGER NOT NULL,
            checkpoints_insufficient INTEGER NOT NULL
        )""",
        "CREATE INDEX shifts_by_agent ON shifts (agent_id)",
    ),
    (
        # Telephone-band companions of voiceprints and of the utterances they are made from;
        # NULL for rows written before companions existed.
        "ALTER TABLE pending_utterances ADD COLUMN telephone_embedding BLOB",
        "ALTER TABLE voiceprints ADD COLUMN telephone_embedding BLOB",
    ),
    (
        # Assurance signing keys, their private halves sealed; and each shift's latest
        # assurance, for the MFA provider to fetch. Erasing an agent erases its assurances.
        """CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            sealed_private_key BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            retired_at INTEGER,
            published_until INTEGER
        )""",
        """CREATE TABLE assurances (
            shift_id TEXT PRIMARY KEY REFERENCES shifts (shift_id) ON DELETE CASCADE,
            agent_id TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
            token_id TEXT NOT NULL,
            token TEXT NOT NULL,
            issued_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        )""",
    ),
    (
        # Throttling of verification attempts (server/throttling.py): only agents in a run of
        # failures have a row. Erasing the agent erases it.
        """CREATE TABLE verification_throttle (
            agent_id TEXT PRIMARY KEY REFERENCES agents (agent_id) ON DELETE CASCADE,
            consecutive_failures INTEGER NOT NULL,
            last_failure_at INTEGER,
            disabled_at INTEGER
        )""",
        # When a check last scored against each voiceprint, for retention. Voiceprints stored
        # before count from their latest audited decision, or else from their creation.
        "ALTER TABLE voiceprints ADD COLUMN last_used_at INTEGER NOT NULL DEFAULT 0",
        """UPDATE voiceprints SET last_used_at = max(created_at, coalesce((
            SELECT max(at) FROM audit WHERE audit.agent_id = voiceprints.agent_id
            AND audit.action IN ('verify', 'shift.login', 'shift.checkpoint')
            AND audit.outcome IN ('ACCEPT', 'REJECT')
        ), 0))""",
        "CREATE INDEX voiceprints_by_last_use ON voiceprints (last_used_at)",
    ),
    _AUDIT_CHAIN_MIGRATION,
    (
        # Revoked assurances, by token id: a shift that ends or locks revokes its latest one,
        # and the row outlives a newer assurance of the shift. Erasing the shift (with its
        # agent) erases them.
        """CREATE TABLE assurance_revocations (
            token_id TEXT PRIMARY KEY,
            shift_id TEXT NOT NULL REFERENCES shifts (shift_id) ON DELETE CASCADE,
            reason TEXT NOT NULL,
            revoked_at INTEGER NOT NULL
        )""",
        "CREATE INDEX assurance_revocations_by_shift ON assurance_revocations (shift_id)",
        # Shifts that ended or locked before revocation existed revoke their assurance now.
        """INSERT INTO assurance_revocations (token_id, shift_id, reason, revoked_at)
            SELECT a.token_id, a.shift_id,
                CASE s.state WHEN 'ENDED' THEN 'shift ended' ELSE 'shift locked' END,
                coalesce(s.ended_at, s.updated_at)
            FROM assurances a JOIN shifts s ON s.shift_id = a.shift_id
            WHERE s.state IN ('ENDED', 'LOCKED')""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_SHIFT_COLUMNS = (
    "shift_id, agent_id, device_id, state, started_at, updated_at, ended_at, "
    "consecutive_failures, checkpoints_passed, checkpoints_failed, checkpoints_insufficient"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A longer list of floats in audit details looks like an embedding written out with tolist().
_MAX_AUDIT_FLOATS = 32

# Joins an audit record's pseudonym to its agent while the agent exists.
_RESOLVE_AGENT = "LEFT JOIN agents g ON a.agent_ref <> '' AND g.audit_pseudonym = a.agent_ref"

_UTTERANCE_COLUMNS = (
    "utterance_id, agent_id, model_id, embedding, duration_seconds, net_speech_seconds, "
    "speech_level_dbfs, clipped_fraction, received_at, telephone_embedding"
)
_VOICEPRINT_COLUMNS = (
    "agent_id, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding, last_used_at"
)
# Every column holding something sealed under the service key, whose blob starts with a format
# byte and the key id: what a key rotation must move and what startup checks it can open.
_SEALED_COLUMNS = (
    ("voiceprints", "embedding"),
    ("voiceprints", "telephone_embedding"),
    ("pending_utterances", "embedding"),
    ("pending_utterances", "telephone_embedding"),
    ("signing_keys", "sealed_private_key"),
)


class SqliteVoiceprintStore:
    """VoiceprintStore on one SQLite connection shared by worker threads under a lock."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        cipher: VoiceprintCipher,
        audit_key: AuditKey | None = None,
    ) -> None:
        """Use `open`, which configures and migrates the connection first."""
        self._conn = connection
        self._cipher = cipher
        self._audit_key = audit_key
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, path: Path, cipher: VoiceprintCipher, *, audit_key: AuditKey | None = None
    ) -> SqliteVoiceprintStore:
        """`audit_key` seals the audit chain; without it records are chained but unsealed,
        and `voxauth audit verify` reports them as unverifiable."""
        _create_private_file(path)
        try:
            # isolation_level=None: transactions are begun explicitly, never implicitly.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open voiceprint database {path}: {exc}") from exc
        try:
            _configure(conn)
            _migrate(conn, audit_key)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot prepare voiceprint database {path}: {exc}") from exc
            raise
        store = cls(conn, cipher, audit_key)
        try:
            store._require_known_keys()
        except BaseException:
            store.close()
            raise
        return store

    def create_agent(self, agent: AgentRecord) -> None:
        with self._transaction(f"create agent {agent.agent_id!r}") as conn:
            if _agent_exists(conn, agent.agent_id):
                raise AgentExistsError(f"agent {agent.agent_id!r} already exists")
            conn.execute(
                "INSERT INTO agents (agent_id, display_name, consent_reference, created_at, "
                "audit_pseudonym) VALUES (?, ?, ?, ?, ?)",
                (
                    agent.agent_id,
                    agent.display_name,
                    agent.consent_reference,
                    _to_micros(agent.created_at),
                    new_agent_pseudonym(),
                ),
            )

    def get_agent(self, agent_id: str) -> AgentRecord:
        with self._transaction(f"read agent {agent_id!r}", write=False) as conn:
            row = conn.execute(
                "SELECT display_name, consent_reference, created_at FROM agents WHERE agent_id = ?",
                (agent_id,),
            ).fetchone()
        if row is None:
            raise _not_found(agent_id)
        return AgentRecord(agent_id, row[0], row[1], _from_micros(row[2]))

    def delete_agent(self, agent_id: str) -> None:
        with self._transaction(f"delete agent {agent_id!r}") as conn:
            # Pending utterances and the voiceprint go with it (ON DELETE CASCADE).
            if conn.execute("DELETE FROM agents WHERE agent_id = ?", (agent_id,)).rowcount == 0:
                raise _not_found(agent_id)
        self._truncate_wal()

    def add_utterance(self, utterance: UtteranceRecord, max_pending: int) -> None:
        # Encrypt before taking the lock: it is the slow part and needs no database state.
        blob = self._cipher.encrypt_embedding(
            utterance.embedding,
            associated=associated_data(
                agent_id=utterance.agent_id,
                record_kind="pending_utterance",
                model_id=utterance.model_id,
            ),
        )
        telephone_blob = self._seal_optional(
            utterance.telephone_embedding,
            utterance.agent_id,
            "telephone_pending_utterance",
            utterance.model_id,
        )
        with self._transaction(f"add utterance for agent {utterance.agent_id!r}") as conn:
            if not _agent_exists(conn, utterance.agent_id):
                raise _not_found(utterance.agent_id)
            (pending,) = conn.execute(
                "SELECT count(*) FROM pending_utterances WHERE agent_id = ?",
                (utterance.agent_id,),
            ).fetchone()
            if pending >= max_pending:
                raise CapacityError(
                    f"agent {utterance.agent_id!r} already has {pending} pending utterances "
                    f"(the limit is {max_pending}); finalize or discard some first"
                )
            conn.execute(
                f"INSERT INTO pending_utterances ({_UTTERANCE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    utterance.utterance_id,
                    utterance.agent_id,
                    utterance.model_id,
                    blob,
                    utterance.duration_seconds,
                    utterance.net_speech_seconds,
                    utterance.speech_level_dbfs,
                    utterance.clipped_fraction,
                    _to_micros(utterance.received_at),
                    telephone_blob,
                ),
            )

    def pending_utterances(self, agent_id: str) -> list[UtteranceRecord]:
        with self._transaction(f"read utterances of agent {agent_id!r}", write=False) as conn:
            if not _agent_exists(conn, agent_id):
                raise _not_found(agent_id)
            rows = conn.execute(
                f"SELECT {_UTTERANCE_COLUMNS} FROM pending_utterances WHERE agent_id = ? "
                "ORDER BY received_at, rowid",
                (agent_id,),
            ).fetchall()
        return [self._utterance_from_row(row) for row in rows]

    def remove_utterances(self, agent_id: str, utterance_ids: list[str]) -> None:
        with self._transaction(f"remove utterances of agent {agent_id!r}") as conn:
            _delete_utterances(conn, agent_id, utterance_ids)

    def replace_voiceprint(self, voiceprint: Voiceprint, consumed_utterance_ids: list[str]) -> bool:
        blob = self._cipher.encrypt_embedding(
            voiceprint.embedding,
            associated=associated_data(
                agent_id=voiceprint.agent_id, record_kind="voiceprint", model_id=voiceprint.model_id
            ),
        )
        telephone_blob = self._seal_optional(
            voiceprint.telephone_embedding,
            voiceprint.agent_id,
            "telephone_voiceprint",
            voiceprint.model_id,
        )
        with self._transaction(f"store voiceprint of agent {voiceprint.agent_id!r}") as conn:
            if not _agent_exists(conn, voiceprint.agent_id):
                raise _not_found(voiceprint.agent_id)
            replaced = (
                conn.execute(
                    "SELECT 1 FROM voiceprints WHERE agent_id = ?", (voiceprint.agent_id,)
                ).fetchone()
                is not None
            )
            conn.execute(
                f"INSERT OR REPLACE INTO voiceprints ({_VOICEPRINT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    voiceprint.agent_id,
                    voiceprint.model_id,
                    blob,
                    _to_micros(voiceprint.created_at),
                    voiceprint.utterance_count,
                    voiceprint.net_speech_seconds,
                    telephone_blob,
                    # Enrollment is the first use: retention counts from it.
                    _to_micros(voiceprint.created_at),
                ),
            )
            _delete_utterances(conn, voiceprint.agent_id, consumed_utterance_ids)
        return replaced

    def get_voiceprint(self, agent_id: str) -> Voiceprint | None:
        with self._transaction(f"read voiceprint of agent {agent_id!r}", write=False) as conn:
            if not _agent_exists(conn, agent_id):
                raise _not_found(agent_id)
            row = conn.execute(
                f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE agent_id = ?",
                (agent_id,),
            ).fetchone()
        return None if row is None else self._voiceprint_from_row(row)

    def voiceprints(self, model_id: str) -> list[Voiceprint]:
        with self._transaction("read voiceprints", write=False) as conn:
            rows = conn.execute(
                f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE model_id = ? "
                "ORDER BY agent_id",
                (model_id,),
            ).fetchall()
        return [self._voiceprint_from_row(row) for row in rows]

    def append_audit(self, event: AuditEvent) -> None:
        """Chains and seals the record. An existing agent is recorded by its pseudonym; an id
        that is no agent (any more), as in the record of an erasure, in clear."""
        details = _audit_details_json(event.details)
        at = _to_micros(event.at)
        with self._transaction(f"append audit event {event.action!r}") as conn:
            row = conn.execute(
                "SELECT audit_pseudonym FROM agents WHERE agent_id = ?", (event.agent_id,)
            ).fetchone()
            agent_ref: str = "" if row is None else row[0]
            entry = AuditEntry(
                at,
                event.action,
                "" if agent_ref else event.agent_id,
                agent_ref,
                event.outcome,
                details,
            )
            _append_chained(conn, self._audit_key, entry)

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        query = (
            "SELECT a.action, coalesce(g.agent_id, a.agent_id), a.outcome, a.at, a.details "
            f"FROM audit_log a {_RESOLVE_AGENT}"
        )
        parameters: tuple[str, ...] = ()
        if agent_id is not None:
            query += (
                " WHERE a.agent_ref = (SELECT audit_pseudonym FROM agents WHERE agent_id = ?)"
                " OR (a.agent_id = ? AND a.agent_ref = '')"
            )
            parameters = (agent_id, agent_id)
        with self._transaction("read audit events", write=False) as conn:
            rows = conn.execute(query + " ORDER BY a.seq", parameters).fetchall()
        return [
            AuditEvent(action, agent, outcome, _from_micros(at), json.loads(details))
            for action, agent, outcome, at, details in rows
        ]

    def latest_audit_event(self, action: str) -> AuditEvent | None:
        query = (
            "SELECT a.action, coalesce(g.agent_id, a.agent_id), a.outcome, a.at, a.details "
            f"FROM audit_log a {_RESOLVE_AGENT} WHERE a.action = ? ORDER BY a.seq DESC LIMIT 1"
        )
        with self._transaction("read the latest audit event", write=False) as conn:
            row = conn.execute(query, (action,)).fetchone()
        if row is None:
            return None
        return AuditEvent(row[0], row[1], row[2], _from_micros(row[3]), json.loads(row[4]))

    def audit_head(self) -> AuditHead | None:
        with self._transaction("read the audit chain head", write=False) as conn:
            row = conn.execute("SELECT seq, hash, key_id, mac FROM audit_head").fetchone()
        return None if row is None else AuditHead(*row)

    def audit_records(self, after_seq: int, limit: int) -> list[AuditRecord]:
        with self._transaction("read audit records", write=False) as conn:
            rows = conn.execute(
                # The casts keep a value someone rewrote with another type checkable: it then
                # fails its hash instead of the check.
                "SELECT a.seq, CAST(a.at AS INTEGER), CAST(a.action AS TEXT), "
                "CAST(a.agent_id AS TEXT), CAST(a.agent_ref AS TEXT), CAST(a.outcome AS TEXT), "
                "CAST(a.details AS TEXT), CAST(a.prev_hash AS TEXT), CAST(a.hash AS TEXT), "
                "CAST(a.key_id AS TEXT), CAST(a.mac AS TEXT), coalesce(g.agent_id, a.agent_id) "
                f"FROM audit_log a {_RESOLVE_AGENT} WHERE a.seq > ? ORDER BY a.seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            AuditRecord(
                seq=row[0],
                entry=AuditEntry(*row[1:7]),
                prev_hash=row[7],
                hash=row[8],
                key_id=row[9],
                mac=row[10],
                agent=row[11],
            )
            for row in rows
        ]

    def reseal_audit(self, keys: Sequence[AuditKey], batch_size: int) -> int:
        """After a key rotation: seals under the current audit key every record (and the head)
        sealed under one of `keys`, `batch_size` records per transaction, and returns how many
        records it re-sealed. A seal that does not check out stops it with StorageError, for
        re-sealing it would launder tampering."""
        current = self._audit_key
        if current is None:
            raise ConfigurationError("re-sealing the audit log needs the audit key")
        known = {key.key_id: key for key in keys}
        resealed = 0
        while True:
            with self._transaction("re-seal audit records") as conn:
                rows = conn.execute(
                    "SELECT seq, hash, key_id, mac FROM audit_log "
                    "WHERE key_id IS NOT NULL AND key_id <> ? ORDER BY seq LIMIT ?",
                    (current.key_id, batch_size),
                ).fetchall()
                for seq, record_hash, key_id, mac in rows:
                    key = known.get(key_id)
                    if key is None or mac is None or not key.sealed_record(record_hash, mac):
                        raise StorageError(
                            f"audit record {seq}'s seal does not check out under the given "
                            "keys; run `voxauth audit verify` before re-sealing"
                        )
                    conn.execute(
                        "UPDATE audit_log SET key_id = ?, mac = ? WHERE seq = ?",
                        (*_record_seal(current, record_hash), seq),
                    )
                if not rows:
                    _reseal_head(conn, current, known)
                    return resealed
            resealed += len(rows)

    def create_shift(self, shift: ShiftRecord) -> None:
        with self._transaction(f"start shift {shift.shift_id!r}") as conn:
            if not _agent_exists(conn, shift.agent_id):
                raise _not_found(shift.agent_id)
            conn.execute(
                f"INSERT INTO shifts ({_SHIFT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _shift_row(shift),
            )

    def get_shift(self, shift_id: str) -> ShiftRecord:
        with self._transaction(f"read shift {shift_id!r}", write=False) as conn:
            row = conn.execute(
                f"SELECT {_SHIFT_COLUMNS} FROM shifts WHERE shift_id = ?", (shift_id,)
            ).fetchone()
        if row is None:
            raise ShiftNotFoundError(f"no shift {shift_id!r}")
        return ShiftRecord(
            shift_id=row[0],
            agent_id=row[1],
            device_id=row[2],
            state=ShiftState(row[3]),
            started_at=_from_micros(row[4]),
            updated_at=_from_micros(row[5]),
            ended_at=None if row[6] is None else _from_micros(row[6]),
            consecutive_failures=row[7],
            checkpoints_passed=row[8],
            checkpoints_failed=row[9],
            checkpoints_insufficient=row[10],
        )

    def update_shift(self, shift: ShiftRecord) -> None:
        row = _shift_row(shift)
        with self._transaction(f"update shift {shift.shift_id!r}") as conn:
            updated = conn.execute(
                "UPDATE shifts SET agent_id = ?, device_id = ?, state = ?, started_at = ?, "
                "updated_at = ?, ended_at = ?, consecutive_failures = ?, checkpoints_passed = ?, "
                "checkpoints_failed = ?, checkpoints_insufficient = ? WHERE shift_id = ?",
                (*row[1:], row[0]),
            )
            if updated.rowcount == 0:
                raise ShiftNotFoundError(f"no shift {shift.shift_id!r}")

    def load_signing_keys(self) -> list[StoredSigningKey]:
        with self._transaction("read signing keys", write=False) as conn:
            rows = conn.execute(
                "SELECT kid, sealed_private_key, created_at, retired_at, published_until "
                "FROM signing_keys"
            ).fetchall()
        return [
            StoredSigningKey(
                kid=row[0],
                sealed_private_key=bytes(row[1]),
                created_at=_from_micros(row[2]),
                retired_at=None if row[3] is None else _from_micros(row[3]),
                published_until=None if row[4] is None else _from_micros(row[4]),
            )
            for row in rows
        ]

    def save_signing_keys(self, keys: list[StoredSigningKey]) -> None:
        with self._transaction("save signing keys") as conn:
            conn.execute("DELETE FROM signing_keys")
            conn.executemany(
                "INSERT INTO signing_keys (kid, sealed_private_key, created_at, retired_at, "
                "published_until) VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        key.kid,
                        key.sealed_private_key,
                        _to_micros(key.created_at),
                        None if key.retired_at is None else _to_micros(key.retired_at),
                        None if key.published_until is None else _to_micros(key.published_until),
                    )
                    for key in keys
                ],
            )

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        with self._transaction(f"save assurance of shift {assurance.shift_id!r}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO assurances (shift_id, agent_id, token_id, token, "
                "issued_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    assurance.shift_id,
                    assurance.agent_id,
                    assurance.token_id,
                    assurance.token,
                    _to_micros(assurance.issued_at),
                    _to_micros(assurance.expires_at),
                ),
            )

    def get_assurance(self, shift_id: str) -> AssuranceRecord | None:
        with self._transaction(f"read assurance of shift {shift_id!r}", write=False) as conn:
            row = conn.execute(
                "SELECT agent_id, token_id, token, issued_at, expires_at FROM assurances "
                "WHERE shift_id = ?",
                (shift_id,),
            ).fetchone()
        if row is None:
            return None
        return AssuranceRecord(
            shift_id, row[0], row[1], row[2], _from_micros(row[3]), _from_micros(row[4])
        )

    def revoke_assurance(
        self, shift_id: str, reason: RevocationReason, at: datetime
    ) -> AssuranceRevocation | None:
        with self._transaction(f"revoke the assurance of shift {shift_id!r}") as conn:
            revoked = conn.execute(
                "INSERT OR IGNORE INTO assurance_revocations (token_id, shift_id, reason, "
                "revoked_at) SELECT token_id, shift_id, ?, ? FROM assurances WHERE shift_id = ?",
                (reason.value, _to_micros(at), shift_id),
            )
            if revoked.rowcount == 0:
                return None
            (token_id,) = conn.execute(
                "SELECT token_id FROM assurances WHERE shift_id = ?", (shift_id,)
            ).fetchone()
        return AssuranceRevocation(token_id, shift_id, reason, at)

    def get_revocation(self, token_id: str) -> AssuranceRevocation | None:
        with self._transaction("read an assurance revocation", write=False) as conn:
            row = conn.execute(
                "SELECT shift_id, reason, revoked_at FROM assurance_revocations WHERE token_id = ?",
                (token_id,),
            ).fetchone()
        if row is None:
            return None
        return AssuranceRevocation(token_id, row[0], RevocationReason(row[1]), _from_micros(row[2]))

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        with self._transaction(f"record the use of agent {agent_id!r}'s voiceprint") as conn:
            conn.execute(
                "UPDATE voiceprints SET last_used_at = max(last_used_at, ?) WHERE agent_id = ?",
                (_to_micros(at), agent_id),
            )

    def expire_voiceprints(self, unused_before: datetime) -> list[str]:
        cutoff = _to_micros(unused_before)
        with self._transaction("expire unused voiceprints") as conn:
            expired = [
                agent_id
                for (agent_id,) in conn.execute(
                    "SELECT agent_id FROM voiceprints WHERE last_used_at < ? ORDER BY agent_id",
                    (cutoff,),
                )
            ]
            conn.execute("DELETE FROM voiceprints WHERE last_used_at < ?", (cutoff,))
        if expired:
            self._truncate_wal()
        return expired

    def update_throttle_state(
        self, agent_id: str, update: Callable[[ThrottleState], ThrottleState]
    ) -> ThrottleState:
        with self._transaction(f"update the throttling of agent {agent_id!r}") as conn:
            if not _agent_exists(conn, agent_id):
                raise _not_found(agent_id)
            row = conn.execute(
                "SELECT consecutive_failures, last_failure_at, disabled_at "
                "FROM verification_throttle WHERE agent_id = ?",
                (agent_id,),
            ).fetchone()
            before = (
                ThrottleState()
                if row is None
                else ThrottleState(
                    row[0],
                    None if row[1] is None else _from_micros(row[1]),
                    None if row[2] is None else _from_micros(row[2]),
                )
            )
            after = update(before)
            # Agents without failures need no row: the table holds only runs of failures.
            conn.execute("DELETE FROM verification_throttle WHERE agent_id = ?", (agent_id,))
            if after != ThrottleState():
                conn.execute(
                    "INSERT INTO verification_throttle "
                    "(agent_id, consecutive_failures, last_failure_at, disabled_at) "
                    "VALUES (?, ?, ?, ?)",
                    (
                        agent_id,
                        after.consecutive_failures,
                        None
                        if after.last_failure_at is None
                        else _to_micros(after.last_failure_at),
                        None if after.disabled_at is None else _to_micros(after.disabled_at),
                    ),
                )
        return before

    def sealing_key_ids(self) -> dict[str, int]:
        # Reads only the key id bytes of each blob, never decrypts.
        sealed = " UNION ALL ".join(
            f"SELECT substr({column}, 2, {KEY_ID_BYTES}) AS key_id FROM {table} "
            f"WHERE {column} IS NOT NULL"
            for table, column in _SEALED_COLUMNS
        )
        with self._transaction("count sealed values by key", write=False) as conn:
            rows = conn.execute(
                f"SELECT lower(hex(key_id)), count(*) FROM ({sealed}) GROUP BY key_id"
            ).fetchall()
        return dict(rows)

    def reencrypt_all(self, batch_size: int) -> ReencryptionReport:
        report = ReencryptionReport(
            voiceprints=self._reseal_rows(
                "voiceprints", "voiceprint", "telephone_voiceprint", batch_size
            ),
            pending_utterances=self._reseal_rows(
                "pending_utterances", "pending_utterance", "telephone_pending_utterance", batch_size
            ),
        )
        if report.voiceprints or report.pending_utterances:
            # Old WAL frames still hold the blobs sealed under the key about to be retired.
            self._truncate_wal()
        return report

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self, what: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; sqlite3 errors become StorageError naming `what`."""
        with self._lock:
            conn = self._conn
            try:
                # IMMEDIATE takes the write lock up front, so a read-then-write cannot be
                # overtaken by another process between its check and its write.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    # Some errors (disk full, I/O) have already rolled the transaction back.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"cannot {what}: {exc}") from exc

    def _truncate_wal(self) -> None:
        """Moves everything into the main file and empties the WAL, whose older frames would
        otherwise still hold erased rows until they are overwritten."""
        with self._lock:
            try:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot checkpoint the database after erasure: {exc}") from exc
        if busy:
            logger.warning("WAL not truncated after erasure: another connection is reading")

    def _require_known_keys(self) -> None:
        """Refuses a store holding values sealed under a key this cipher does not have, before
        the service starts rather than at the first read of each."""
        unknown = {
            key_id: count
            for key_id, count in self.sealing_key_ids().items()
            if key_id not in self._cipher.known_key_ids
        }
        if unknown:
            listed = ", ".join(f"{key_id} ({count} values)" for key_id, count in unknown.items())
            raise ConfigurationError(
                f"the database holds values sealed with key {listed}, which is neither the "
                f"current key {self._cipher.key_id} (VOXAUTH_KEY / VOXAUTH_KEY_FILE) nor a "
                "previous key (VOXAUTH_PREVIOUS_KEYS / VOXAUTH_PREVIOUS_KEYS_FILE)"
            )

    def _reseal_rows(
        self, table: str, kind: RecordKind, telephone_kind: RecordKind, batch_size: int
    ) -> int:
        """Re-seals, `batch_size` rows per transaction, the rows of `table` with an embedding
        sealed under another key than the current one; returns how many."""
        current = bytes.fromhex(self._cipher.key_id)
        resealed = 0
        while True:
            with self._transaction(f"re-encrypt {table}") as conn:
                rows = conn.execute(
                    "SELECT rowid, agent_id, model_id, embedding, telephone_embedding "
                    f"FROM {table} WHERE substr(embedding, 2, :n) != :key "
                    "OR substr(telephone_embedding, 2, :n) != :key LIMIT :batch",
                    {"n": KEY_ID_BYTES, "key": current, "batch": batch_size},
                ).fetchall()
                for rowid, agent_id, model_id, blob, telephone in rows:
                    conn.execute(
                        f"UPDATE {table} SET embedding = ?, telephone_embedding = ? "
                        "WHERE rowid = ?",
                        (
                            self._reseal(blob, agent_id, kind, model_id),
                            None
                            if telephone is None
                            else self._reseal(telephone, agent_id, telephone_kind, model_id),
                            rowid,
                        ),
                    )
            if not rows:
                return resealed
            resealed += len(rows)

    def _reseal(self, blob: bytes, agent_id: str, kind: RecordKind, model_id: str) -> bytes:
        return self._cipher.reseal(
            blob,
            associated=associated_data(agent_id=agent_id, record_kind=kind, model_id=model_id),
        )

    def _seal_optional(
        self, embedding: Embedding | None, agent_id: str, kind: RecordKind, model_id: str
    ) -> bytes | None:
        if embedding is None:
            return None
        return self._cipher.encrypt_embedding(
            embedding,
            associated=associated_data(agent_id=agent_id, record_kind=kind, model_id=model_id),
        )

    def _open_optional(
        self, blob: bytes | None, agent_id: str, kind: RecordKind, model_id: str
    ) -> Embedding | None:
        if blob is None:
            return None
        return self._cipher.decrypt_embedding(
            blob,
            associated=associated_data(agent_id=agent_id, record_kind=kind, model_id=model_id),
        )

    def _voiceprint_from_row(self, row: tuple[Any, ...]) -> Voiceprint:
        agent_id, model_id, blob, created_at, utterance_count, net_speech, telephone, used = row
        embedding = self._cipher.decrypt_embedding(
            blob,
            associated=associated_data(
                agent_id=agent_id, record_kind="voiceprint", model_id=model_id
            ),
        )
        return Voiceprint(
            agent_id,
            model_id,
            embedding,
            _from_micros(created_at),
            utterance_count,
            net_speech,
            self._open_optional(telephone, agent_id, "telephone_voiceprint", model_id),
            _from_micros(used),
        )

    def _utterance_from_row(self, row: tuple[Any, ...]) -> UtteranceRecord:
        utterance_id, agent_id, model_id, blob, duration, net_speech, level, clipped, at, phone = (
            row
        )
        embedding = self._cipher.decrypt_embedding(
            blob,
            associated=associated_data(
                agent_id=agent_id, record_kind="pending_utterance", model_id=model_id
            ),
        )
        return UtteranceRecord(
            utterance_id,
            agent_id,
            model_id,
            embedding,
            duration,
            net_speech,
            level,
            clipped,
            _from_micros(at),
            self._open_optional(phone, agent_id, "telephone_pending_utterance", model_id),
        )


def _create_private_file(path: Path) -> None:
    """Creates the database file 0600 before SQLite does (SQLite would honour the umask);
    the -wal and -shm files then copy its mode."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise StorageError(f"cannot create voiceprint database {path}: {exc.strerror}") from exc
    if mode & 0o077:
        logger.warning(
            "voiceprint database %s is accessible by group or others (mode %03o); chmod 600 it",
            path,
            mode,
        )


def _configure(conn: sqlite3.Connection) -> None:
    (journal_mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")
    # A pragma the build does not support is silently ignored, and erasure relies on these.
    applied = {
        "journal_mode": journal_mode,
        "foreign_keys": conn.execute("PRAGMA foreign_keys").fetchone()[0],
        "secure_delete": conn.execute("PRAGMA secure_delete").fetchone()[0],
    }
    if applied != {"journal_mode": "wal", "foreign_keys": 1, "secure_delete": 1}:
        raise StorageError(f"this SQLite build does not apply the required settings: {applied}")


def _migrate(conn: sqlite3.Connection, audit_key: AuditKey | None) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"the database has schema version {version}, newer than this voxauth's "
                f"{SCHEMA_VERSION}; upgrade voxauth"
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
            if statements is _AUDIT_CHAIN_MIGRATION:
                _chain_carried_over_audit(conn, audit_key)
        # user_version lives in the database header, so it commits with the schema.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _agent_exists(conn: sqlite3.Connection, agent_id: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM agents WHERE agent_id = ?", (agent_id,)).fetchone() is not None
    )


def _not_found(agent_id: str) -> AgentNotFoundError:
    return AgentNotFoundError(f"no agent {agent_id!r}")


def _delete_utterances(conn: sqlite3.Connection, agent_id: str, utterance_ids: list[str]) -> None:
    # Scoped to the agent, so one agent's request can never discard another's utterances.
    conn.executemany(
        "DELETE FROM pending_utterances WHERE agent_id = ? AND utterance_id = ?",
        [(agent_id, utterance_id) for utterance_id in utterance_ids],
    )


def _shift_row(shift: ShiftRecord) -> tuple[Any, ...]:
    return (
        shift.shift_id,
        shift.agent_id,
        shift.device_id,
        shift.state.value,
        _to_micros(shift.started_at),
        _to_micros(shift.updated_at),
        None if shift.ended_at is None else _to_micros(shift.ended_at),
        shift.consecutive_failures,
        shift.checkpoints_passed,
        shift.checkpoints_failed,
        shift.checkpoints_insufficient,
    )


def _to_micros(moment: datetime) -> int:
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment}: voxauth stores timezone-aware times only")
    return (moment - _EPOCH) // _MICROSECOND


def _from_micros(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def _audit_details_json(details: Mapping[str, Any]) -> str:
    _refuse_biometrics(details, "details")
    return canonical_details(details)


def _append_chained(conn: sqlite3.Connection, key: AuditKey | None, entry: AuditEntry) -> None:
    """Appends the record after the sealed head and moves the head on, in the caller's
    transaction."""
    head = conn.execute("SELECT seq, hash FROM audit_head").fetchone()
    if head is None:
        raise StorageError(
            "the audit chain's head is missing: the audit log was tampered with (run "
            "`voxauth audit verify`)"
        )
    # Continuing from the head rather than from the last row keeps records cut off the end
    # missing for good: the next record cannot seal over the cut.
    seq, record_hash = head[0] + 1, chain_hash(head[1], entry)
    conn.execute(
        "INSERT INTO audit_log (seq, at, action, agent_id, agent_ref, outcome, details, "
        "prev_hash, hash, key_id, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            seq,
            entry.at,
            entry.action,
            entry.agent_id,
            entry.agent_ref,
            entry.outcome,
            entry.details,
            head[1],
            record_hash,
            *_record_seal(key, record_hash),
        ),
    )
    _seal_head(conn, key, seq, record_hash)


def _chain_carried_over_audit(conn: sqlite3.Connection, key: AuditKey | None) -> None:
    """Pseudonymises, chains and seals the audit rows of a database from before the chain, in
    its migration's transaction. The rows of an agent erased back then lose its id (a pseudonym
    nothing resolves) except the record of the erasure, as they would have had the chain
    existed."""
    rows = conn.execute(
        "SELECT seq, at, action, agent_id, outcome, details FROM audit_log ORDER BY seq"
    ).fetchall()
    pseudonyms: dict[str, str] = dict(
        conn.execute("SELECT agent_id, audit_pseudonym FROM agents").fetchall()
    )
    # An id erased and created again: its rows up to the last erasure are the erased agent's.
    last_erasure = {row[3]: row[0] for row in rows if row[2] == ERASURE_ACTION}
    erased: dict[str, str] = {}
    seq, prev_hash = 0, GENESIS_HASH
    for seq, at, action, agent_id, outcome, details in rows:
        if not agent_id or action == ERASURE_ACTION:
            agent_ref = ""
        elif agent_id in pseudonyms and seq > last_erasure.get(agent_id, 0):
            agent_ref = pseudonyms[agent_id]
        else:
            agent_ref = erased.setdefault(agent_id, new_agent_pseudonym())
        entry = AuditEntry(
            at,
            action,
            "" if agent_ref else agent_id,
            agent_ref,
            outcome,
            canonical_details(json.loads(details)),
        )
        record_hash = chain_hash(prev_hash, entry)
        conn.execute(
            "UPDATE audit_log SET agent_id = ?, agent_ref = ?, details = ?, prev_hash = ?, "
            "hash = ?, key_id = ?, mac = ? WHERE seq = ?",
            (
                entry.agent_id,
                entry.agent_ref,
                entry.details,
                prev_hash,
                record_hash,
                *_record_seal(key, record_hash),
                seq,
            ),
        )
        prev_hash = record_hash
    _seal_head(conn, key, seq, prev_hash)


def _record_seal(key: AuditKey | None, record_hash: str) -> tuple[str | None, str | None]:
    """The key id and MAC columns of a record."""
    return (None, None) if key is None else (key.key_id, key.record_mac(record_hash))


def _reseal_head(
    conn: sqlite3.Connection, current: AuditKey, known: Mapping[str, AuditKey]
) -> None:
    head = conn.execute("SELECT seq, hash, key_id, mac FROM audit_head").fetchone()
    if head is None or head[2] == current.key_id:
        return
    seq, head_hash, key_id, mac = head
    key = known.get(key_id)
    if key is None or mac is None or not key.sealed_head(seq, head_hash, mac):
        raise StorageError(
            "the audit chain head's seal does not check out under the given keys; run "
            "`voxauth audit verify` before re-sealing"
        )
    _seal_head(conn, current, seq, head_hash)


def _seal_head(conn: sqlite3.Connection, key: AuditKey | None, seq: int, head_hash: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO audit_head (singleton, seq, hash, key_id, mac) "
        "VALUES (1, ?, ?, ?, ?)",
        (
            seq,
            head_hash,
            None if key is None else key.key_id,
            None if key is None else key.head_mac(seq, head_hash),
        ),
    )


def _refuse_biometrics(value: object, where: str) -> None:
    """Raises ValueError if audit details hold anything that could be an embedding."""
    if isinstance(value, bytes | bytearray | memoryview | np.ndarray):
        raise ValueError(
            f"audit {where} is {type(value).__name__}: the audit log never holds embeddings "
            "or binary data"
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_biometrics(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        if sum(isinstance(item, float) for item in value) > _MAX_AUDIT_FLOATS:
            raise ValueError(
                f"audit {where} holds more than {_MAX_AUDIT_FLOATS} numbers, which looks like "
                "an embedding; the audit log never holds embeddings"
            )
        for index, item in enumerate(value):
            _refuse_biometrics(item, f"{where}[{index}]")
