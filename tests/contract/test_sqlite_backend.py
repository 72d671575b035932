"""SQLite only: the file on disk (its mode, what its bytes hold after an erasure, a
constraint failing inside a transaction), the settings the backend insists on, and schema
versions."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from server.errors import StorageError
from server.storage.records import AgentRecord, AuditEvent
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.storage.sqlite.schema import SCHEMA_VERSION
from tests.contract.conftest import AUDIT_KEY, CIPHER
from tests.contract.samples import NOW, agent, assert_same_voiceprint, utterance, voiceprint


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "voxauth.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SecureStore]:
    opened = open_store(db_path, CIPHER, audit_key=AUDIT_KEY)
    yield opened
    opened.close()


def file_bytes(db: Path) -> bytes:
    """Everything SQLite keeps on disk for the database that could hold row data."""
    wal = db.with_name(db.name + "-wal")
    return b"".join(part.read_bytes() for part in (db, wal) if part.exists())


def stored_blobs(db: Path, agent_id: str | None = None) -> set[bytes]:
    where = "" if agent_id is None else " WHERE agent_id = ?"
    parameters = () if agent_id is None else (agent_id, agent_id)
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            f"SELECT embedding FROM pending_utterances{where} "
            f"UNION ALL SELECT embedding FROM voiceprints{where}",
            parameters,
        ).fetchall()
    return {row[0] for row in rows}


def test_the_connection_runs_with_the_settings_erasure_and_durability_need(
    store: SecureStore, db_path: Path
) -> None:
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_database_file_is_private(db_path: Path, store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_embeddings_are_not_in_the_file_in_the_clear(db_path: Path, store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.add_utterance(utterance("a1", 1), max_pending=5)
    store.replace_voiceprint(voiceprint("a1", "v"), [])

    on_disk = file_bytes(db_path)
    for blob in stored_blobs(db_path):
        assert blob in on_disk
    for plain in (utterance("a1", 1).embedding, voiceprint("a1", "v").embedding):
        assert plain.tobytes() not in on_disk
        assert plain.astype(np.float64).tobytes() not in on_disk


def test_delete_agent_leaves_no_trace_on_disk(db_path: Path, store: SecureStore) -> None:
    store.create_agent(agent("keep"))
    store.add_utterance(utterance("keep", 1), max_pending=5)
    doomed = AgentRecord("doomed", "Zelda Quixote-Erasure", "CONSENT-REF-7781-XQ", NOW)
    store.create_agent(doomed)
    for n in range(3):
        store.add_utterance(utterance("doomed", n), max_pending=5)
    # Every ciphertext the agent ever had, including consumed utterances and the replaced
    # voiceprint, whose old copies could linger in free pages or WAL frames.
    ciphertexts = stored_blobs(db_path, "doomed")
    store.replace_voiceprint(voiceprint("doomed", "v1"), ["doomed-u0"])
    ciphertexts |= stored_blobs(db_path, "doomed")
    store.replace_voiceprint(voiceprint("doomed", "v2"), ["doomed-u1"])
    ciphertexts |= stored_blobs(db_path, "doomed")
    store.append_audit(AuditEvent("agent.create", "doomed", "ok", NOW))
    assert len(ciphertexts) == 5

    secrets = [doomed.display_name.encode(), doomed.consent_reference.encode()]
    secrets += [voiceprint("doomed", label).embedding.tobytes() for label in ("v1", "v2")]
    secrets += [utterance("doomed", n).embedding.tobytes() for n in range(3)]
    # Any 16-byte run of a ciphertext would be a remnant.
    fragments = [blob[i : i + 16] for blob in ciphertexts for i in range(0, len(blob) - 16, 16)]
    before = file_bytes(db_path)
    assert doomed.display_name.encode() in before
    assert any(fragment in before for fragment in fragments)

    store.delete_agent("doomed")

    def assert_no_trace() -> None:
        on_disk = file_bytes(db_path)
        assert agent("keep").consent_reference.encode() in on_disk
        for needle in secrets + fragments:
            assert needle not in on_disk

    assert_no_trace()  # while the service runs
    store.close()
    assert_no_trace()  # and once the file is at rest


def test_a_constraint_failing_inside_a_write_changes_nothing(
    db_path: Path, store: SecureStore
) -> None:
    store.create_agent(agent("a1"))
    old = voiceprint("a1", "old")
    store.replace_voiceprint(old, [])
    for n in range(3):
        store.add_utterance(utterance("a1", n), max_pending=5)
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute(
            "CREATE TRIGGER fail_consume BEFORE DELETE ON pending_utterances "
            "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
        )

    with pytest.raises(StorageError, match="simulated failure"):
        store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0", "a1-u1"])

    assert_same_voiceprint(store.get_voiceprint("a1"), old)
    assert len(store.pending_utterances("a1")) == 3


def test_newer_schema_is_refused(db_path: Path) -> None:
    open_store(db_path, CIPHER).close()
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match="newer"):
        open_store(db_path, CIPHER)
