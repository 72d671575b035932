"""Shift leases (server/shifts/lease.py): which replica owns a shift, its fencing token and
its checkpoint schedule; no personal data, it goes with its shift. And shift events for the
replicas' event bus (server/shifts/event_bus.py), sealed under the agent's key, kept for a
while so a replica catches up by id. SQLite's migration 11.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """CREATE TABLE shift_leases (
            shift_id TEXT PRIMARY KEY REFERENCES shifts (shift_id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            token BIGINT NOT NULL,
            attached BOOLEAN NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL,
            checkpoint_seq INTEGER NOT NULL,
            next_checkpoint_at TIMESTAMPTZ
        )"""
    )
    # Ids grow in commit order because every write holds the writer lock to its commit.
    op.execute(
        """CREATE TABLE shift_events (
            event_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            agent_ref TEXT NOT NULL,
            payload BYTEA NOT NULL,
            at TIMESTAMPTZ NOT NULL
        )"""
    )
    op.execute("CREATE INDEX shift_events_by_agent ON shift_events (agent_ref)")
    op.execute("CREATE INDEX shift_events_by_time ON shift_events (at)")


def downgrade() -> None:
    raise NotImplementedError("voxauth's schema is only ever migrated forward")
