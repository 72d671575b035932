"""Signed assurances for the MFA provider: after a login check passes, voxauth issues a JWT
signed with Ed25519 (JWS alg `EdDSA`) that the provider verifies offline with the public keys
voxauth publishes as a JWKS document (RFC 7517, OKP keys per RFC 8037).

Claims of an assurance (all registered names except the one `voxauth_` private claim):

- `iss` the configured issuer, `sub` the agent id, `aud` the MFA provider's audience;
- `iat` = `nbf` = when the login check passed, `exp` = `iat` + the token lifetime (a shift);
- `jti` 128 random bits, so the provider can refuse a replayed assurance;
- `sid` the shift id (OpenID's session id claim: the shift is the agent's session);
- `amr` `["voice"]`, RFC 8176's method reference for voice biometrics. No `acr`: its values
  are agreed per deployment with the provider, while `amr` already states the method;
- `voxauth_device_id` the softphone device the check was made on (no registered claim fits).

Signing keys rotate: the new key signs from then on while each retired key stays published
until every token it signed has expired (plus a clock-skew margin), and is then pruned. Keys
persist through a SigningKeyStore, their private halves sealed with AES-256-GCM under a key
derived from the service key (VOXAUTH_KEY), never in clear.

AssuranceVerifier checks a token as voxauth's own introspection does (signature, issuer,
validity period); revocation is the AssuranceDesk's, which keeps the store.

The JWS itself (encoding, signing, parsing, verifying; the public JWK of a key) is PyJWT's, a
maintained library that relying parties use too; this module decides the claims, the keys and
their lives, and what it accepts before PyJWT sees a token.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.errors import ConfigurationError, InvalidRequestError, StorageError
from server.security.crypto import KEY_BYTES, KEY_ID_BYTES

logger = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
VOICE_METHOD = "voice"
"""RFC 8176 authentication method reference: "Use of voice biometric for authentication"."""

Jwk = dict[str, str]
JwksDocument = dict[str, list[Jwk]]

_SEALED_FORMAT_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SEALED_HEADER_BYTES = 1 + KEY_ID_BYTES
_PRIVATE_KEY_BYTES = 32
# HKDF's info string: changing it would make every stored signing key unreadable.
_SUBKEY_PURPOSE = b"voxauth signing keys v1"


@dataclass(frozen=True)
class AssurancePolicy:
    """How assurances are issued and how long their signing keys live."""

    issuer: str = "voxauth"
    """The `iss` claim; the MFA provider checks it."""

    token_lifetime: timedelta = timedelta(hours=8)
    """From issue to `exp`: one shift, so one login check covers it."""

    clock_skew: timedelta = timedelta(minutes=5)
    """Extra time a retired key stays published, for a provider whose clock runs behind or
    who accepts `exp` with some leeway."""

    key_rotation_interval: timedelta = timedelta(days=30)
    """Age at which the active signing key is replaced by a new one."""

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigurationError("the assurance issuer must not be empty")
        for name in ("token_lifetime", "key_rotation_interval"):
            if getattr(self, name) < timedelta(seconds=1):
                raise ConfigurationError(f"the assurance {name} must be at least one second")
        if self.clock_skew < timedelta(0):
            raise ConfigurationError("the assurance clock_skew must not be negative")


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 signing key and where it is in its life: active while `retired_at` is None,
    then published (for verification only) until `published_until`."""

    kid: str
    """RFC 7638 JWK thumbprint of the public key: stable, and derived from the key alone."""
    private_key: Ed25519PrivateKey
    created_at: datetime
    retired_at: datetime | None = None
    published_until: datetime | None = None

    @classmethod
    def generate(cls, now: datetime) -> SigningKey:
        return cls.from_private_key(Ed25519PrivateKey.generate(), created_at=now)

    @classmethod
    def from_private_key(
        cls, private_key: Ed25519PrivateKey, *, created_at: datetime
    ) -> SigningKey:
        return cls(kid=_thumbprint(private_key), private_key=private_key, created_at=created_at)

    def public_jwk(self) -> Jwk:
        return {
            **_public_members(self.private_key),
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }

    def retire(self, now: datetime, keep_published_for: timedelta) -> SigningKey:
        return replace(self, retired_at=now, published_until=now + keep_published_for)

    def is_published(self, now: datetime) -> bool:
        return self.published_until is None or now < self.published_until


