"""The embedded StorageBackend: one SQLite database and its key file, one connection shared by
worker threads under a lock.

The database (`voxauth.db`) runs in WAL mode with synchronous=FULL (a committed write survives
a crash) and secure_delete (erased rows leave no bytes in free pages). Old WAL frames outlive a
commit while another connection reads, so the data keys live apart, in the key file
(`voxauth.db-keys`), attached to the same connection: a rollback journal deleted at each
commit and secure_delete mean a deleted key is gone from every file when its transaction
commits. Both files belong together: back them up together; without the key file nothing of
any agent opens.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from server.errors import StorageError
from server.records import (
    AgentRecord,
    AssuranceRecord,
    AssuranceRevocation,
    RevocationReason,
    ShiftCursor,
    ShiftLease,
    ShiftState,
    StoreCensus,
    ThrottleState,
)
from server.security.assurances import StoredSigningKey
from server.security.audit import AuditEntry, AuditHead
from server.storage.backend import (
    AgentKeyRow,
    AgentRow,
    AssuranceRow,
    AuditRow,
    CompletedRequestRow,
    EventRow,
    FingerprintRow,
    HeldVoiceprintRow,
    ShiftRow,
    Transaction,
    UtteranceRow,
    VoiceprintRow,
    WatchlistRow,
)
from server.storage.legacy import LegacyAgent, Upgrade
from server.storage.sqlite.schema import (
    AUDIT_CHAIN_MIGRATION,
    KEY_MIGRATIONS,
    KEY_SCHEMA_VERSION,
    LEGACY_TABLES_DROP,
    MIGRATIONS,
    PER_AGENT_KEYS_MIGRATION,
    SCHEMA_VERSION,
)

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for another connection's lock before it fails."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_FINGERPRINT_COLUMNS = "agent_ref, model_id, origin, recorded_at, embedding, telephone_embedding"
_UTTERANCE_COLUMNS = (
    "utterance_id, agent_ref, model_id, embedding, duration_seconds, net_speech_seconds, "
    "speech_level_dbfs, clipped_fraction, received_at, telephone_embedding"
)
_VOICEPRINT_COLUMNS = (
    "agent_ref, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding, last_used_at"
)
_HELD_COLUMNS = (
    "agent_ref, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding, reason, held_at, matched_agent_ref, matched_entry_id, similarity"
)
_WATCHLIST_COLUMNS = (
    "entry_id, model_id, embedding, telephone_embedding, details, added_at, expires_at"
)
_SHIFT_COLUMNS = (
    "shift_id, agent_ref, device_id, state, started_at, updated_at, ended_at, "
    "consecutive_failures, checkpoints_passed, checkpoints_failed, checkpoints_insufficient"
)
# The casts keep a value someone rewrote with another type checkable: it then fails its hash
# instead of the read.
_AUDIT_COLUMNS = (
    "seq, CAST(at AS INTEGER), CAST(action AS TEXT), CAST(agent_id AS TEXT), "
    "CAST(agent_ref AS TEXT), CAST(outcome AS TEXT), CAST(details AS TEXT), "
    "CAST(prev_hash AS TEXT), CAST(hash AS TEXT), CAST(key_id AS TEXT), CAST(mac AS TEXT)"
)


def key_file_path(database: Path) -> Path:
    """Where the data keys of the database at `database` live."""
    return database.with_name(database.name + "-keys")


class SqliteBackend:
    """StorageBackend on one SQLite connection; transactions run one at a time."""

    def __init__(self, connection: sqlite3.Connection, *, interrupted_commit: bool) -> None:
        """Use `open`, which configures and migrates the connection first."""
        self._conn = connection
        self._lock = threading.Lock()
        self._interrupted_commit = interrupted_commit

    @classmethod
    def open(cls, path: Path, *, upgrade: Upgrade) -> SqliteBackend:
        """Opens (creating them 0600 if need be) and migrates the database at `path` and its
        key file; `upgrade` seals the data of a database from before per-agent keys."""
        keys = key_file_path(path)
        _create_private_file(path)
        _create_private_file(keys)
        # A journal left behind is a commit a crash cut short: SQLite rolls it back on the
        # first read, so it is seen here or never.
        interrupted = keys.with_name(keys.name + "-journal").exists()
        try:
            # isolation_level=None: transactions are begun explicitly, never implicitly.
            conn = sqlite3.connect(
                path,
                isolation_level=None,
                check_same_thread=False,
                timeout=_BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open voiceprint database {path}: {exc}") from exc
        try:
            _configure(conn, keys)
            upgraded = _migrate(conn, upgrade)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot prepare voiceprint database {path}: {exc}") from exc
            raise
        backend = cls(conn, interrupted_commit=interrupted)
        if upgraded:
            # The clear copies the upgrade replaced may still sit in WAL frames.
            backend.discard_erased()
        return backend

    @contextmanager
    def transaction(self, what: str, *, write: bool) -> Iterator[Transaction]:
        """One transaction under the lock; sqlite3 errors become StorageError naming `what`."""
        with self._lock, _transaction(self._conn, what, write=write) as txn:
            yield txn

    def discard_erased(self) -> None:
        """Moves everything into the main file and empties the WAL, whose older frames would
        otherwise keep erased ciphertext until they are overwritten."""
        with self._lock:
            try:
                # Without waiting for readers: nothing depends on it, and a reader may hold
                # its transaction for as long as it likes.
                self._conn.execute("PRAGMA busy_timeout = 0")
                try:
                    busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot checkpoint the database after erasure: {exc}") from exc
        if busy:
            logger.info(
                "WAL not truncated after erasure: another connection is reading; its old frames "
                "keep erased ciphertext until they are overwritten"
            )

    def interrupted_commit(self) -> bool:
        return self._interrupted_commit

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@contextmanager
def _transaction(conn: sqlite3.Connection, what: str, *, write: bool) -> Iterator[Transaction]:
    try:
        # IMMEDIATE takes the write locks up front, so a read-then-write cannot be overtaken
        # by another process between its check and its write. SQLite locks every file a
        # commit writes before it commits any, so a commit never lands in one file only for
        # want of a lock.
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


class SqliteTransaction:
    """Transaction on the backend's connection (see backend.Transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection

    # --- agents ------------------------------------------------------------------------------

    def insert_agent(self, row: AgentRow) -> bool:
        if self.agent(row.agent_handle) is not None:
            return False
        self._conn.execute(
            "INSERT INTO agents (agent_handle, sealed_identity) VALUES (?, ?)",
            (row.agent_handle, row.sealed_identity),
        )
        return True

    def agent(self, agent_handle: str) -> AgentRow | None:
        row = self._conn.execute(
            "SELECT agent_handle, sealed_identity FROM agents WHERE agent_handle = ?",
            (agent_handle,),
        ).fetchone()
        return None if row is None else AgentRow(row[0], bytes(row[1]))

    def agents(self) -> list[AgentRow]:
        rows = self._conn.execute("SELECT agent_handle, sealed_identity FROM agents")
        return [AgentRow(handle, bytes(identity)) for handle, identity in rows]

    def delete_agent(self, agent_handle: str, agent_ref: str) -> bool:
        deleted = self._conn.execute("DELETE FROM agents WHERE agent_handle = ?", (agent_handle,))
        if deleted.rowcount == 0:
            return False
        # Assurances and their revocations go with their shifts (ON DELETE CASCADE).
        for table in (
            "pending_utterances",
            "voiceprints",
            "replay_fingerprints",
            "passive_enrollments",
            "held_voiceprints",
            "shifts",
            "verification_throttle",
            "completed_requests",
            "shift_events",
        ):
            self._conn.execute(f"DELETE FROM {table} WHERE agent_ref = ?", (agent_ref,))
        return True

    # --- data keys ---------------------------------------------------------------------------

    def agent_key(self, agent_handle: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT wrapped_key FROM keys.agent_keys WHERE agent_handle = ?", (agent_handle,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def put_agent_key(self, row: AgentKeyRow) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO keys.agent_keys (agent_handle, wrapped_key) VALUES (?, ?)",
            (row.agent_handle, row.wrapped_key),
        )

    def delete_agent_key(self, agent_handle: str) -> None:
        self._conn.execute("DELETE FROM keys.agent_keys WHERE agent_handle = ?", (agent_handle,))

    def agent_key_page(self, after_handle: str, limit: int) -> list[AgentKeyRow]:
        rows = self._conn.execute(
            "SELECT agent_handle, wrapped_key FROM keys.agent_keys WHERE agent_handle > ? "
            "ORDER BY agent_handle LIMIT ?",
            (after_handle, limit),
        )
        return [AgentKeyRow(handle, bytes(wrapped)) for handle, wrapped in rows]

    def store_key(self, name: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT wrapped_key FROM keys.store_keys WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def put_store_key(self, name: str, wrapped_key: bytes) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO keys.store_keys (name, wrapped_key) VALUES (?, ?)",
            (name, wrapped_key),
        )

    # --- pending utterances ------------------------------------------------------------------

    def insert_utterance(self, row: UtteranceRow) -> None:
        self._conn.execute(
            f"INSERT INTO pending_utterances ({_UTTERANCE_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.utterance_id,
                row.agent_ref,
                row.model_id,
                row.sealed_embedding,
                row.duration_seconds,
                row.net_speech_seconds,
                row.speech_level_dbfs,
                row.clipped_fraction,
                _to_micros(row.received_at),
                row.sealed_telephone_embedding,
            ),
        )

    def utterances(self, agent_ref: str) -> list[UtteranceRow]:
        rows = self._conn.execute(
            f"SELECT {_UTTERANCE_COLUMNS} FROM pending_utterances WHERE agent_ref = ? "
            "ORDER BY received_at, rowid",
            (agent_ref,),
        )
        return [_utterance_row(row) for row in rows]

    def delete_utterances(self, agent_ref: str, utterance_ids: Sequence[str]) -> None:
        self._conn.executemany(
            "DELETE FROM pending_utterances WHERE agent_ref = ? AND utterance_id = ?",
            [(agent_ref, utterance_id) for utterance_id in utterance_ids],
        )

    # --- replay fingerprints ------------------------------------------------------------------

    def insert_fingerprint(self, row: FingerprintRow) -> None:
        self._conn.execute(
            f"INSERT INTO replay_fingerprints ({_FINGERPRINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                row.agent_ref,
                row.model_id,
                row.origin,
                _to_micros(row.recorded_at),
                row.sealed_embedding,
                row.sealed_telephone_embedding,
            ),
        )

    def fingerprints(self, agent_ref: str) -> list[FingerprintRow]:
        rows = self._conn.execute(
            f"SELECT {_FINGERPRINT_COLUMNS} FROM replay_fingerprints WHERE agent_ref = ? "
            "ORDER BY recorded_at, rowid",
            (agent_ref,),
        )
        return [
            FingerprintRow(
                ref,
                model_id,
                origin,
                _from_micros(at),
                bytes(blob),
                None if phone is None else bytes(phone),
            )
            for ref, model_id, origin, at, blob, phone in rows
        ]

    def prune_fingerprints(
        self, agent_ref: str, origin: str, recorded_before: datetime, keep: int
    ) -> None:
        self._conn.execute(
            "DELETE FROM replay_fingerprints WHERE agent_ref = ? AND origin = ? AND ("
            "recorded_at < ? OR rowid NOT IN (SELECT rowid FROM replay_fingerprints "
            "WHERE agent_ref = ? AND origin = ? ORDER BY recorded_at DESC, rowid DESC LIMIT ?))",
            (agent_ref, origin, _to_micros(recorded_before), agent_ref, origin, keep),
        )

    # --- voiceprints -------------------------------------------------------------------------

    def voiceprint(self, agent_ref: str) -> VoiceprintRow | None:
        row = self._conn.execute(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE agent_ref = ?", (agent_ref,)
        ).fetchone()
        return None if row is None else _voiceprint_row(row)

    def voiceprints(self, model_id: str) -> list[VoiceprintRow]:
        rows = self._conn.execute(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE model_id = ?", (model_id,)
        )
        return [_voiceprint_row(row) for row in rows]

    def put_voiceprint(self, row: VoiceprintRow) -> bool:
        replaced = self.voiceprint(row.agent_ref) is not None
        self._conn.execute(
            f"INSERT OR REPLACE INTO voiceprints ({_VOICEPRINT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.agent_ref,
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

    def mark_voiceprint_used(self, agent_ref: str, at: datetime) -> None:
        self._conn.execute(
            "UPDATE voiceprints SET last_used_at = max(last_used_at, ?) WHERE agent_ref = ?",
            (_to_micros(at), agent_ref),
        )

    def delete_voiceprints_unused_before(self, cutoff: datetime) -> list[str]:
        micros = _to_micros(cutoff)
        expired = [
            agent_ref
            for (agent_ref,) in self._conn.execute(
                "SELECT agent_ref FROM voiceprints WHERE last_used_at < ?", (micros,)
            )
        ]
        self._conn.execute("DELETE FROM voiceprints WHERE last_used_at < ?", (micros,))
        return expired

    # --- passive enrollment and held voiceprints ---------------------------------------------

    def put_passive_enrollment(self, agent_ref: str, requested_at: datetime) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO passive_enrollments (agent_ref, requested_at) VALUES (?, ?)",
            (agent_ref, _to_micros(requested_at)),
        )

    def passive_enrollment(self, agent_ref: str) -> datetime | None:
        row = self._conn.execute(
            "SELECT requested_at FROM passive_enrollments WHERE agent_ref = ?", (agent_ref,)
        ).fetchone()
        return None if row is None else _from_micros(row[0])

    def delete_passive_enrollment(self, agent_ref: str) -> None:
        self._conn.execute("DELETE FROM passive_enrollments WHERE agent_ref = ?", (agent_ref,))

    def put_held_voiceprint(self, row: HeldVoiceprintRow) -> None:
        voiceprint = row.voiceprint
        self._conn.execute(
            f"INSERT OR REPLACE INTO held_voiceprints ({_HELD_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                voiceprint.agent_ref,
                voiceprint.model_id,
                voiceprint.sealed_embedding,
                _to_micros(voiceprint.created_at),
                voiceprint.utterance_count,
                voiceprint.net_speech_seconds,
                voiceprint.sealed_telephone_embedding,
                row.reason,
                _to_micros(row.held_at),
                row.matched_agent_ref,
                row.matched_entry_id,
                row.similarity,
            ),
        )

    def held_voiceprint(self, agent_ref: str) -> HeldVoiceprintRow | None:
        row = self._conn.execute(
            f"SELECT {_HELD_COLUMNS} FROM held_voiceprints WHERE agent_ref = ?", (agent_ref,)
        ).fetchone()
        if row is None:
            return None
        ref, model_id, blob, created, count, net, phone, reason, held, matched, entry, sim = row
        created_at = _from_micros(created)
        return HeldVoiceprintRow(
            VoiceprintRow(
                ref,
                model_id,
                bytes(blob),
                created_at,
                count,
                net,
                None if phone is None else bytes(phone),
                created_at,
            ),
            reason,
            _from_micros(held),
            matched,
            entry,
            sim,
        )

    def delete_held_voiceprint(self, agent_ref: str) -> bool:
        deleted = self._conn.execute(
            "DELETE FROM held_voiceprints WHERE agent_ref = ?", (agent_ref,)
        )
        return deleted.rowcount > 0

    # --- the watchlist -----------------------------------------------------------------------

    def insert_watchlist_entry(self, row: WatchlistRow) -> None:
        self._conn.execute(
            f"INSERT INTO watchlist ({_WATCHLIST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.entry_id,
                row.model_id,
                row.sealed_embedding,
                row.sealed_telephone_embedding,
                row.sealed_details,
                _to_micros(row.added_at),
                _to_micros(row.expires_at),
            ),
        )

    def watchlist(self) -> list[WatchlistRow]:
        rows = self._conn.execute(
            f"SELECT {_WATCHLIST_COLUMNS} FROM watchlist ORDER BY added_at, rowid"
        )
        return [
            WatchlistRow(
                entry_id,
                model_id,
                bytes(blob),
                None if phone is None else bytes(phone),
                bytes(details),
                _from_micros(added),
                _from_micros(expires),
            )
            for entry_id, model_id, blob, phone, details, added, expires in rows
        ]

    def delete_watchlist_entry(self, entry_id: str) -> bool:
        deleted = self._conn.execute("DELETE FROM watchlist WHERE entry_id = ?", (entry_id,))
        return deleted.rowcount > 0

    def delete_watchlist_expired(self, at: datetime) -> list[str]:
        micros = _to_micros(at)
        expired = [
            entry_id
            for (entry_id,) in self._conn.execute(
                "SELECT entry_id FROM watchlist WHERE expires_at <= ? ORDER BY entry_id", (micros,)
            )
        ]
        self._conn.execute("DELETE FROM watchlist WHERE expires_at <= ?", (micros,))
        return expired

    # --- shifts, throttling, signing keys, assurances ----------------------------------------

    def insert_shift(self, row: ShiftRow) -> None:
        self._conn.execute(
            f"INSERT INTO shifts ({_SHIFT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _shift_values(row),
        )

    def shift(self, shift_id: str) -> ShiftRow | None:
        row = self._conn.execute(
            f"SELECT {_SHIFT_COLUMNS} FROM shifts WHERE shift_id = ?", (shift_id,)
        ).fetchone()
        return None if row is None else _shift_row(row)

    def update_shift(self, row: ShiftRow) -> bool:
        values = _shift_values(row)
        updated = self._conn.execute(
            "UPDATE shifts SET agent_ref = ?, device_id = ?, state = ?, started_at = ?, "
            "updated_at = ?, ended_at = ?, consecutive_failures = ?, checkpoints_passed = ?, "
            "checkpoints_failed = ?, checkpoints_insufficient = ? WHERE shift_id = ?",
            (*values[1:], values[0]),
        )
        return updated.rowcount == 1

    def shifts_page(
        self, states: Collection[ShiftState], limit: int, before: ShiftCursor | None
    ) -> list[ShiftRow]:
        clauses: list[str] = []
        values: list[Any] = []
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            values += [state.value for state in states]
        if before is not None:
            micros = _to_micros(before.started_at)
            clauses.append("(started_at < ? OR (started_at = ? AND shift_id < ?))")
            values += [micros, micros, before.shift_id]
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = self._conn.execute(
            f"SELECT {_SHIFT_COLUMNS} FROM shifts {where}"
            "ORDER BY started_at DESC, shift_id DESC LIMIT ?",
            (*values, limit),
        ).fetchall()
        return [_shift_row(row) for row in rows]

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        row = self._conn.execute(
            "SELECT owner, token, attached, expires_at, checkpoint_seq, next_checkpoint_at "
            "FROM shift_leases WHERE shift_id = ?",
            (shift_id,),
        ).fetchone()
        if row is None:
            return None
        owner, token, attached, expires_at, seq, next_at = row
        return ShiftLease(
            shift_id,
            owner,
            token,
            bool(attached),
            _from_micros(expires_at),
            seq,
            _optional_time(next_at),
        )

    def put_shift_lease(self, lease: ShiftLease) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO shift_leases (shift_id, owner, token, attached, expires_at, "
            "checkpoint_seq, next_checkpoint_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                lease.shift_id,
                lease.owner,
                lease.token,
                int(lease.attached),
                _to_micros(lease.expires_at),
                lease.checkpoint_seq,
                _optional_micros(lease.next_checkpoint_at),
            ),
        )

    def throttle_state(self, agent_ref: str) -> ThrottleState:
        row = self._conn.execute(
            "SELECT consecutive_failures, last_failure_at, disabled_at "
            "FROM verification_throttle WHERE agent_ref = ?",
            (agent_ref,),
        ).fetchone()
        if row is None:
            return ThrottleState()
        return ThrottleState(row[0], _optional_time(row[1]), _optional_time(row[2]))

    def census(self, delay_after_failures: int) -> StoreCensus:
        open_shifts: dict[ShiftState, int] = {s: 0 for s in ShiftState if s is not ShiftState.ENDED}
        for state, count in self._conn.execute(
            "SELECT state, COUNT(*) FROM shifts WHERE state != ? GROUP BY state",
            (ShiftState.ENDED.value,),
        ):
            open_shifts[ShiftState(state)] = count
        delayed, disabled = self._conn.execute(
            "SELECT COUNT(*) FILTER (WHERE disabled_at IS NULL AND consecutive_failures >= ?), "
            "COUNT(*) FILTER (WHERE disabled_at IS NOT NULL) FROM verification_throttle",
            (delay_after_failures,),
        ).fetchone()
        return StoreCensus(open_shifts, delayed, disabled)

    def put_throttle_state(self, agent_ref: str, state: ThrottleState) -> None:
        # Agents without failures need no row: the table holds only runs of failures.
        self._conn.execute("DELETE FROM verification_throttle WHERE agent_ref = ?", (agent_ref,))
        if state != ThrottleState():
            self._conn.execute(
                "INSERT INTO verification_throttle "
                "(agent_ref, consecutive_failures, last_failure_at, disabled_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    agent_ref,
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

    def put_assurance(self, row: AssuranceRow) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO assurances (shift_id, agent_ref, token_id, sealed_token, "
            "issued_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                row.shift_id,
                row.agent_ref,
                row.token_id,
                row.sealed_token,
                _to_micros(row.issued_at),
                _to_micros(row.expires_at),
            ),
        )

    def assurance(self, shift_id: str) -> AssuranceRow | None:
        row = self._conn.execute(
            "SELECT agent_ref, token_id, sealed_token, issued_at, expires_at FROM assurances "
            "WHERE shift_id = ?",
            (shift_id,),
        ).fetchone()
        if row is None:
            return None
        return AssuranceRow(
            shift_id, row[0], row[1], bytes(row[2]), _from_micros(row[3]), _from_micros(row[4])
        )

    def insert_revocation(self, revocation: AssuranceRevocation) -> None:
        self._conn.execute(
            "INSERT INTO assurance_revocations (token_id, shift_id, reason, revoked_at) "
            "VALUES (?, ?, ?, ?)",
            (
                revocation.token_id,
                revocation.shift_id,
                revocation.reason.value,
                _to_micros(revocation.revoked_at),
            ),
        )

    def revocation(self, token_id: str) -> AssuranceRevocation | None:
        row = self._conn.execute(
            "SELECT shift_id, reason, revoked_at FROM assurance_revocations WHERE token_id = ?",
            (token_id,),
        ).fetchone()
        if row is None:
            return None
        return AssuranceRevocation(token_id, row[0], RevocationReason(row[1]), _from_micros(row[2]))

    # --- completed requests ------------------------------------------------------------------

    def completed_request(self, request_handle: str) -> CompletedRequestRow | None:
        row = self._conn.execute(
            "SELECT request_digest, agent_ref, response, expires_at FROM completed_requests "
            "WHERE request_handle = ?",
            (request_handle,),
        ).fetchone()
        if row is None:
            return None
        return CompletedRequestRow(
            request_handle, row[0], row[1], bytes(row[2]), _from_micros(row[3])
        )

    def put_completed_request(self, row: CompletedRequestRow) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO completed_requests (request_handle, request_digest, "
            "agent_ref, response, expires_at) VALUES (?, ?, ?, ?, ?)",
            (
                row.request_handle,
                row.request_digest,
                row.agent_ref,
                row.response,
                _to_micros(row.expires_at),
            ),
        )

    def delete_completed_requests_expired(self, at: datetime) -> int:
        deleted = self._conn.execute(
            "DELETE FROM completed_requests WHERE expires_at <= ?", (_to_micros(at),)
        )
        return deleted.rowcount

    # --- the audit chain ---------------------------------------------------------------------

    def insert_event(self, agent_ref: str, sealed_payload: bytes, at: datetime) -> int:
        cursor = self._conn.execute(
            "INSERT INTO shift_events (agent_ref, payload, at) VALUES (?, ?, ?)",
            (agent_ref, sealed_payload, _to_micros(at)),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def events_after(self, after_id: int, limit: int) -> list[EventRow]:
        rows = self._conn.execute(
            "SELECT event_id, agent_ref, payload, at FROM shift_events WHERE event_id > ? "
            "ORDER BY event_id LIMIT ?",
            (after_id, limit),
        )
        return [EventRow(i, ref, bytes(payload), _from_micros(at)) for i, ref, payload, at in rows]

    def latest_event_id(self) -> int:
        # The AUTOINCREMENT counter, which deleting the newest events does not move back.
        row = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'shift_events'"
        ).fetchone()
        return 0 if row is None else int(row[0])

    def delete_events_before(self, at: datetime) -> None:
        self._conn.execute("DELETE FROM shift_events WHERE at < ?", (_to_micros(at),))

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
    """Creates the file 0600 before SQLite does (SQLite would honour the umask); the -wal,
    -shm and -journal files then copy its mode."""
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


