"""Rotating the encryption key: previous keys still open what they wrapped, re-encryption wraps
every data key anew under the new key in small transactions (the data stays as it is), and a
store sealed under a key the server was not given refuses to start."""

from __future__ import annotations

import base64
import sqlite3
import zlib
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.config import KeySettings
from server.errors import ConfigurationError, StorageError
from server.security.assurances import SigningKey, SigningKeyCipher
from server.security.crypto import VoiceprintCipher, associated_data, load_previous_keys
from server.storage.interface import AgentRecord, ReencryptionReport, UtteranceRecord, Voiceprint
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.tools import reencrypt_cli

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_C = bytes(range(200, 232))
A_ID = VoiceprintCipher(KEY_A).key_id
B_ID = VoiceprintCipher(KEY_B).key_id
MODEL = "ecapa-test"
NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
AGENTS = [f"agent-{n}" for n in range(5)]


def vector(label: str) -> Embedding:
    values = np.random.default_rng(zlib.crc32(label.encode())).standard_normal(192)
    return (values / np.linalg.norm(values)).astype(np.float32)


def voiceprint(agent_id: str) -> Voiceprint:
    return Voiceprint(
        agent_id, MODEL, vector(agent_id), NOW, 3, 20.0, telephone_embedding=vector(agent_id + "t")
    )