@dataclass(frozen=True)
class StoredSigningKey:
    """A signing key as stored: its private half sealed, the rest in clear."""

    kid: str
    sealed_private_key: bytes
    created_at: datetime
    retired_at: datetime | None
    published_until: datetime | None


KeyChange = Callable[[list[StoredSigningKey]], list[StoredSigningKey] | None]
"""Given the stored keys, the keys to store instead, or None to leave them as they are."""


class SigningKeyStore(Protocol):
    """Where the signing keys persist, shared by every replica on the store. Implementations
    are thread-safe."""

    def load_signing_keys(self) -> list[StoredSigningKey]:
        """Every stored signing key, in any order."""

    def save_signing_keys(self, keys: list[StoredSigningKey]) -> None:
        """Replaces the stored keys with `keys` in one transaction (keys left out are deleted).
        Raises StorageError."""

    def update_signing_keys(self, change: KeyChange) -> list[StoredSigningKey]:
        """Reads the stored keys and stores `change(stored)` in one write transaction that no
        other writer (another replica's rotation) overtakes; returns the keys stored after
        it. An exception from `change` propagates and changes nothing. Raises StorageError."""


class MemorySigningKeyStore:
    """A SigningKeyStore that lives as long as the object: for tests."""

    def __init__(self) -> None:
        self._keys: list[StoredSigningKey] = []
        self._lock = threading.Lock()

    def load_signing_keys(self) -> list[StoredSigningKey]:
        with self._lock:
            return list(self._keys)

    def save_signing_keys(self, keys: list[StoredSigningKey]) -> None:
        with self._lock:
            self._keys = list(keys)

    def update_signing_keys(self, change: KeyChange) -> list[StoredSigningKey]:
        with self._lock:
            changed = change(list(self._keys))
            if changed is not None:
                self._keys = list(changed)
            return list(self._keys)


