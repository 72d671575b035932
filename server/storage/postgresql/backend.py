"""The shared StorageBackend: one PostgreSQL database that several voxauth replicas use at once,
through a pool of psycopg connections per replica.

Transactions, across every replica:
- A write transaction takes the store's writer lock (a transaction-level advisory lock) as its
  first statement and runs at READ COMMITTED: writers run one after another, each seeing every
  commit before it, which is what the backend protocol promises (server/storage/backend.py:
  "a read-then-write in it is never overtaken by another writer") and what SQLite's BEGIN
  IMMEDIATE gives one process. Every read-then-write invariant of SecureStore therefore holds
  across replicas as it does in one: the throttle count (an admitted attempt is counted before
  the next is admitted), the audit chain (one total order: each append reads the head the
  previous one wrote), the pending-utterance cap, the creation of the store's own keys, and
  the ones finer locks would get wrong: the crash recovery at open (which deletes keys without
  an agent and must not see a concurrent creation half), a key re-wrap racing an erasure
  (which must not put an erased agent's key back), two creations of one agent id. The price:
  writes do not overlap, commits included (`voxauth bench store` measures it; README,
  "The shared PostgreSQL store").
- A read transaction is REPEATABLE READ, READ ONLY: one snapshot, never blocked by a writer,
  never failing for one.

The data keys live in the database beside the rows (agent_keys), wrapped under the service
key, so every replica shares them and one commit holds a row and its key together. Erasure
deletes the key row in the transaction that deletes the agent's rows; see README, "Erasure on
PostgreSQL", for what dead tuples, WAL and backups then hold.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from server.errors import StorageError
from server.records import (
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
from server.storage.legacy import Upgrade
from server.storage.postgresql.schema import migrate, with_defaults

logger = logging.getLogger(__name__)

LOCK_CLASS = 0x766F7861
"""The first key of every advisory lock voxauth takes ("voxa"), so they clash with no other
application's on the same database."""
WRITER_LOCK = (LOCK_CLASS, 1)
EVENTS_CHANNEL = "voxauth_shift_events"
"""The NOTIFY channel a committed shift event is announced on (its id as the payload)."""
"""The store's writer lock: held by each write transaction from its first statement."""

_POOL_TIMEOUT_SECONDS = 30.0
"""How long a store call waits for a free connection before it fails."""
# Erasure leaves dead tuples of the erased rows; VACUUM frees them (see discard_erased).
_ERASED_TABLES = (
    "agent_keys",
    "agents",
    "pending_utterances",
    "voiceprints",
    "replay_fingerprints",
    "shifts",
    "assurances",
    "assurance_revocations",
    "verification_throttle",
    "completed_requests",
    "shift_events",
    "passive_enrollments",
    "held_voiceprints",
)

_HELD_COLUMNS = (
    "agent_ref, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding, reason, held_at, matched_agent_ref, matched_entry_id, similarity"
)
_WATCHLIST_COLUMNS = (
    "entry_id, model_id, embedding, telephone_embedding, details, added_at, expires_at"
)
_FINGERPRINT_COLUMNS = "agent_ref, model_id, origin, recorded_at, embedding, telephone_embedding"
_UTTERANCE_COLUMNS = (
    "utterance_id, agent_ref, model_id, embedding, duration_seconds, net_speech_seconds, "
    "speech_level_dbfs, clipped_fraction, received_at, telephone_embedding"
)
_VOICEPRINT_COLUMNS = (
    "agent_ref, model_id, embedding, created_at, utterance_count, net_speech_seconds, "
    "telephone_embedding, last_used_at"
)
_SHIFT_COLUMNS = (
    "shift_id, agent_ref, device_id, state, started_at, updated_at, ended_at, "
    "consecutive_failures, checkpoints_passed, checkpoints_failed, checkpoints_insufficient"
)
_AUDIT_COLUMNS = (
    "seq, at, action, agent_id, agent_ref, outcome, details, prev_hash, hash, key_id, mac"
)


