"""A shift that ends or locks revokes its assurance, and introspection (RFC 7662 in spirit)
tells the MFA provider whether a token stands and why not (issue 10, item 4). The desk runs on
the real SQLite store, so revocation is shown to survive a restart; the provider's side checks
tokens with PyJWT, an independent JWT library."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from server.errors import (
    AgentNotFoundError,
    AssuranceNotFoundError,
    AssuranceRevokedError,
    InvalidRequestError,
)
from server.security.assurance_desk import AssuranceDesk, Introspection
from server.security.assurances import (
    AssuranceIssuer,
    AssurancePolicy,
    InactiveReason,
    MemorySigningKeyStore,
    SigningKeyCipher,
    SigningKeyring,
)
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, RevocationReason, ShiftRecord, ShiftState
from server.storage.sqlite import open_store
from server.storage.sqlite.schema import MIGRATIONS
from tests.clock import ManualClock

KEY = bytes(range(32))
AUDIENCE = "mfa.example.com"
POLICY = AssurancePolicy(issuer="voxauth", token_lifetime=timedelta(hours=8))
SHIFT_ID = "Wq3mZ9-shift_7"


class Service:
    """voxauth's side: the store, the keyring and the desk, as the server builds them."""

    def __init__(self, path: Path, clock: ManualClock) -> None:
        self.clock = clock
        self.store = open_store(path, VoiceprintCipher(KEY))
        self.keyring = SigningKeyring.load(self.store, SigningKeyCipher(KEY), POLICY, clock.now())
        self.desk = AssuranceDesk(self.store, self.keyring, AUDIENCE, clock)

    def jwks(self) -> jwt.PyJWKSet:
        return jwt.PyJWKSet.from_json(json.dumps(self.desk.jwks()))