class SigningKeyCipher:
    """Seals private signing keys with AES-256-GCM under a subkey of the service key.

    A separate subkey (HKDF-SHA256) keeps signing-key blobs and voiceprint blobs in separate
    key domains although one secret is configured. A blob is: format version (1 byte) | id of
    the service key (8 bytes, the same id server/crypto.py shows) | nonce (12) | AES-GCM
    output; the associated data binds it to its kid, so a blob moved to another row does not
    open.
    """

    def __init__(self, service_key: bytes, previous_keys: tuple[bytes, ...] = ()) -> None:
        """Seals under `service_key`; opens under it or any of `previous_keys` (during a key
        rotation: the keyring re-seals what it opened with an old key)."""
        self._aeads: dict[bytes, AESGCM] = {}
        for key in (service_key, *previous_keys):
            if len(key) != KEY_BYTES:
                raise ConfigurationError(
                    f"the encryption key is {len(key)} bytes; it must be {KEY_BYTES}"
                )
            subkey = HKDF(
                algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_SUBKEY_PURPOSE
            ).derive(key)
            self._aeads.setdefault(hashlib.sha256(key).digest()[:KEY_ID_BYTES], AESGCM(subkey))
        self._key_id = hashlib.sha256(service_key).digest()[:KEY_ID_BYTES]
        self._aead = self._aeads[self._key_id]

    def is_current(self, stored: StoredSigningKey) -> bool:
        """Whether `stored` is sealed under the current service key."""
        return stored.sealed_private_key[1:_SEALED_HEADER_BYTES] == self._key_id

    def seal(self, key: SigningKey) -> StoredSigningKey:
        header = bytes([_SEALED_FORMAT_VERSION]) + self._key_id
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(
            nonce, key.private_key.private_bytes_raw(), header + key.kid.encode()
        )
        return StoredSigningKey(
            kid=key.kid,
            sealed_private_key=header + nonce + sealed,
            created_at=key.created_at,
            retired_at=key.retired_at,
            published_until=key.published_until,
        )

    def open(self, stored: StoredSigningKey) -> SigningKey:
        blob = stored.sealed_private_key
        if len(blob) != _SEALED_HEADER_BYTES + _NONCE_BYTES + _PRIVATE_KEY_BYTES + _TAG_BYTES:
            raise StorageError(f"sealed signing key {stored.kid} has {len(blob)} bytes")
        header = blob[:_SEALED_HEADER_BYTES]
        if header[0] != _SEALED_FORMAT_VERSION:
            raise StorageError(
                f"sealed signing key {stored.kid} has format version {header[0]}; this voxauth "
                f"reads version {_SEALED_FORMAT_VERSION}"
            )
        aead = self._aeads.get(header[1:])
        if aead is None:
            raise StorageError(
                f"signing key {stored.kid} was sealed with key {header[1:].hex()}, but the "
                f"loaded key is {self._key_id.hex()}: wrong VOXAUTH_KEY / VOXAUTH_KEY_FILE?"
            )
        nonce = blob[_SEALED_HEADER_BYTES : _SEALED_HEADER_BYTES + _NONCE_BYTES]
        try:
            raw = aead.decrypt(
                nonce, blob[_SEALED_HEADER_BYTES + _NONCE_BYTES :], header + stored.kid.encode()
            )
        except InvalidTag:
            raise StorageError(
                f"sealed signing key {stored.kid} failed authentication: it was altered, or it "
                "belongs to another key"
            ) from None
        private_key = Ed25519PrivateKey.from_private_bytes(raw)
        return SigningKey(
            kid=stored.kid,
            private_key=private_key,
            created_at=stored.created_at,
            retired_at=stored.retired_at,
            published_until=stored.published_until,
        )


