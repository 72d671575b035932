"""The SQLite schema, as the migrations that build it: a database of any earlier version is
brought up to SCHEMA_VERSION when it opens (server/storage/sqlite/backend.py)."""

from __future__ import annotations

# The hash-chained audit log (server/security/audit.py), an entry of MIGRATIONS. Named,
# because its hashes and seals are computed above the backend: the migration calls back into
# the store (server/storage/audit_chain.py) right after these statements, in the same
# transaction.
AUDIT_CHAIN_MIGRATION = (
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

# Per-agent data keys (server/storage/sealing.py). The old tables are kept, renamed, for the
# upgrade to read (server/storage/upgrade.py seals every agent anew in the migration's
# transaction) and dropped after it: LEGACY_TABLES_DROP. Rows other than the agent's own name
# the agent by its audit pseudonym (agent_ref); the agent's own row by its handle, a keyed hash
# of its id. No foreign key joins them: only the sealed identity does, which is the point.
PER_AGENT_KEYS_MIGRATION = (
    "ALTER TABLE assurances RENAME TO legacy_assurances",
    "ALTER TABLE verification_throttle RENAME TO legacy_verification_throttle",
    "ALTER TABLE shifts RENAME TO legacy_shifts",
    "ALTER TABLE voiceprints RENAME TO legacy_voiceprints",
    "ALTER TABLE pending_utterances RENAME TO legacy_pending_utterances",
    "ALTER TABLE agents RENAME TO legacy_agents",
    "DROP INDEX pending_utterances_by_agent",
    "DROP INDEX shifts_by_agent",
    "DROP INDEX voiceprints_by_last_use",
    "DROP INDEX agents_by_audit_pseudonym",
    # Only records of an erasure name an agent in clear; an index would be one more copy.
    "DROP INDEX audit_log_by_agent_id",
    """CREATE TABLE agents (
        agent_handle TEXT PRIMARY KEY,
        sealed_identity BLOB NOT NULL
    )""",
    """CREATE TABLE pending_utterances (
        utterance_id TEXT PRIMARY KEY,
        agent_ref TEXT NOT NULL,
        model_id TEXT NOT NULL,
        embedding BLOB NOT NULL,
        duration_seconds REAL NOT NULL,
        net_speech_seconds REAL NOT NULL,
        speech_level_dbfs REAL NOT NULL,
        clipped_fraction REAL NOT NULL,
        received_at INTEGER NOT NULL,
        telephone_embedding BLOB
    )""",
    "CREATE INDEX pending_utterances_by_agent ON pending_utterances (agent_ref, received_at)",
    """CREATE TABLE voiceprints (
        agent_ref TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        embedding BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        utterance_count INTEGER NOT NULL,
        net_speech_seconds REAL NOT NULL,
        telephone_embedding BLOB,
        last_used_at INTEGER NOT NULL
    )""",
    "CREATE INDEX voiceprints_by_last_use ON voiceprints (last_used_at)",
    """CREATE TABLE shifts (
        shift_id TEXT PRIMARY KEY,
        agent_ref TEXT NOT NULL,
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
    "CREATE INDEX shifts_by_agent ON shifts (agent_ref)",
    """CREATE TABLE assurances (
        shift_id TEXT PRIMARY KEY REFERENCES shifts (shift_id) ON DELETE CASCADE,
        agent_ref TEXT NOT NULL,
        token_id TEXT NOT NULL,
        sealed_token BLOB NOT NULL,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    )""",
    """CREATE TABLE verification_throttle (
        agent_ref TEXT PRIMARY KEY,
        consecutive_failures INTEGER NOT NULL,
        last_failure_at INTEGER,
        disabled_at INTEGER
    )""",
)
LEGACY_TABLES_DROP = (
    "DROP TABLE legacy_assurances",
    "DROP TABLE legacy_verification_throttle",
    "DROP TABLE legacy_shifts",
    "DROP TABLE legacy_voiceprints",
    "DROP TABLE legacy_pending_utterances",
    "DROP TABLE legacy_agents",
)

# MIGRATIONS[n] takes the schema from user_version n to n + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
        # Throttling of verification attempts (server/verification/throttling.py): only
        # agents in a run of failures have a row. Erasing the agent erases it.
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
    AUDIT_CHAIN_MIGRATION,
    PER_AGENT_KEYS_MIGRATION,
    (
        # Revoked assurances, by token id: a shift that ends or locks revokes its latest one,
        # and the row outlives a newer assurance of the shift. Erasing the shift (with its
        # agent) erases them. Nothing here names the agent.
        """CREATE TABLE assurance_revocations (
            token_id TEXT PRIMARY KEY,
            shift_id TEXT NOT NULL REFERENCES shifts (shift_id) ON DELETE CASCADE,
            reason TEXT NOT NULL,
            revoked_at INTEGER NOT NULL
        )""",
        "CREATE INDEX assurance_revocations_by_shift ON assurance_revocations (shift_id)",
        # Shifts that ended or locked before revocation existed revoke their assurance now
        # (the tables as PER_AGENT_KEYS_MIGRATION left them: state and times are in clear).
        """INSERT INTO assurance_revocations (token_id, shift_id, reason, revoked_at)
            SELECT a.token_id, a.shift_id,
                CASE s.state WHEN 'ENDED' THEN 'shift ended' ELSE 'shift locked' END,
                coalesce(s.ended_at, s.updated_at)
            FROM assurances a JOIN shifts s ON s.shift_id = a.shift_id
            WHERE s.state IN ('ENDED', 'LOCKED')""",
    ),
    (
        # Completed requests, for retries with a request id (server/runtime/requests.py).
        # Found by a keyed hash of (caller, method, id); a response naming an agent is sealed
        # under its data key and carries its pseudonym, so erasing the agent deletes it.
        """CREATE TABLE completed_requests (
            request_handle TEXT PRIMARY KEY,
            request_digest TEXT NOT NULL,
            agent_ref TEXT,
            response BLOB NOT NULL,
            expires_at INTEGER NOT NULL
        )""",
        "CREATE INDEX completed_requests_by_agent_ref ON completed_requests (agent_ref)",
        "CREATE INDEX completed_requests_by_expiry ON completed_requests (expires_at)",
    ),
    (
        # Replay fingerprints (server/verification/replay.py): the sealed embeddings of the
        # agent's enrollment utterances and of its recent checks, to recognise a recording
        # played again. Bounded per agent; erased with the agent.
        """CREATE TABLE replay_fingerprints (
            agent_ref TEXT NOT NULL,
            model_id TEXT NOT NULL,
            origin TEXT NOT NULL,
            recorded_at INTEGER NOT NULL,
            embedding BLOB NOT NULL,
            telephone_embedding BLOB
        )""",
        "CREATE INDEX replay_fingerprints_by_agent ON replay_fingerprints (agent_ref, recorded_at)",
    ),
    (
        # Shift leases (server/shifts/lease.py): which replica owns a shift, its fencing token
        # and its checkpoint schedule. No personal data; it goes with its shift.
        """CREATE TABLE shift_leases (
            shift_id TEXT PRIMARY KEY REFERENCES shifts (shift_id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            token INTEGER NOT NULL,
            attached INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            checkpoint_seq INTEGER NOT NULL,
            next_checkpoint_at INTEGER
        )""",
        # Shift events for the event bus (server/shifts/event_bus.py), sealed under the agent's
        # key, kept for a while so a subscriber's replica catches up by id. AUTOINCREMENT: an
        # id is never given twice, even after the newest events are deleted.
        """CREATE TABLE shift_events (
            event_id INTEGER PRIMARY KEY AUTOINCREMENT,
            agent_ref TEXT NOT NULL,
            payload BLOB NOT NULL,
            at INTEGER NOT NULL
        )""",
        "CREATE INDEX shift_events_by_agent ON shift_events (agent_ref)",
        "CREATE INDEX shift_events_by_time ON shift_events (at)",
    ),
    (
        # Passive enrollment from the agent's shifts (enrollment/passive.py): the mark that HR
        # asked for it. What it collects is pending utterances, as in active enrollment.
        """CREATE TABLE passive_enrollments (
            agent_ref TEXT PRIMARY KEY,
            requested_at INTEGER NOT NULL
        )""",
        # Voiceprints held for HR review (enrollment/review.py): a duplicate of another
        # agent's voice, a watchlist match, or one waiting for approval. Sealed under the
        # agent's key; matched_agent_ref is the matching agent's pseudonym, as audit rows
        # carry. Erased with the agent.
        """CREATE TABLE held_voiceprints (
            agent_ref TEXT PRIMARY KEY,
            model_id TEXT NOT NULL,
            embedding BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            utterance_count INTEGER NOT NULL,
            net_speech_seconds REAL NOT NULL,
            telephone_embedding BLOB,
            reason TEXT NOT NULL,
            held_at INTEGER NOT NULL,
            matched_agent_ref TEXT NOT NULL,
            matched_entry_id TEXT NOT NULL,
            similarity REAL NOT NULL
        )""",
        # The watchlist (enrollment/watchlist.py): voices of known fraudsters and dismissed
        # employees, sealed under the store's watchlist key; deleted when they expire.
        """CREATE TABLE watchlist (
            entry_id TEXT PRIMARY KEY,
            model_id TEXT NOT NULL,
            embedding BLOB NOT NULL,
            telephone_embedding BLOB,
            details BLOB NOT NULL,
            added_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        )""",
        "CREATE INDEX watchlist_by_expiry ON watchlist (expires_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The key file's schema, migrated like the database's: KEY_MIGRATIONS[n] takes it from
# user_version n to n + 1. It holds wrapped keys only, and runs with a rollback journal and
# secure_delete, so a deleted key leaves no copy behind (no WAL frames outlive the commit).
KEY_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys.agent_keys (
            agent_handle TEXT PRIMARY KEY,
            wrapped_key BLOB NOT NULL
        )""",
        """CREATE TABLE keys.store_keys (
            name TEXT PRIMARY KEY,
            wrapped_key BLOB NOT NULL
        )""",
    ),
)
KEY_SCHEMA_VERSION = len(KEY_MIGRATIONS)
