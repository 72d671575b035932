"""Sealing embeddings at rest, and loading the key."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.config import KeySettings
from server.errors import ConfigurationError, StorageError
from server.security.crypto import (
    VoiceprintCipher,
    associated_data,
    create_key_file,
    load_key,
)

KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()
AGENT_A = associated_data(agent_id="agent-a", record_kind="voiceprint", model_id="ecapa-v1")
AGENT_B = associated_data(agent_id="agent-b", record_kind="voiceprint", model_id="ecapa-v1")


@pytest.fixture
def embedding() -> Embedding:
    vector = np.random.default_rng(7).standard_normal(192).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_round_trip_is_exact_float32(embedding: Embedding) -> None:
    cipher = VoiceprintCipher(KEY)
    blob = cipher.encrypt_embedding(embedding, associated=AGENT_A)
    restored = cipher.decrypt_embedding(blob, associated=AGENT_A)
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, embedding)
    assert embedding.tobytes() not in blob


def test_each_encryption_uses_a_fresh_nonce(embedding: Embedding) -> None:
    cipher = VoiceprintCipher(KEY)
    first = cipher.encrypt_embedding(embedding, associated=AGENT_A)
    assert first != cipher.encrypt_embedding(embedding, associated=AGENT_A)


def test_blob_carries_version_and_key_id(embedding: Embedding) -> None:
    cipher = VoiceprintCipher(KEY)
    blob = cipher.encrypt_embedding(embedding, associated=AGENT_A)
    assert blob[0] == 1
    assert blob[1:9].hex() == cipher.key_id


def test_wrong_key_is_a_storage_error_naming_the_key(embedding: Embedding) -> None:
    blob = VoiceprintCipher(KEY).encrypt_embedding(embedding, associated=AGENT_A)
    with pytest.raises(StorageError, match="loaded key is"):
        VoiceprintCipher(bytes(32)).decrypt_embedding(blob, associated=AGENT_A)


@pytest.mark.parametrize("position", [0, 1, 9, 30, -1])
def test_tampered_blob_is_a_storage_error(embedding: Embedding, position: int) -> None:
    cipher = VoiceprintCipher(KEY)
    blob = bytearray(cipher.encrypt_embedding(embedding, associated=AGENT_A))
    blob[position] ^= 0x01
    with pytest.raises(StorageError):
        cipher.decrypt_embedding(bytes(blob), associated=AGENT_A)


def test_truncated_blob_is_a_storage_error(embedding: Embedding) -> None:
    cipher = VoiceprintCipher(KEY)
    blob = cipher.encrypt_embedding(embedding, associated=AGENT_A)
    with pytest.raises(StorageError, match="truncated"):
        cipher.decrypt_embedding(blob[:20], associated=AGENT_A)


def test_blob_moved_to_another_agent_does_not_decrypt(embedding: Embedding) -> None:
    cipher = VoiceprintCipher(KEY)
    blob = cipher.encrypt_embedding(embedding, associated=AGENT_A)
    with pytest.raises(StorageError, match="another record"):
        cipher.decrypt_embedding(blob, associated=AGENT_B)


def test_associated_data_distinguishes_kind_and_model() -> None:
    bindings = {
        associated_data(agent_id="a", record_kind="voiceprint", model_id="m"),
        associated_data(agent_id="a", record_kind="pending_utterance", model_id="m"),
        associated_data(agent_id="a", record_kind="voiceprint", model_id="m2"),
        # Field boundaries matter: "ab"+"c" must differ from "a"+"bc".
        associated_data(agent_id="avoiceprint", record_kind="voiceprint", model_id=""),
    }
    assert len(bindings) == 4


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3), np.float32), np.zeros(0, np.float32), np.array([1.0, np.nan], np.float32)],
)
def test_refuses_malformed_embeddings(bad: Embedding) -> None:
    with pytest.raises(ValueError):
        VoiceprintCipher(KEY).encrypt_embedding(bad, associated=AGENT_A)


def test_cipher_refuses_a_short_key() -> None:
    with pytest.raises(ConfigurationError, match="32"):
        VoiceprintCipher(bytes(16))


def key_from_environment(env: dict[str, str]) -> bytes:
    keys = KeySettings.from_environment(env)
    return load_key(key_b64=keys.key, key_file=keys.key_file)


def test_key_from_environment_variable() -> None:
    assert key_from_environment({"VOXAUTH_KEY": KEY_B64}) == KEY


def test_key_from_file(tmp_path: Path) -> None:
    key_file = tmp_path / "voxauth.key"
    key_file.write_text(KEY_B64 + "\n")
    key_file.chmod(0o600)
    assert key_from_environment({"VOXAUTH_KEY_FILE": str(key_file)}) == KEY


def test_missing_key_names_both_variables() -> None:
    with pytest.raises(ConfigurationError) as raised:
        key_from_environment({"VOXAUTH_KEY": ""})
    assert "VOXAUTH_KEY " in raised.value.message
    assert "VOXAUTH_KEY_FILE" in raised.value.message


def test_both_sources_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="only one"):
        load_key(key_b64=KEY_B64, key_file=tmp_path / "k")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(16)).decode(), "16 bytes"),
        ("é" * 44, "not valid base64"),
    ],
)
def test_bad_key_text(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as raised:
        load_key(key_b64=text, key_file=None)
    assert "VOXAUTH_KEY" in raised.value.message


def test_unreadable_key_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.key"
    with pytest.raises(ConfigurationError, match="cannot read") as raised:
        load_key(key_b64=None, key_file=missing)
    assert str(missing) in raised.value.message


def test_binary_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    key_file = tmp_path / "raw.key"
    key_file.write_bytes(b"\xff" * 32)
    with pytest.raises(ConfigurationError, match="not base64"):
        load_key(key_b64=None, key_file=key_file)


def test_loose_key_file_permissions_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "shared.key"
    key_file.write_text(KEY_B64)
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="server.security.crypto"):
        assert load_key(key_b64=None, key_file=key_file) == KEY
    assert "chmod 600" in caplog.text
    assert KEY_B64 not in caplog.text


def test_create_key_file_is_private_and_loadable(tmp_path: Path) -> None:
    key_file = tmp_path / "var" / "dev.key"
    create_key_file(key_file)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = load_key(key_b64=None, key_file=key_file)
    assert len(key) == 32
    VoiceprintCipher(key)


def test_create_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    key_file = tmp_path / "dev.key"
    create_key_file(key_file)
    before = key_file.read_bytes()
    with pytest.raises(ConfigurationError, match="already exists"):
        create_key_file(key_file)
    assert key_file.read_bytes() == before


def test_created_keys_differ(tmp_path: Path) -> None:
    create_key_file(tmp_path / "one.key")
    create_key_file(tmp_path / "two.key")
    assert (tmp_path / "one.key").read_bytes() != (tmp_path / "two.key").read_bytes()
