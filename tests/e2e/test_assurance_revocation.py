"""The MFA provider learns that an assurance no longer stands (issue 10, item 4): ending or
locking a shift revokes its assurance, GetAssurance says so, and IntrospectAssurance answers
for any token. Against the real server over mutual TLS, the provider checking offline with
PyJWT as in tests/e2e/test_security.py."""

from __future__ import annotations

import json
import queue
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import grpc
import jwt
import pytest
from voxauth.v1 import assurances_pb2 as apb
from voxauth.v1 import assurances_pb2_grpc as apb_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc

from server.security.certificates import DevelopmentPki, create_pki
from server.security.crypto import VoiceprintCipher
from server.security.identity import Role
from server.storage.databases import open_store
from tests.clock import ManualClock
from tests.softphone import POLICY, ShiftStream
from tests.support import (
    KEY,
    OTHER_1,
    SPEAKER_A,
    RunningServer,
    as_role,
    first_half,
    second_half,
    speech,
    split,
    tls_config,
    wav_audio,
)


@pytest.fixture
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_secure(
    start_server: Callable[..., RunningServer],
    tmp_path_factory: pytest.TempPathFactory,
    pki: DevelopmentPki,
) -> Callable[[], RunningServer]:
    """Starts the server (again, on the same database, for a restart)."""
    config = replace(tls_config(tmp_path_factory.mktemp("server"), pki), shifts=POLICY)
    # Real time for the clock's wall part: PyJWT checks exp against the real clock.
    clock = ManualClock(start=datetime.now(UTC))
    return lambda: start_server(config, clock=clock, credentials=as_role(pki, Role.HR))


class Provider:
    """The MFA provider's two views: offline with the JWKS, online with introspection."""

    def __init__(self, server: RunningServer, pki: DevelopmentPki) -> None:
        self._jwks_url = f"http://127.0.0.1:{server.server.jwks_port}/.well-known/jwks.json"
        channel = grpc.secure_channel(f"127.0.0.1:{server.port}", as_role(pki, Role.MFA))
        self.assurances = apb_grpc.AssuranceServiceStub(channel)
        self.shifts = spb_grpc.ShiftServiceStub(channel)

    def verifies_offline(self, token: str) -> bool:
        with urllib.request.urlopen(self._jwks_url, timeout=10) as response:
            keys = jwt.PyJWKSet.from_dict(json.load(response))
        key = keys[jwt.get_unverified_header(token)["kid"]]
        jwt.decode(token, key.key, algorithms=["EdDSA"], audience="mfa", issuer="voxauth")
        return True

    def introspect(self, token: str) -> apb.AssuranceIntrospection:
        return self.assurances.IntrospectAssurance(apb.IntrospectAssuranceRequest(token=token))

    def get_assurance_refusal(self, shift_id: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as refused:
            self.assurances.GetAssurance(apb.GetAssuranceRequest(shift_id=shift_id))
        return refused.value


def softphone(server: RunningServer, pki: DevelopmentPki) -> spb_grpc.ShiftServiceStub:
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", as_role(pki, Role.SOFTPHONE))
    return spb_grpc.ShiftServiceStub(channel)


def start_shift(server: RunningServer, pki: DevelopmentPki) -> spb.LoginCheckResponse:
    server.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    started = softphone(server, pki).StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a",
            device_id="softphone-1",
            login_audio=wav_audio(second_half(SPEAKER_A)),
        )
    )
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED
    return started


