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


STORAGES: dict[str, Callable[[Path], Storage]] = {
    "sqlite": lambda tmp_path: SqliteStorage(tmp_path / "var" / "voxauth.sqlite3"),
}


@pytest.fixture(params=sorted(STORAGES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return STORAGES[request.param](tmp_path)


@pytest.fixture
def store(storage: Storage) -> Iterator[SecureStore]:
    opened = storage.open()
    yield opened
    opened.close()
