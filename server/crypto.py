"""Encryption at rest of speaker embeddings (voiceprints and pending utterances), and the key.

A blob is: format version (1 byte) | key id (8 bytes) | nonce (12 bytes) | AES-256-GCM output.
The key id lets a later key rotation tell which key sealed a blob; the associated data binds
each blob to its row, so a blob copied into another agent's row does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from models.embedder import Embedding
from server.errors import ConfigurationError, StorageError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
FORMAT_VERSION = 1
KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = 1 + KEY_ID_BYTES

KEY_ENV = "VOXAUTH_KEY"
KEY_FILE_ENV = "VOXAUTH_KEY_FILE"

RecordKind = Literal[
    "voiceprint", "pending_utterance", "telephone_voiceprint", "telephone_pending_utterance"
]


def associated_data(*, agent_id: str, record_kind: RecordKind, model_id: str) -> bytes:
    """The row binding of an embedding blob, length-prefixed so no two rows encode alike."""
    return b"".join(
        len(encoded).to_bytes(4, "big") + encoded
        for encoded in (part.encode() for part in (agent_id, record_kind, model_id))
    )


class VoiceprintCipher:
    """Seals embeddings with AES-256-GCM under one key. Thread-safe (holds no mutable state)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"the encryption key is {len(key)} bytes; it must be 32")
        self._aead = AESGCM(key)
        self._key_id = hashlib.sha256(key).digest()[:KEY_ID_BYTES]

    @property
    def key_id(self) -> str:
        """Hex id of the key (a SHA-256 prefix: safe to log, reveals nothing usable)."""
        return self._key_id.hex()

    def encrypt_embedding(self, embedding: Embedding, *, associated: bytes) -> bytes:
        vector = np.asarray(embedding, dtype="<f4")
        if vector.ndim != 1 or vector.size == 0:
            raise ValueError(f"an embedding is a non-empty 1-D array, not shape {vector.shape}")
        if not np.all(np.isfinite(vector)):
            raise ValueError("refusing to store an embedding with NaN or infinite values")
        header = bytes([FORMAT_VERSION]) + self._key_id
        nonce = os.urandom(_NONCE_BYTES)
        # The header is authenticated too, so a forged version or key id cannot pass.
        sealed = self._aead.encrypt(nonce, vector.tobytes(), header + associated)
        return header + nonce + sealed

    def decrypt_embedding(self, blob: bytes, *, associated: bytes) -> Embedding:
        if len(blob) < _HEADER_BYTES + _NONCE_BYTES + _TAG_BYTES:
            raise StorageError(f"encrypted embedding is truncated ({len(blob)} bytes)")
        if blob[0] != FORMAT_VERSION:
            raise StorageError(
                f"encrypted embedding has format version {blob[0]}; this voxauth reads "
                f"version {FORMAT_VERSION}"
            )
        header = blob[:_HEADER_BYTES]
        blob_key_id = header[1:]
        if blob_key_id != self._key_id:
            raise StorageError(
                f"encrypted embedding was sealed with key {blob_key_id.hex()}, but the loaded "
                f"key is {self.key_id}: wrong VOXAUTH_KEY / VOXAUTH_KEY_FILE?"
            )
        nonce = blob[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
        try:
            plain = self._aead.decrypt(
                nonce, blob[_HEADER_BYTES + _NONCE_BYTES :], header + associated
            )
        except InvalidTag:
            raise StorageError(
                "encrypted embedding failed authentication: it was altered, or it belongs to "
                "another record (agent, kind or model)"
            ) from None
        if len(plain) % 4:
            raise StorageError(f"decrypted embedding has {len(plain)} bytes, not whole float32s")
        return np.frombuffer(plain, dtype="<f4").astype(np.float32)


def load_key(*, key_b64: str | None, key_file: Path | None) -> bytes:
    """The 32-byte key from base64 text (VOXAUTH_KEY) or a file holding it (VOXAUTH_KEY_FILE)."""
    if key_b64 is not None and key_file is not None:
        # Refuse rather than pick one: the wrong key makes every voiceprint unreadable.
        raise ConfigurationError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one")
    if key_b64 is not None:
        return _decode_key(key_b64, source=KEY_ENV)
    if key_file is not None:
        return _decode_key(_read_key_file(key_file), source=f"{KEY_FILE_ENV} file {key_file}")
    raise ConfigurationError(
        f"no voiceprint encryption key: set {KEY_ENV} (base64 of 32 random bytes) or "
        f"{KEY_FILE_ENV} (path of a file holding it); the setup script creates var/dev.key "
        "for development"
    )


def key_from_environment(env: Mapping[str, str]) -> bytes:
    """load_key from the environment; an empty variable counts as unset."""
    key_file = env.get(KEY_FILE_ENV)
    return load_key(key_b64=env.get(KEY_ENV) or None, key_file=Path(key_file) if key_file else None)


def create_key_file(path: Path) -> None:
    """Writes a new random key as base64 text, mode 0600. Never overwrites an existing file."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(
            f"key file {path} already exists; refusing to overwrite it (data sealed with it "
            "would become unreadable)"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create key file {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(base64.b64encode(AESGCM.generate_key(bit_length=256)).decode() + "\n")
            out.flush()
            # Losing the key after a crash would lose every voiceprint sealed with it.
            os.fsync(out.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot write key file {path}: {exc.strerror}") from exc


def _read_key_file(path: Path) -> str:
    try:
        with path.open("rb") as source:
            mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
            raw = source.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {KEY_FILE_ENV} file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        logger.warning(
            "key file %s is accessible by group or others (mode %03o); chmod 600 it", path, mode
        )
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{KEY_FILE_ENV} file {path} is not base64 text") from None


def _decode_key(text: str, *, source: str) -> bytes:
    # Messages never quote the text: it is (or is meant to be) the secret.
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{source} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"{source} decodes to {len(key)} bytes; the key must be {KEY_BYTES} random bytes"
        )
    return key
