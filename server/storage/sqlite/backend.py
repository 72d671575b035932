"""The embedded StorageBackend: one SQLite file, one connection shared by worker threads under
a lock.

Durability and erasure are set per connection: WAL with synchronous=FULL (a committed write
survives a crash), and secure_delete so erased rows leave no bytes behind in free pages.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from server.errors import StorageError
from server.security.assurances import StoredSigningKey
from server.security.audit import AuditEntry, AuditHead
from server.storage.backend import AgentRow, AuditRow, Transaction, UtteranceRow, VoiceprintRow
from server.storage.records import AssuranceRecord, ShiftRecord, ShiftState, ThrottleState
from server.storage.sqlite.schema import AUDIT_CHAIN_MIGRATION, MIGRATIONS, SCHEMA_VERSION

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_PARAMETERS_PER_STATEMENT = 500
_AGENT_COLUMNS = "agent_id, display_name, consent_reference, created_at, audit_pseudonym"
_UTTERANCE_COLUMNS = (
    "utterance_id, agent_id, model_id, embedding, duration_seconds, net_speech_seconds, "
    "speech_level_dbfs, clipped_fraction, received_at, telephone_embedding"
)
_VOICEPRINT_COLUMNS = (
    "agent_id, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding, last_used_at"
)
_SHIFT_COLUMNS = (
    "shift_id, agent_id, device_id, state, started_at, updated_at, ended_at, "
    "consecutive_failures, checkpoints_passed, checkpoints_failed, checkpoints_insufficient"
)
# The casts keep a value someone rewrote with another type checkable: it then fails its hash
# instead of the read.
_AUDIT_COLUMNS = (
    "seq, CAST(at AS INTEGER), CAST(action AS TEXT), CAST(agent_id AS TEXT), "
    "CAST(agent_ref AS TEXT), CAST(outcome AS TEXT), CAST(details AS TEXT), "
    "CAST(prev_hash AS TEXT), CAST(hash AS TEXT), CAST(key_id AS TEXT), CAST(mac AS TEXT)"
)

ChainCarriedOverAudit = Callable[[Transaction], None]
"""Chains and seals the audit rows a database from before the audit chain carries over, in
the migration's transaction (server/storage/audit_chain.py)."""


