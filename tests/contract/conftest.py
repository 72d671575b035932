"""The backends the storage contract runs on. Each is a `Storage`: a place the store keeps its
data, opened as a SecureStore over that backend (as the service does) or as the bare backend
(for a test that writes rows behind the store's back). A new backend adds its Storage to
`STORAGES`; every contract test then runs on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.storage.backend import StorageBackend
from server.storage.postgresql.backend import PostgresBackend
from server.storage.secure_store import SecureStore
from server.storage.sqlite.backend import SqliteBackend
from server.storage.upgrade import SealingUpgrade
from tests.fake_storage import FailingBackend

KEY = bytes(range(32))
CIPHER = VoiceprintCipher(KEY)
AUDIT_KEY = AuditKey(KEY)


class Storage(Protocol):
    def backend(
        self, cipher: VoiceprintCipher = CIPHER, audit_key: AuditKey | None = AUDIT_KEY
    ) -> StorageBackend:
        """A new connection to the data, without the store above it."""

    def open(
        self,
        cipher: VoiceprintCipher = CIPHER,
        audit_key: AuditKey | None = AUDIT_KEY,
        *,
        failing: FailingBackend | None = None,
    ) -> SecureStore:
        """The store over a new connection; through `failing` (whose wrapped backend this
        sets) when given."""


class SqliteStorage:
    def __init__(self, path: Path) -> None:
        self.path = path

    def backend(
        self, cipher: VoiceprintCipher = CIPHER, audit_key: AuditKey | None = AUDIT_KEY
    ) -> StorageBackend:
        return SqliteBackend.open(self.path, upgrade=SealingUpgrade(cipher, audit_key))

    def open(
        self,
        cipher: VoiceprintCipher = CIPHER,
        audit_key: AuditKey | None = AUDIT_KEY,
        *,
        failing: FailingBackend | None = None,
    ) -> SecureStore:
        backend: StorageBackend = self.backend(cipher, audit_key)
        if failing is not None:
            failing.wrap(backend)
            backend = failing
        return SecureStore.open(backend, cipher, audit_key)


class PostgresStorage:
    """A database of its own on the tests' PostgreSQL server; each `backend` or `open` is a
    new connection pool, as another replica's would be."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo

    def backend(
        self, cipher: VoiceprintCipher = CIPHER, audit_key: AuditKey | None = AUDIT_KEY
    ) -> StorageBackend:
        return PostgresBackend.open(
            self.conninfo, connections=4, upgrade=SealingUpgrade(cipher, audit_key)
        )

    def open(
        self,
        cipher: VoiceprintCipher = CIPHER,
        audit_key: AuditKey | None = AUDIT_KEY,
        *,
        failing: FailingBackend | None = None,
    ) -> SecureStore:
        backend: StorageBackend = self.backend(cipher, audit_key)
        if failing is not None:
            failing.wrap(backend)
            backend = failing
        return SecureStore.open(backend, cipher, audit_key)


STORAGES: dict[str, Callable[[pytest.FixtureRequest, Path], Storage]] = {
    "sqlite": lambda _, tmp_path: SqliteStorage(tmp_path / "var" / "voxauth.sqlite3"),
    "postgresql": lambda request, _: PostgresStorage(
        request.getfixturevalue("postgres_server").new_database()
    ),
}
"""Each backend's Storage, made for one test (its request) in its temporary directory."""


@pytest.fixture(params=sorted(STORAGES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return STORAGES[request.param](request, tmp_path)


@pytest.fixture
def store(storage: Storage) -> Iterator[SecureStore]:
    opened = storage.open()
    yield opened
    opened.close()
