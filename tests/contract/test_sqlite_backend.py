"""SQLite only: the files on disk (their mode, what their bytes hold after an erasure, also
while another connection reads), the key file beside the database and what a crash between
their commits leaves, a constraint failing inside a transaction, the settings the backend
insists on, schema versions, and the upgrade of a database from before data keys."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.audit_actions import AuditAction
from server.errors import AgentNotFoundError, StorageError
from server.records import (
    AgentRecord,
    AssuranceRecord,
    AssuranceRevocation,
    AuditEvent,
    RevocationReason,
    ShiftRecord,
    ShiftState,
    ThrottleState,
)
from server.security.assurances import (
    AssuranceIssuer,
    AssurancePolicy,
    MemorySigningKeyStore,
    SigningKeyCipher,
    SigningKeyring,
)
from server.security.crypto import RecordKind, associated_data, sealing_key_id
from server.storage.sealing import KeyRing
from server.storage.secure_store import SecureStore
from server.storage.sqlite import key_file_path, open_store
from server.storage.sqlite.backend import SqliteBackend
from server.storage.sqlite.schema import MIGRATIONS, PER_AGENT_KEYS_MIGRATION, SCHEMA_VERSION
from server.storage.upgrade import SealingUpgrade
from tests.contract.conftest import AUDIT_KEY, CIPHER, KEY
from tests.contract.samples import (
    MODEL,
    NOW,
    agent,
    assert_same_voiceprint,
    utterance,
    voiceprint,
)


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


def stored_blobs(db: Path, agent_ref: str | None = None) -> set[bytes]:
    where = "" if agent_ref is None else " WHERE agent_ref = ?"
    parameters = () if agent_ref is None else (agent_ref, agent_ref)
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            f"SELECT embedding FROM pending_utterances{where} "
            f"UNION ALL SELECT embedding FROM voiceprints{where}",
            parameters,
        ).fetchall()
    return {row[0] for row in rows}


def agent_ref_of_utterance(db: Path, utterance_id: str) -> str:
    with closing(sqlite3.connect(db)) as conn:
        (agent_ref,) = conn.execute(
            "SELECT agent_ref FROM pending_utterances WHERE utterance_id = ?", (utterance_id,)
        ).fetchone()
    return str(agent_ref)


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
    ref = agent_ref_of_utterance(db_path, "doomed-u0")
    # Every ciphertext the agent ever had, including consumed utterances and the replaced
    # voiceprint, whose old copies could linger in free pages or WAL frames.
    ciphertexts = stored_blobs(db_path, ref)
    store.replace_voiceprint(voiceprint("doomed", "v1"), ["doomed-u0"])
    ciphertexts |= stored_blobs(db_path, ref)
    store.replace_voiceprint(voiceprint("doomed", "v2"), ["doomed-u1"])
    ciphertexts |= stored_blobs(db_path, ref)
    store.append_audit(AuditEvent("agent.create", "doomed", "ok", NOW))
    assert len(ciphertexts) == 5

    secrets = [doomed.display_name.encode(), doomed.consent_reference.encode()]
    secrets += [voiceprint("doomed", label).embedding.tobytes() for label in ("v1", "v2")]
    secrets += [utterance("doomed", n).embedding.tobytes() for n in range(3)]
    # Sealed from the start: the name and consent reference are never on disk in clear.
    before = file_bytes(db_path)
    assert not any(secret in before for secret in secrets)
    # Any 16-byte run of a ciphertext would be a remnant.
    fragments = [blob[i : i + 16] for blob in ciphertexts for i in range(0, len(blob) - 16, 16)]
    assert any(fragment in before for fragment in fragments)

    store.delete_agent("doomed")

    def assert_no_trace() -> None:
        on_disk = file_bytes(db_path)
        # The other agent's ciphertext is still there.
        assert all(blob in on_disk for blob in stored_blobs(db_path))
        for needle in secrets + fragments:
            assert needle not in on_disk

    assert_no_trace()  # while the service runs
    store.close()
    # Closing checkpoints the WAL into the file and removes it.
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


def database_files(db: Path) -> dict[str, bytes]:
    """Every file of the database and its key file: what a copy or a backup would take."""
    return {path.name: path.read_bytes() for path in sorted(db.parent.iterdir())}


def test_erasure_while_another_connection_reads_leaves_nothing_that_opens(
    db_path: Path, store: SecureStore
) -> None:
    """Issue 10, item 1: a connection holding a read transaction keeps the WAL from being
    emptied, so its old frames outlive the erasure; they must hold nothing readable."""
    erin = AgentRecord("erin-7781-zq", "Erin Quillfeather-Zorn", "HR-CONSENT-7781-ZQ", NOW)
    store.create_agent(agent("keep"))
    with closing(sqlite3.connect(db_path)) as conn:
        (kept,) = conn.execute("SELECT sealed_identity FROM agents").fetchone()
    with store.unit_of_work() as unit:
        unit.create_agent(erin)
        unit.append_audit(AuditEvent("agent.create", erin.agent_id, "ok", NOW))
    for n in range(3):
        # Ids of their own (as the service makes them), not derived from the agent's.
        pending = replace(utterance(erin.agent_id, n, telephone=True), utterance_id=f"u{n}")
        store.add_utterance(pending, max_pending=5)
    store.replace_voiceprint(voiceprint(erin.agent_id, "v1"), ["u0"])
    store.replace_voiceprint(voiceprint(erin.agent_id, "v2"), ["u1"])
    store.create_shift(
        ShiftRecord("shift-1", erin.agent_id, "desk-12", ShiftState.VERIFIED, NOW, NOW)
    )
    keyring = SigningKeyring.load(
        MemorySigningKeyStore(), SigningKeyCipher(KEY), AssurancePolicy(), NOW
    )
    signed = AssuranceIssuer(keyring).issue(
        agent_id=erin.agent_id, shift_id="shift-1", device_id="desk-12", audience="mfa", now=NOW
    )
    store.save_assurance(
        AssuranceRecord("shift-1", erin.agent_id, signed.jti, signed.token, NOW, signed.expires_at)
    )
    store.update_throttle_state(erin.agent_id, lambda _: ThrottleState(2, NOW))
    store.append_audit(AuditEvent("verify", erin.agent_id, "ACCEPT", NOW, {"score": 0.71}))
    with closing(sqlite3.connect(db_path)) as conn:
        ciphertexts = [
            blob
            for (blob,) in conn.execute(
                "SELECT embedding FROM voiceprints UNION ALL SELECT telephone_embedding FROM "
                "voiceprints UNION ALL SELECT embedding FROM pending_utterances UNION ALL "
                "SELECT sealed_identity FROM agents UNION ALL SELECT sealed_token FROM assurances"
            )
            if blob != kept
        ]
    with closing(sqlite3.connect(key_file_path(db_path))) as conn:
        wrapped_before = {blob for (blob,) in conn.execute("SELECT wrapped_key FROM agent_keys")}
    secrets = [erin.display_name, erin.consent_reference, signed.token]
    secrets += signed.token.split(".")[:2]  # header and claims, whose `sub` is the agent id

    reader = sqlite3.connect(db_path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM agents").fetchone()
        # DeleteAgent's unit: the erasure and its record.
        with store.unit_of_work() as unit:
            unit.delete_agent(erin.agent_id)
            unit.append_audit(AuditEvent(AuditAction.AGENT_DELETE, erin.agent_id, "ok", NOW))
        files = database_files(db_path)
    finally:
        reader.close()

    everything = b"".join(files.values())
    # The attack's setting: the WAL was not emptied, and still holds the agent's ciphertext.
    assert any(blob in files["voxauth.sqlite3-wal"] for blob in ciphertexts)
    for secret in secrets:
        assert secret.encode() not in everything
    # The agent id is left only in the record of the erasure (action and id stored side by
    # side), however many old frames hold that page.
    agent_id = erin.agent_id.encode()
    assert (
        everything.count(agent_id)
        == everything.count(AuditAction.AGENT_DELETE.encode() + agent_id)
        > 0
    )
    # Its data key is gone from every file, and no key left opens what it sealed.
    with closing(sqlite3.connect(key_file_path(db_path))) as conn:
        wrapped_after = {blob for (blob,) in conn.execute("SELECT wrapped_key FROM agent_keys")}
    [destroyed] = wrapped_before - wrapped_after
    assert destroyed not in everything
    backend = SqliteBackend.open(db_path, upgrade=SealingUpgrade(CIPHER, AUDIT_KEY))
    with backend.transaction("unwrap the keys left", write=False) as txn:
        keys = KeyRing.load(txn, CIPHER, may_create=False)
        remaining = {
            keys.agent_key(row.agent_handle, row.wrapped_key).key_id
            for row in txn.agent_key_page("", 10)
        }
    backend.close()
    leftovers = [blob for blob in ciphertexts if blob in everything]
    assert leftovers
    assert not {sealing_key_id(blob) for blob in leftovers} & (remaining | CIPHER.known_key_ids)


def delete_key_behind_the_store(db: Path) -> None:
    with closing(sqlite3.connect(key_file_path(db))) as conn, conn:
        conn.execute("DELETE FROM agent_keys WHERE rowid = (SELECT max(rowid) FROM agent_keys)")


def test_a_data_key_left_by_an_interrupted_erasure_is_destroyed_at_the_next_start(
    db_path: Path,
) -> None:
    store = open_store(db_path, CIPHER, audit_key=AUDIT_KEY)
    store.create_agent(agent("keep"))
    store.close()
    # As a crash between the commit of the rows and that of the key file leaves it.
    with closing(sqlite3.connect(key_file_path(db_path))) as conn, conn:
        conn.execute(
            "INSERT INTO agent_keys VALUES ('erased-agent-handle', ?)",
            (CIPHER.seal(bytes(32), associated=b""),),
        )

    open_store(db_path, CIPHER, audit_key=AUDIT_KEY).close()

    with closing(sqlite3.connect(key_file_path(db_path))) as conn:
        assert conn.execute("SELECT count(*) FROM agent_keys").fetchone() == (1,)


def test_an_agent_without_its_key_stops_the_start_unless_a_crash_explains_it(
    db_path: Path,
) -> None:
    store = open_store(db_path, CIPHER, audit_key=AUDIT_KEY)
    store.create_agent(agent("keep"))
    store.create_agent(agent("new"))
    store.close()
    delete_key_behind_the_store(db_path)

    # A key file that lacks an agent's key is not this database's own.
    with pytest.raises(StorageError, match="1 of the database's 2 agents have no data key"):
        open_store(db_path, CIPHER, audit_key=AUDIT_KEY)

    # A journal left in the key file: a crash cut its commit short, after the database's.
    journal = key_file_path(db_path).with_name(key_file_path(db_path).name + "-journal")
    journal.write_bytes(b"")
    recovered = open_store(db_path, CIPHER, audit_key=AUDIT_KEY)
    try:
        assert len([a for a in ("keep", "new") if _exists(recovered, a)]) == 1
        [event] = [e for e in recovered.audit_events() if e.action == "storage.recover"]
        assert event.details == {"interrupted_agent_creations": 1}
    finally:
        recovered.close()


def _exists(store: SecureStore, agent_id: str) -> bool:
    try:
        store.get_agent(agent_id)
    except AgentNotFoundError:
        return False
    return True


def test_a_database_with_agents_does_not_open_without_its_key_file(db_path: Path) -> None:
    store = open_store(db_path, CIPHER, audit_key=AUDIT_KEY)
    store.create_agent(agent("keep"))
    store.close()
    key_file_path(db_path).unlink()

    with pytest.raises(StorageError, match=r"key file .* is missing"):
        open_store(db_path, CIPHER, audit_key=AUDIT_KEY)


def test_a_database_from_before_data_keys_is_sealed_anew_when_it_opens(db_path: Path) -> None:
    keyed = MIGRATIONS.index(PER_AGENT_KEYS_MIGRATION)
    old = voiceprint("ann", "v")
    pending = utterance("ann", 1, telephone=True)
    pseudonym = "5f" * 16
    at = 1_767_225_600_000_000  # 2026-01-01, as the old schema stores times
    ended_at = at + 3_600_000_000

    def legacy_seal(embedding: Embedding | None, kind: RecordKind) -> bytes:
        assert embedding is not None
        return CIPHER.encrypt_embedding(
            embedding, associated=associated_data(agent_id="ann", record_kind=kind, model_id=MODEL)
        )

    db_path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db_path)) as conn, conn:
        for statements in MIGRATIONS[:keyed]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {keyed}")
        conn.execute("INSERT INTO audit_head VALUES (1, 0, ?, NULL, NULL)", ("0" * 64,))
        conn.execute(
            "INSERT INTO agents VALUES ('ann', 'Ann Oldtimer', 'HR-OLD-1', ?, ?)", (at, pseudonym)
        )
        conn.execute(
            "INSERT INTO pending_utterances VALUES ('ann-u1', 'ann', ?, ?, 6.0, 5.0, -24.5, "
            "0.001, ?, ?)",
            (
                MODEL,
                legacy_seal(pending.embedding, "pending_utterance"),
                at,
                legacy_seal(pending.telephone_embedding, "telephone_pending_utterance"),
            ),
        )
        conn.execute(
            "INSERT INTO voiceprints VALUES ('ann', ?, ?, ?, 3, 14.5, ?, ?)",
            (
                MODEL,
                legacy_seal(old.embedding, "voiceprint"),
                at,
                legacy_seal(old.telephone_embedding, "telephone_voiceprint"),
                at,
            ),
        )
        conn.execute(
            "INSERT INTO shifts VALUES "
            "('shift-1', 'ann', 'desk', 'LOCKED', ?, ?, NULL, 3, 4, 5, 6)",
            (at, at),
        )
        conn.execute(
            "INSERT INTO shifts VALUES "
            "('shift-2', 'ann', 'desk', 'ENDED', ?, ?, ?, 0, 1, 0, 0), "
            "('shift-3', 'ann', 'desk', 'VERIFIED', ?, ?, NULL, 0, 2, 0, 0)",
            (at, at, ended_at, at, at),
        )
        conn.executemany(
            "INSERT INTO assurances VALUES (?, 'ann', ?, 'header.OLD-TOKEN.sig', ?, ?)",
            [(f"shift-{n}", f"jti-{n}", at, at) for n in (1, 2, 3)],
        )
        conn.execute("INSERT INTO verification_throttle VALUES ('ann', 7, ?, ?)", (at, at))

    store = open_store(db_path, CIPHER, audit_key=AUDIT_KEY)
    try:
        assert store.get_agent("ann").display_name == "Ann Oldtimer"
        stored = store.get_voiceprint("ann")
        assert stored is not None and stored.telephone_embedding is not None
        np.testing.assert_array_equal(stored.embedding, old.embedding)
        np.testing.assert_array_equal(stored.telephone_embedding, old.telephone_embedding)
        [kept] = store.pending_utterances("ann")
        np.testing.assert_array_equal(kept.embedding, pending.embedding)
        shift = store.get_shift("shift-1")
        assert (shift.agent_id, shift.state, shift.checkpoints_insufficient) == (
            "ann",
            ShiftState.LOCKED,
            6,
        )
        assurance = store.get_assurance("shift-1")
        assert assurance is not None and assurance.token == "header.OLD-TOKEN.sig"
        assert store.update_throttle_state("ann", lambda state: state).consecutive_failures == 7
        # Shifts that had locked or ended before revocation existed have their assurance
        # revoked, as of the lock or the end; a verified shift's still stands.
        assert store.get_revocation("jti-1") == AssuranceRevocation(
            "jti-1", "shift-1", RevocationReason.SHIFT_LOCKED, datetime(2026, 1, 1, tzinfo=UTC)
        )
        assert store.get_revocation("jti-2") == AssuranceRevocation(
            "jti-2", "shift-2", RevocationReason.SHIFT_ENDED, datetime(2026, 1, 1, 1, tzinfo=UTC)
        )
        assert store.get_revocation("jti-3") is None
        # The agent keeps its pseudonym, so the records the chain already holds stay its own.
        store.append_audit(AuditEvent("verify", "ann", "ACCEPT", NOW))
        [record] = store.audit_records(0, 10)
        assert (record.entry.agent_ref, record.agent) == (pseudonym, "ann")
    finally:
        store.close()
    on_disk = file_bytes(db_path)
    for clear in (b"Ann Oldtimer", b"HR-OLD-1", b"OLD-TOKEN", b"'ann'"):
        assert clear not in on_disk
