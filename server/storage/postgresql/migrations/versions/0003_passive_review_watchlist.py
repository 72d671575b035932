"""Passive enrollment marks (enrollment/passive.py), voiceprints held for HR review
(enrollment/review.py), sealed under the agent's key and erased with it, and the watchlist
(enrollment/watchlist.py), sealed under the store's watchlist key and deleted when entries
expire. SQLite's migration 12.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """CREATE TABLE passive_enrollments (
            agent_ref TEXT PRIMARY KEY,
            requested_at TIMESTAMPTZ NOT NULL
        )"""
    )
    op.execute(
        """CREATE TABLE held_voiceprints (
            agent_ref TEXT PRIMARY KEY,
            model_id TEXT NOT NULL,
            embedding BYTEA NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            utterance_count INTEGER NOT NULL,
            net_speech_seconds DOUBLE PRECISION NOT NULL,
            telephone_embedding BYTEA,
            reason TEXT NOT NULL,
            held_at TIMESTAMPTZ NOT NULL,
            matched_agent_ref TEXT NOT NULL,
            matched_entry_id TEXT NOT NULL,
            similarity DOUBLE PRECISION NOT NULL
        )"""
    )
    # `seq` keeps the insertion order SQLite's rowid gives, for entries added at one instant.
    op.execute(
        """CREATE TABLE watchlist (
            entry_id TEXT PRIMARY KEY,
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            model_id TEXT NOT NULL,
            embedding BYTEA NOT NULL,
            telephone_embedding BYTEA,
            details BYTEA NOT NULL,
            added_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
        )"""
    )
    op.execute("CREATE INDEX watchlist_by_expiry ON watchlist (expires_at)")


def downgrade() -> None:
    raise NotImplementedError("voxauth's schema is only ever migrated forward")
