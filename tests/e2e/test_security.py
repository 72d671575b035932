"""Security end to end: the real server behind mutual TLS, callers in their roles, and the
MFA provider's view: assurances verified offline from the JWKS, shift events as they happen."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt
import pytest
from voxauth.v1 import admin_pb2, admin_pb2_grpc, assurances_pb2, assurances_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.api.tls import channel_credentials
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
    http_get,
    https_context,
    second_half,
    speech,
    split,
    tls_config,
    wav_audio,
)


@pytest.fixture
def pki(tmp_path: Path) -> DevelopmentPki:
    return create_pki(tmp_path / "pki")


@pytest.fixture
def secure(
    start_server: Callable[..., RunningServer], tmp_path: Path, pki: DevelopmentPki
) -> RunningServer:
    # Real time for the clock's wall part: the MFA side checks exp against the real clock.
    return start_server(
        replace(tls_config(tmp_path, pki), shifts=POLICY),
        clock=ManualClock(start=datetime.now(UTC)),
        credentials=as_role(pki, Role.HR),
    )


def channel(server: RunningServer, pki: DevelopmentPki, role: Role) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{server.port}", as_role(pki, role))


def enroll_and_start_shift(server: RunningServer, pki: DevelopmentPki) -> spb.LoginCheckResponse:
    server.enroll("agent-a", split(first_half(SPEAKER_A), 2))  # as hr
    softphone = spb_grpc.ShiftServiceStub(channel(server, pki, Role.SOFTPHONE))
    return softphone.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a",
            device_id="softphone-1",
            login_audio=wav_audio(second_half(SPEAKER_A)),
        )
    )


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code()


def test_each_role_is_refused_outside_its_rights(
    secure: RunningServer, pki: DevelopmentPki, tmp_path: Path
) -> None:
    secure.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    audio = wav_audio(second_half(SPEAKER_A))
    verify = pb.VerifyRequest(agent_id="agent-a", audio=audio)
    create = pb.CreateAgentRequest(agent_id="b", display_name="B", consent_reference="HR-2")

    softphone = channel(secure, pki, Role.SOFTPHONE)
    assert pb_grpc.VerificationServiceStub(softphone).Verify(verify).decision == (
        pb.DECISION_ACCEPT
    )
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: pb_grpc.EnrollmentServiceStub(softphone).CreateAgent(create)) is denied
    assert code_of(lambda: secure.verification.Verify(verify)) is denied  # hr may not verify
    mfa = channel(secure, pki, Role.MFA)
    start = spb.StartShiftRequest(agent_id="agent-a", device_id="d", login_audio=audio)
    assert code_of(lambda: spb_grpc.ShiftServiceStub(mfa).StartShift(start)) is denied
    config = admin_pb2.GetConfigurationRequest()
    assert code_of(lambda: admin_pb2_grpc.AdminServiceStub(mfa).GetConfiguration(config)) is denied
    admin = admin_pb2_grpc.AdminServiceStub(channel(secure, pki, Role.ADMIN))
    shown = json.loads(admin.GetConfiguration(config).json)
    assert shown["transport"]["client_ca"]
    # Each channel's minimum of net speech for a decision.
    assert shown["verification"]["min_net_speech_seconds"] == 3.0
    assert shown["verification"]["min_net_speech_seconds_telephone"] == (
        secure.config.verification.min_net_speech_seconds_telephone
    )
    # One enrolled agent: the shipped thresholds apply, and it says why.
    wideband = shown["scoring_thresholds"]["wideband"]
    assert wideband["local_normalized_threshold"] is None
    assert wideband["applied_normalized_threshold"] == wideband["shipped_normalized_threshold"]
    assert wideband["local_comparisons"] == wideband["agents"] * (wideband["agents"] - 1)
    # How long a check and a voiceprint the shipped calibration measured, per condition.
    for condition in ("wideband", "wideband-to-telephone", "telephone"):
        shown_condition = shown["scoring_thresholds"][condition]
        assert shown_condition["longest_calibrated_test_seconds"] > 10.0
        assert shown_condition["longest_calibrated_voiceprint_seconds"] > 10.0

    # No client certificate: refused at the handshake.
    anonymous = grpc.secure_channel(
        f"127.0.0.1:{secure.port}", channel_credentials(pki.ca_certificate)
    )
    assert code_of(lambda: pb_grpc.VerificationServiceStub(anonymous).Verify(verify)) is (
        grpc.StatusCode.UNAVAILABLE
    )

    secure.stop()
    store = open_store(secure.config.database_path, VoiceprintCipher(KEY))
    refusals = [e for e in store.audit_events() if e.action == "access.denied"]
    store.close()
    assert len(refusals) == 4
    assert {e.outcome for e in refusals} == {"PERMISSION_DENIED"}
    assert {e.details["method"] for e in refusals} >= {"/voxauth.v1.EnrollmentService/CreateAgent"}


def test_the_mfa_provider_verifies_assurances_offline_from_the_jwks(
    secure: RunningServer, pki: DevelopmentPki
) -> None:
    started = enroll_and_start_shift(secure, pki)
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED
    token = started.assurance

    # The relying party knows nothing but the published keys.
    url, tls = secure.http_url("/.well-known/jwks.json"), https_context(pki)
    jwks = jwt.PyJWKSet.from_json(http_get(url, tls).body.decode())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="mfa", issuer="voxauth")
    assert claims["sub"] == "agent-a"
    assert claims["sid"] == started.shift.shift_id
    assert claims["amr"] == ["voice"]
    assert claims["exp"] > claims["iat"]
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.key, algorithms=["EdDSA"], audience="someone-else")

    mfa = channel(secure, pki, Role.MFA)
    fetched = assurances_pb2_grpc.AssuranceServiceStub(mfa).GetAssurance(
        assurances_pb2.GetAssuranceRequest(shift_id=started.shift.shift_id)
    )
    assert fetched.token == token
    over_grpc = assurances_pb2_grpc.AssuranceServiceStub(mfa).GetJwks(
        assurances_pb2.GetJwksRequest()
    )
    assert json.loads(over_grpc.json)["keys"][0]["kid"] == key.key_id

    # A rotation keeps the earlier token valid: its key stays published.
    admin = admin_pb2_grpc.AdminServiceStub(channel(secure, pki, Role.ADMIN))
    new_kid = admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest()).key_id
    rotated = jwt.PyJWKSet.from_json(http_get(url, tls).body.decode())
    assert {k.key_id for k in rotated.keys} == {key.key_id, new_kid}
    jwt.decode(token, rotated[str(key.key_id)].key, algorithms=["EdDSA"], audience="mfa")


def test_the_http_side_serves_probes_and_metrics_over_tls_only(
    secure: RunningServer, pki: DevelopmentPki
) -> None:
    tls = https_context(pki)
    assert http_get(secure.http_url("/healthz"), tls).status == 200
    assert http_get(secure.http_url("/readyz"), tls).status == 200
    metrics = http_get(secure.http_url("/metrics"), tls)
    assert metrics.status == 200
    assert b"voxauth_ready 1.0" in metrics.body
    # The same port in plain HTTP answers nothing.
    plain = secure.http_url("/healthz").replace("https://", "http://")
    with pytest.raises(OSError):
        http_get(plain)


def test_a_locked_shift_reaches_the_mfa_provider_at_once(
    secure: RunningServer, pki: DevelopmentPki
) -> None:
    shift_id = enroll_and_start_shift(secure, pki).shift.shift_id
    mfa = spb_grpc.ShiftServiceStub(channel(secure, pki, Role.MFA))
    subscription = mfa.SubscribeShiftEvents(spb.SubscribeShiftEventsRequest(agent_id="agent-a"))
    events: queue.Queue[spb.ShiftEvent] = queue.Queue()

    def listen() -> None:
        try:
            for event in subscription:
                events.put(event)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.CANCELLED  # the test hangs up at the end

    threading.Thread(target=listen, daemon=True).start()

    stream = ShiftStream(spb_grpc.ShiftServiceStub(channel(secure, pki, Role.SOFTPHONE)), shift_id)
    stream.next_event()
    for impostor in (OTHER_1, OTHER_1):
        stream.send(speech(impostor))
        secure.advance(100)
        assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED

    kinds = [events.get(timeout=60).kind for _ in range(3)]
    assert kinds == [
        spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
        spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
        spb.SHIFT_EVENT_KIND_SHIFT_LOCKED,
    ]
    state = mfa.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.state == spb.SHIFT_STATE_LOCKED

    # An admin unlock (after the helpdesk checked the agent) is announced too.
    admin = admin_pb2_grpc.AdminServiceStub(channel(secure, pki, Role.ADMIN))
    admin.UnlockShift(admin_pb2.UnlockShiftRequest(shift_id=shift_id, reason="ticket 42"))
    assert events.get(timeout=60).kind == spb.SHIFT_EVENT_KIND_SHIFT_VERIFIED
    subscription.cancel()
    stream.close()
