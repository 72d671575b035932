"""The embedded SQLite backend. `open_store` is how the composition root (server/app.py) and
the tools open the service's store; nothing else imports this package."""

from __future__ import annotations

from pathlib import Path

from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.storage.secure_store import SecureStore
from server.storage.sqlite.backend import SqliteBackend, key_file_path
from server.storage.upgrade import SealingUpgrade

__all__ = ["key_file_path", "open_store"]


def open_store(
    path: Path, cipher: VoiceprintCipher, *, audit_key: AuditKey | None = None
) -> SecureStore:
    """The store in the SQLite file at `path` and its key file beside it (`key_file_path`),
    both created 0600 if missing and migrated if older. `audit_key` seals the audit chain;
    without it records are chained but unsealed, and `voxauth audit verify` reports them as
    unverifiable. Raises StorageError, or ConfigurationError if the database holds values
    sealed under a key `cipher` lacks."""
    backend = SqliteBackend.open(path, upgrade=SealingUpgrade(cipher, audit_key))
    return SecureStore.open(backend, cipher, audit_key)