@pytest.fixture
def clock() -> ManualClock:
    # PyJWT judges exp by the real clock: start voxauth's at real time.
    return ManualClock(start=datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def service(tmp_path: Path, clock: ManualClock) -> Iterator[Service]:
    running = Service(tmp_path / "voxauth.db", clock)
    yield running
    running.store.close()


def shift_of(service: Service, shift_id: str = SHIFT_ID) -> ShiftRecord:
    """A verified shift of agent-042 (created with its first shift), as the store keeps it."""
    now = service.clock.now()
    try:
        service.store.get_agent("agent-042")
    except AgentNotFoundError:
        service.store.create_agent(AgentRecord("agent-042", "Agent 42", "HR-1", now))
    record = ShiftRecord(shift_id, "agent-042", "softphone-3", ShiftState.VERIFIED, now, now)
    service.store.create_shift(record)
    return record


def signed_by(keyring: SigningKeyring, now: datetime) -> str:
    """An assurance for agent-042's shift, signed with `keyring`'s key under its issuer."""
    return (
        AssuranceIssuer(keyring)
        .issue(
            agent_id="agent-042",
            shift_id=SHIFT_ID,
            device_id="softphone-3",
            audience=AUDIENCE,
            now=now,
        )
        .token
    )


def provider_accepts(service: Service, token: str) -> bool:
    """What an MFA provider verifying offline concludes: signature, audience, issuer, time."""
    key = service.jwks()[jwt.get_unverified_header(token)["kid"]]
    try:
        jwt.decode(token, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer="voxauth")
    except jwt.InvalidTokenError:
        return False
    return True


def inactive(found: Introspection) -> InactiveReason | None:
    assert found.active == (found.claims is not None)
    return found.inactive_reason


def test_a_valid_assurance_is_active_with_the_claims_a_relying_party_needs(
    service: Service,
) -> None:
    issued = service.desk.issue(shift_of(service))
    found = service.desk.introspect(issued.token)
    assert found.active
    assert found.claims is not None
    assert found.claims.agent_id == "agent-042"
    assert found.claims.shift_id == SHIFT_ID
    assert found.claims.audience == AUDIENCE
    assert found.claims.token_id == issued.token_id
    assert found.claims.issued_at == service.clock.now()
    assert found.claims.expires_at == issued.expires_at
    # The same claims an offline verifier reads.
    decoded = jwt.decode(
        issued.token,
        service.jwks()[jwt.get_unverified_header(issued.token)["kid"]],
        algorithms=["EdDSA"],
        audience=AUDIENCE,
    )
    assert (decoded["sub"], decoded["sid"], decoded["jti"]) == (
        "agent-042",
        SHIFT_ID,
        issued.token_id,
    )
    assert decoded["exp"] == int(found.claims.expires_at.timestamp())
    assert service.desk.latest(SHIFT_ID) == issued


def test_an_ended_shift_revokes_its_assurance(service: Service) -> None:
    issued = service.desk.issue(shift_of(service))
    service.clock.advance(60)

    revocation = service.desk.revoke(SHIFT_ID, RevocationReason.SHIFT_ENDED)
    assert revocation is not None
    assert revocation.token_id == issued.token_id

    # Offline the token still verifies: only introspection can tell the provider.
    assert provider_accepts(service, issued.token)
    found = service.desk.introspect(issued.token)
    assert inactive(found) is InactiveReason.REVOKED_SHIFT_ENDED
    assert found.claims is None
    assert found.revocation is not None and found.revocation.revoked_at == service.clock.now()
    with pytest.raises(AssuranceRevokedError) as refused:
        service.desk.latest(SHIFT_ID)
    assert refused.value.message.endswith("revoked: shift ended")
    # The first revocation stands; a second one changes nothing.
    assert service.desk.revoke(SHIFT_ID, RevocationReason.SHIFT_LOCKED) is None
    assert inactive(service.desk.introspect(issued.token)) is InactiveReason.REVOKED_SHIFT_ENDED


def test_a_locked_shift_revokes_its_assurance_until_a_new_login_check_issues_another(
    service: Service,
) -> None:
    shift = shift_of(service)
    before_lock = service.desk.issue(shift)
    service.desk.revoke(SHIFT_ID, RevocationReason.SHIFT_LOCKED)
    with pytest.raises(AssuranceRevokedError, match=r"revoked: shift locked$"):
        service.desk.latest(SHIFT_ID)
    assert inactive(service.desk.introspect(before_lock.token)) is (
        InactiveReason.REVOKED_SHIFT_LOCKED
    )

    # The passing login check that unlocks the shift, at the same instant.
    after_unlock = service.desk.issue(shift)
    assert service.desk.latest(SHIFT_ID) == after_unlock
    assert service.desk.introspect(after_unlock.token).active
    # The token from before the lock stays refused, for its own reason.
    assert inactive(service.desk.introspect(before_lock.token)) is (
        InactiveReason.REVOKED_SHIFT_LOCKED
    )


def test_a_newer_assurance_of_a_shift_leaves_the_earlier_one_standing(service: Service) -> None:
    # A second passing login check on a verified shift revokes nothing.
    shift = shift_of(service)
    first = service.desk.issue(shift)
    service.clock.advance(5)
    second = service.desk.issue(shift)
    assert service.desk.introspect(first.token).active
    assert service.desk.introspect(second.token).active
    # Ending the shift revokes the latest; the earlier stays as it was (it expires first).
    service.desk.revoke(SHIFT_ID, RevocationReason.SHIFT_ENDED)
    assert inactive(service.desk.introspect(second.token)) is InactiveReason.REVOKED_SHIFT_ENDED


def test_revocation_survives_a_restart(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "voxauth.db"
    first = Service(path, clock)
    issued = first.desk.issue(shift_of(first))
    first.desk.revoke(SHIFT_ID, RevocationReason.SHIFT_ENDED)
    first.store.close()

    restarted = Service(path, clock)
    try:
        assert inactive(restarted.desk.introspect(issued.token)) is (
            InactiveReason.REVOKED_SHIFT_ENDED
        )
        with pytest.raises(AssuranceRevokedError, match="shift ended"):
            restarted.desk.latest(SHIFT_ID)
    finally:
        restarted.store.close()


def test_an_expired_assurance_is_inactive_and_no_longer_served(service: Service) -> None:
    issued = service.desk.issue(shift_of(service))
    service.clock.advance(POLICY.token_lifetime - timedelta(seconds=1))
    assert service.desk.introspect(issued.token).active
    service.clock.advance(1)
    assert inactive(service.desk.introspect(issued.token)) is InactiveReason.EXPIRED
    with pytest.raises(AssuranceNotFoundError):
        service.desk.latest(SHIFT_ID)


def test_an_assurance_dated_in_the_future_is_not_yet_valid(service: Service) -> None:
    shift_of(service)
    early = signed_by(service.keyring, service.clock.now() + timedelta(minutes=10))
    assert inactive(service.desk.introspect(early)) is InactiveReason.NOT_YET_VALID


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


def decoded(segment: str) -> dict[str, object]:
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def encoded(value: dict[str, object]) -> str:
    return b64url(json.dumps(value).encode())


def test_a_token_signed_by_another_key_or_altered_or_of_another_issuer_is_inactive(
    service: Service,
) -> None:
    now = service.clock.now()
    genuine = service.desk.issue(shift_of(service)).token
    header, payload, signature = segments(genuine)

    another_service = SigningKeyring.load(
        MemorySigningKeyStore(), SigningKeyCipher(bytes(32)), POLICY, now
    )
    foreign = signed_by(another_service, now)
    assert inactive(service.desk.introspect(foreign)) is InactiveReason.SIGNATURE_INVALID
    # Our signature under the other service's header: its kid names no key published here.
    foreign_header = segments(foreign)[0]
    assert inactive(service.desk.introspect(f"{foreign_header}.{payload}.{signature}")) is (
        InactiveReason.SIGNATURE_INVALID
    )

    # Claims altered after signing: another agent.
    forged = f"{header}.{encoded({**decoded(payload), 'sub': 'boss'})}.{signature}"
    assert inactive(service.desk.introspect(forged)) is InactiveReason.SIGNATURE_INVALID

    # The token does not choose the algorithm: "none" without a signature, or HS256 keyed
    # with the public key, is refused.
    for alg in ("none", "HS256"):
        swapped = encoded({**decoded(header), "alg": alg})
        for tail in ("", signature):
            token = f"{swapped}.{payload}.{tail}"
            assert inactive(service.desk.introspect(token)) is InactiveReason.SIGNATURE_INVALID

    # Our very keys, but another issuer's name (or an earlier configuration's).
    renamed = SigningKeyring.load(
        service.store, SigningKeyCipher(KEY), AssurancePolicy(issuer="intruder"), now
    )
    assert inactive(service.desk.introspect(signed_by(renamed, now))) is (
        InactiveReason.SIGNATURE_INVALID
    )


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "....",
        "eyJhbGciOiJFZERTQSJ9.e30",
        # Valid base64url, but not JSON objects.
        f"{b64url(b'[1]')}.{b64url(b'{}')}.{b64url(bytes(64))}",
        f"{b64url(b'not json')}.{b64url(b'{}')}.{b64url(bytes(64))}",
        f"{b64url(bytes([0xFF, 0xFE]))}.{b64url(b'{}')}.{b64url(bytes(64))}",
        # Characters outside base64url, which a lenient decoder would skip.
        "eyJhbGciOiJFZERTQSJ9.e30.\x00\n\u202e",
        "eyJhbGciOiJFZERTQSJ9+.e30.AAAA",
        # A header without a kid.
        f"{b64url(json.dumps({'alg': 'EdDSA'}).encode())}.{b64url(b'{}')}.{b64url(bytes(64))}",
        # Deeply nested JSON, and a megabyte.
        f"{b64url(b'[' * 5000)}.{b64url(b'{}')}.AAAA",
        "x" * 1_000_000,
    ],
    ids=lambda token: repr(token[:24]),
)
def test_anything_that_is_not_a_compact_jws_is_inactive_as_malformed(
    service: Service, token: str
) -> None:
    assert inactive(service.desk.introspect(token)) is InactiveReason.MALFORMED


