"""Which database the store lives in, by the one setting VOXAUTH_DB: a postgresql:// (or
postgres://) URI names the shared PostgreSQL database several replicas use; anything else is
the path of the embedded SQLite file (the default). The composition root (server/app.py) and
the tools open the store here; nothing else imports the concrete backends."""

from __future__ import annotations

from pathlib import Path

from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.storage import postgresql, sqlite
from server.storage.interface import EventWakeups
from server.storage.postgresql.notify import PostgresEventWakeups
from server.storage.secure_store import SecureStore

_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(_POSTGRESQL_SCHEMES)


def open_store(
    location: str | Path,
    cipher: VoiceprintCipher,
    *,
    audit_key: AuditKey | None = None,
    connections: int = 4,
) -> SecureStore:
    """The store at `location` (see the module's doc), migrated if older; `connections`
    bounds a PostgreSQL store's connection pool (one per store thread). Raises StorageError,
    or ConfigurationError if the database holds values sealed under a key `cipher` lacks."""
    if is_postgresql(location):
        assert isinstance(location, str)
        return postgresql.open_store(location, cipher, audit_key=audit_key, connections=connections)
    return sqlite.open_store(Path(location), cipher, audit_key=audit_key)


def event_wakeups(location: str | Path) -> EventWakeups | None:
    """How replicas on the database at `location` learn of each other's shift events; None
    for SQLite, which one process serves (it writes every event itself)."""
    if is_postgresql(location):
        assert isinstance(location, str)
        return PostgresEventWakeups(location)
    return None


def store_exists(location: str | Path) -> bool:
    """Whether a store is at `location` already, for the tools that must not create one
    (opening would, and an empty store's audit chain is intact). Raises StorageError if a
    PostgreSQL database cannot be reached."""
    if is_postgresql(location):
        assert isinstance(location, str)
        return postgresql.holds_schema(location)
    return Path(location).is_file()