class SigningKeyring:
    """The active signing key and the retired ones still needed to verify unexpired tokens.

    The store holds the keyring that every replica shares; each replica follows it (`sync`,
    every KEYRING_SYNC_SECONDS, and at once for a token whose key it does not know), and
    changes it only by a compare-and-set in one write transaction (`update_signing_keys`): a
    rotation due on several replicas at once happens once, the others adopt its key, and no
    replica's key is ever overwritten by another's. Every change is saved before it takes
    effect, so no token is ever signed by a key that a restart, or another replica, would
    lose. Thread-safe.
    """

    def __init__(
        self,
        store: SigningKeyStore,
        cipher: SigningKeyCipher,
        policy: AssurancePolicy,
        active: SigningKey | None,
        retired: list[SigningKey],
    ) -> None:
        self.policy = policy
        self._store = store
        self._cipher = cipher
        self._active = active
        self._retired = retired
        self._lock = threading.Lock()
        self._looked_up_at = -_UNKNOWN_KID_SYNC_SECONDS

    @classmethod
    def load(
        cls,
        store: SigningKeyStore,
        cipher: SigningKeyCipher,
        policy: AssurancePolicy,
        now: datetime,
    ) -> SigningKeyring:
        """The keyring as stored; creates the first key, or rotates an overdue one, as needed.
        Raises StorageError."""
        keyring = cls(store, cipher, policy, None, [])
        keyring.sync()
        keyring.refresh(now)

        def reseal(stored: list[StoredSigningKey]) -> list[StoredSigningKey] | None:
            if all(cipher.is_current(key) for key in stored):
                return None
            # After a service-key rotation: re-seal everything under the new key, so the old
            # one can be retired.
            return [cipher.seal(cipher.open(key)) for key in stored]

        with keyring._lock:
            keyring._adopt(store.update_signing_keys(reseal))
        return keyring

    def sync(self) -> None:
        """Follows the stored keyring: another replica may have rotated. Raises StorageError,
        or ConfigurationError for a key sealed under a service key this replica lacks (during
        a rolling key rotation; see README), and then keeps the keys it had."""
        stored = self._store.load_signing_keys()
        with self._lock:
            self._adopt(stored)

    def refresh(self, now: datetime) -> SigningKey:
        """The key to sign with now: rotates first when the active key is older than the
        rotation interval (or there is none), and prunes retired keys no longer needed."""
        with self._lock:
            active = self._active
            if active is None or now - active.created_at >= self.policy.key_rotation_interval:
                return self._rotate(now, force=False)
            if any(not key.is_published(now) for key in self._retired):
                self._adopt(self._store.update_signing_keys(self._pruned(now)))
            assert self._active is not None
            return self._active

    def rotate(self, now: datetime) -> SigningKey:
        """Makes a new active key now. The old one stays published while tokens it signed can
        still be valid, so rotation invalidates no token (nor does it revoke any)."""
        with self._lock:
            return self._rotate(now, force=True)

    def published_keys(self, now: datetime) -> list[SigningKey]:
        """The keys a verifier needs now: the active one first, then retired ones, newest
        first."""
        with self._lock:
            active = [self._active] if self._active is not None else []
            retired = sorted(
                (key for key in self._retired if key.is_published(now)),
                key=lambda key: key.created_at,
                reverse=True,
            )
        return active + retired

    def knows(self, kid: str, now: datetime) -> bool:
        """Whether `kid` is a published key here, following the store first when it is not
        (at most once a second: a stream of made-up key ids costs one read a second)."""
        if any(key.kid == kid for key in self.published_keys(now)):
            return True
        with self._lock:
            if time.monotonic() - self._looked_up_at < _UNKNOWN_KID_SYNC_SECONDS:
                return False
            self._looked_up_at = time.monotonic()
        try:
            self.sync()
        except (StorageError, ConfigurationError) as error:
            logger.warning("cannot follow the stored signing keys: %s", error.message)
            return False
        return any(key.kid == kid for key in self.published_keys(now))

    def _rotate(self, now: datetime, *, force: bool) -> SigningKey:
        cipher, policy = self._cipher, self.policy

        def rotation(stored: list[StoredSigningKey]) -> list[StoredSigningKey] | None:
            active, retired = _split([cipher.open(key) for key in stored])
            if (
                not force
                and active is not None
                and now - active.created_at < policy.key_rotation_interval
            ):
                return None  # Another replica rotated meanwhile: its key is the one.
            new = SigningKey.generate(now)
            kept = [key for key in retired if key.is_published(now)]
            if active is not None:
                # The last token the old key signs is issued now; it must verify until it
                # expires.
                kept.append(active.retire(now, policy.token_lifetime + policy.clock_skew))
            logger.info(
                "signing key %s is now active (replacing %s)", new.kid, active and active.kid
            )
            return [cipher.seal(key) for key in [new, *kept]]

        self._adopt(self._store.update_signing_keys(rotation))
        assert self._active is not None
        return self._active

    def _pruned(self, now: datetime) -> KeyChange:
        cipher = self._cipher

        def prune(stored: list[StoredSigningKey]) -> list[StoredSigningKey] | None:
            kept = [
                key
                for key in stored
                if key.retired_at is None or cipher.open(key).is_published(now)
            ]
            return None if len(kept) == len(stored) else kept

        return prune

    def _adopt(self, stored: list[StoredSigningKey]) -> None:
        """Takes the stored keys as this keyring's (the caller holds the lock)."""
        self._active, self._retired = _split([self._cipher.open(key) for key in stored])


KEYRING_SYNC_SECONDS = 2.0
"""How often a replica follows the stored keyring (server/app.py): a key another replica
rotated to shows in this one's JWKS at most this much later. Tokens signed with it verify
here at once (an unknown key id makes the keyring look)."""
_UNKNOWN_KID_SYNC_SECONDS = 1.0


