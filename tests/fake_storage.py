"""A storage backend that fails where a test says: a crash in the middle of a transaction, as
the database sees it (the transaction never commits)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from server.errors import StorageError
from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.storage.backend import StorageBackend, Transaction
from server.storage.secure_store import SecureStore
from server.storage.sqlite.backend import SqliteBackend
from server.storage.upgrade import SealingUpgrade


class CrashError(StorageError):
    """What the failing backend raises in place of the operation."""


class FailingBackend:
    """Wraps a StorageBackend (given by `wrap`); while `fail_on` names a Transaction method,
    calling it raises CrashError instead, so the transaction around it rolls back."""

    def __init__(self) -> None:
        self._wrapped: StorageBackend | None = None
        self.fail_on: str | None = None

    def wrap(self, backend: StorageBackend) -> None:
        self._wrapped = backend

    @property
    def _backend(self) -> StorageBackend:
        assert self._wrapped is not None, "FailingBackend.wrap first"
        return self._wrapped

    @contextmanager
    def transaction(self, what: str, *, write: bool) -> Iterator[Transaction]:
        with self._backend.transaction(what, write=write) as txn:
            yield cast(Transaction, _FailingTransaction(txn, self))

    def discard_erased(self) -> None:
        self._backend.discard_erased()

    def interrupted_commit(self) -> bool:
        return self._backend.interrupted_commit()

    def close(self) -> None:
        self._backend.close()


class _FailingTransaction:
    def __init__(self, txn: Transaction, backend: FailingBackend) -> None:
        self._txn = txn
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        if name == self._backend.fail_on:

            def crash(*_: object, **__: object) -> None:
                raise CrashError(f"simulated crash at {name}")

            return crash
        return getattr(self._txn, name)


def failing_sqlite_store(
    path: Path, cipher: VoiceprintCipher, audit_key: AuditKey | None = None
) -> tuple[SecureStore, FailingBackend]:
    """A store on the SQLite file at `path`, through a FailingBackend (not failing yet)."""
    failing = FailingBackend()
    failing.wrap(SqliteBackend.open(path, upgrade=SealingUpgrade(cipher, audit_key)))
    return SecureStore.open(failing, cipher, audit_key), failing
