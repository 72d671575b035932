"""The tamper-evident audit log: the hash chain and its seals, what tampering with the SQLite
file looks like to `voxauth audit verify`, the exports, and erasure leaving nothing behind but
the record that it happened."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import stat
import uuid
import zlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.audit_actions import AuditAction
from server.errors import StorageError
from server.security.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditKey,
    AuditRecord,
    BreakKind,
    ChainReport,
    canonical_details,
    cef_lines,
    chain_hash,
    jsonl_lines,
    read_chain,
    verify_log,
)
from server.security.crypto import VoiceprintCipher
from server.storage.interface import (
    AgentRecord,
    AuditEvent,
    ShiftRecord,
    ShiftState,
    UtteranceRecord,
    Voiceprint,
)
from server.storage.secure_store import SecureStore
from server.storage.sqlite import key_file_path, open_store
from server.storage.sqlite.schema import AUDIT_CHAIN_MIGRATION, MIGRATIONS
from server.tools.cli import main

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AUDIT_KEY = AuditKey(KEY)
NOW = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
MODEL = "ecapa-test"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "voxauth.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SecureStore]:
    opened = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    yield opened
    opened.close()


def five_records(store: SecureStore) -> list[AuditEvent]:
    """Records 1-5: an agent's, a refused call's (no agent) and an unknown id's."""
    store.create_agent(AgentRecord("a1", "Ann", "HR-1", NOW))
    events = [
        AuditEvent("agent.create", "a1", "ok", NOW),
        AuditEvent("verify", "a1", "REJECT", NOW + timedelta(seconds=1), {"score": 0.31}),
        AuditEvent("access.denied", "", "PERMISSION_DENIED", NOW + timedelta(seconds=2)),
        AuditEvent("verify", "a1", "ACCEPT", NOW + timedelta(seconds=3), {"score": 0.82}),
        AuditEvent("shift.start", "nobody", "UNVERIFIED", NOW + timedelta(seconds=4)),
    ]
    for event in events:
        store.append_audit(event)
    return events


def verified(store: SecureStore, *keys: AuditKey) -> ChainReport:
    return verify_log(store, keys or (AUDIT_KEY,))


def tamper(db_path: Path, *statements: str, parameters: tuple[object, ...] = ()) -> None:
    """Writes to the database file behind the store's back, as someone without the key could."""
    with closing(sqlite3.connect(db_path)) as conn, conn:
        for statement in statements:
            conn.execute(statement, parameters)


def test_appended_records_form_a_sealed_chain(db_path: Path, store: SecureStore) -> None:
    events = five_records(store)

    assert verified(store) == ChainReport(5, None)
    records = list(read_chain(store, page_size=2))
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert [r.prev_hash for r in records] == [GENESIS_HASH] + [r.hash for r in records[:-1]]
    assert store.audit_events() == events
    assert store.audit_events("a1") == [events[0], events[1], events[3]]
    # The agent is stored under its pseudonym only; ids that are no agent stay as they are.
    with closing(sqlite3.connect(db_path)) as conn:
        stored = conn.execute("SELECT agent_id, agent_ref FROM audit_log ORDER BY seq").fetchall()
    pseudonym = stored[0][1]
    assert len(pseudonym) == 32
    assert stored == [("", pseudonym), ("", pseudonym), ("", ""), ("", pseudonym), ("nobody", "")]
    assert [r.agent for r in records] == ["a1", "a1", "", "a1", "nobody"]


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE audit_log SET outcome = 'PERMISSION_GRANTED' WHERE seq = 3",
        """UPDATE audit_log SET details = '{"method":"/elsewhere"}' WHERE seq = 3""",
        "UPDATE audit_log SET details = 'not json' WHERE seq = 3",
        "UPDATE audit_log SET at = at + 1 WHERE seq = 3",
        "UPDATE audit_log SET at = 'yesterday' WHERE seq = 3",
        "UPDATE audit_log SET agent_id = 'a1' WHERE seq = 3",
    ],
)
def test_an_edited_record_is_found(db_path: Path, store: SecureStore, edit: str) -> None:
    five_records(store)
    tamper(db_path, edit)

    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (3, BreakKind.EDITED)
    assert report.records == 2


@pytest.mark.parametrize("removed", [1, 3])
def test_a_removed_record_is_found(db_path: Path, store: SecureStore, removed: int) -> None:
    five_records(store)
    tamper(db_path, f"DELETE FROM audit_log WHERE seq = {removed}")

    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (removed, BreakKind.REMOVED)