def _split(keys: list[SigningKey]) -> tuple[SigningKey | None, list[SigningKey]]:
    active = [key for key in keys if key.retired_at is None]
    if len(active) > 1:
        raise StorageError(
            f"the store holds {len(active)} active signing keys; there can be only one"
        )
    return (active[0] if active else None), [key for key in keys if key.retired_at is not None]


@dataclass(frozen=True)
class Assurance:
    token: str
    """Compact JWS (header.payload.signature, base64url without padding)."""
    jti: str
    expires_at: datetime


class AssuranceIssuer:
    """Signs assurances with the keyring's active key, under the keyring's policy (one source
    for the lifetime, which also decides how long retired keys stay published)."""

    def __init__(self, keyring: SigningKeyring) -> None:
        self._keyring = keyring

    def issue(
        self, *, agent_id: str, shift_id: str, device_id: str, audience: str, now: datetime
    ) -> Assurance:
        """Raises InvalidRequestError when an identifier is empty, StorageError when a due key
        rotation cannot be saved."""
        for field, value in (
            ("agent_id", agent_id),
            ("shift_id", shift_id),
            ("device_id", device_id),
            ("audience", audience),
        ):
            if not value:
                raise InvalidRequestError(f"an assurance needs a {field}", field=field)
        key = self._keyring.refresh(now)
        policy = self._keyring.policy
        issued_at = int(now.timestamp())
        expires_at = issued_at + int(policy.token_lifetime.total_seconds())
        jti = _b64url(secrets.token_bytes(16))
        claims: dict[str, Any] = {
            "iss": policy.issuer,
            "sub": agent_id,
            "aud": audience,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_at,
            "jti": jti,
            "sid": shift_id,
            "amr": [VOICE_METHOD],
            "voxauth_device_id": device_id,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
        )
        return Assurance(
            token=token,
            jti=jti,
            expires_at=datetime.fromtimestamp(expires_at, UTC),
        )


def jwks_document(keyring: SigningKeyring, now: datetime) -> JwksDocument:
    """The public keys a verifier needs now, as a JWKS document. Never any private part."""
    return {"keys": [key.public_jwk() for key in keyring.published_keys(now)]}


def _public_members(private_key: Ed25519PrivateKey) -> Jwk:
    """The public key's JWK members (RFC 8037 §2: kty, crv, x), as PyJWT writes them."""
    members: dict[str, str] = jwt.algorithms.OKPAlgorithm.to_jwk(
        private_key.public_key(), as_dict=True
    )
    return {name: members[name] for name in ("kty", "crv", "x")}


def _thumbprint(private_key: Ed25519PrivateKey) -> str:
    # RFC 7638: the required members only, sorted, no whitespace (PyJWT has no thumbprint).
    return _b64url(hashlib.sha256(_canonical_json(_public_members(private_key))).digest())