class SqliteBackend:
    """StorageBackend on one SQLite connection; transactions run one at a time."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        """Use `open`, which configures and migrates the connection first."""
        self._conn = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, chain_carried_over_audit: ChainCarriedOverAudit) -> SqliteBackend:
        """Opens (creating it 0600 if need be) and migrates the database at `path`."""
        _create_private_file(path)
        try:
            # isolation_level=None: transactions are begun explicitly, never implicitly.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open voiceprint database {path}: {exc}") from exc
        try:
            _configure(conn)
            _migrate(conn, chain_carried_over_audit)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot prepare voiceprint database {path}: {exc}") from exc
            raise
        return cls(conn)

    @contextmanager
    def transaction(self, what: str, *, write: bool) -> Iterator[Transaction]:
        """One transaction under the lock; sqlite3 errors become StorageError naming `what`."""
        with self._lock:
            conn = self._conn
            try:
                # IMMEDIATE takes the write lock up front, so a read-then-write cannot be
                # overtaken by another process between its check and its write.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield SqliteTransaction(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    # Some errors (disk full, I/O) have already rolled the transaction back.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"cannot {what}: {exc}") from exc

    def discard_erased(self) -> None:
        """Moves everything into the main file and empties the WAL, whose older frames would
        otherwise still hold erased rows until they are overwritten."""
        with self._lock:
            try:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot checkpoint the database after erasure: {exc}") from exc
        if busy:
            logger.warning("WAL not truncated after erasure: another connection is reading")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteTransaction:
    """Transaction on the backend's connection (see backend.Transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection

    # --- agents ----------------------------------------------------------------------------

    def insert_agent(self, row: AgentRow) -> bool:
        if self.agent(row.agent_id) is not None:
            return False
        self._conn.execute(
            f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (
                row.agent_id,
                row.display_name,
                row.consent_reference,
                _to_micros(row.created_at),
                row.audit_pseudonym,
            ),
        )
        return True

    def agent(self, agent_id: str) -> AgentRow | None:
        row = self._conn.execute(
            f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
        ).fetchone()
        return None if row is None else _agent_row(row)

    def agents(self) -> list[AgentRow]:
        return [
            _agent_row(row) for row in self._conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents")
        ]

    def agents_by_pseudonym(self, pseudonyms: Collection[str]) -> list[AgentRow]:
        wanted = sorted(set(pseudonyms))
        rows: list[AgentRow] = []
        # A page at a time keeps each statement within SQLite's limit on parameters.
        for start in range(0, len(wanted), _PARAMETERS_PER_STATEMENT):
            page = wanted[start : start + _PARAMETERS_PER_STATEMENT]
            rows += map(
                _agent_row,
                self._conn.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM agents WHERE audit_pseudonym IN "
                    f"({', '.join('?' * len(page))})",
                    page,
                ),
            )
        return rows

    def delete_agent(self, agent_id: str) -> bool:
        # Everything else of the agent goes with it (ON DELETE CASCADE).
        deleted = self._conn.execute("DELETE FROM agents WHERE agent_id = ?", (agent_id,))
        return deleted.rowcount == 1

    # --- pending utterances ----------------------------------------------------------------

    def insert_utterance(self, row: UtteranceRow) -> None:
        self._conn.execute(
            f"INSERT INTO pending_utterances ({_UTTERANCE_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _utterance_values(row),
        )

    def utterances(self, agent_id: str) -> list[UtteranceRow]:
        rows = self._conn.execute(
            f"SELECT {_UTTERANCE_COLUMNS} FROM pending_utterances WHERE agent_id = ? "
            "ORDER BY received_at, rowid",
            (agent_id,),
        )
        return [_utterance_row(row) for row in rows]

    def utterance_page(self, after_utterance_id: str, limit: int) -> list[UtteranceRow]:
        rows = self._conn.execute(
            f"SELECT {_UTTERANCE_COLUMNS} FROM pending_utterances WHERE utterance_id > ? "
            "ORDER BY utterance_id LIMIT ?",
            (after_utterance_id, limit),
        )
        return [_utterance_row(row) for row in rows]

    def update_utterance(self, row: UtteranceRow) -> None:
        values = _utterance_values(row)
        self._conn.execute(
            "UPDATE pending_utterances SET agent_id = ?, model_id = ?, embedding = ?, "
            "duration_seconds = ?, net_speech_seconds = ?, speech_level_dbfs = ?, "
            "clipped_fraction = ?, received_at = ?, telephone_embedding = ? "
            "WHERE utterance_id = ?",
            (*values[1:], values[0]),
        )

    def delete_utterances(self, agent_id: str, utterance_ids: Sequence[str]) -> None:
        self._conn.executemany(
            "DELETE FROM pending_utterances WHERE agent_id = ? AND utterance_id = ?",
            [(agent_id, utterance_id) for utterance_id in utterance_ids],
        )

    # --- voiceprints -----------------------------------------------------------------------

    def voiceprint(self, agent_id: str) -> VoiceprintRow | None:
        row = self._conn.execute(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE agent_id = ?", (agent_id,)
        ).fetchone()
        return None if row is None else _voiceprint_row(row)

    def voiceprints(self, model_id: str) -> list[VoiceprintRow]:
        rows = self._conn.execute(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE model_id = ? ORDER BY agent_id",
            (model_id,),
        )
        return [_voiceprint_row(row) for row in rows]

    def voiceprint_page(self, after_agent_id: str, limit: int) -> list[VoiceprintRow]:
        rows = self._conn.execute(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE agent_id > ? "
            "ORDER BY agent_id LIMIT ?",
            (after_agent_id, limit),
        )
        return [_voiceprint_row(row) for row in rows]

    def put_voiceprint(self, row: VoiceprintRow) -> bool:
        replaced = (
            self._conn.execute(
                "SELECT 1 FROM voiceprints WHERE agent_id = ?", (row.agent_id,)
            ).fetchone()
            is not None
        )
        self._conn.execute(
            f"INSERT OR REPLACE INTO voiceprints ({_VOICEPRINT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.agent_id,
                row.model_id,
                row.sealed_embedding,
                _to_micros(row.created_at),
                row.utterance_count,
                row.net_speech_seconds,
                row.sealed_telephone_embedding,
                _to_micros(row.last_used_at),
            ),
        )
        return replaced

    def mark_voiceprint_used(self, agent_id: str, at: datetime) -> None:
        self._conn.execute(
            "UPDATE voiceprints SET last_used_at = max(last_used_at, ?) WHERE agent_id = ?",
            (_to_micros(at), agent_id),
        )

    def delete_voiceprints_unused_before(self, cutoff: datetime) -> list[str]:
        micros = _to_micros(cutoff)
        expired = [
            agent_id
            for (agent_id,) in self._conn.execute(
                "SELECT agent_id FROM voiceprints WHERE last_used_at < ? ORDER BY agent_id",
                (micros,),
            )
        ]
        self._conn.execute("DELETE FROM voiceprints WHERE last_used_at < ?", (micros,))
        return expired

    # --- shifts, throttling, signing keys, assurances --------------------------------------

    def insert_shift(self, shift: ShiftRecord) -> None:
        self._conn.execute(
            f"INSERT INTO shifts ({_SHIFT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _shift_values(shift),
        )

    def shift(self, shift_id: str) -> ShiftRecord | None:
        row = self._conn.execute(
            f"SELECT {_SHIFT_COLUMNS} FROM shifts WHERE shift_id = ?", (shift_id,)
        ).fetchone()
        if row is None:
            return None
        return ShiftRecord(
            shift_id=row[0],
            agent_id=row[1],
            device_id=row[2],
            state=ShiftState(row[3]),
            started_at=_from_micros(row[4]),
            updated_at=_from_micros(row[5]),
            ended_at=_optional_time(row[6]),
            consecutive_failures=row[7],
            checkpoints_passed=row[8],
            checkpoints_failed=row[9],
            checkpoints_insufficient=row[10],
        )

    def update_shift(self, shift: ShiftRecord) -> bool:
        values = _shift_values(shift)
        updated = self._conn.execute(
            "UPDATE shifts SET agent_id = ?, device_id = ?, state = ?, started_at = ?, "
            "updated_at = ?, ended_at = ?, consecutive_failures = ?, checkpoints_passed = ?, "
            "checkpoints_failed = ?, checkpoints_insufficient = ? WHERE shift_id = ?",
            (*values[1:], values[0]),
        )
        return updated.rowcount == 1

    def throttle_state(self, agent_id: str) -> ThrottleState:
        row = self._conn.execute(
            "SELECT consecutive_failures, last_failure_at, disabled_at "
            "FROM verification_throttle WHERE agent_id = ?",
            (agent_id,),
        ).fetchone()
        if row is None:
            return ThrottleState()
        return ThrottleState(row[0], _optional_time(row[1]), _optional_time(row[2]))

    def put_throttle_state(self, agent_id: str, state: ThrottleState) -> None:
        # Agents without failures need no row: the table holds only runs of failures.
        self._conn.execute("DELETE FROM verification_throttle WHERE agent_id = ?", (agent_id,))
        if state != ThrottleState():
            self._conn.execute(
                "INSERT INTO verification_throttle "
                "(agent_id, consecutive_failures, last_failure_at, disabled_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    agent_id,
                    state.consecutive_failures,
                    _optional_micros(state.last_failure_at),
                    _optional_micros(state.disabled_at),
                ),
            )

    def signing_keys(self) -> list[StoredSigningKey]:
        rows = self._conn.execute(
            "SELECT kid, sealed_private_key, created_at, retired_at, published_until "
            "FROM signing_keys"
        )
        return [
            StoredSigningKey(
                kid=row[0],
                sealed_private_key=bytes(row[1]),
                created_at=_from_micros(row[2]),
                retired_at=_optional_time(row[3]),
                published_until=_optional_time(row[4]),
            )
            for row in rows
        ]

    def replace_signing_keys(self, keys: Sequence[StoredSigningKey]) -> None:
        self._conn.execute("DELETE FROM signing_keys")
        self._conn.executemany(
            "INSERT INTO signing_keys (kid, sealed_private_key, created_at, retired_at, "
            "published_until) VALUES (?, ?, ?, ?, ?)",
            [
                (
                    key.kid,
                    key.sealed_private_key,
                    _to_micros(key.created_at),
                    _optional_micros(key.retired_at),
                    _optional_micros(key.published_until),
                )
                for key in keys
            ],
        )

    def put_assurance(self, assurance: AssuranceRecord) -> None:
        self._conn.execute(
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

    def assurance(self, shift_id: str) -> AssuranceRecord | None:
        row = self._conn.execute(
            "SELECT agent_id, token_id, token, issued_at, expires_at FROM assurances "
            "WHERE shift_id = ?",
            (shift_id,),
        ).fetchone()
        if row is None:
            return None
        return AssuranceRecord(
            shift_id, row[0], row[1], row[2], _from_micros(row[3]), _from_micros(row[4])
        )

    # --- the audit chain -------------------------------------------------------------------

    def audit_head(self) -> AuditHead | None:
        row = self._conn.execute("SELECT seq, hash, key_id, mac FROM audit_head").fetchone()
        return None if row is None else AuditHead(*row)

    def put_audit_head(self, head: AuditHead) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO audit_head (singleton, seq, hash, key_id, mac) "
            "VALUES (1, ?, ?, ?, ?)",
            (head.seq, head.hash, head.key_id, head.mac),
        )

    def insert_audit_row(self, row: AuditRow) -> None:
        self._conn.execute(
            "INSERT INTO audit_log (seq, at, action, agent_id, agent_ref, outcome, details, "
            "prev_hash, hash, key_id, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _audit_values(row),
        )

    def update_audit_row(self, row: AuditRow) -> None:
        values = _audit_values(row)
        self._conn.execute(
            "UPDATE audit_log SET at = ?, action = ?, agent_id = ?, agent_ref = ?, outcome = ?, "
            "details = ?, prev_hash = ?, hash = ?, key_id = ?, mac = ? WHERE seq = ?",
            (*values[1:], values[0]),
        )

    def audit_rows(self, after_seq: int, limit: int) -> list[AuditRow]:
        rows = self._conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [_audit_row(row) for row in rows]

    def latest_audit_row(self, action: str) -> AuditRow | None:
        row = self._conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE action = ? ORDER BY seq DESC LIMIT 1",
            (action,),
        ).fetchone()
        return None if row is None else _audit_row(row)

    def audit_rows_sealed_by_other_keys(self, key_id: str, limit: int) -> list[AuditRow]:
        rows = self._conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log "
            "WHERE key_id IS NOT NULL AND key_id <> ? ORDER BY seq LIMIT ?",
            (key_id, limit),
        )
        return [_audit_row(row) for row in rows]


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


