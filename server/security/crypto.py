"""Encryption at rest: the service key and the agents' data keys it wraps.

A blob is: format version (1 byte) | key id (8 bytes) | nonce (12 bytes) | AES-256-GCM output.
Everything of an agent that is sealed (embeddings, identity, assurance tokens) is sealed under
the agent's own data key (format 2), and that key is stored only wrapped under the service key
(format 1): erasing an agent destroys its wrapped key, after which no copy of its data opens.
The key id tells which key sealed a blob, so after a key rotation blobs sealed with a previous
service key (VOXAUTH_PREVIOUS_KEYS) still open until they are re-wrapped; the associated data
binds each blob to its row, so a blob copied into another row does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.embedder import Embedding
from server.errors import ConfigurationError, StorageError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
FORMAT_VERSION = 1
"""Blobs sealed under the service key: embeddings of databases from before per-agent keys,
and the wrapped data keys."""
DATA_KEY_FORMAT_VERSION = 2
"""Blobs sealed under an agent's data key."""
KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = 1 + KEY_ID_BYTES

KEY_ENV = "VOXAUTH_KEY"
KEY_FILE_ENV = "VOXAUTH_KEY_FILE"
PREVIOUS_KEYS_ENV = "VOXAUTH_PREVIOUS_KEYS"
PREVIOUS_KEYS_FILE_ENV = "VOXAUTH_PREVIOUS_KEYS_FILE"

RecordKind = Literal[
    "voiceprint",
    "pending_utterance",
    "telephone_voiceprint",
    "telephone_pending_utterance",
    "replay_fingerprint",
    "telephone_replay_fingerprint",
    "held_voiceprint",
    "telephone_held_voiceprint",
    "watchlist_entry",
    "telephone_watchlist_entry",
]


def binding(*parts: str) -> bytes:
    """Associated data binding a blob to what it belongs to, length-prefixed so no two lists
    of parts encode alike."""
    return b"".join(
        len(encoded).to_bytes(4, "big") + encoded for encoded in (part.encode() for part in parts)
    )


def associated_data(*, agent_id: str, record_kind: RecordKind, model_id: str) -> bytes:
    """The row binding of an embedding blob."""
    return binding(agent_id, record_kind, model_id)