class PostgresBackend:
    """StorageBackend on a pool of connections to one PostgreSQL database; thread-safe, and
    safe beside other replicas' backends on the same database."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]]) -> None:
        """Use `open`, which migrates the database first."""
        self._pool = pool

    @classmethod
    def open(cls, conninfo: str, *, connections: int, upgrade: Upgrade) -> PostgresBackend:
        """Migrates the database at `conninfo` (a libpq URI or key=value string) and opens a
        pool of up to `connections` connections to it. `upgrade` seals the empty audit
        chain's head of a new database. Raises StorageError."""

        def created(conn: psycopg.Connection[Any]) -> None:
            # The chain starts at its sealed genesis head, in the transaction that makes the
            # schema, as SQLite's migrations start it: a head missing later is tampering.
            upgrade.chain_carried_over_audit(PostgresTransaction(conn), {})

        migrate(with_defaults(conninfo), lock=WRITER_LOCK, created=created)
        pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            with_defaults(conninfo),
            min_size=1,
            max_size=connections,
            # Transactions are begun explicitly (connection.transaction()), never implicitly.
            kwargs={"autocommit": True},
            configure=_configure,
            # A connection the server dropped (restart, failover) is found before use.
            check=ConnectionPool.check_connection,
            timeout=_POOL_TIMEOUT_SECONDS,
            open=False,
            name="voxauth-store",
        )
        try:
            pool.open(wait=True, timeout=_POOL_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            pool.close()
            raise StorageError(f"cannot connect to the database: {exc}") from exc
        return cls(pool)

    @contextmanager
    def transaction(self, what: str, *, write: bool) -> Iterator[Transaction]:
        """One transaction on a pooled connection; psycopg errors become StorageError naming
        `what`."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                if write:
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", WRITER_LOCK)
                else:
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield PostgresTransaction(conn)
        except psycopg.Error as exc:
            raise StorageError(f"cannot {what}: {exc}") from exc

    def discard_erased(self) -> None:
        """VACUUMs the tables erasure deletes from, so their dead tuples (ciphertext whose key
        is gone, and the wrapped key) leave the pages now rather than at autovacuum's next
        pass. A tuple an open snapshot (another replica's reader) may still see stays until a
        later VACUUM; the freed space is not zeroed, and the WAL keeps what it logged, which is
        why erasure on PostgreSQL is completed by retiring the service key (README, "Erasure
        on PostgreSQL")."""
        try:
            with self._pool.connection() as conn:
                # Autocommit: VACUUM cannot run inside a transaction.
                conn.execute(f"VACUUM (SKIP_LOCKED) {', '.join(_ERASED_TABLES)}")
        except psycopg.Error as exc:
            raise StorageError(f"cannot vacuum the database after erasure: {exc}") from exc

    def interrupted_commit(self) -> bool:
        # A row and its key commit in one transaction: no crash can separate them.
        return False

    def close(self) -> None:
        self._pool.close()


def _configure(conn: psycopg.Connection[Any]) -> None:
    # Times come back in UTC (the backend protocol's promise), whatever the server's zone.
    conn.execute("SET TIME ZONE 'UTC'")


class PostgresTransaction:
    """Transaction on one pooled connection (see backend.Transaction)."""

    def __init__(self, connection: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._conn = connection

    def _one(self, query: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        return self._conn.execute(query, params).fetchone()

    def _all(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(query, params).fetchall()

    def _run(self, query: str, params: Sequence[Any] = ()) -> int:
        """Runs a statement; how many rows it changed."""
        return self._conn.execute(query, params).rowcount

    # --- agents ------------------------------------------------------------------------------

    def insert_agent(self, row: AgentRow) -> bool:
        return (
            self._run(
                "INSERT INTO agents (agent_handle, sealed_identity) VALUES (%s, %s) "
                "ON CONFLICT (agent_handle) DO NOTHING",
                (row.agent_handle, row.sealed_identity),
            )
            == 1
        )

    def agent(self, agent_handle: str) -> AgentRow | None:
        row = self._one(
            "SELECT agent_handle, sealed_identity FROM agents WHERE agent_handle = %s",
            (agent_handle,),
        )
        return None if row is None else AgentRow(row[0], bytes(row[1]))

    def agents(self) -> list[AgentRow]:
        rows = self._all("SELECT agent_handle, sealed_identity FROM agents")
        return [AgentRow(handle, bytes(identity)) for handle, identity in rows]

    def delete_agent(self, agent_handle: str, agent_ref: str) -> bool:
        if not self._run("DELETE FROM agents WHERE agent_handle = %s", (agent_handle,)):
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
            self._run(f"DELETE FROM {table} WHERE agent_ref = %s", (agent_ref,))
        return True

    # --- data keys ---------------------------------------------------------------------------

    def agent_key(self, agent_handle: str) -> bytes | None:
        row = self._one(
            "SELECT wrapped_key FROM agent_keys WHERE agent_handle = %s", (agent_handle,)
        )
        return None if row is None else bytes(row[0])

    def put_agent_key(self, row: AgentKeyRow) -> None:
        self._run(
            "INSERT INTO agent_keys (agent_handle, wrapped_key) VALUES (%s, %s) "
            "ON CONFLICT (agent_handle) DO UPDATE SET wrapped_key = EXCLUDED.wrapped_key",
            (row.agent_handle, row.wrapped_key),
        )

    def delete_agent_key(self, agent_handle: str) -> None:
        self._run("DELETE FROM agent_keys WHERE agent_handle = %s", (agent_handle,))

    def agent_key_page(self, after_handle: str, limit: int) -> list[AgentKeyRow]:
        rows = self._all(
            "SELECT agent_handle, wrapped_key FROM agent_keys WHERE agent_handle > %s "
            "ORDER BY agent_handle LIMIT %s",
            (after_handle, limit),
        )
        return [AgentKeyRow(handle, bytes(wrapped)) for handle, wrapped in rows]

    def store_key(self, name: str) -> bytes | None:
        row = self._one("SELECT wrapped_key FROM store_keys WHERE name = %s", (name,))
        return None if row is None else bytes(row[0])

    def put_store_key(self, name: str, wrapped_key: bytes) -> None:
        self._run(
            "INSERT INTO store_keys (name, wrapped_key) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET wrapped_key = EXCLUDED.wrapped_key",
            (name, wrapped_key),
        )

    # --- pending utterances ------------------------------------------------------------------

    def insert_utterance(self, row: UtteranceRow) -> None:
        self._run(
            f"INSERT INTO pending_utterances ({_UTTERANCE_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                row.utterance_id,
                row.agent_ref,
                row.model_id,
                row.sealed_embedding,
                row.duration_seconds,
                row.net_speech_seconds,
                row.speech_level_dbfs,
                row.clipped_fraction,
                _time(row.received_at),
                row.sealed_telephone_embedding,
            ),
        )

    def utterances(self, agent_ref: str) -> list[UtteranceRow]:
        rows = self._all(
            f"SELECT {_UTTERANCE_COLUMNS} FROM pending_utterances WHERE agent_ref = %s "
            "ORDER BY received_at, id",
            (agent_ref,),
        )
        return [_utterance_row(row) for row in rows]

    def delete_utterances(self, agent_ref: str, utterance_ids: Sequence[str]) -> None:
        self._run(
            "DELETE FROM pending_utterances WHERE agent_ref = %s AND utterance_id = ANY(%s)",
            (agent_ref, list(utterance_ids)),
        )

    # --- replay fingerprints ------------------------------------------------------------------

    def insert_fingerprint(self, row: FingerprintRow) -> None:
        self._run(
            f"INSERT INTO replay_fingerprints ({_FINGERPRINT_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (
                row.agent_ref,
                row.model_id,
                row.origin,
                _time(row.recorded_at),
                row.sealed_embedding,
                row.sealed_telephone_embedding,
            ),
        )

    def fingerprints(self, agent_ref: str) -> list[FingerprintRow]:
        rows = self._all(
            f"SELECT {_FINGERPRINT_COLUMNS} FROM replay_fingerprints WHERE agent_ref = %s "
            "ORDER BY recorded_at, id",
            (agent_ref,),
        )
        return [
            FingerprintRow(
                ref,
                model_id,
                origin,
                _utc(at),
                bytes(blob),
                None if phone is None else bytes(phone),
            )
            for ref, model_id, origin, at, blob, phone in rows
        ]

    def prune_fingerprints(
        self, agent_ref: str, origin: str, recorded_before: datetime, keep: int
    ) -> None:
        self._run(
            "DELETE FROM replay_fingerprints WHERE agent_ref = %s AND origin = %s AND ("
            "recorded_at < %s OR id NOT IN (SELECT id FROM replay_fingerprints "
            "WHERE agent_ref = %s AND origin = %s ORDER BY recorded_at DESC, id DESC LIMIT %s))",
            (agent_ref, origin, _time(recorded_before), agent_ref, origin, keep),
        )

    # --- voiceprints -------------------------------------------------------------------------

    def voiceprint(self, agent_ref: str) -> VoiceprintRow | None:
        row = self._one(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE agent_ref = %s", (agent_ref,)
        )
        return None if row is None else _voiceprint_row(row)

    def voiceprints(self, model_id: str) -> list[VoiceprintRow]:
        rows = self._all(
            f"SELECT {_VOICEPRINT_COLUMNS} FROM voiceprints WHERE model_id = %s", (model_id,)
        )
        return [_voiceprint_row(row) for row in rows]

    def put_voiceprint(self, row: VoiceprintRow) -> bool:
        # xmax is 0 for a row this statement inserted, the replaced row's id otherwise.
        result = self._one(
            f"INSERT INTO voiceprints ({_VOICEPRINT_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (agent_ref) DO UPDATE SET "
            "model_id = EXCLUDED.model_id, embedding = EXCLUDED.embedding, "
            "created_at = EXCLUDED.created_at, utterance_count = EXCLUDED.utterance_count, "
            "net_speech_seconds = EXCLUDED.net_speech_seconds, "
            "telephone_embedding = EXCLUDED.telephone_embedding, "
            "last_used_at = EXCLUDED.last_used_at RETURNING xmax <> 0",
            (
                row.agent_ref,
                row.model_id,
                row.sealed_embedding,
                _time(row.created_at),
                row.utterance_count,
                row.net_speech_seconds,
                row.sealed_telephone_embedding,
                _time(row.last_used_at),
            ),
        )
        return bool(result is not None and result[0])

    def mark_voiceprint_used(self, agent_ref: str, at: datetime) -> None:
        self._run(
            "UPDATE voiceprints SET last_used_at = GREATEST(last_used_at, %s) WHERE agent_ref = %s",
            (_time(at), agent_ref),
        )

    def delete_voiceprints_unused_before(self, cutoff: datetime) -> list[str]:
        rows = self._all(
            "DELETE FROM voiceprints WHERE last_used_at < %s RETURNING agent_ref", (_time(cutoff),)
        )
        return [agent_ref for (agent_ref,) in rows]

    # --- passive enrollment and voiceprints held for review --------------------------------

    def put_passive_enrollment(self, agent_ref: str, requested_at: datetime) -> None:
        self._run(
            "INSERT INTO passive_enrollments (agent_ref, requested_at) VALUES (%s, %s) "
            "ON CONFLICT (agent_ref) DO UPDATE SET requested_at = EXCLUDED.requested_at",
            (agent_ref, _time(requested_at)),
        )

    def passive_enrollment(self, agent_ref: str) -> datetime | None:
        row = self._one(
            "SELECT requested_at FROM passive_enrollments WHERE agent_ref = %s", (agent_ref,)
        )
        return None if row is None else _utc(row[0])

    def delete_passive_enrollment(self, agent_ref: str) -> None:
        self._run("DELETE FROM passive_enrollments WHERE agent_ref = %s", (agent_ref,))

    def put_held_voiceprint(self, row: HeldVoiceprintRow) -> None:
        voiceprint = row.voiceprint
        self._run(
            f"INSERT INTO held_voiceprints ({_HELD_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (agent_ref) DO UPDATE SET model_id = EXCLUDED.model_id, "
            "embedding = EXCLUDED.embedding, created_at = EXCLUDED.created_at, "
            "utterance_count = EXCLUDED.utterance_count, "
            "net_speech_seconds = EXCLUDED.net_speech_seconds, "
            "telephone_embedding = EXCLUDED.telephone_embedding, reason = EXCLUDED.reason, "
            "held_at = EXCLUDED.held_at, matched_agent_ref = EXCLUDED.matched_agent_ref, "
            "matched_entry_id = EXCLUDED.matched_entry_id, similarity = EXCLUDED.similarity",
            (
                voiceprint.agent_ref,
                voiceprint.model_id,
                voiceprint.sealed_embedding,
                _time(voiceprint.created_at),
                voiceprint.utterance_count,
                voiceprint.net_speech_seconds,
                voiceprint.sealed_telephone_embedding,
                row.reason,
                _time(row.held_at),
                row.matched_agent_ref,
                row.matched_entry_id,
                row.similarity,
            ),
        )

    def held_voiceprint(self, agent_ref: str) -> HeldVoiceprintRow | None:
        row = self._one(
            f"SELECT {_HELD_COLUMNS} FROM held_voiceprints WHERE agent_ref = %s", (agent_ref,)
        )
        if row is None:
            return None
        ref, model_id, blob, created, count, net, phone, reason, held, matched, entry, sim = row
        created_at = _utc(created)
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
            _utc(held),
            matched,
            entry,
            sim,
        )

    def delete_held_voiceprint(self, agent_ref: str) -> bool:
        return self._run("DELETE FROM held_voiceprints WHERE agent_ref = %s", (agent_ref,)) > 0

    # --- the watchlist -----------------------------------------------------------------------

    def insert_watchlist_entry(self, row: WatchlistRow) -> None:
        self._run(
            f"INSERT INTO watchlist ({_WATCHLIST_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                row.entry_id,
                row.model_id,
                row.sealed_embedding,
                row.sealed_telephone_embedding,
                row.sealed_details,
                _time(row.added_at),
                _time(row.expires_at),
            ),
        )

    def watchlist(self) -> list[WatchlistRow]:
        rows = self._all(f"SELECT {_WATCHLIST_COLUMNS} FROM watchlist ORDER BY added_at, seq")
        return [
            WatchlistRow(
                entry_id,
                model_id,
                bytes(blob),
                None if phone is None else bytes(phone),
                bytes(details),
                _utc(added),
                _utc(expires),
            )
            for entry_id, model_id, blob, phone, details, added, expires in rows
        ]

    def delete_watchlist_entry(self, entry_id: str) -> bool:
        return self._run("DELETE FROM watchlist WHERE entry_id = %s", (entry_id,)) > 0

    def delete_watchlist_expired(self, at: datetime) -> list[str]:
        rows = self._all(
            "DELETE FROM watchlist WHERE expires_at <= %s RETURNING entry_id", (_time(at),)
        )
        return sorted(entry_id for (entry_id,) in rows)

    # --- shifts, throttling, signing keys, assurances ----------------------------------------

    def insert_shift(self, row: ShiftRow) -> None:
        self._run(
            f"INSERT INTO shifts ({_SHIFT_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            _shift_values(row),
        )

    def shift(self, shift_id: str) -> ShiftRow | None:
        row = self._one(f"SELECT {_SHIFT_COLUMNS} FROM shifts WHERE shift_id = %s", (shift_id,))
        return None if row is None else _shift_row(row)

    def update_shift(self, row: ShiftRow) -> bool:
        values = _shift_values(row)
        return (
            self._run(
                "UPDATE shifts SET agent_ref = %s, device_id = %s, state = %s, "
                "started_at = %s, updated_at = %s, ended_at = %s, consecutive_failures = %s, "
                "checkpoints_passed = %s, checkpoints_failed = %s, checkpoints_insufficient = %s "
                "WHERE shift_id = %s",
                (*values[1:], values[0]),
            )
            == 1
        )

    def shifts_page(
        self, states: Collection[ShiftState], limit: int, before: ShiftCursor | None
    ) -> list[ShiftRow]:
        clauses: list[str] = []
        values: list[Any] = []
        if states:
            clauses.append("state = ANY(%s)")
            values.append([state.value for state in states])
        if before is not None:
            clauses.append("(started_at, shift_id) < (%s, %s)")
            values += [_time(before.started_at), before.shift_id]
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = self._all(
            f"SELECT {_SHIFT_COLUMNS} FROM shifts {where}"
            "ORDER BY started_at DESC, shift_id DESC LIMIT %s",
            (*values, limit),
        )
        return [_shift_row(row) for row in rows]

    def census(self, delay_after_failures: int) -> StoreCensus:
        open_shifts: dict[ShiftState, int] = {s: 0 for s in ShiftState if s is not ShiftState.ENDED}
        for state, count in self._all(
            "SELECT state, COUNT(*) FROM shifts WHERE state <> %s GROUP BY state",
            (ShiftState.ENDED.value,),
        ):
            open_shifts[ShiftState(state)] = count
        row = self._one(
            "SELECT COUNT(*) FILTER (WHERE disabled_at IS NULL AND consecutive_failures >= %s), "
            "COUNT(*) FILTER (WHERE disabled_at IS NOT NULL) FROM verification_throttle",
            (delay_after_failures,),
        )
        delayed, disabled = row if row is not None else (0, 0)
        return StoreCensus(open_shifts, delayed, disabled)

    def shift_lease(self, shift_id: str) -> ShiftLease | None:
        row = self._one(
            "SELECT owner, token, attached, expires_at, checkpoint_seq, next_checkpoint_at "
            "FROM shift_leases WHERE shift_id = %s",
            (shift_id,),
        )
        if row is None:
            return None
        owner, token, attached, expires_at, seq, next_at = row
        return ShiftLease(
            shift_id, owner, token, attached, _utc(expires_at), seq, _optional_utc(next_at)
        )

    def put_shift_lease(self, lease: ShiftLease) -> None:
        self._run(
            "INSERT INTO shift_leases (shift_id, owner, token, attached, expires_at, "
            "checkpoint_seq, next_checkpoint_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (shift_id) DO UPDATE SET owner = EXCLUDED.owner, "
            "token = EXCLUDED.token, attached = EXCLUDED.attached, "
            "expires_at = EXCLUDED.expires_at, checkpoint_seq = EXCLUDED.checkpoint_seq, "
            "next_checkpoint_at = EXCLUDED.next_checkpoint_at",
            (
                lease.shift_id,
                lease.owner,
                lease.token,
                lease.attached,
                _time(lease.expires_at),
                lease.checkpoint_seq,
                _optional_time(lease.next_checkpoint_at),
            ),
        )

    def throttle_state(self, agent_ref: str) -> ThrottleState:
        row = self._one(
            "SELECT consecutive_failures, last_failure_at, disabled_at "
            "FROM verification_throttle WHERE agent_ref = %s",
            (agent_ref,),
        )
        if row is None:
            return ThrottleState()
        return ThrottleState(row[0], _optional_utc(row[1]), _optional_utc(row[2]))

    def put_throttle_state(self, agent_ref: str, state: ThrottleState) -> None:
        # Agents without failures need no row: the table holds only runs of failures.
        if state == ThrottleState():
            self._run("DELETE FROM verification_throttle WHERE agent_ref = %s", (agent_ref,))
            return
        self._run(
            "INSERT INTO verification_throttle "
            "(agent_ref, consecutive_failures, last_failure_at, disabled_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (agent_ref) DO UPDATE SET "
            "consecutive_failures = EXCLUDED.consecutive_failures, "
            "last_failure_at = EXCLUDED.last_failure_at, disabled_at = EXCLUDED.disabled_at",
            (
                agent_ref,
                state.consecutive_failures,
                _optional_time(state.last_failure_at),
                _optional_time(state.disabled_at),
            ),
        )

    def signing_keys(self) -> list[StoredSigningKey]:
        rows = self._all(
            "SELECT kid, sealed_private_key, created_at, retired_at, published_until "
            "FROM signing_keys"
        )
        return [
            StoredSigningKey(
                kid=row[0],
                sealed_private_key=bytes(row[1]),
                created_at=_utc(row[2]),
                retired_at=_optional_utc(row[3]),
                published_until=_optional_utc(row[4]),
            )
            for row in rows
        ]

    def replace_signing_keys(self, keys: Sequence[StoredSigningKey]) -> None:
        values = [
            (
                key.kid,
                key.sealed_private_key,
                _time(key.created_at),
                _optional_time(key.retired_at),
                _optional_time(key.published_until),
            )
            for key in keys
        ]
        self._run("DELETE FROM signing_keys")
        with self._conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO signing_keys (kid, sealed_private_key, created_at, retired_at, "
                "published_until) VALUES (%s, %s, %s, %s, %s)",
                values,
            )

    def put_assurance(self, row: AssuranceRow) -> None:
        self._run(
            "INSERT INTO assurances (shift_id, agent_ref, token_id, sealed_token, issued_at, "
            "expires_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (shift_id) DO UPDATE SET "
            "agent_ref = EXCLUDED.agent_ref, token_id = EXCLUDED.token_id, "
            "sealed_token = EXCLUDED.sealed_token, issued_at = EXCLUDED.issued_at, "
            "expires_at = EXCLUDED.expires_at",
            (
                row.shift_id,
                row.agent_ref,
                row.token_id,
                row.sealed_token,
                _time(row.issued_at),
                _time(row.expires_at),
            ),
        )

    def assurance(self, shift_id: str) -> AssuranceRow | None:
        row = self._one(
            "SELECT agent_ref, token_id, sealed_token, issued_at, expires_at FROM assurances "
            "WHERE shift_id = %s",
            (shift_id,),
        )
        if row is None:
            return None
        return AssuranceRow(shift_id, row[0], row[1], bytes(row[2]), _utc(row[3]), _utc(row[4]))

    def insert_revocation(self, revocation: AssuranceRevocation) -> None:
        self._run(
            "INSERT INTO assurance_revocations (token_id, shift_id, reason, revoked_at) "
            "VALUES (%s, %s, %s, %s)",
            (
                revocation.token_id,
                revocation.shift_id,
                revocation.reason.value,
                _time(revocation.revoked_at),
            ),
        )

    def revocation(self, token_id: str) -> AssuranceRevocation | None:
        row = self._one(
            "SELECT shift_id, reason, revoked_at FROM assurance_revocations WHERE token_id = %s",
            (token_id,),
        )
        if row is None:
            return None
        return AssuranceRevocation(token_id, row[0], RevocationReason(row[1]), _utc(row[2]))

    # --- completed requests ------------------------------------------------------------------

    def completed_request(self, request_handle: str) -> CompletedRequestRow | None:
        row = self._one(
            "SELECT request_digest, agent_ref, response, expires_at FROM completed_requests "
            "WHERE request_handle = %s",
            (request_handle,),
        )
        if row is None:
            return None
        return CompletedRequestRow(request_handle, row[0], row[1], bytes(row[2]), _utc(row[3]))

    def put_completed_request(self, row: CompletedRequestRow) -> None:
        self._run(
            "INSERT INTO completed_requests (request_handle, request_digest, agent_ref, "
            "response, expires_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (request_handle) DO UPDATE SET "
            "request_digest = EXCLUDED.request_digest, agent_ref = EXCLUDED.agent_ref, "
            "response = EXCLUDED.response, expires_at = EXCLUDED.expires_at",
            (
                row.request_handle,
                row.request_digest,
                row.agent_ref,
                row.response,
                _time(row.expires_at),
            ),
        )

    def delete_completed_requests_expired(self, at: datetime) -> int:
        return self._run("DELETE FROM completed_requests WHERE expires_at <= %s", (_time(at),))

    # --- the audit chain ---------------------------------------------------------------------

    def audit_head(self) -> AuditHead | None:
        row = self._one("SELECT seq, hash, key_id, mac FROM audit_head", ())
        return None if row is None else AuditHead(*row)

    def put_audit_head(self, head: AuditHead) -> None:
        self._run(
            "INSERT INTO audit_head (singleton, seq, hash, key_id, mac) "
            "VALUES (1, %s, %s, %s, %s) ON CONFLICT (singleton) DO UPDATE SET "
            "seq = EXCLUDED.seq, hash = EXCLUDED.hash, key_id = EXCLUDED.key_id, "
            "mac = EXCLUDED.mac",
            (head.seq, head.hash, head.key_id, head.mac),
        )

    def insert_event(self, agent_ref: str, sealed_payload: bytes, at: datetime) -> int:
        row = self._one(
            "INSERT INTO shift_events (agent_ref, payload, at) VALUES (%s, %s, %s) "
            "RETURNING event_id",
            (agent_ref, sealed_payload, _time(at)),
        )
        assert row is not None
        # Delivered to every listening replica when (and only if) this transaction commits.
        self._one("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(row[0])))
        return int(row[0])

    def events_after(self, after_id: int, limit: int) -> list[EventRow]:
        rows = self._all(
            "SELECT event_id, agent_ref, payload, at FROM shift_events WHERE event_id > %s "
            "ORDER BY event_id LIMIT %s",
            (after_id, limit),
        )
        return [EventRow(i, ref, bytes(payload), _utc(at)) for i, ref, payload, at in rows]

    def latest_event_id(self) -> int:
        # The identity's own counter: deleting the newest events does not move it back. A
        # sequence is outside MVCC: it counts the id a writer took in a transaction not yet
        # committed. Waiting for the writer lock first (shared: readers do not queue behind
        # each other) makes every id counted one whose transaction has ended, so a bus opened
        # at it misses none that commit later, and a resume check does not take an event
        # still to commit for one dropped.
        self._one("SELECT pg_advisory_xact_lock_shared(%s, %s)", WRITER_LOCK)
        row = self._one(
            "SELECT coalesce((SELECT last_value FROM shift_events_event_id_seq "
            "WHERE is_called), 0)",
            (),
        )
        assert row is not None
        return int(row[0])

    def delete_events_before(self, at: datetime) -> None:
        self._run("DELETE FROM shift_events WHERE at < %s", (_time(at),))

    def insert_audit_row(self, row: AuditRow) -> None:
        self._run(
            f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            _audit_values(row),
        )

    def update_audit_row(self, row: AuditRow) -> None:
        values = _audit_values(row)
        self._run(
            "UPDATE audit_log SET at = %s, action = %s, agent_id = %s, agent_ref = %s, "
            "outcome = %s, details = %s, prev_hash = %s, hash = %s, key_id = %s, mac = %s "
            "WHERE seq = %s",
            (*values[1:], values[0]),
        )

    def audit_rows(self, after_seq: int, limit: int) -> list[AuditRow]:
        rows = self._all(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > %s ORDER BY seq LIMIT %s",
            (after_seq, limit),
        )
        return [_audit_row(row) for row in rows]

    def latest_audit_row(self, action: str) -> AuditRow | None:
        row = self._one(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE action = %s ORDER BY seq DESC LIMIT 1",
            (action,),
        )
        return None if row is None else _audit_row(row)

    def audit_rows_sealed_by_other_keys(self, key_id: str, limit: int) -> list[AuditRow]:
        rows = self._all(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log "
            "WHERE key_id IS NOT NULL AND key_id <> %s ORDER BY seq LIMIT %s",
            (key_id, limit),
        )
        return [_audit_row(row) for row in rows]


def _time(moment: datetime) -> datetime:
    # PostgreSQL would read a naive time in the session's zone: refuse it, as SQLite does.
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment}: voxauth stores timezone-aware times only")
    return moment


def _optional_time(moment: datetime | None) -> datetime | None:
    return None if moment is None else _time(moment)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _optional_utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


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
        _utc(at),
        None if phone is None else bytes(phone),
    )


def _voiceprint_row(row: tuple[Any, ...]) -> VoiceprintRow:
    agent_ref, model_id, blob, created_at, utterance_count, net_speech, phone, used = row
    return VoiceprintRow(
        agent_ref,
        model_id,
        bytes(blob),
        _utc(created_at),
        utterance_count,
        net_speech,
        None if phone is None else bytes(phone),
        _utc(used),
    )


def _shift_values(row: ShiftRow) -> tuple[Any, ...]:
    return (
        row.shift_id,
        row.agent_ref,
        row.device_id,
        row.state.value,
        _time(row.started_at),
        _time(row.updated_at),
        _optional_time(row.ended_at),
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
        started_at=_utc(row[4]),
        updated_at=_utc(row[5]),
        ended_at=_optional_utc(row[6]),
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