def _migrate(conn: sqlite3.Connection, chain_carried_over_audit: ChainCarriedOverAudit) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"the database has schema version {version}, newer than this voxauth's "
                f"{SCHEMA_VERSION}; upgrade voxauth"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
            if statements is AUDIT_CHAIN_MIGRATION:
                chain_carried_over_audit(SqliteTransaction(conn))
        # user_version lives in the database header, so it commits with the schema.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _to_micros(moment: datetime) -> int:
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment}: voxauth stores timezone-aware times only")
    return (moment - _EPOCH) // _MICROSECOND


def _from_micros(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def _optional_micros(moment: datetime | None) -> int | None:
    return None if moment is None else _to_micros(moment)


def _optional_time(micros: int | None) -> datetime | None:
    return None if micros is None else _from_micros(micros)


def _agent_row(row: tuple[Any, ...]) -> AgentRow:
    agent_id, display_name, consent_reference, created_at, pseudonym = row
    return AgentRow(agent_id, display_name, consent_reference, _from_micros(created_at), pseudonym)


def _utterance_values(row: UtteranceRow) -> tuple[Any, ...]:
    return (
        row.utterance_id,
        row.agent_id,
        row.model_id,
        row.sealed_embedding,
        row.duration_seconds,
        row.net_speech_seconds,
        row.speech_level_dbfs,
        row.clipped_fraction,
        _to_micros(row.received_at),
        row.sealed_telephone_embedding,
    )


def _utterance_row(row: tuple[Any, ...]) -> UtteranceRow:
    utterance_id, agent_id, model_id, blob, duration, net_speech, level, clipped, at, phone = row
    return UtteranceRow(
        utterance_id,
        agent_id,
        model_id,
        bytes(blob),
        duration,
        net_speech,
        level,
        clipped,
        _from_micros(at),
        None if phone is None else bytes(phone),
    )


def _voiceprint_row(row: tuple[Any, ...]) -> VoiceprintRow:
    agent_id, model_id, blob, created_at, utterance_count, net_speech, phone, used = row
    return VoiceprintRow(
        agent_id,
        model_id,
        bytes(blob),
        _from_micros(created_at),
        utterance_count,
        net_speech,
        None if phone is None else bytes(phone),
        _from_micros(used),
    )


def _shift_values(shift: ShiftRecord) -> tuple[Any, ...]:
    return (
        shift.shift_id,
        shift.agent_id,
        shift.device_id,
        shift.state.value,
        _to_micros(shift.started_at),
        _to_micros(shift.updated_at),
        _optional_micros(shift.ended_at),
        shift.consecutive_failures,
        shift.checkpoints_passed,
        shift.checkpoints_failed,
        shift.checkpoints_insufficient,
    )


def _audit_values(row: AuditRow) -> tuple[Any, ...]:
    entry = row.entry
    return (
        row.seq,
        entry.at,
        entry.action,
        entry.agent_id,
        entry.agent_ref,
        entry.outcome,
        entry.details,
        row.prev_hash,
        row.hash,
        row.key_id,
        row.mac,
    )


def _audit_row(row: tuple[Any, ...]) -> AuditRow:
    return AuditRow(
        seq=row[0],
        entry=AuditEntry(*row[1:7]),
        prev_hash=row[7],
        hash=row[8],
        key_id=row[9],
        mac=row[10],
    )