def utterance(agent_id: str, n: int) -> UtteranceRecord:
    label = f"{agent_id}-u{n}"
    return UtteranceRecord(
        label,
        agent_id,
        MODEL,
        vector(label),
        4.0,
        3.5,
        -22.0,
        0.0,
        NOW + timedelta(seconds=n),
        # Some utterances predate telephone companions.
        telephone_embedding=vector(label + "t") if n % 2 else None,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A store sealed under key A: voiceprints (with companions) and pending utterances."""
    path = tmp_path / "voxauth.db"
    store = open_store(path, VoiceprintCipher(KEY_A))
    for agent_id in AGENTS:
        store.create_agent(AgentRecord(agent_id, agent_id, "HR-1", NOW))
        store.replace_voiceprint(voiceprint(agent_id), [])
        for n in range(3):
            store.add_utterance(utterance(agent_id, n), max_pending=10)
    store.close()
    return path


@pytest.fixture
def opened() -> Iterator[list[SecureStore]]:
    """Stores the test opens, closed at the end."""
    stores: list[SecureStore] = []
    yield stores
    for store in stores:
        store.close()


def open_with(
    db_path: Path, opened: list[SecureStore], key: bytes, *previous: bytes
) -> SecureStore:
    store = open_store(db_path, VoiceprintCipher(key, previous))
    opened.append(store)
    return store


def assert_everything_readable(store: SecureStore) -> None:
    for agent_id in AGENTS:
        stored = store.get_voiceprint(agent_id)
        expected = voiceprint(agent_id)
        assert stored is not None and stored.telephone_embedding is not None
        assert expected.telephone_embedding is not None
        np.testing.assert_array_equal(stored.embedding, expected.embedding)
        np.testing.assert_array_equal(stored.telephone_embedding, expected.telephone_embedding)
        pending = store.pending_utterances(agent_id)
        assert [u.utterance_id for u in pending] == [f"{agent_id}-u{n}" for n in range(3)]
        for n, got in enumerate(pending):
            want = utterance(agent_id, n)
            np.testing.assert_array_equal(got.embedding, want.embedding)
            if want.telephone_embedding is None:
                assert got.telephone_embedding is None
            else:
                assert got.telephone_embedding is not None
                np.testing.assert_array_equal(got.telephone_embedding, want.telephone_embedding)


# 5 agents' data keys and the store's handle key: all the service key wraps.
WRAPPED_KEYS = 5 + 1


def sealed_rows(db_path: Path) -> list[tuple[bytes, ...]]:
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute(
            "SELECT sealed_identity FROM agents UNION ALL SELECT embedding FROM voiceprints "
            "UNION ALL SELECT embedding FROM pending_utterances ORDER BY 1"
        ).fetchall()


def test_rotation_leaves_everything_readable_with_the_new_key_only(
    db_path: Path, opened: list[SecureStore]
) -> None:
    rotating = open_with(db_path, opened, KEY_B, KEY_A)
    # Before re-encryption the previous key opens everything, and new keys are wrapped with
    # the new one.
    assert_everything_readable(rotating)
    rotating.create_agent(AgentRecord("new", "new", "HR-2", NOW))
    rotating.replace_voiceprint(voiceprint("new"), [])
    assert rotating.sealing_key_ids() == {A_ID: WRAPPED_KEYS, B_ID: 1}
    rows = sealed_rows(db_path)

    # Batches of 2 keys: many small transactions.
    report = rotating.reencrypt_all(batch_size=2)

    assert report == ReencryptionReport(data_keys=WRAPPED_KEYS)
    assert rotating.sealing_key_ids() == {B_ID: WRAPPED_KEYS + 1}
    # Only the keys are wrapped anew; the data they seal is left as it was.
    assert sealed_rows(db_path) == rows
    assert rotating.reencrypt_all(batch_size=2) == ReencryptionReport(0)
    rotating.close()

    assert_everything_readable(open_with(db_path, opened, KEY_B))


def test_the_old_key_alone_no_longer_opens_the_store(
    db_path: Path, opened: list[SecureStore]
) -> None:
    open_with(db_path, opened, KEY_B, KEY_A).reencrypt_all(batch_size=100)
    with pytest.raises(ConfigurationError, match=B_ID):
        open_with(db_path, opened, KEY_A)

    # Nor does it open any single value any more.
    old = VoiceprintCipher(KEY_A)
    blob = VoiceprintCipher(KEY_B).encrypt_embedding(
        vector("x"),
        associated=associated_data(agent_id="x", record_kind="voiceprint", model_id=MODEL),
    )
    with pytest.raises(StorageError, match=B_ID):
        old.decrypt_embedding(
            blob,
            associated=associated_data(agent_id="x", record_kind="voiceprint", model_id=MODEL),
        )


def test_startup_names_the_key_ids_it_cannot_open(db_path: Path, opened: list[SecureStore]) -> None:
    with pytest.raises(ConfigurationError) as refused:
        open_with(db_path, opened, KEY_B, KEY_C)
    message = refused.value.message
    assert f"{A_ID} ({WRAPPED_KEYS} values)" in message
    assert B_ID in message
    assert "VOXAUTH_PREVIOUS_KEYS" in message


def test_signing_keys_sealed_under_an_unknown_key_stop_the_start(
    tmp_path: Path, opened: list[SecureStore]
) -> None:
    path = tmp_path / "signing.db"
    store = open_with(path, opened, KEY_A)
    store.save_signing_keys([SigningKeyCipher(KEY_A).seal(SigningKey.generate(NOW))])
    # The signing key and the store's handle key.
    assert store.sealing_key_ids() == {A_ID: 2}
    store.close()
    with pytest.raises(ConfigurationError, match=A_ID):
        open_with(path, opened, KEY_B)


def test_reencrypt_command_with_the_server_running(
    db_path: Path,
    opened: list[SecureStore],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = open_with(db_path, opened, KEY_B, KEY_A)
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY_B).decode())
    monkeypatch.delenv("VOXAUTH_KEY_FILE", raising=False)
    monkeypatch.setenv("VOXAUTH_PREVIOUS_KEYS", base64.b64encode(KEY_A).decode())

    assert reencrypt_cli.main(["--db", str(db_path), "--batch-size", "3"]) == 0

    output = capsys.readouterr().out
    assert f"re-wrapped under key {B_ID}: {WRAPPED_KEYS} data keys" in output
    assert "previous keys can be removed" in output
    # The running server's connection reads the re-sealed rows, and the run is audited.
    assert_everything_readable(server)
    [event] = [e for e in server.audit_events() if e.action == "key.reencrypt"]
    assert event.details == {"key_id": B_ID, "data_keys": WRAPPED_KEYS}


def test_reencrypt_command_without_the_old_key_changes_nothing(
    db_path: Path,
    opened: list[SecureStore],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY_B).decode())
    monkeypatch.delenv("VOXAUTH_KEY_FILE", raising=False)
    monkeypatch.delenv("VOXAUTH_PREVIOUS_KEYS", raising=False)
    monkeypatch.delenv("VOXAUTH_PREVIOUS_KEYS_FILE", raising=False)

    assert reencrypt_cli.main(["--db", str(db_path)]) == 2

    assert A_ID in capsys.readouterr().err
    assert_everything_readable(open_with(db_path, opened, KEY_A))


def previous_keys_from_environment(env: dict[str, str]) -> tuple[bytes, ...]:
    keys = KeySettings.from_environment(env)
    return load_previous_keys(listed=keys.previous_keys, key_file=keys.previous_keys_file)


def test_previous_keys_from_the_environment(tmp_path: Path) -> None:
    a, b = (base64.b64encode(key).decode() for key in (KEY_A, KEY_B))
    assert previous_keys_from_environment({}) == ()
    assert previous_keys_from_environment({"VOXAUTH_PREVIOUS_KEYS": f"{a}, {b}"}) == (KEY_A, KEY_B)
    key_file = tmp_path / "previous.keys"
    key_file.write_text(f"{a}\n{b}\n")
    key_file.chmod(0o600)
    assert previous_keys_from_environment({"VOXAUTH_PREVIOUS_KEYS_FILE": str(key_file)}) == (
        KEY_A,
        KEY_B,
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"VOXAUTH_PREVIOUS_KEYS": "x", "VOXAUTH_PREVIOUS_KEYS_FILE": "f"}, "only one"),
        (
            {"VOXAUTH_PREVIOUS_KEYS": base64.b64encode(KEY_A).decode() + ",not-base64"},
            "VOXAUTH_PREVIOUS_KEYS, key 2 is not valid base64",
        ),
        ({"VOXAUTH_PREVIOUS_KEYS_FILE": "/nonexistent/previous.keys"}, "cannot read"),
    ],
)
def test_bad_previous_keys(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        previous_keys_from_environment(env)


def test_a_cipher_opens_previous_keys_blobs_and_seals_with_the_current() -> None:
    associated = associated_data(agent_id="a", record_kind="voiceprint", model_id=MODEL)
    old_blob = VoiceprintCipher(KEY_A).encrypt_embedding(vector("a"), associated=associated)
    cipher = VoiceprintCipher(KEY_B, [KEY_A])
    assert cipher.key_id == B_ID
    assert cipher.known_key_ids == {A_ID, B_ID}
    np.testing.assert_array_equal(
        cipher.decrypt_embedding(old_blob, associated=associated), vector("a")
    )
    resealed = cipher.reseal(old_blob, associated=associated)
    assert resealed[1:9].hex() == B_ID
    np.testing.assert_array_equal(
        VoiceprintCipher(KEY_B).decrypt_embedding(resealed, associated=associated), vector("a")
    )
