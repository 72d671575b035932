"""SqliteVoiceprintStore: the VoiceprintStore contract, durability, atomicity and erasure."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    CapacityError,
    ConfigurationError,
    StorageError,
)
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, AuditEvent, UtteranceRecord, Voiceprint
from server.storage.sqlite.store import SqliteVoiceprintStore

MODEL = "ecapa-voxceleb-test"
NOW = datetime(2025, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
CIPHER = VoiceprintCipher(bytes(range(32)))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "voxauth.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteVoiceprintStore]:
    opened = SqliteVoiceprintStore.open(db_path, CIPHER)
    yield opened
    opened.close()


def unit_vector(label: str) -> Embedding:
    vector = np.random.default_rng(zlib.crc32(label.encode())).standard_normal(192)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def agent(agent_id: str) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        display_name=f"Display {agent_id}",
        consent_reference=f"consent/{agent_id}/2025-03",
        created_at=NOW,
    )


def utterance(agent_id: str, n: int) -> UtteranceRecord:
    return UtteranceRecord(
        utterance_id=f"{agent_id}-u{n}",
        agent_id=agent_id,
        model_id=MODEL,
        embedding=unit_vector(f"{agent_id}-u{n}"),
        duration_seconds=5.0 + n,
        net_speech_seconds=4.0 + n,
        speech_level_dbfs=-24.5,
        clipped_fraction=0.001,
        received_at=NOW + timedelta(seconds=n),
    )


def voiceprint(agent_id: str, label: str, utterance_count: int = 3) -> Voiceprint:
    return Voiceprint(
        agent_id=agent_id,
        model_id=MODEL,
        embedding=unit_vector(label),
        created_at=NOW + timedelta(minutes=5),
        utterance_count=utterance_count,
        net_speech_seconds=14.5,
    )


def file_bytes(db: Path) -> bytes:
    """Everything SQLite keeps on disk for the database that could hold row data."""
    wal = db.with_name(db.name + "-wal")
    return b"".join(part.read_bytes() for part in (db, wal) if part.exists())


def stored_blobs(db: Path) -> list[bytes]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT embedding FROM pending_utterances UNION ALL SELECT embedding FROM voiceprints"
        ).fetchall()
    return [row[0] for row in rows]


def assert_same_voiceprint(actual: Voiceprint | None, expected: Voiceprint) -> None:
    assert actual is not None
    assert actual.embedding.dtype == np.float32
    np.testing.assert_array_equal(actual.embedding, expected.embedding)
    assert (actual.agent_id, actual.model_id, actual.created_at) == (
        expected.agent_id,
        expected.model_id,
        expected.created_at,
    )
    assert (actual.utterance_count, actual.net_speech_seconds) == (
        expected.utterance_count,
        expected.net_speech_seconds,
    )


def test_create_and_get_agent(store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("a1"))
    got = store.get_agent("a1")
    assert got == agent("a1")
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() == timedelta(0)


def test_times_in_other_zones_come_back_as_the_same_instant_in_utc(
    store: SqliteVoiceprintStore,
) -> None:
    local = datetime(2025, 3, 1, 11, 30, tzinfo=timezone(timedelta(hours=2)))
    store.create_agent(AgentRecord("a1", "A", "c", local))
    got = store.get_agent("a1").created_at
    assert got == local
    assert got.tzinfo == UTC


def test_naive_times_are_refused(store: SqliteVoiceprintStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.create_agent(AgentRecord("a1", "A", "c", datetime(2025, 3, 1)))


def test_duplicate_agent(store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("a1"))
    with pytest.raises(AgentExistsError):
        store.create_agent(agent("a1"))


def test_unknown_agent(store: SqliteVoiceprintStore) -> None:
    with pytest.raises(AgentNotFoundError):
        store.get_agent("ghost")
    with pytest.raises(AgentNotFoundError):
        store.delete_agent("ghost")
    with pytest.raises(AgentNotFoundError):
        store.add_utterance(utterance("ghost", 1), max_pending=5)
    with pytest.raises(AgentNotFoundError):
        store.pending_utterances("ghost")
    with pytest.raises(AgentNotFoundError):
        store.get_voiceprint("ghost")
    with pytest.raises(AgentNotFoundError):
        store.replace_voiceprint(voiceprint("ghost", "v"), [])


def test_add_list_and_remove_utterances(store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("a1"))
    store.create_agent(agent("a2"))
    # Added out of order: listing is by time received.
    for n in (2, 1, 3):
        store.add_utterance(utterance("a1", n), max_pending=5)
    store.add_utterance(utterance("a2", 1), max_pending=5)

    pending = store.pending_utterances("a1")
    assert [u.utterance_id for u in pending] == ["a1-u1", "a1-u2", "a1-u3"]
    expected = utterance("a1", 1)
    first = pending[0]
    np.testing.assert_array_equal(first.embedding, expected.embedding)
    assert first.embedding.dtype == np.float32
    assert first == UtteranceRecord(**{**vars(expected), "embedding": first.embedding})

    # Another agent's ids are out of reach.
    store.remove_utterances("a1", ["a1-u2", "a2-u1"])
    assert [u.utterance_id for u in store.pending_utterances("a1")] == ["a1-u1", "a1-u3"]
    assert [u.utterance_id for u in store.pending_utterances("a2")] == ["a2-u1"]


def test_pending_utterances_are_capped(store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("a1"))
    for n in range(3):
        store.add_utterance(utterance("a1", n), max_pending=3)
    with pytest.raises(CapacityError):
        store.add_utterance(utterance("a1", 3), max_pending=3)
    assert len(store.pending_utterances("a1")) == 3

    store.remove_utterances("a1", ["a1-u0"])
    store.add_utterance(utterance("a1", 3), max_pending=3)
    assert len(store.pending_utterances("a1")) == 3


def test_replace_voiceprint(store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("a1"))
    assert store.get_voiceprint("a1") is None
    for n in range(4):
        store.add_utterance(utterance("a1", n), max_pending=10)

    first = voiceprint("a1", "first")
    assert store.replace_voiceprint(first, ["a1-u0", "a1-u1"]) is False
    assert_same_voiceprint(store.get_voiceprint("a1"), first)
    assert [u.utterance_id for u in store.pending_utterances("a1")] == ["a1-u2", "a1-u3"]

    second = voiceprint("a1", "second", utterance_count=2)
    assert store.replace_voiceprint(second, ["a1-u2", "a1-u3"]) is True
    assert_same_voiceprint(store.get_voiceprint("a1"), second)
    assert store.pending_utterances("a1") == []


def test_data_survives_reopening(db_path: Path) -> None:
    store = SqliteVoiceprintStore.open(db_path, CIPHER)
    store.create_agent(agent("a1"))
    store.add_utterance(utterance("a1", 1), max_pending=5)
    store.add_utterance(utterance("a1", 2), max_pending=5)
    print_ = voiceprint("a1", "v")
    store.replace_voiceprint(print_, ["a1-u1"])
    store.append_audit(AuditEvent("enrollment.finalize", "a1", "ok", NOW, {"utterances": 1}))
    store.close()

    reopened = SqliteVoiceprintStore.open(db_path, CIPHER)
    try:
        assert reopened.get_agent("a1") == agent("a1")
        assert_same_voiceprint(reopened.get_voiceprint("a1"), print_)
        [pending] = reopened.pending_utterances("a1")
        np.testing.assert_array_equal(pending.embedding, utterance("a1", 2).embedding)
        assert reopened.audit_events("a1") == [
            AuditEvent("enrollment.finalize", "a1", "ok", NOW, {"utterances": 1})
        ]
    finally:
        reopened.close()


def test_database_file_is_private(db_path: Path, store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("a1"))
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_another_key_cannot_open_the_voiceprints(db_path: Path) -> None:
    store = SqliteVoiceprintStore.open(db_path, CIPHER)
    store.create_agent(agent("a1"))
    store.replace_voiceprint(voiceprint("a1", "v"), [])
    store.close()

    # Refused when the store opens (the server's start), naming the key that sealed them.
    with pytest.raises(ConfigurationError, match=CIPHER.key_id):
        SqliteVoiceprintStore.open(db_path, VoiceprintCipher(bytes(32)))


def test_a_blob_copied_to_another_agent_does_not_decrypt(
    db_path: Path, store: SqliteVoiceprintStore
) -> None:
    for agent_id in ("victim", "attacker"):
        store.create_agent(agent(agent_id))
        store.replace_voiceprint(voiceprint(agent_id, agent_id), [])
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            "UPDATE voiceprints SET embedding = "
            "(SELECT embedding FROM voiceprints WHERE agent_id = 'victim') "
            "WHERE agent_id = 'attacker'"
        )
    with pytest.raises(StorageError, match="another record"):
        store.get_voiceprint("attacker")


def test_embeddings_are_not_stored_in_the_clear(
    db_path: Path, store: SqliteVoiceprintStore
) -> None:
    store.create_agent(agent("a1"))
    store.add_utterance(utterance("a1", 1), max_pending=5)
    store.replace_voiceprint(voiceprint("a1", "v"), [])

    on_disk = file_bytes(db_path)
    for blob in stored_blobs(db_path):
        assert blob in on_disk
    for plain in (utterance("a1", 1).embedding, voiceprint("a1", "v").embedding):
        assert plain.tobytes() not in on_disk
        assert plain.astype(np.float64).tobytes() not in on_disk


def agent_blobs(db: Path, agent_id: str) -> set[bytes]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT embedding FROM pending_utterances WHERE agent_id = ? "
            "UNION ALL SELECT embedding FROM voiceprints WHERE agent_id = ?",
            (agent_id, agent_id),
        ).fetchall()
    return {row[0] for row in rows}


def test_delete_agent_leaves_no_trace_on_disk(db_path: Path, store: SqliteVoiceprintStore) -> None:
    store.create_agent(agent("keep"))
    store.add_utterance(utterance("keep", 1), max_pending=5)
    doomed = AgentRecord("doomed", "Zelda Quixote-Erasure", "CONSENT-REF-7781-XQ", NOW)
    store.create_agent(doomed)
    for n in range(3):
        store.add_utterance(utterance("doomed", n), max_pending=5)
    # Every ciphertext the agent ever had, including consumed utterances and the replaced
    # voiceprint, whose old copies could linger in free pages or WAL frames.
    ciphertexts = agent_blobs(db_path, "doomed")
    store.replace_voiceprint(voiceprint("doomed", "v1"), ["doomed-u0"])
    ciphertexts |= agent_blobs(db_path, "doomed")
    store.replace_voiceprint(voiceprint("doomed", "v2"), ["doomed-u1"])
    ciphertexts |= agent_blobs(db_path, "doomed")
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

    with pytest.raises(AgentNotFoundError):
        store.get_agent("doomed")
    assert [u.utterance_id for u in store.pending_utterances("keep")] == ["keep-u1"]
    # The agent's audit records stay, but nothing links them to it any more.
    assert store.audit_events("doomed") == []
    assert [(e.action, e.agent_id) for e in store.audit_events()] == [("agent.create", "")]

    def assert_no_trace() -> None:
        on_disk = file_bytes(db_path)
        assert agent("keep").consent_reference.encode() in on_disk
        for needle in secrets + fragments:
            assert needle not in on_disk

    assert_no_trace()  # while the service runs
    store.close()
    assert_no_trace()  # and once the file is at rest


def test_failure_inside_replace_voiceprint_changes_nothing(
    db_path: Path, store: SqliteVoiceprintStore
) -> None:
    store.create_agent(agent("a1"))
    old = voiceprint("a1", "old")
    store.replace_voiceprint(old, [])
    for n in range(3):
        store.add_utterance(utterance("a1", n), max_pending=5)

    # The voiceprint row is written first; the failure strikes when the consumed utterances
    # are being discarded, i.e. after the new voiceprint is already in the transaction.
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute(
            "CREATE TRIGGER fail_consume BEFORE DELETE ON pending_utterances "
            "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
        )
    with pytest.raises(StorageError, match="simulated failure"):
        store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0", "a1-u1"])

    assert_same_voiceprint(store.get_voiceprint("a1"), old)
    assert [u.utterance_id for u in store.pending_utterances("a1")] == ["a1-u0", "a1-u1", "a1-u2"]

    # The store is still usable once the fault is gone.
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("DROP TRIGGER fail_consume")
    assert store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0", "a1-u1"]) is True
    assert_same_voiceprint(store.get_voiceprint("a1"), voiceprint("a1", "new"))


def test_failed_encryption_changes_nothing(
    store: SqliteVoiceprintStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_agent(agent("a1"))
    old = voiceprint("a1", "old")
    store.replace_voiceprint(old, [])
    store.add_utterance(utterance("a1", 0), max_pending=5)

    def broken(*_: object, **__: object) -> bytes:
        raise RuntimeError("cipher failed")

    monkeypatch.setattr(CIPHER, "encrypt_embedding", broken)
    with pytest.raises(RuntimeError):
        store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0"])
    monkeypatch.undo()

    assert_same_voiceprint(store.get_voiceprint("a1"), old)
    assert len(store.pending_utterances("a1")) == 1


def test_concurrent_writes_all_land(store: SqliteVoiceprintStore) -> None:
    threads = 8
    per_thread = 6
    store.create_agent(agent("shared"))
    start = threading.Barrier(threads)

    def work(t: int) -> int:
        start.wait()
        own = f"agent-{t}"
        store.create_agent(agent(own))
        capped = 0
        for n in range(per_thread):
            store.add_utterance(utterance(own, n), max_pending=per_thread)
            store.append_audit(AuditEvent("enrollment.add", own, "ok", NOW, {"n": n}))
            try:
                store.add_utterance(utterance("shared", t * per_thread + n), max_pending=10)
            except CapacityError:
                capped += 1
        store.replace_voiceprint(voiceprint(own, own), [f"{own}-u0"])
        return capped

    with ThreadPoolExecutor(threads) as pool:
        capped = sum(pool.map(work, range(threads)))

    for t in range(threads):
        own = f"agent-{t}"
        assert len(store.pending_utterances(own)) == per_thread - 1
        assert_same_voiceprint(store.get_voiceprint(own), voiceprint(own, own))
        assert [e.details["n"] for e in store.audit_events(own)] == list(range(per_thread))
    # The cap holds under contention: exactly 10 shared utterances got in.
    assert len(store.pending_utterances("shared")) == 10
    assert capped == threads * per_thread - 10


def test_audit_log(store: SqliteVoiceprintStore) -> None:
    events = [
        AuditEvent("agent.create", "a1", "ok", NOW),
        AuditEvent("verify", "a2", "REJECT", NOW, {"score": 0.31, "ids": ["x", "y"]}),
        AuditEvent("verify", "a1", "ACCEPT", NOW + timedelta(seconds=1), {"score": 0.82}),
    ]
    for event in events:
        store.append_audit(event)
    assert store.audit_events() == events
    assert store.audit_events("a1") == [events[0], events[2]]
    assert store.audit_events("nobody") == []


@pytest.mark.parametrize(
    "details",
    [
        {"embedding": np.zeros(192, np.float32)},
        {"nested": {"raw": b"\x00\x01"}},
        {"list": [bytearray(b"x")]},
        {"as_list": [0.1] * 192},
        {"not_json": object()},
        {"nan": float("nan")},
    ],
)
def test_audit_refuses_what_could_be_biometric(
    store: SqliteVoiceprintStore, details: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        store.append_audit(AuditEvent("verify", "a1", "ok", NOW, details))
    assert store.audit_events() == []


def test_newer_schema_is_refused(db_path: Path) -> None:
    SqliteVoiceprintStore.open(db_path, CIPHER).close()
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match="newer"):
        SqliteVoiceprintStore.open(db_path, CIPHER)


def test_closed_store_raises_storage_error(store: SqliteVoiceprintStore) -> None:
    store.close()
    with pytest.raises(StorageError):
        store.get_agent("a1")
