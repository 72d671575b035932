"""Alembic's entry point for voxauth's PostgreSQL schema. voxauth runs it only through
server/storage/postgresql/schema.py, which hands it a connection already inside the
transaction (and holding the lock) the whole upgrade commits in."""

from __future__ import annotations

from alembic import context

from server.storage.postgresql.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