@pytest.mark.parametrize(
    "moves",
    [
        # Records 2 and 4 swap places.
        (
            "UPDATE audit_log SET seq = -2 WHERE seq = 2",
            "UPDATE audit_log SET seq = 2 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = -2",
        ),
        # Record 2 moves to the end.
        ("UPDATE audit_log SET seq = 6 WHERE seq = 2",),
    ],
)
def test_reordered_records_are_found(
    db_path: Path, store: SecureStore, moves: tuple[str, ...]
) -> None:
    five_records(store)
    tamper(db_path, *moves)

    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (2, BreakKind.REORDERED)


def test_records_cut_off_the_end_are_found_by_the_sealed_head(
    db_path: Path, store: SecureStore
) -> None:
    five_records(store)
    tamper(db_path, "DELETE FROM audit_log WHERE seq >= 4")

    # What is left is a perfect chain: only the sealed head's count shows the cut.
    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (4, BreakKind.REMOVED)
    assert "cut off the end" in report.first_break.reason

    # New records continue from the head, so they cannot paper over the cut.
    store.append_audit(AuditEvent("verify", "a1", "ACCEPT", NOW))
    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (4, BreakKind.REMOVED)

    # Moving the head back to the cut needs the key.
    [third] = store.audit_records(2, 1)
    tamper(db_path, "DELETE FROM audit_log WHERE seq > 3")
    tamper(db_path, "UPDATE audit_head SET seq = 3, hash = ?", parameters=(third.hash,))
    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (3, BreakKind.FORGED)


def test_a_chain_rewritten_without_the_key_fails_its_seals(
    db_path: Path, store: SecureStore
) -> None:
    five_records(store)
    # The attacker knows the algorithm, rewrites record 2 and every hash after it, and seals
    # everything with a key of their own under the real key's id.
    forger = AuditKey(OTHER_KEY)
    prev_hash = store.audit_records(0, 1)[0].hash
    for record in store.audit_records(1, 10):
        entry = replace(record.entry, outcome="ACCEPT") if record.seq == 2 else record.entry
        record_hash = chain_hash(prev_hash, entry)
        tamper(
            db_path,
            "UPDATE audit_log SET outcome = ?, prev_hash = ?, hash = ?, mac = ? WHERE seq = ?",
            parameters=(
                entry.outcome,
                prev_hash,
                record_hash,
                forger.record_mac(record_hash),
                record.seq,
            ),
        )
        prev_hash = record_hash
    tamper(
        db_path,
        "UPDATE audit_head SET hash = ?, mac = ?",
        parameters=(prev_hash, forger.head_mac(5, prev_hash)),
    )

    report = verified(store)
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (2, BreakKind.FORGED)


def test_records_sealed_before_a_key_rotation_need_the_previous_key_until_resealed(
    db_path: Path,
) -> None:
    before = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    for n in range(3):
        before.append_audit(AuditEvent("config.change", "", "ok", NOW, {"n": n}))
    before.close()
    new_key = AuditKey(OTHER_KEY)
    after = open_store(db_path, VoiceprintCipher(OTHER_KEY, [KEY]), audit_key=new_key)
    try:
        after.append_audit(AuditEvent("config.change", "", "ok", NOW))
        assert verified(after, new_key, AUDIT_KEY) == ChainReport(4, None)
        report = verified(after, new_key)
        assert report.first_break is not None
        assert (report.first_break.seq, report.first_break.kind) == (1, BreakKind.UNVERIFIABLE)
        assert AUDIT_KEY.key_id in report.first_break.reason

        # A record forged under the old key is not laundered by re-sealing.
        [second] = after.audit_records(1, 1)
        tamper(db_path, "UPDATE audit_log SET mac = ? WHERE seq = 2", parameters=("0" * 64,))
        with pytest.raises(StorageError, match="record 2"):
            after.reseal_audit([AUDIT_KEY], batch_size=2)
        tamper(db_path, "UPDATE audit_log SET mac = ? WHERE seq = 2", parameters=(second.mac,))

        assert after.reseal_audit([AUDIT_KEY], batch_size=2) == 3
        assert verified(after, new_key) == ChainReport(4, None)
    finally:
        after.close()


def test_records_written_without_the_audit_key_are_unverifiable(db_path: Path) -> None:
    store = open_store(db_path, VoiceprintCipher(KEY))
    try:
        store.append_audit(AuditEvent("config.change", "", "ok", NOW))
        report = verified(store)
    finally:
        store.close()
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.kind) == (1, BreakKind.UNVERIFIABLE)


