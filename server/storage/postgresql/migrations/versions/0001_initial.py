"""The schema as SQLite's migrations had brought it (server/storage/sqlite/schema.py, version
10): one table per row kind of server/storage/backend.py.

Times are timestamptz (microseconds, like SQLite's integers); the audit chain's `at` stays the
integer its hash covers. Handles are hex keyed hashes, compared bytewise (COLLATE "C") so that
a walk by handle pages alike whatever the database's collation. Unlike SQLite's key file, the
data keys live in the same database as the rows, so one commit holds both (no interrupted
commit can separate them) and every replica sees them; see README, "Erasure on PostgreSQL".

Revision ID: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_STATEMENTS = (
    """CREATE TABLE agents (
        agent_handle TEXT COLLATE "C" PRIMARY KEY,
        sealed_identity BYTEA NOT NULL
    )""",
    # The data keys, wrapped under the service key. Deleting a row is the erasure.
    """CREATE TABLE agent_keys (
        agent_handle TEXT COLLATE "C" PRIMARY KEY,
        wrapped_key BYTEA NOT NULL
    )""",
    """CREATE TABLE store_keys (
        name TEXT PRIMARY KEY,
        wrapped_key BYTEA NOT NULL
    )""",
    # id: insertion order, the tie-break of equal times (SQLite's rowid).
    """CREATE TABLE pending_utterances (
        id BIGINT GENERATED ALWAYS AS IDENTITY,
        utterance_id TEXT PRIMARY KEY,
        agent_ref TEXT NOT NULL,
        model_id TEXT NOT NULL,
        embedding BYTEA NOT NULL,
        duration_seconds DOUBLE PRECISION NOT NULL,
        net_speech_seconds DOUBLE PRECISION NOT NULL,
        speech_level_dbfs DOUBLE PRECISION NOT NULL,
        clipped_fraction DOUBLE PRECISION NOT NULL,
        received_at TIMESTAMPTZ NOT NULL,
        telephone_embedding BYTEA
    )""",
    "CREATE INDEX pending_utterances_by_agent ON pending_utterances (agent_ref, received_at, id)",
    """CREATE TABLE voiceprints (
        agent_ref TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        embedding BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        utterance_count INTEGER NOT NULL,
        net_speech_seconds DOUBLE PRECISION NOT NULL,
        telephone_embedding BYTEA,
        last_used_at TIMESTAMPTZ NOT NULL
    )""",
    "CREATE INDEX voiceprints_by_model ON voiceprints (model_id)",
    "CREATE INDEX voiceprints_by_last_use ON voiceprints (last_used_at)",
    """CREATE TABLE replay_fingerprints (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        agent_ref TEXT NOT NULL,
        model_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL,
        embedding BYTEA NOT NULL,
        telephone_embedding BYTEA
    )""",
    "CREATE INDEX replay_fingerprints_by_agent ON replay_fingerprints (agent_ref, recorded_at)",
    """CREATE TABLE shifts (
        shift_id TEXT PRIMARY KEY,
        agent_ref TEXT NOT NULL,
        device_id TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        ended_at TIMESTAMPTZ,
        consecutive_failures INTEGER NOT NULL,
        checkpoints_passed INTEGER NOT NULL,
        checkpoints_failed INTEGER NOT NULL,
        checkpoints_insufficient INTEGER NOT NULL
    )""",
    "CREATE INDEX shifts_by_agent ON shifts (agent_ref)",
    # Assurances and revocations go with their shift.
    """CREATE TABLE assurances (
        shift_id TEXT PRIMARY KEY REFERENCES shifts (shift_id) ON DELETE CASCADE,
        agent_ref TEXT NOT NULL,
        token_id TEXT NOT NULL,
        sealed_token BYTEA NOT NULL,
        issued_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE assurance_revocations (
        token_id TEXT PRIMARY KEY,
        shift_id TEXT NOT NULL REFERENCES shifts (shift_id) ON DELETE CASCADE,
        reason TEXT NOT NULL,
        revoked_at TIMESTAMPTZ NOT NULL
    )""",
    "CREATE INDEX assurance_revocations_by_shift ON assurance_revocations (shift_id)",
    # Only agents in a run of failures have a row.
    """CREATE TABLE verification_throttle (
        agent_ref TEXT PRIMARY KEY,
        consecutive_failures INTEGER NOT NULL,
        last_failure_at TIMESTAMPTZ,
        disabled_at TIMESTAMPTZ
    )""",
    """CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        sealed_private_key BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        retired_at TIMESTAMPTZ,
        published_until TIMESTAMPTZ
    )""",
    """CREATE TABLE completed_requests (
        request_handle TEXT PRIMARY KEY,
        request_digest TEXT NOT NULL,
        agent_ref TEXT,
        response BYTEA NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )""",
    "CREATE INDEX completed_requests_by_agent_ref ON completed_requests (agent_ref)",
    "CREATE INDEX completed_requests_by_expiry ON completed_requests (expires_at)",
    # The hash-chained audit log: seq counts from 1 without gaps.
    """CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        at BIGINT NOT NULL,
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
    "CREATE INDEX audit_log_by_action ON audit_log (action, seq)",
    """CREATE TABLE audit_head (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL,
        key_id TEXT,
        mac TEXT
    )""",
)


def upgrade() -> None:
    for statement in _STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("voxauth's schema is only ever migrated forward")