def _configure(conn: sqlite3.Connection, keys: Path) -> None:
    (journal_mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("ATTACH DATABASE ? AS keys", (str(keys),))
    (keys_journal_mode,) = conn.execute("PRAGMA keys.journal_mode = DELETE").fetchone()
    conn.execute("PRAGMA keys.synchronous = FULL")
    conn.execute("PRAGMA keys.secure_delete = ON")
    # A pragma the build does not support is silently ignored, and erasure relies on these.
    applied = {
        "journal_mode": journal_mode,
        "foreign_keys": conn.execute("PRAGMA foreign_keys").fetchone()[0],
        "secure_delete": conn.execute("PRAGMA secure_delete").fetchone()[0],
        "keys.journal_mode": keys_journal_mode,
        "keys.secure_delete": conn.execute("PRAGMA keys.secure_delete").fetchone()[0],
    }
    required = {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "secure_delete": 1,
        "keys.journal_mode": "delete",
        "keys.secure_delete": 1,
    }
    if applied != required:
        raise StorageError(f"this SQLite build does not apply the required settings: {applied}")


def _migrate(conn: sqlite3.Connection, upgrade: Upgrade) -> bool:
    """Brings the key file and the database to the current schema; whether it sealed data of
    a database from before per-agent keys."""
    with _transaction(conn, "migrate the key file", write=True):
        (key_version,) = conn.execute("PRAGMA keys.user_version").fetchone()
        if key_version > KEY_SCHEMA_VERSION:
            raise StorageError(
                f"the key file has schema version {key_version}, newer than this voxauth's "
                f"{KEY_SCHEMA_VERSION}; upgrade voxauth"
            )
        for statements in KEY_MIGRATIONS[key_version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA keys.user_version = {KEY_SCHEMA_VERSION}")
    with _transaction(conn, "read the database's schema version", write=False):
        version = _schema_version(conn)
        keyed = MIGRATIONS.index(PER_AGENT_KEYS_MIGRATION)
        legacy_ids = (
            [agent_id for (agent_id,) in conn.execute("SELECT agent_id FROM agents")]
            if 0 < version <= keyed
            else []
        )
    if legacy_ids:
        # The keys commit before the rows sealed under them: the two files commit one after
        # the other, and a crash between must not leave rows whose key is lost.
        with _transaction(conn, "create the agents' data keys", write=True) as txn:
            upgrade.prepare_keys(txn, legacy_ids)
    with _transaction(conn, "migrate the database", write=True) as txn:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = _schema_version(conn)
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
            if statements is AUDIT_CHAIN_MIGRATION:
                pseudonyms = dict(conn.execute("SELECT agent_id, audit_pseudonym FROM agents"))
                upgrade.chain_carried_over_audit(txn, pseudonyms)
            elif statements is PER_AGENT_KEYS_MIGRATION:
                upgrade.seal_agents(txn, _legacy_agents(conn))
                for statement in LEGACY_TABLES_DROP:
                    conn.execute(statement)
        # user_version lives in the database header, so it commits with the schema.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return bool(legacy_ids)


def _schema_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"the database has schema version {version}, newer than this voxauth's "
            f"{SCHEMA_VERSION}; upgrade voxauth"
        )
    return int(version)


def _legacy_agents(conn: sqlite3.Connection) -> Iterator[LegacyAgent]:
    """The agents in the tables PER_AGENT_KEYS_MIGRATION set aside, one at a time."""
    agents = conn.execute(
        "SELECT agent_id, display_name, consent_reference, created_at, audit_pseudonym "
        "FROM legacy_agents ORDER BY agent_id"
    ).fetchall()
    for agent_id, display_name, consent_reference, created_at, pseudonym in agents:
        by_agent = (agent_id,)
        utterances = conn.execute(
            "SELECT utterance_id, ?, model_id, embedding, duration_seconds, net_speech_seconds, "
            "speech_level_dbfs, clipped_fraction, received_at, telephone_embedding "
            "FROM legacy_pending_utterances WHERE agent_id = ? ORDER BY received_at, rowid",
            (pseudonym, agent_id),
        ).fetchall()
        voiceprint = conn.execute(
            "SELECT ?, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
            "telephone_embedding, last_used_at FROM legacy_voiceprints WHERE agent_id = ?",
            (pseudonym, agent_id),
        ).fetchone()
        shifts = conn.execute(
            "SELECT shift_id, ?, device_id, state, started_at, updated_at, ended_at, "
            "consecutive_failures, checkpoints_passed, checkpoints_failed, "
            "checkpoints_insufficient FROM legacy_shifts WHERE agent_id = ?",
            (pseudonym, agent_id),
        ).fetchall()
        assurances = conn.execute(
            "SELECT shift_id, token_id, token, issued_at, expires_at FROM legacy_assurances "
            "WHERE agent_id = ?",
            by_agent,
        ).fetchall()
        throttle = conn.execute(
            "SELECT consecutive_failures, last_failure_at, disabled_at "
            "FROM legacy_verification_throttle WHERE agent_id = ?",
            by_agent,
        ).fetchone()
        yield LegacyAgent(
            agent=AgentRecord(agent_id, display_name, consent_reference, _from_micros(created_at)),
            audit_pseudonym=pseudonym,
            utterances=[_utterance_row(row) for row in utterances],
            voiceprint=None if voiceprint is None else _voiceprint_row(voiceprint),
            shifts=[_shift_row(row) for row in shifts],
            assurances=[
                AssuranceRecord(
                    shift_id, agent_id, token_id, token, _from_micros(issued), _from_micros(expires)
                )
                for shift_id, token_id, token, issued, expires in assurances
            ],
            throttle=ThrottleState()
            if throttle is None
            else ThrottleState(
                throttle[0], _optional_time(throttle[1]), _optional_time(throttle[2])
            ),
        )


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


def _utterance_row(row: tuple[Any, ...]) -> UtteranceRow:
    utterance_id, agent_ref, model_id, blob, duration, net_speech, level, clipped, at, phone = row
    return UtteranceRow(
        utterance_id,
        agent_ref,
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
    agent_ref, model_id, blob, created_at, utterance_count, net_speech, phone, used = row
    return VoiceprintRow(
        agent_ref,
        model_id,
        bytes(blob),
        _from_micros(created_at),
        utterance_count,
        net_speech,
        None if phone is None else bytes(phone),
        _from_micros(used),
    )


def _shift_values(row: ShiftRow) -> tuple[Any, ...]:
    return (
        row.shift_id,
        row.agent_ref,
        row.device_id,
        row.state.value,
        _to_micros(row.started_at),
        _to_micros(row.updated_at),
        _optional_micros(row.ended_at),
        row.consecutive_failures,
        row.checkpoints_passed,
        row.checkpoints_failed,
        row.checkpoints_insufficient,
    )


def _shift_row(row: tuple[Any, ...]) -> ShiftRow:
    return ShiftRow(
        shift_id=row[0],
        agent_ref=row[1],
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