def test_the_migration_chains_the_records_of_an_older_database(db_path: Path) -> None:
    chain_version = MIGRATIONS.index(AUDIT_CHAIN_MIGRATION)
    with closing(sqlite3.connect(db_path)) as conn, conn:
        for statements in MIGRATIONS[:chain_version]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {chain_version}")
        conn.execute("INSERT INTO agents VALUES ('kept', 'Kim', 'HR-2', 0)")
        conn.executemany(
            "INSERT INTO audit (at, action, agent_id, outcome, details) VALUES (?, ?, ?, ?, ?)",
            [
                (1, "agent.create", "gone-4711", "ok", "{}"),
                (2, "verify", "gone-4711", "ACCEPT", '{"score": 0.8}'),
                (3, AuditAction.AGENT_DELETE, "gone-4711", "ok", "{}"),
                (4, "agent.create", "kept", "ok", "{}"),
                (5, "access.denied", "", "PERMISSION_DENIED", '{"method": "/x"}'),
            ],
        )

    store = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    try:
        assert verified(store) == ChainReport(5, None)
        assert [(e.action, e.agent_id) for e in store.audit_events()] == [
            ("agent.create", ""),
            ("verify", ""),
            (AuditAction.AGENT_DELETE, "gone-4711"),
            ("agent.create", "kept"),
            ("access.denied", ""),
        ]
        assert store.audit_events()[1].details == {"score": 0.8}
    finally:
        store.close()
    # The agent erased before the chain existed survives only in the record of its erasure;
    # the old tables left nothing behind.
    assert db_path.read_bytes().count(b"gone-4711") == 1


def test_jsonl_export_carries_what_rechecks_the_chain(store: SecureStore) -> None:
    events = five_records(store)

    exported = [json.loads(line) for line in jsonl_lines(read_chain(store))]

    assert [line["seq"] for line in exported] == [1, 2, 3, 4, 5]
    prev_hash = GENESIS_HASH
    for line, event in zip(exported, events, strict=True):
        entry = AuditEntry(
            line["at"],
            line["action"],
            line["agent_id"],
            line["agent_ref"],
            line["outcome"],
            canonical_details(line["details"]),
        )
        assert line["prev_hash"] == prev_hash
        assert chain_hash(prev_hash, entry) == line["hash"]
        prev_hash = line["hash"]
        assert (line["action"], line["agent"], line["outcome"]) == (
            event.action,
            event.agent_id,
            event.outcome,
        )
        assert line["details"] == event.details
        assert datetime.fromisoformat(line["time"]) == event.at


def test_cef_lines_escape_header_and_extension_and_rank_severity() -> None:
    def record(action: str, outcome: str, details: str, agent: str = "") -> AuditRecord:
        entry = AuditEntry(1_740_821_415_123_456, action, "", agent and "ref1", outcome, details)
        return AuditRecord(7, entry, "aa", "bb", None, None, agent)

    denied, odd = cef_lines(
        [
            record("access.denied", "PERMISSION_DENIED", '{"reason":"a=b"}'),
            record("odd|act\\ion\nx", "two\nlines\r=x\\y", "{}", agent="erin"),
        ],
        "1|2",
    )

    assert denied == (
        r"CEF:0|voxauth|voxauth|1\|2|access.denied|access.denied|8|rt=1740821415123 "
        r"externalId=7 act=access.denied outcome=PERMISSION_DENIED cs2Label=hash cs2=bb "
        r'cs3Label=prevHash cs3=aa msg={"reason":"a\=b"}'
    )
    assert odd == (
        r"CEF:0|voxauth|voxauth|1\|2|odd\|act\\ion x|odd\|act\\ion x|5|rt=1740821415123 "
        r"externalId=7 act=odd|act\\ion\nx outcome=two\nlines\r\=x\\y duser=erin "
        r"cs1Label=agentRef cs1=ref1 cs2Label=hash cs2=bb cs3Label=prevHash cs3=aa msg={}"
    )
    severities = [
        line.split("|")[6]
        for line in cef_lines(
            [record("a", outcome, "{}") for outcome in ("LOCKED", "REJECT", "INCONCLUSIVE", "ok")],
            "1",
        )
    ]
    assert severities == ["8", "6", "3", "1"]


@pytest.fixture
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VOXAUTH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())


