"""Signing keys shared by replicas (issue 15, point 2): one rotates, all follow; a rotation
due on several at once happens once; tokens from every replica verify from one JWKS, fetched
from any of them. Each replica is a SigningKeyring and an AssuranceDesk on its own connection
to one store (SQLite file or the tests' PostgreSQL); the MFA provider's side is PyJWT."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from server.records import AgentRecord, ShiftRecord, ShiftState
from server.security.assurance_desk import AssuranceDesk
from server.security.assurances import AssurancePolicy, SigningKeyCipher, SigningKeyring
from server.security.crypto import VoiceprintCipher
from server.storage.databases import open_store
from server.storage.secure_store import SecureStore
from tests.clock import ManualClock
from tests.postgres import PostgresServer

KEY = bytes(range(32))
AUDIENCE = "mfa.example.com"
POLICY = AssurancePolicy(issuer="voxauth", token_lifetime=timedelta(hours=8))


class Replica:
    def __init__(self, location: str | Path, clock: ManualClock) -> None:
        self.clock = clock
        self.store: SecureStore = open_store(location, VoiceprintCipher(KEY))
        self.keyring = SigningKeyring.load(self.store, SigningKeyCipher(KEY), POLICY, clock.now())
        self.desk = AssuranceDesk(self.store, self.keyring, AUDIENCE, clock)

    def token(self, shift_id: str) -> str:
        now = self.clock.now()
        record = ShiftRecord(shift_id, "agent-1", "phone-1", ShiftState.VERIFIED, now, now)
        self.store.create_shift(record)
        return self.desk.issue(record).token


def provider_accepts(jwks_json: str, token: str, leeway: timedelta = timedelta(0)) -> bool:
    keys = jwt.PyJWKSet.from_json(jwks_json)
    kid = jwt.get_unverified_header(token)["kid"]
    if kid not in {key.key_id for key in keys.keys}:
        return False
    jwt.decode(
        token, keys[kid], algorithms=["EdDSA"], audience=AUDIENCE, issuer="voxauth", leeway=leeway
    )
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    if request.param == "sqlite":
        return tmp_path / "voxauth.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def clock() -> ManualClock:
    # PyJWT judges exp by the real clock.
    return ManualClock(start=datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def replicas(database: str | Path, clock: ManualClock) -> Iterator[list[Replica]]:
    first = open_store(database, VoiceprintCipher(KEY))
    first.create_agent(AgentRecord("agent-1", "Agent 1", "HR-1", clock.now()))
    first.close()
    started: list[Replica] = []

    def start() -> None:
        replica = Replica(database, clock)
        with lock:
            started.append(replica)

    # Three replicas start together on an empty keyring: one key is made, all adopt it.
    lock = threading.Lock()
    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    yield started
    for replica in started:
        replica.store.close()


def test_replicas_that_start_together_share_one_key(replicas: list[Replica]) -> None:
    kids = {replica.keyring.published_keys(replica.clock.now())[0].kid for replica in replicas}
    assert len(kids) == 1
    assert len(replicas[0].store.load_signing_keys()) == 1


def test_one_replica_rotates_and_every_replica_follows(replicas: list[Replica]) -> None:
    one, two, three = replicas
    before = two.token("before")
    new_kid = one.desk.rotate()
    after = one.token("after")
    # Replica two has not looked at the store since: a token with a key id it does not know
    # makes it look, so the token verifies there at once.
    assert two.desk.introspect(after).active
    assert two.desk.introspect(before).active
    # Replica three follows on its next sync; its JWKS then verifies every replica's tokens.
    three.keyring.sync()
    jwks = three.desk.jwks_json()
    assert json.loads(jwks)["keys"][0]["kid"] == new_kid
    for token in (before, after, two.token("two-after")):
        assert provider_accepts(jwks, token)
    assert provider_accepts(one.desk.jwks_json(), before)


def test_a_rotation_due_on_every_replica_at_once_happens_once(
    replicas: list[Replica], clock: ManualClock
) -> None:
    later = POLICY.key_rotation_interval + timedelta(seconds=1)
    clock.advance(later.total_seconds())
    tokens: dict[str, str] = {}
    lock = threading.Lock()

    def issue(n: int, replica: Replica) -> None:
        token = replica.token(f"due-{n}")
        with lock:
            tokens[f"due-{n}"] = token

    threads = [threading.Thread(target=issue, args=pair) for pair in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kids = {jwt.get_unverified_header(token)["kid"] for token in tokens.values()}
    assert len(kids) == 1  # one new key, signing on all three
    stored = replicas[0].store.load_signing_keys()
    assert len([key for key in stored if key.retired_at is None]) == 1
    assert len(stored) == 2  # the new key and the one it retired
    for replica in replicas:
        replica.keyring.sync()
        jwks = replica.desk.jwks_json()
        # (PyJWT reads the real clock, which the test clock is ahead of.)
        assert all(provider_accepts(jwks, token, leeway=later) for token in tokens.values())


def test_made_up_key_ids_cost_at_most_one_store_read_a_second(
    replicas: list[Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    one = replicas[0]
    reads: list[int] = []
    load = one.store.load_signing_keys

    def counted() -> list[object]:
        reads.append(1)
        return load()  # type: ignore[return-value]

    monkeypatch.setattr(one.store, "load_signing_keys", counted)
    for n in range(50):
        assert not one.keyring.knows(f"made-up-{n}", one.clock.now())
    assert len(reads) == 1