def _canonical_json(value: Mapping[str, object]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


MAX_TOKEN_CHARS = 8192
"""Longer strings are not assurances (voxauth's are under 1,000 characters): refused unread."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
# Seconds since the epoch that datetime can hold on every platform (years 1970 to 9999).
_LATEST_SECONDS = 253_402_300_799


class InactiveReason(enum.Enum):
    """Why a token is not an assurance that stands now, in the order they are checked."""

    MALFORMED = "malformed"
    SIGNATURE_INVALID = "signature invalid"
    NOT_YET_VALID = "not yet valid"
    EXPIRED = "expired"
    REVOKED_SHIFT_ENDED = "revoked: shift ended"
    REVOKED_SHIFT_LOCKED = "revoked: shift locked"
    SHIFT_ERASED = "shift erased"


@dataclass(frozen=True)
class AssuranceClaims:
    """What a verified assurance says, under this service's names (JWT claims in brackets)."""

    issuer: str  # iss
    agent_id: str  # sub
    audience: str  # aud
    token_id: str  # jti
    shift_id: str  # sid
    issued_at: datetime  # iat
    not_before: datetime  # nbf
    expires_at: datetime  # exp


class AssuranceVerifier:
    """Tells whether a token is an assurance signed with one of the keyring's published keys,
    under its issuer, and valid at a given time. Any string may be asked about: the answer is
    a reason, never an exception. Revocation is not its business (see AssuranceDesk)."""

    def __init__(self, keyring: SigningKeyring) -> None:
        self._keyring = keyring

    def verify(self, token: str, now: datetime) -> AssuranceClaims | InactiveReason:
        header = _header(token)
        if header is None:
            return InactiveReason.MALFORMED
        kid, alg = header.get("kid"), header.get("alg")
        if not isinstance(kid, str) or not isinstance(alg, str):
            return InactiveReason.MALFORMED
        # The algorithm is ours to choose, never the token's: anything but EdDSA (none, HS256
        # with a public key as secret, ...) is refused before a key is looked at.
        key = self._key(kid, now)
        if alg != ALGORITHM or key is None:
            return InactiveReason.SIGNATURE_INVALID
        try:
            claims = jwt.decode(
                token,
                key.private_key.public_key(),
                algorithms=[ALGORITHM],
                # Presence here; types, issuer and times below, against the service's clock
                # rather than PyJWT's reading of the system's.
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            return InactiveReason.SIGNATURE_INVALID
        except (jwt.InvalidTokenError, RecursionError):
            return InactiveReason.MALFORMED
        verified = _claims(claims)
        if verified is None:
            return InactiveReason.MALFORMED
        if verified.issuer != self._keyring.policy.issuer:
            return InactiveReason.SIGNATURE_INVALID
        if now < verified.not_before:
            return InactiveReason.NOT_YET_VALID
        if now >= verified.expires_at:
            return InactiveReason.EXPIRED
        return verified

    def _key(self, kid: str, now: datetime) -> SigningKey | None:
        # A key another replica rotated to may be newer than this replica's copy.
        if not self._keyring.knows(kid, now):
            return None
        return next((k for k in self._keyring.published_keys(now) if k.kid == kid), None)


_REQUIRED_CLAIMS = ("iss", "sub", "aud", "jti", "sid", "iat", "nbf", "exp")


def _header(token: str) -> dict[str, Any] | None:
    """The header of what looks like a compact JWS; None if it is not one. Stricter than
    PyJWT, whose base64 decoding skips characters outside the alphabet: a token must be
    three segments of base64url and of bounded length before PyJWT reads it."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    segments = token.split(".")
    if len(segments) != 3 or not all(_SEGMENT.fullmatch(segment) for segment in segments):
        return None
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except (jwt.InvalidTokenError, RecursionError):
        return None
    return header


def _claims(claims: dict[str, Any]) -> AssuranceClaims | None:
    """The registered claims every assurance carries, typed; None if one is missing or of the
    wrong type."""
    issuer, agent_id, audience, token_id, shift_id = (
        _text_claim(claims, name) for name in ("iss", "sub", "aud", "jti", "sid")
    )
    issued_at, not_before, expires_at = (
        _time_claim(claims, name) for name in ("iat", "nbf", "exp")
    )
    if (
        issuer is None
        or agent_id is None
        or audience is None
        or token_id is None
        or shift_id is None
        or issued_at is None
        or not_before is None
        or expires_at is None
    ):
        return None
    return AssuranceClaims(
        issuer=issuer,
        agent_id=agent_id,
        audience=audience,
        token_id=token_id,
        shift_id=shift_id,
        issued_at=issued_at,
        not_before=not_before,
        expires_at=expires_at,
    )


def _text_claim(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


def _time_claim(claims: dict[str, Any], name: str) -> datetime | None:
    value = claims.get(name)
    # bool is an int in Python, but not a NumericDate; voxauth writes whole seconds.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not 0 <= value <= _LATEST_SECONDS:
        return None
    return datetime.fromtimestamp(value, UTC)