@pytest.mark.usefixtures("key_in_env")
def test_audit_verify_command(
    db_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    five_records(store)
    store.close()

    assert main(["audit", "verify", "--db", str(db_path)]) == 0
    assert capsys.readouterr().out == "5 records, chain intact\n"

    tamper(db_path, "UPDATE audit_log SET outcome = 'ACCEPT' WHERE seq = 2")
    assert main(["audit", "verify", "--db", str(db_path)]) == 1
    assert "broken at record 2 (edited)" in capsys.readouterr().out

    assert main(["audit", "verify", "--db", str(db_path.with_name("missing.db"))]) == 2
    assert not db_path.with_name("missing.db").exists()
    monkeypatch.delenv("VOXAUTH_KEY")
    assert main(["audit", "verify", "--db", str(db_path)]) == 2
    assert "no voiceprint encryption key" in capsys.readouterr().err


def swap(db: Path, table: str, key: str, column: str) -> None:
    """Swaps `column` between the table's two rows, with sqlite3 behind the store's back."""
    with closing(sqlite3.connect(db)) as conn, conn:
        (first_key, first), (second_key, second) = conn.execute(
            f"SELECT {key}, {column} FROM {table}"
        ).fetchall()
        conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (second, first_key))
        conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (first, second_key))


def two_agents_in_a_copy(db_path: Path, tmp_path: Path) -> Path:
    """Ann and Bob with a record each, in a copy of the closed database and its key file."""
    store = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    for agent_id in ("ann", "bob"):
        store.create_agent(AgentRecord(agent_id, agent_id.title(), "HR-1", NOW))
        store.append_audit(AuditEvent("verify", agent_id, "REJECT", NOW, {"score": 0.2}))
    store.close()
    copy = tmp_path / "copy" / "voxauth.db"
    copy.parent.mkdir()
    shutil.copyfile(db_path, copy)
    shutil.copyfile(key_file_path(db_path), key_file_path(copy))
    return copy


