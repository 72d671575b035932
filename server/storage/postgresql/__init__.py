"""The shared PostgreSQL backend, for several replicas on one database. `open_store` is how
server/storage/databases.py opens it; nothing else imports this package."""

from __future__ import annotations

from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.storage.postgresql.backend import PostgresBackend
from server.storage.postgresql.schema import holds_schema
from server.storage.secure_store import SecureStore
from server.storage.upgrade import SealingUpgrade

__all__ = ["holds_schema", "open_store"]


def open_store(
    conninfo: str,
    cipher: VoiceprintCipher,
    *,
    audit_key: AuditKey | None = None,
    connections: int = 4,
) -> SecureStore:
    """The store in the PostgreSQL database at `conninfo` (a libpq URI, postgresql://...),
    migrated if older, over a pool of up to `connections` connections (one per store
    thread). `audit_key` seals the audit chain as for SQLite. Raises StorageError, or
    ConfigurationError if the database holds values sealed under a key `cipher` lacks."""
    backend = PostgresBackend.open(
        conninfo, connections=connections, upgrade=SealingUpgrade(cipher, audit_key)
    )
    return SecureStore.open(backend, cipher, audit_key)
