"""End to end: the real model on real speech, over a real gRPC socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from scipy.signal import resample_poly
from voxauth.v1 import voxauth_pb2 as pb

from server.pipeline.decode import encode_mulaw, telephone_channel
from server.security.crypto import VoiceprintCipher
from server.storage.databases import open_store
from server.storage.interface import Voiceprint
from tests.support import (
    KEY,
    OTHER_1,
    SHORT_CLIP,
    SPEAKER_A,
    SPEAKER_B,
    RunningServer,
    first_half,
    second_half,
    speech,
    split,
    wav_audio,
    wav_bytes,
)


def enroll_a(voxauth: RunningServer, agent_id: str = "agent-a") -> pb.FinalizeEnrollmentResponse:
    return voxauth.enroll(agent_id, split(first_half(SPEAKER_A), 2))


def test_same_speaker_is_accepted(voxauth: RunningServer) -> None:
    finalized = enroll_a(voxauth)
    assert finalized.voiceprint.utterance_count == 2
    assert not finalized.replaced_previous

    result = voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_A)))

    assert result.decision == pb.DECISION_ACCEPT
    assert result.score >= result.threshold
    assert result.llr >= result.llr_threshold
    assert result.normalized_score >= result.normalized_threshold
    assert result.llr > 0  # the evidence favours the agent
    assert result.decided_by != pb.DECIDED_BY_UNSPECIFIED
    assert result.target_false_match_rate == 1e-4
    assert 0 < result.expected_false_non_match_rate < 0.5
    assert result.channel == pb.CHANNEL_WIDEBAND
    assert result.comparison == pb.COMPARISON_WIDEBAND
    assert finalized.voiceprint.telephone_companion
    assert result.model_id == finalized.voiceprint.model_id
    assert result.quality.net_speech_seconds >= 3.0


def test_different_speaker_is_rejected(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    for impostor in (OTHER_1, SPEAKER_B):
        result = voxauth.verify("agent-a", wav_audio(second_half(impostor)))
        assert result.decision == pb.DECISION_REJECT, impostor
        assert result.score < result.threshold
        assert result.llr < result.llr_threshold


def test_too_little_speech_is_inconclusive(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    result = voxauth.verify("agent-a", wav_audio(speech(SHORT_CLIP)))
    assert result.decision == pb.DECISION_INCONCLUSIVE
    assert result.quality.net_speech_seconds < 3.0
    assert pb.QUALITY_ISSUE_TOO_LITTLE_SPEECH in result.quality.issues


def test_a_telephone_check_needs_the_telephone_minimum_and_a_wideband_one_does_not(
    voxauth: RunningServer,
) -> None:
    enroll_a(voxauth)
    policy = voxauth.config.verification
    minimum = policy.min_net_speech_for(telephone=True)
    assert minimum > policy.min_net_speech_seconds
    # Less audio than the telephone minimum, so less net speech, but more than 3 s of it.
    cut = second_half(SPEAKER_A)[: int((minimum - 0.3) * 16_000)]
    narrowband = resample_poly(cut, 1, 2).astype(np.float32)
    call = pb.Audio(
        encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, data=encode_mulaw(narrowband)
    )
    refused = voxauth.verify("agent-a", call)
    assert refused.channel == pb.CHANNEL_TELEPHONE
    assert policy.min_net_speech_seconds <= refused.quality.net_speech_seconds < minimum
    assert refused.decision == pb.DECISION_INCONCLUSIVE
    assert pb.QUALITY_ISSUE_TOO_LITTLE_SPEECH in refused.quality.issues
    assert refused.min_net_speech_seconds == minimum
    # The same speech as a 16 kHz file that carries the call: telephone, refused alike.
    relayed = voxauth.verify("agent-a", wav_audio(telephone_channel(cut)))
    assert relayed.channel == pb.CHANNEL_TELEPHONE
    assert relayed.decision == pb.DECISION_INCONCLUSIVE
    # The same speech recorded wideband is decided, by the general minimum.
    decided = voxauth.verify("agent-a", wav_audio(cut))
    assert decided.channel == pb.CHANNEL_WIDEBAND
    assert decided.decision == pb.DECISION_ACCEPT
    assert decided.min_net_speech_seconds == policy.min_net_speech_seconds
    # With the telephone minimum of speech, the call is decided.
    whole_call = resample_poly(second_half(SPEAKER_A), 1, 2).astype(np.float32)
    longer = voxauth.verify(
        "agent-a",
        pb.Audio(
            encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, data=encode_mulaw(whole_call)
        ),
    )
    assert longer.quality.net_speech_seconds >= minimum
    assert longer.decision != pb.DECISION_INCONCLUSIVE


def test_telephone_mulaw_of_enrolled_speaker_is_accepted(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    narrowband = resample_poly(second_half(SPEAKER_A), 1, 2).astype(np.float32)
    audio = pb.Audio(
        encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, data=encode_mulaw(narrowband)
    )
    result = voxauth.verify("agent-a", audio)
    # The evidence favours the agent; whether it clears 1 in 10,000 is a matter of the
    # telephone false-non-match rate (9-15% held out, README "Accuracy"), and this check
    # lies just under the bounded threshold.
    assert result.llr > 0, result.score
    assert result.decision != pb.DECISION_INCONCLUSIVE
    assert result.channel == pb.CHANNEL_TELEPHONE
    assert result.comparison == pb.COMPARISON_TELEPHONE


def test_telephone_audio_in_a_wideband_file_is_scored_as_telephone(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    relayed = wav_audio(telephone_channel(second_half(SPEAKER_A)))
    result = voxauth.verify("agent-a", relayed)
    assert result.channel == pb.CHANNEL_TELEPHONE
    assert result.comparison == pb.COMPARISON_TELEPHONE
    assert result.llr > 0, result.score
    impostor = voxauth.verify("agent-a", wav_audio(telephone_channel(second_half(OTHER_1))))
    assert impostor.comparison == pb.COMPARISON_TELEPHONE
    assert impostor.decision == pb.DECISION_REJECT, impostor.score
    assert impostor.normalized_score < result.normalized_score


def test_unknown_and_unenrolled_agents(voxauth: RunningServer) -> None:
    audio = wav_audio(second_half(SPEAKER_A))
    with pytest.raises(grpc.RpcError) as unknown:
        voxauth.verify("nobody", audio)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND

    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="new", display_name="New", consent_reference="HR-2")
    )
    with pytest.raises(grpc.RpcError) as unenrolled:
        voxauth.verify("new", audio)
    assert unenrolled.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "enroll" in (unenrolled.value.details() or "")


def test_enrollment_without_consent_is_refused(voxauth: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        voxauth.enrollment.CreateAgent(
            pb.CreateAgentRequest(agent_id="x", display_name="X", consent_reference=" ")
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "consent_reference" in (refused.value.details() or "")


def _nan_wav() -> bytes:
    samples = second_half(SPEAKER_A).copy()
    samples[1000] = np.nan
    return wav_bytes(samples, subtype="FLOAT")


BAD_AUDIO = {
    "unspecified encoding": (pb.Audio(data=b"\x00\x01" * 8000), "encoding"),
    "raw PCM without a rate": (
        pb.Audio(encoding=pb.AUDIO_ENCODING_PCM16LE, data=b"\x00\x01" * 8000),
        "sample_rate",
    ),
    "unsupported rate": (
        pb.Audio(encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=12345, data=b"\0\1" * 8000),
        "sample_rate",
    ),
    "u-law at 16 kHz": (
        pb.Audio(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=16000, data=b"\x7f" * 8000),
        "8000",
    ),
    "empty": (pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=b""), "empty"),
    "too long": (
        pb.Audio(
            encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=8000, data=bytes(8000 * 2 * 61)
        ),
        "limit",
    ),
    "corrupt FLAC": (pb.Audio(encoding=pb.AUDIO_ENCODING_FLAC, data=b"fLaC" + bytes(5000)), ""),
    "non-finite samples": (pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=_nan_wav()), "finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_is_invalid_argument(voxauth: RunningServer, case: str) -> None:
    enroll_a(voxauth)
    audio, expected_words = BAD_AUDIO[case]
    with pytest.raises(grpc.RpcError) as failure:
        voxauth.verify("agent-a", audio)
    error = failure.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, case
    assert expected_words.lower() in (error.details() or "").lower()
    # The field at fault is named in a google.rpc.BadRequest detail.
    status = rpc_status.from_call(error)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violations)
    assert violations.field_violations[0].field.startswith("audio")


def test_restart_keeps_voiceprints(start_server: Callable[..., RunningServer]) -> None:
    first = start_server()
    enroll_a(first)
    first.stop()

    second = start_server(first.config)
    result = second.verify("agent-a", wav_audio(second_half(SPEAKER_A)))
    assert result.decision == pb.DECISION_ACCEPT


def test_delete_erases_the_agent(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    voxauth.enrollment.DeleteAgent(pb.DeleteAgentRequest(agent_id="agent-a"))

    for call in (
        lambda: voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_A))),
        lambda: voxauth.enrollment.GetEnrollmentStatus(
            pb.GetEnrollmentStatusRequest(agent_id="agent-a")
        ),
    ):
        with pytest.raises(grpc.RpcError) as gone:
            call()
        assert gone.value.code() is grpc.StatusCode.NOT_FOUND
    # The id is free again: the agent can be enrolled afresh.
    assert enroll_a(voxauth).voiceprint.utterance_count == 2


def test_voiceprint_of_another_model_is_refused(
    start_server: Callable[..., RunningServer],
) -> None:
    first = start_server()
    enroll_a(first)
    first.stop()
    store = open_store(first.config.database_path, VoiceprintCipher(KEY))
    current = store.get_voiceprint("agent-a")
    assert current is not None
    store.replace_voiceprint(
        Voiceprint(
            agent_id="agent-a",
            model_id="some-other-model@v2",
            embedding=current.embedding,
            created_at=current.created_at,
            utterance_count=current.utterance_count,
            net_speech_seconds=current.net_speech_seconds,
        ),
        [],
    )
    store.close()

    second = start_server(first.config)
    with pytest.raises(grpc.RpcError) as refused:
        second.verify("agent-a", wav_audio(second_half(SPEAKER_A)))
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "some-other-model@v2" in (refused.value.details() or "")


def test_reenrollment_replaces_the_voiceprint(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    # HR re-enrolls the same agent id (here, deliberately, with another voice to make the
    # swap visible).
    for samples in split(first_half(SPEAKER_B), 2):
        voxauth.enrollment.AddEnrollmentAudio(
            pb.AddEnrollmentAudioRequest(agent_id="agent-a", audio=wav_audio(samples))
        )
    # Until finalized, the old voiceprint stays in force.
    assert voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_A))).decision == (
        pb.DECISION_ACCEPT
    )
    finalized = voxauth.enrollment.FinalizeEnrollment(
        pb.FinalizeEnrollmentRequest(agent_id="agent-a")
    )
    assert finalized.replaced_previous
    assert voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_B))).decision == (
        pb.DECISION_ACCEPT
    )
    assert voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_A))).decision == (
        pb.DECISION_REJECT
    )


def test_an_utterance_of_another_person_is_rejected_at_finalize(voxauth: RunningServer) -> None:
    utterances = [*split(first_half(SPEAKER_A), 2), first_half(OTHER_1)]
    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="mixed", display_name="Mixed", consent_reference="HR-3")
    )
    ids = []
    for samples in utterances:
        added = voxauth.enrollment.AddEnrollmentAudio(
            pb.AddEnrollmentAudioRequest(agent_id="mixed", audio=wav_audio(samples))
        )
        ids.append(added.utterance.utterance_id)

    finalized = voxauth.enrollment.FinalizeEnrollment(
        pb.FinalizeEnrollmentRequest(agent_id="mixed")
    )

    assert [r.utterance_id for r in finalized.rejected] == [ids[2]]
    assert "another speaker" in finalized.rejected[0].rejection_reason
    assert finalized.voiceprint.utterance_count == 2


def test_two_disagreeing_utterances_ask_for_more(voxauth: RunningServer) -> None:
    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="two", display_name="Two", consent_reference="HR-4")
    )
    for name in (SPEAKER_A, OTHER_1):
        voxauth.enrollment.AddEnrollmentAudio(
            pb.AddEnrollmentAudioRequest(agent_id="two", audio=wav_audio(first_half(name)))
        )
    with pytest.raises(grpc.RpcError) as incomplete:
        voxauth.enrollment.FinalizeEnrollment(pb.FinalizeEnrollmentRequest(agent_id="two"))
    assert incomplete.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "same person" in (incomplete.value.details() or "")


def test_enrollment_status_reports_progress(voxauth: RunningServer) -> None:
    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="prog", display_name="Prog", consent_reference="HR-5")
    )
    short = voxauth.enrollment.AddEnrollmentAudio(
        pb.AddEnrollmentAudioRequest(agent_id="prog", audio=wav_audio(speech(SHORT_CLIP)))
    )
    assert not short.utterance.accepted
    assert "too little speech" in short.utterance.rejection_reason

    added = voxauth.enrollment.AddEnrollmentAudio(
        pb.AddEnrollmentAudioRequest(
            agent_id="prog", audio=wav_audio(split(first_half(SPEAKER_A), 2)[0])
        )
    )
    assert added.utterance.accepted
    status = added.status
    assert len(status.pending_utterances) == 1
    assert 0 < status.net_speech_seconds < status.required_net_speech_seconds == 5.0
    assert not status.ready_to_finalize
    with pytest.raises(grpc.RpcError) as early:
        voxauth.enrollment.FinalizeEnrollment(pb.FinalizeEnrollmentRequest(agent_id="prog"))
    assert early.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "needed" in (early.value.details() or "")


def test_long_utterance_streams_in_chunks(voxauth: RunningServer) -> None:
    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="stream", display_name="S", consent_reference="HR-6")
    )
    data = wav_bytes(first_half(SPEAKER_A))
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    messages = [
        pb.EnrollmentAudioChunk(agent_id="stream", encoding=pb.AUDIO_ENCODING_WAV, data=chunks[0])
    ] + [pb.EnrollmentAudioChunk(data=c) for c in chunks[1:]]
    response = voxauth.enrollment.StreamEnrollmentAudio(iter(messages))
    assert response.utterance.accepted
    assert response.status.ready_to_finalize


def test_server_refuses_to_start_without_a_key(tmp_path: Path, key_env: dict[str, str]) -> None:
    del key_env["VOXAUTH_KEY"]
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.tools.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "x.db"),
        ],
        env=key_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 2
    assert "VOXAUTH_KEY" in started.stderr
    assert not (tmp_path / "x.db").exists()


def test_empty_enrollment_stream_is_invalid(voxauth: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        voxauth.enrollment.StreamEnrollmentAudio(iter([]))
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "no audio" in (failure.value.details() or "")


def test_every_decision_is_audited_without_biometrics(voxauth: RunningServer) -> None:
    enroll_a(voxauth)
    voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_A)))
    voxauth.stop()
    store = open_store(voxauth.config.database_path, VoiceprintCipher(KEY))
    events = store.audit_events("agent-a")
    store.close()
    actions = [e.action for e in events]
    assert actions[0] == "agent.create"
    assert actions.count("enrollment.add") == 2
    assert "enrollment.finalize" in actions
    verify = next(e for e in events if e.action == "verify")
    assert verify.outcome == "ACCEPT"
    assert set(verify.details) == {
        "score",
        "threshold",
        "net_speech_seconds",
        "model_id",
        "channel",
        "target_fmr",
        "condition",
        "normalized_score",
        "llr",
        "llr_threshold",
        "decided_by",
        "pad_score",
        "pad_threshold",
        "pad_decision",
        "pad_enforced",
    }