@pytest.mark.usefixtures("key_in_env")
def test_audit_verify_finds_two_agents_pseudonyms_swapped_in_a_copy(
    db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10, item 2: who the records are about, rewritten in a copy of the database."""
    copy = two_agents_in_a_copy(db_path, tmp_path)
    assert main(["audit", "verify", "--db", str(copy)]) == 0
    assert capsys.readouterr().out == "2 records, chain intact\n"

    # Each pseudonym is sealed with its agent's identity: swapping them swaps those.
    swap(copy, "agents", "agent_handle", "sealed_identity")

    assert main(["audit", "verify", "--db", str(copy)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("audit attribution broken (reattributed): the identity of agent row")
    assert out.count("belongs to another agent") == 2
    assert out.endswith("the 2 records are intact, but not who they are about\n")


@pytest.mark.usefixtures("key_in_env")
def test_audit_verify_finds_a_pseudonym_replaced_in_a_copy(
    db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = two_agents_in_a_copy(db_path, tmp_path)
    # Bob's row given a copy of Ann's identity, to claim her records.
    tamper(copy, "UPDATE agents SET sealed_identity = (SELECT max(sealed_identity) FROM agents)")

    assert main(["audit", "verify", "--db", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "(reattributed)" in out and out.count("the identity of agent row") == 1


@pytest.mark.usefixtures("key_in_env")
def test_audit_verify_finds_identities_moved_with_their_keys_in_a_copy(
    db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = two_agents_in_a_copy(db_path, tmp_path)
    swap(copy, "agents", "agent_handle", "sealed_identity")
    swap(key_file_path(copy), "agent_keys", "agent_handle", "wrapped_key")

    assert main(["audit", "verify", "--db", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "(reattributed)" in out and out.count("wrapped data key failed authentication") == 2


@pytest.mark.usefixtures("key_in_env")
def test_audit_export_command(db_path: Path, tmp_path: Path) -> None:
    store = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    five_records(store)
    store.close()
    out = tmp_path / "export" / "audit.cef"
    out.parent.mkdir()

    since = (NOW + timedelta(seconds=3)).replace(tzinfo=None).isoformat()
    argv = ["audit", "export", "--db", str(db_path), "--format", "cef", "--since", since]
    assert main([*argv, "--out", str(out)]) == 0

    lines = out.read_text().splitlines()
    assert [line.split("|")[4] for line in lines] == ["verify", "shift.start"]
    assert all(line.startswith("CEF:0|voxauth|voxauth|") for line in lines)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


# --- erasure ---------------------------------------------------------------------------------


def embedding(label: str) -> Embedding:
    vector = np.random.default_rng(zlib.crc32(label.encode())).standard_normal(192)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def on_disk(db: Path) -> bytes:
    """Everything SQLite keeps on disk for the database that could hold row data."""
    wal = db.with_name(db.name + "-wal")
    return b"".join(part.read_bytes() for part in (db, wal) if part.exists())


def test_erasure_leaves_nothing_behind_but_the_record_that_it_happened(db_path: Path) -> None:
    store = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    agent_id = "erin-7781-zq"
    doomed = AgentRecord(agent_id, "Erin Quillfeather-Zorn", "HR-CONSENT-7781-ZQ", NOW)
    store.create_agent(AgentRecord("kept", "Kim", "HR-1", NOW))
    store.create_agent(doomed)

    def audit(action: str, outcome: str, **details: object) -> None:
        store.append_audit(AuditEvent(action, agent_id, outcome, NOW, dict(details)))

    # Enrollment, re-enrollment, a shift and a verification, as the services record them.
    audit("agent.create", "ok")
    utterance_ids = [uuid.uuid4().hex for _ in range(3)]
    for n, utterance_id in enumerate(utterance_ids):
        store.add_utterance(
            UtteranceRecord(
                utterance_id,
                agent_id,
                MODEL,
                embedding(f"u{n}"),
                6.0,
                5.0,
                -24.0,
                0.0,
                NOW,
                telephone_embedding=embedding(f"t{n}"),
            ),
            max_pending=5,
        )
        audit("enrollment.add", "ok", utterance_id=utterance_id, net_speech_seconds=5.0)
    for label, consumed in (("v1", utterance_ids[:2]), ("v2", utterance_ids[2:])):
        store.replace_voiceprint(
            Voiceprint(
                agent_id,
                MODEL,
                embedding(label),
                NOW,
                len(consumed),
                5.0 * len(consumed),
                telephone_embedding=embedding(f"{label}-phone"),
            ),
            consumed,
        )
        audit("enrollment.finalize", "ok", utterance_count=len(consumed), model_id=MODEL)
    shift_id = uuid.uuid4().hex
    store.create_shift(ShiftRecord(shift_id, agent_id, "desk-12", ShiftState.VERIFIED, NOW, NOW))
    audit("shift.start", "VERIFIED", shift_id=shift_id, device_id="desk-12")
    audit("verify", "ACCEPT", score=0.71, threshold=0.52, model_id=MODEL)
    with closing(sqlite3.connect(db_path)) as conn:
        (pseudonym,) = conn.execute("SELECT agent_ref FROM audit_log WHERE seq = 1").fetchone()
        ciphertexts = [
            blob
            for (blob,) in conn.execute(
                "SELECT embedding FROM voiceprints UNION ALL SELECT telephone_embedding "
                "FROM voiceprints UNION ALL SELECT embedding FROM pending_utterances"
            )
        ]
    plain = [embedding(label).tobytes() for label in ("u0", "u1", "u2", "t0", "t1", "t2")]
    plain += [embedding(label).tobytes() for label in ("v1", "v2", "v1-phone", "v2-phone")]
    secrets = [doomed.display_name.encode(), doomed.consent_reference.encode(), *plain]
    # Any 16-byte run of a ciphertext would be a remnant.
    secrets += [blob[i : i + 16] for blob in ciphertexts for i in range(0, len(blob) - 16, 16)]
    # Sealed from the start: the name is never on disk in clear.
    assert doomed.display_name.encode() not in on_disk(db_path)
    assert secrets[-1] in on_disk(db_path)

    store.delete_agent(agent_id)
    store.append_audit(AuditEvent(AuditAction.AGENT_DELETE, agent_id, "ok", NOW))

    def assert_no_trace() -> None:
        stored = on_disk(db_path)
        for secret in secrets:
            assert secret not in stored
        # The earlier records keep their pseudonym, but nothing maps it to the agent any more:
        # the only agent row and data key left are the other agent's.
        assert pseudonym.encode() in stored
        with closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute("SELECT count(*) FROM agents").fetchone() == (1,)
        with closing(sqlite3.connect(key_file_path(db_path))) as conn:
            assert conn.execute("SELECT count(*) FROM agent_keys").fetchone() == (1,)

    assert_no_trace()  # while the service runs
    store.close()
    assert_no_trace()  # and at rest
    # The id itself is left only in the erasure record.
    assert on_disk(db_path).count(agent_id.encode()) == 1

    reopened = open_store(db_path, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    try:
        assert verified(reopened) == ChainReport(9, None)
        assert [e.action for e in reopened.audit_events(agent_id)] == [AuditAction.AGENT_DELETE]
        assert [e.agent_id for e in reopened.audit_events()][:-1] == [""] * 8
    finally:
        reopened.close()