class _Sealer(ABC):
    """AES-256-GCM blobs of one format: format version | key id | nonce | ciphertext and tag,
    the header authenticated with the associated data. Seals under the current key, opens
    blobs of it or of the previous keys. Thread-safe (holds no mutable state)."""

    _format: int

    def __init__(self, key: bytes, previous_keys: Sequence[bytes] = ()) -> None:
        for candidate in (key, *previous_keys):
            if len(candidate) != KEY_BYTES:
                raise ConfigurationError(
                    f"an encryption key is {len(candidate)} bytes; it must be {KEY_BYTES}"
                )
        self._aead = AESGCM(key)
        self._key_id = _key_id(key)
        self._openers = {_key_id(known): AESGCM(known) for known in (*previous_keys, key)}

    @property
    def key_id(self) -> str:
        """Hex id of the current key (a SHA-256 prefix: safe to log, reveals nothing usable)."""
        return self._key_id.hex()

    @property
    def known_key_ids(self) -> frozenset[str]:
        """Hex ids of the keys this cipher opens blobs of: the current and the previous ones."""
        return frozenset(key_id.hex() for key_id in self._openers)

    def seal(self, plain: bytes, *, associated: bytes) -> bytes:
        header = bytes([self._format]) + self._key_id
        nonce = os.urandom(_NONCE_BYTES)
        # The header is authenticated too, so a forged version or key id cannot pass.
        return header + nonce + self._aead.encrypt(nonce, plain, header + associated)

    def open(self, blob: bytes, *, associated: bytes, what: str = "sealed value") -> bytes:
        """The plaintext; StorageError naming `what` if the blob does not open here."""
        if len(blob) < _HEADER_BYTES + _NONCE_BYTES + _TAG_BYTES:
            raise StorageError(f"{what} is truncated ({len(blob)} bytes)")
        if blob[0] != self._format:
            raise StorageError(
                f"{what} has format version {blob[0]}; this voxauth reads version "
                f"{self._format} here"
            )
        header = blob[:_HEADER_BYTES]
        opener = self._openers.get(header[1:])
        if opener is None:
            raise StorageError(self._unknown_key(what, header[1:].hex()))
        nonce = blob[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
        try:
            return opener.decrypt(nonce, blob[_HEADER_BYTES + _NONCE_BYTES :], header + associated)
        except InvalidTag:
            raise StorageError(
                f"{what} failed authentication: it was altered, or it belongs to another record "
                "(agent, kind or model)"
            ) from None

    def encrypt_embedding(self, embedding: Embedding, *, associated: bytes) -> bytes:
        vector = np.asarray(embedding, dtype="<f4")
        if vector.ndim != 1 or vector.size == 0:
            raise ValueError(f"an embedding is a non-empty 1-D array, not shape {vector.shape}")
        if not np.all(np.isfinite(vector)):
            raise ValueError("refusing to store an embedding with NaN or infinite values")
        return self.seal(vector.tobytes(), associated=associated)

    def decrypt_embedding(self, blob: bytes, *, associated: bytes) -> Embedding:
        plain = self.open(blob, associated=associated, what="encrypted embedding")
        if len(plain) % 4:
            raise StorageError(f"decrypted embedding has {len(plain)} bytes, not whole float32s")
        return np.frombuffer(plain, dtype="<f4").astype(np.float32)

    @abstractmethod
    def _unknown_key(self, what: str, key_id: str) -> str:
        """Why a blob sealed under `key_id` does not open here."""


class VoiceprintCipher(_Sealer):
    """The service key (VOXAUTH_KEY) and the previous ones: wraps the agents' data keys, and
    opens embeddings sealed directly under it before data keys existed."""

    _format = FORMAT_VERSION

    def wrap_key(self, key: DataKey, *, associated: bytes) -> bytes:
        """`key` sealed under the current service key, bound to `associated`."""
        return self.seal(key.raw, associated=associated)

    def unwrap_key(self, blob: bytes, *, associated: bytes) -> DataKey:
        return DataKey(self.open(blob, associated=associated, what="wrapped data key"))

    def reseal(self, blob: bytes, *, associated: bytes) -> bytes:
        """The blob's content sealed anew under the current key."""
        return self.seal(self.open(blob, associated=associated), associated=associated)

    def _unknown_key(self, what: str, key_id: str) -> str:
        return (
            f"{what} was sealed with key {key_id}, but the loaded key is {self.key_id}: wrong "
            f"{KEY_ENV} / {KEY_FILE_ENV}, or a previous key missing from {PREVIOUS_KEYS_ENV}?"
        )


class DataKey(_Sealer):
    """One agent's data key: seals everything of the agent that is sealed. Stored only wrapped
    under the service key; destroying the wrapped copy makes all of it unreadable for good."""

    _format = DATA_KEY_FORMAT_VERSION

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self._raw = raw

    @classmethod
    def generate(cls) -> DataKey:
        return cls(AESGCM.generate_key(bit_length=8 * KEY_BYTES))

    @property
    def raw(self) -> bytes:
        """The key itself, for wrapping only."""
        return self._raw

    def _unknown_key(self, what: str, key_id: str) -> str:
        return (
            f"{what} was sealed with data key {key_id}, not with this agent's {self.key_id}: it "
            "belongs to another agent"
        )


def sealing_key_id(blob: bytes) -> str:
    """Hex id of the key that sealed `blob`, read from its header without opening it. Signing
    keys sealed by server/security/assurances.py share the header layout."""
    if len(blob) < _HEADER_BYTES:
        raise StorageError(f"sealed value is truncated ({len(blob)} bytes)")
    return blob[1:_HEADER_BYTES].hex()


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def derive_subkey(key: bytes, purpose: str) -> bytes:
    """A 256-bit key for one `purpose` (HKDF-SHA256 of the service key): every replica with
    the same service key derives the same one, and it reveals nothing of the service key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(key)


def load_key(*, key_b64: str | None, key_file: Path | None) -> bytes:
    """The 32-byte key from base64 text (VOXAUTH_KEY) or a file holding it (VOXAUTH_KEY_FILE)."""
    if key_b64 is not None and key_file is not None:
        # Refuse rather than pick one: the wrong key makes every voiceprint unreadable.
        raise ConfigurationError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one")
    if key_b64 is not None:
        return _decode_key(key_b64, source=KEY_ENV)
    if key_file is not None:
        return _decode_key(
            _read_key_file(key_file, env_name=KEY_FILE_ENV),
            source=f"{KEY_FILE_ENV} file {key_file}",
        )
    raise ConfigurationError(
        f"no voiceprint encryption key: set {KEY_ENV} (base64 of 32 random bytes) or "
        f"{KEY_FILE_ENV} (path of a file holding it); the setup script creates var/dev.key "
        "for development"
    )


def load_previous_keys(*, listed: str | None, key_file: Path | None) -> tuple[bytes, ...]:
    """Keys replaced by the current one, which still open what they sealed until it is
    re-sealed: base64 keys separated by commas (VOXAUTH_PREVIOUS_KEYS), or by commas or line
    breaks in a file (VOXAUTH_PREVIOUS_KEYS_FILE). Neither given: no previous keys."""
    if listed is not None and key_file is not None:
        raise ConfigurationError(
            f"both {PREVIOUS_KEYS_ENV} and {PREVIOUS_KEYS_FILE_ENV} are set; set only one"
        )
    if key_file is not None:
        source = f"{PREVIOUS_KEYS_FILE_ENV} file {key_file}"
        text = _read_key_file(key_file, env_name=PREVIOUS_KEYS_FILE_ENV)
    else:
        source, text = PREVIOUS_KEYS_ENV, listed or ""
    entries = [entry for entry in text.replace("\n", ",").split(",") if entry.strip()]
    return tuple(
        _decode_key(entry, source=f"{source}, key {number}")
        for number, entry in enumerate(entries, start=1)
    )


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


def _read_key_file(path: Path, *, env_name: str) -> str:
    try:
        with path.open("rb") as source:
            mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
            raw = source.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {env_name} file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        logger.warning(
            "key file %s is accessible by group or others (mode %03o); chmod 600 it", path, mode
        )
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{env_name} file {path} is not base64 text") from None


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
