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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from models.embedder import Embedding
from server.crypto import RecordKind, VoiceprintCipher, associated_data
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    CapacityError,
    ShiftNotFoundError,
    StorageError,
)
from server.store import (
    AgentRecord,
    AuditEvent,
    ShiftRecord,
    ShiftState,
    UtteranceRecord,
    Voiceprint,
)

logger = logging.getLogger(__name__)

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

_UTTERANCE_COLUMNS = (
    "utterance_id, agent_id, model_id, embedding, duration_seconds, net_speech_seconds, "
    "speech_level_dbfs, clipped_fraction, received_at, telephone_embedding"
)
_VOICEPRINT_COLUMNS = (
    "agent_id, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding"
)


class SqliteVoiceprintStore:
    """VoiceprintStore on one SQLite connection shared by worker threads under a lock."""

    def __init__(self, connection: sqlite3.Connection, cipher: VoiceprintCipher) -> None:
        """Use `open`, which configures and migrates the connection first."""
        self._conn = connection
        self._cipher = cipher
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, cipher: VoiceprintCipher) -> SqliteVoiceprintStore:
        _create_private_file(path)
        try:
            # isolation_level=None: transactions are begun explicitly, never implicitly.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open voiceprint database {path}: {exc}") from exc
        try:
            _configure(conn)
            _migrate(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot prepare voiceprint database {path}: {exc}") from exc
            raise
        return cls(conn, cipher)

    def create_agent(self, agent: AgentRecord) -> None:
        with self._transaction(f"create agent {agent.agent_id!r}") as conn:
            if _agent_exists(conn, agent.agent_id):
                raise AgentExistsError(f"agent {agent.agent_id!r} already exists")
            conn.execute(
                "INSERT INTO agents (agent_id, display_name, consent_reference, created_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    agent.agent_id,
                    agent.display_name,
                    agent.consent_reference,
                    _to_micros(agent.created_at),
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
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    voiceprint.agent_id,
                    voiceprint.model_id,
                    blob,
                    _to_micros(voiceprint.created_at),
                    voiceprint.utterance_count,
                    voiceprint.net_speech_seconds,
                    telephone_blob,
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
        details = _audit_details_json(event.details)
        with self._transaction(f"append audit event {event.action!r}") as conn:
            conn.execute(
                "INSERT INTO audit (at, action, agent_id, outcome, details) VALUES (?, ?, ?, ?, ?)",
                (_to_micros(event.at), event.action, event.agent_id, event.outcome, details),
            )

    def audit_events(self, agent_id: str | None = None) -> list[AuditEvent]:
        query = "SELECT action, agent_id, outcome, at, details FROM audit"
        parameters: tuple[str, ...] = ()
        if agent_id is not None:
            query += " WHERE agent_id = ?"
            parameters = (agent_id,)
        with self._transaction("read audit events", write=False) as conn:
            rows = conn.execute(query + " ORDER BY id", parameters).fetchall()
        return [
            AuditEvent(action, agent, outcome, _from_micros(at), json.loads(details))
            for action, agent, outcome, at, details in rows
        ]

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
        agent_id, model_id, blob, created_at, utterance_count, net_speech, telephone = row
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


def _migrate(conn: sqlite3.Connection) -> None:
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
    try:
        return json.dumps(details, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit details must be plain JSON values: {exc}") from exc


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