def test_an_ended_shifts_assurance_is_revoked_and_stays_so_after_a_restart(
    start_secure: Callable[[], RunningServer], pki: DevelopmentPki
) -> None:
    server = start_secure()
    started = start_shift(server, pki)
    token, shift_id = started.assurance, started.shift.shift_id
    provider = Provider(server, pki)

    active = provider.introspect(token)
    assert active.active
    assert active.inactive_reason == apb.INACTIVE_REASON_UNSPECIFIED
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (active.agent_id, active.shift_id, active.audience, active.token_id) == (
        claims["sub"],
        claims["sid"],
        claims["aud"],
        claims["jti"],
    )
    assert active.issued_at.seconds == claims["iat"]
    assert active.expires_at.seconds == claims["exp"]

    softphone(server, pki).EndShift(spb.EndShiftRequest(shift_id=shift_id))

    # Offline, nothing has changed: the token still verifies for its 8 hours.
    assert provider.verifies_offline(token)
    revoked = provider.introspect(token)
    assert not revoked.active
    assert revoked.inactive_reason == apb.INACTIVE_REASON_REVOKED_SHIFT_ENDED
    assert revoked.HasField("revoked_at")
    assert (revoked.agent_id, revoked.token_id) == ("", "")  # an inactive token says only why
    refused = provider.get_assurance_refusal(shift_id)
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.details() or "").endswith("revoked: shift ended")

    server.stop()
    store = open_store(server.config.database_path, VoiceprintCipher(KEY))
    try:
        (audited,) = [e for e in store.audit_events() if e.action == "assurance.revoke"]
    finally:
        store.close()
    assert audited.outcome == "REVOKED"
    assert audited.details == {
        "shift_id": shift_id,
        "token_id": claims["jti"],
        "reason": "shift ended",
    }

    restarted = Provider(start_secure(), pki)
    assert restarted.introspect(token).inactive_reason == apb.INACTIVE_REASON_REVOKED_SHIFT_ENDED
    assert restarted.get_assurance_refusal(shift_id).code() is grpc.StatusCode.FAILED_PRECONDITION


def test_a_locked_shifts_assurance_is_revoked_when_the_event_arrives_until_a_login_check(
    start_secure: Callable[[], RunningServer], pki: DevelopmentPki
) -> None:
    server = start_secure()
    started = start_shift(server, pki)
    token, shift_id = started.assurance, started.shift.shift_id
    provider = Provider(server, pki)
    subscription = provider.shifts.SubscribeShiftEvents(
        spb.SubscribeShiftEventsRequest(agent_id="agent-a")
    )
    # What the provider sees at the moment each event arrives.
    seen: queue.Queue[tuple[int, apb.AssuranceIntrospection]] = queue.Queue()

    def listen() -> None:
        try:
            for event in subscription:
                seen.put((event.kind, provider.introspect(token)))
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.CANCELLED

    threading.Thread(target=listen, daemon=True).start()
    stream = ShiftStream(softphone(server, pki), shift_id)
    stream.next_event()
    for impostor in (OTHER_1, OTHER_1):
        stream.send(speech(impostor))
        server.advance(100)
        assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED

    kinds_and_answers = [seen.get(timeout=60) for _ in range(3)]
    assert [kind for kind, _ in kinds_and_answers] == [
        spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
        spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
        spb.SHIFT_EVENT_KIND_SHIFT_LOCKED,
    ]
    first_failure, _, locked = (answer for _, answer in kinds_and_answers)
    assert first_failure.active  # one failed checkpoint does not lock
    assert locked.inactive_reason == apb.INACTIVE_REASON_REVOKED_SHIFT_LOCKED
    refused = provider.get_assurance_refusal(shift_id)
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.details() or "").endswith("revoked: shift locked")

    # The agent passes a new login check: a fresh assurance, while the old token stays revoked.
    relogin = softphone(server, pki).CheckLogin(
        spb.CheckLoginRequest(shift_id=shift_id, login_audio=wav_audio(second_half(SPEAKER_A)))
    )
    assert relogin.shift.state == spb.SHIFT_STATE_VERIFIED
    assert relogin.assurance and relogin.assurance != token
    assert provider.introspect(relogin.assurance).active
    assert provider.introspect(token).inactive_reason == apb.INACTIVE_REASON_REVOKED_SHIFT_LOCKED
    fetched = provider.assurances.GetAssurance(apb.GetAssuranceRequest(shift_id=shift_id))
    assert fetched.token == relogin.assurance
    subscription.cancel()
    stream.close()


def test_introspection_answers_inactive_for_tokens_that_do_not_stand(
    start_secure: Callable[[], RunningServer], pki: DevelopmentPki
) -> None:
    server = start_secure()
    token = start_shift(server, pki).assurance
    provider = Provider(server, pki)

    # Garbage of every kind is inactive, never an error that could say more.
    for garbage in ("", "hello", "a.b.c", "x" * 1_000_000, token + "x", token[:-3]):
        answer = provider.introspect(garbage)
        assert not answer.active
        assert answer.inactive_reason in (
            apb.INACTIVE_REASON_MALFORMED,
            apb.INACTIVE_REASON_SIGNATURE_INVALID,
        )
    assert provider.introspect("x" * 1_000_000).inactive_reason == apb.INACTIVE_REASON_MALFORMED

    # Past its exp by voxauth's clock.
    server.advance(8 * 3600)
    assert provider.introspect(token).inactive_reason == apb.INACTIVE_REASON_EXPIRED
