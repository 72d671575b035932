"""Assurances from the MFA provider's side: it knows voxauth only by its JWKS document, and
verifies with PyJWT, an independent JWT library, as a real relying party would."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.errors import InvalidRequestError, StorageError
from server.security.assurances import (
    Assurance,
    AssuranceIssuer,
    AssurancePolicy,
    JwksDocument,
    MemorySigningKeyStore,
    SigningKey,
    SigningKeyCipher,
    SigningKeyring,
    jwks_document,
)
from tests.clock import ManualClock

SERVICE_KEY = bytes(range(32))
AUDIENCE = "mfa.example.com"
POLICY = AssurancePolicy(
    issuer="voxauth",
    token_lifetime=timedelta(hours=8),
    clock_skew=timedelta(minutes=5),
    key_rotation_interval=timedelta(days=30),
)
KEPT_AFTER_ROTATION = POLICY.token_lifetime + POLICY.clock_skew


def issuer_clock(offset: timedelta = timedelta(0)) -> ManualClock:
    """voxauth's wall clock, moved by the test. PyJWT judges `exp` by the real clock (it takes
    no clock), so this one starts at a chosen offset from real time: an assurance issued 9 h
    ago is expired for the provider too."""
    return ManualClock(start=datetime.now(UTC).replace(microsecond=0) + offset)


class MfaProvider:
    """The relying party: voxauth's JWKS document, voxauth's issuer name, its own audience."""

    def __init__(self, jwks: JwksDocument, audience: str = AUDIENCE) -> None:
        # Through JSON, as the document travels: it must be plain public data.
        self._keys = jwt.PyJWKSet.from_json(json.dumps(jwks))
        self._audience = audience

    def verify(self, token: str) -> dict[str, Any]:
        kid = kid_of(token)
        try:
            key = self._keys[kid]
        except KeyError:
            raise jwt.InvalidTokenError(f"no published key has kid {kid}") from None
        return jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            audience=self._audience,
            issuer="voxauth",
            options={"require": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"]},
        )


def issue(issuer: AssuranceIssuer, clock: ManualClock, audience: str = AUDIENCE) -> Assurance:
    return issuer.issue(
        agent_id="agent-042",
        shift_id="shift-7",
        device_id="softphone-3",
        audience=audience,
        now=clock.now(),
    )


def load_keyring(clock: ManualClock, store: MemorySigningKeyStore | None = None) -> SigningKeyring:
    return SigningKeyring.load(
        store or MemorySigningKeyStore(), SigningKeyCipher(SERVICE_KEY), POLICY, clock.now()
    )


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def published_kids(keyring: SigningKeyring, clock: ManualClock) -> list[str]:
    return [key["kid"] for key in jwks_document(keyring, clock.now())["keys"]]


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_valid_assurance_verifies_and_carries_every_claim() -> None:
    clock = issuer_clock()
    keyring = load_keyring(clock)
    assurance = issue(AssuranceIssuer(keyring), clock)
    jwks = jwks_document(keyring, clock.now())

    claims = MfaProvider(jwks).verify(assurance.token)

    issued_at = int(clock.now().timestamp())
    assert claims == {
        "iss": "voxauth",
        "sub": "agent-042",
        "aud": AUDIENCE,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + 8 * 3600,
        "jti": assurance.jti,
        "sid": "shift-7",
        "amr": ["voice"],
        "voxauth_device_id": "softphone-3",
    }
    assert assurance.expires_at == clock.now() + timedelta(hours=8)
    assert jwt.get_unverified_header(assurance.token) == {
        "alg": "EdDSA",
        "typ": "JWT",
        "kid": jwks["keys"][0]["kid"],
    }
    assert len(b64url_decode(assurance.jti)) == 16
    assert issue(AssuranceIssuer(keyring), clock).jti != assurance.jti


def test_the_jwks_holds_only_public_ed25519_keys() -> None:
    clock = issuer_clock()
    keyring = load_keyring(clock)

    (key,) = jwks_document(keyring, clock.now())["keys"]

    assert set(key) == {"kty", "crv", "x", "kid", "use", "alg"}
    assert (key["kty"], key["crv"], key["use"], key["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")


def test_the_kid_is_the_rfc_7638_thumbprint() -> None:
    # The key and thumbprint of RFC 8037, appendix A.1 and A.3.
    private_key = Ed25519PrivateKey.from_private_bytes(
        b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    )

    key = SigningKey.from_private_key(private_key, created_at=datetime.now(UTC))

    assert key.public_jwk()["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert key.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_a_forged_assurance_is_rejected() -> None:
    clock = issuer_clock()
    keyring = load_keyring(clock)
    token = issue(AssuranceIssuer(keyring), clock).token
    provider = MfaProvider(jwks_document(keyring, clock.now()))
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))

    other_agent = b64url_encode(json.dumps({**claims, "sub": "agent-999"}).encode())
    with pytest.raises(jwt.InvalidSignatureError):
        provider.verify(f"{header}.{other_agent}.{signature}")

    impostor_key = Ed25519PrivateKey.generate()
    same_kid = jwt.encode(claims, impostor_key, algorithm="EdDSA", headers={"kid": kid_of(token)})
    with pytest.raises(jwt.InvalidSignatureError):
        provider.verify(same_kid)

    unsigned_header = {"alg": "none", "typ": "JWT", "kid": kid_of(token)}
    unsigned = f"{b64url_encode(json.dumps(unsigned_header).encode())}.{payload}."
    with pytest.raises(jwt.InvalidAlgorithmError):
        provider.verify(unsigned)


def test_an_expired_assurance_is_rejected() -> None:
    clock = issuer_clock(offset=-(POLICY.token_lifetime + timedelta(seconds=1)))
    keyring = load_keyring(clock)
    assurance = issue(AssuranceIssuer(keyring), clock)

    with pytest.raises(jwt.ExpiredSignatureError):
        MfaProvider(jwks_document(keyring, clock.now())).verify(assurance.token)


def test_an_assurance_for_another_audience_is_rejected() -> None:
    clock = issuer_clock()
    keyring = load_keyring(clock)
    assurance = issue(AssuranceIssuer(keyring), clock, audience="another-provider")

    with pytest.raises(jwt.InvalidAudienceError):
        MfaProvider(jwks_document(keyring, clock.now())).verify(assurance.token)


def test_an_assurance_needs_an_audience() -> None:
    clock = issuer_clock()

    with pytest.raises(InvalidRequestError) as raised:
        issue(AssuranceIssuer(load_keyring(clock)), clock, audience="")

    assert raised.value.field == "audience"


def test_rotation_keeps_earlier_assurances_valid_until_they_expire() -> None:
    # Seven hours ago an assurance was issued; four hours ago the key rotated.
    clock = issuer_clock(offset=-timedelta(hours=7))
    store = MemorySigningKeyStore()
    keyring = load_keyring(clock, store)
    issuer = AssuranceIssuer(keyring)
    before = issue(issuer, clock)
    clock.advance(timedelta(hours=3))
    last_of_old_key = issue(issuer, clock)
    keyring.rotate(clock.now())
    rotated_at = clock.now()
    clock.advance(timedelta(hours=4))

    after = issue(issuer, clock)
    provider = MfaProvider(jwks_document(keyring, clock.now()))

    old_kid, new_kid = kid_of(before.token), kid_of(after.token)
    assert old_kid != new_kid
    assert published_kids(keyring, clock) == [new_kid, old_kid]
    assert provider.verify(before.token)["jti"] == before.jti
    assert provider.verify(after.token)["jti"] == after.jti

    # The old key stays published until the last token it signed has expired (plus the skew
    # allowance), and then disappears from the JWKS and the store.
    assert last_of_old_key.expires_at + POLICY.clock_skew == rotated_at + KEPT_AFTER_ROTATION
    clock.advance(rotated_at + KEPT_AFTER_ROTATION - clock.now() - timedelta(seconds=1))
    assert published_kids(keyring, clock) == [new_kid, old_kid]
    clock.advance(timedelta(seconds=1))
    assert published_kids(keyring, clock) == [new_kid]
    with pytest.raises(jwt.InvalidTokenError, match="no published key"):
        MfaProvider(jwks_document(keyring, clock.now())).verify(before.token)
    keyring.refresh(clock.now())
    assert [stored.kid for stored in store.load_signing_keys()] == [new_kid]


def test_the_active_key_rotates_when_it_reaches_the_rotation_interval() -> None:
    clock = issuer_clock()
    keyring = load_keyring(clock)
    issuer = AssuranceIssuer(keyring)
    first_kid = kid_of(issue(issuer, clock).token)

    clock.advance(POLICY.key_rotation_interval - timedelta(seconds=1))
    assert kid_of(issue(issuer, clock).token) == first_kid
    clock.advance(timedelta(seconds=1))
    second_kid = kid_of(issue(issuer, clock).token)

    assert second_kid != first_kid
    assert published_kids(keyring, clock) == [second_kid, first_kid]


def test_keys_survive_a_restart_sealed() -> None:
    clock = issuer_clock(offset=-timedelta(hours=1))
    store = MemorySigningKeyStore()
    keyring = load_keyring(clock, store)
    before = issue(AssuranceIssuer(keyring), clock)
    keyring.rotate(clock.now())
    clock.advance(timedelta(hours=1))

    restarted = load_keyring(clock, store)

    assert published_kids(restarted, clock) == published_kids(keyring, clock)
    after = issue(AssuranceIssuer(restarted), clock)
    assert kid_of(after.token) == keyring.published_keys(clock.now())[0].kid
    provider = MfaProvider(jwks_document(restarted, clock.now()))
    assert provider.verify(before.token)["jti"] == before.jti
    assert provider.verify(after.token)["jti"] == after.jti
    sealed = {stored.kid: stored.sealed_private_key for stored in store.load_signing_keys()}
    assert list(sealed) == published_kids(keyring, clock)
    for key in keyring.published_keys(clock.now()):
        assert key.private_key.private_bytes_raw() not in sealed[key.kid]


def test_sealed_keys_do_not_open_with_another_service_key_or_under_another_kid() -> None:
    clock = issuer_clock()
    store = MemorySigningKeyStore()
    load_keyring(clock, store)
    (stored,) = store.load_signing_keys()

    with pytest.raises(StorageError, match="wrong VOXAUTH_KEY"):
        SigningKeyCipher(bytes(32)).open(stored)
    with pytest.raises(StorageError, match="failed authentication"):
        SigningKeyCipher(SERVICE_KEY).open(replace(stored, kid="another-kid"))