def test_a_token_signed_with_our_key_but_without_a_required_claim_is_malformed(
    service: Service,
) -> None:
    genuine = service.desk.issue(shift_of(service)).token
    key = service.keyring.published_keys(service.clock.now())[0]
    header, payload, _ = segments(genuine)
    claims = decoded(payload)
    without_sid = {name: value for name, value in claims.items() if name != "sid"}
    for broken in ({**claims, "exp": "tomorrow"}, {**claims, "iat": True}, without_sid):
        body = encoded(broken)
        signature = b64url(key.private_key.sign(f"{header}.{body}".encode()))
        token = f"{header}.{body}.{signature}"
        assert inactive(service.desk.introspect(token)) is InactiveReason.MALFORMED


def test_an_erased_agents_assurance_is_inactive(service: Service) -> None:
    issued = service.desk.issue(shift_of(service))
    service.store.delete_agent("agent-042")
    assert inactive(service.desk.introspect(issued.token)) is InactiveReason.SHIFT_ERASED


@pytest.mark.parametrize(
    "shift_id", ["", "shift\x00id", "shift\nid", "shift\u202eid", "s" * 65, "s" * 1_000_000]
)
def test_get_assurance_refuses_a_malformed_shift_id_without_repeating_it(
    service: Service, shift_id: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        service.desk.latest(shift_id)
    assert refused.value.field == "shift_id"
    assert shift_id not in refused.value.message or not shift_id
    assert len(refused.value.message) < 120


def test_an_upgrade_revokes_the_assurances_of_shifts_already_ended_or_locked(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "old.db"
    [mine] = [n for n, step in enumerate(MIGRATIONS) if "assurance_revocations" in step[0]]
    # Written by a voxauth without revocation: three shifts, each with its assurance.
    before = Service(path, clock)
    tokens = {
        shift_id: before.desk.issue(shift_of(before, shift_id)).token
        for shift_id in ("ended", "locked", "verified")
    }
    before.store.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE assurance_revocations")
        # And what the migrations after it add, which run again from that version.
        conn.execute("DROP TABLE completed_requests")
        conn.execute("DROP TABLE replay_fingerprints")
        conn.execute("DROP TABLE shift_leases")
        conn.execute("DROP TABLE shift_events")
        for table in ("passive_enrollments", "held_voiceprints", "watchlist"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute(f"PRAGMA user_version = {mine}")
        conn.execute("UPDATE shifts SET state = 'ENDED', ended_at = 1 WHERE shift_id = 'ended'")
        conn.execute("UPDATE shifts SET state = 'LOCKED' WHERE shift_id = 'locked'")

    upgraded = Service(path, clock)
    try:
        assert inactive(upgraded.desk.introspect(tokens["ended"])) is (
            InactiveReason.REVOKED_SHIFT_ENDED
        )
        assert inactive(upgraded.desk.introspect(tokens["locked"])) is (
            InactiveReason.REVOKED_SHIFT_LOCKED
        )
        assert upgraded.desk.introspect(tokens["verified"]).active
    finally:
        upgraded.store.close()
