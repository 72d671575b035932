"""Shifts end to end: login check, a stream of real speech, checkpoints at (test-clock) random
times, locking, reconnects and restarts. The real model, over a real gRPC socket; the clock is
the test's, so a whole shift runs in seconds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from tests.clock import ManualClock
from tests.softphone import POLICY, ShiftStream
from tests.support import (
    OTHER_1,
    OTHER_2,
    SPEAKER_A,
    RunningServer,
    Samples,
    first_half,
    make_config,
    metric,
    second_half,
    speech,
    split,
    wav_audio,
)


@pytest.fixture
def shift_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return start_server(replace(make_config(tmp_path), shifts=POLICY))


def start_shift(voxauth: RunningServer, login: Samples) -> spb.LoginCheckResponse:
    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    return voxauth.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a", device_id="softphone-7", login_audio=wav_audio(login)
        )
    )


def test_login_verifies_the_shift(shift_server: RunningServer) -> None:
    started = start_shift(shift_server, second_half(SPEAKER_A))
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED
    assert started.verification.decision == pb.DECISION_ACCEPT
    assert started.shift.device_id == "softphone-7"

    impostor = shift_server.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a", device_id="softphone-8", login_audio=wav_audio(second_half(OTHER_1))
        )
    )
    assert impostor.shift.state == spb.SHIFT_STATE_UNVERIFIED
    assert impostor.verification.decision == pb.DECISION_REJECT


def test_checkpoints_pass_then_another_speaker_locks_the_shift(
    shift_server: RunningServer,
) -> None:
    shift_id = start_shift(shift_server, second_half(SPEAKER_A)).shift.shift_id
    stream = ShiftStream(shift_server.shifts, shift_id)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED

    stream.send(speech(SPEAKER_A))
    shift_server.advance(100)
    passed = stream.next_event()
    assert passed.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED
    assert passed.score >= passed.threshold
    assert passed.net_speech_seconds == pytest.approx(6.0, abs=0.01)
    assert passed.audio_start.ToDatetime() <= passed.audio_end.ToDatetime()
    assert passed.scheduled_at.ToDatetime() == passed.at.ToDatetime() or passed.at.seconds >= (
        passed.scheduled_at.seconds
    )

    # Someone else takes over the headset.
    stream.send(speech(OTHER_1))
    shift_server.advance(100)
    failed = stream.next_event()
    assert failed.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED
    assert failed.score < failed.threshold
    assert failed.shift.state == spb.SHIFT_STATE_VERIFIED
    assert failed.shift.consecutive_failures == 1

    stream.send(speech(OTHER_2))
    shift_server.advance(100)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED
    locked = stream.next_event()
    assert locked.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED
    assert locked.shift.state == spb.SHIFT_STATE_LOCKED

    state = shift_server.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.state == spb.SHIFT_STATE_LOCKED
    assert (state.checkpoints_passed, state.checkpoints_failed) == (1, 2)
    metrics = shift_server.scrape()
    checkpoints = [
        metric(metrics, "voxauth_checkpoints_total", outcome=o) for o in ("passed", "failed")
    ]
    assert checkpoints == [1, 2]
    assert metric(metrics, "voxauth_shift_locks_total") == 1
    assert metric(metrics, "voxauth_shifts", state="locked") == 1

    # Only a passing login check unlocks it.
    wrong = shift_server.shifts.CheckLogin(
        spb.CheckLoginRequest(shift_id=shift_id, login_audio=wav_audio(second_half(OTHER_1)))
    )
    assert wrong.shift.state == spb.SHIFT_STATE_LOCKED
    unlocked = shift_server.shifts.CheckLogin(
        spb.CheckLoginRequest(shift_id=shift_id, login_audio=wav_audio(second_half(SPEAKER_A)))
    )
    assert unlocked.shift.state == spb.SHIFT_STATE_VERIFIED
    assert unlocked.shift.consecutive_failures == 0
    stream.close()


def test_silence_and_noise_give_insufficient_speech_and_no_lock(
    shift_server: RunningServer,
) -> None:
    shift_id = start_shift(shift_server, second_half(SPEAKER_A)).shift.shift_id
    stream = ShiftStream(shift_server.shifts, shift_id)
    stream.next_event()
    rng = np.random.default_rng(7)
    for _ in range(3):
        stream.send(np.zeros(16000 * 10, dtype=np.float32))
        stream.send((0.01 * rng.standard_normal(16000 * 10)).astype(np.float32))
        shift_server.advance(100)  # due
        shift_server.advance(31)  # past the wait for speech
        event = stream.next_event()
        assert event.kind == spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH
        assert event.shift.state == spb.SHIFT_STATE_VERIFIED
    state = shift_server.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.checkpoints_insufficient_speech == 3
    assert state.consecutive_failures == 0
    stream.close()


def test_reconnect_resumes_and_a_new_stream_takes_over(shift_server: RunningServer) -> None:
    shift_id = start_shift(shift_server, second_half(SPEAKER_A)).shift.shift_id
    first = ShiftStream(shift_server.shifts, shift_id)
    first.next_event()
    second = ShiftStream(shift_server.shifts, shift_id)
    attached = second.next_event()
    assert attached.kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    assert attached.shift.shift_id == shift_id
    assert first.error().code() is grpc.StatusCode.ABORTED

    second.send(speech(SPEAKER_A))
    shift_server.advance(100)
    assert second.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED
    second.close()

    # The softphone drops off and comes back: same shift, same counts.
    third = ShiftStream(shift_server.shifts, shift_id)
    resumed = third.next_event()
    assert resumed.shift.checkpoints_passed == 1
    third.close()


def test_restart_keeps_the_shift_state(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    config = replace(make_config(tmp_path), shifts=POLICY)
    first = start_server(config)
    shift_id = start_shift(first, second_half(SPEAKER_A)).shift.shift_id
    stream = ShiftStream(first.shifts, shift_id)
    stream.next_event()
    stream.send(speech(SPEAKER_A))
    first.advance(100)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED
    stream.close()
    first.stop()

    # The wall clock goes on across the restart; the schedule stored with the shift is in it.
    second = start_server(config, clock=ManualClock(start=first.clock.now()))
    state = second.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.state == spb.SHIFT_STATE_VERIFIED
    assert state.checkpoints_passed == 1
    resumed = ShiftStream(second.shifts, shift_id)
    assert resumed.next_event().shift.checkpoints_passed == 1
    resumed.send(speech(SPEAKER_A))
    second.advance(100)
    assert resumed.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED
    resumed.close()


def test_bad_streams_get_clear_errors_and_leave_other_shifts_alone(
    shift_server: RunningServer,
) -> None:
    good_id = start_shift(shift_server, second_half(SPEAKER_A)).shift.shift_id
    good = ShiftStream(shift_server.shifts, good_id)
    good.next_event()
    good.send(speech(SPEAKER_A))

    def failing(first: spb.ShiftAudio, *rest: spb.ShiftAudio) -> grpc.RpcError:
        call = shift_server.shifts.StreamShiftAudio(iter([first, *rest]))
        with pytest.raises(grpc.RpcError) as failure:
            list(call)
        return failure.value

    other_id = shift_server.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a", device_id="d2", login_audio=wav_audio(second_half(SPEAKER_A))
        )
    ).shift.shift_id

    def header(shift_id: str, rate: int = 16000) -> spb.ShiftAudio:
        return spb.ShiftAudio(
            header=spb.ShiftAudioHeader(
                shift_id=shift_id, encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=rate
            )
        )

    cases = {
        "frame of the wrong size": (
            [header(other_id), spb.ShiftAudio(frames=b"\0" * 641)],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "unsupported format": ([header(other_id, rate=22050)], grpc.StatusCode.INVALID_ARGUMENT),
        "audio before the header": (
            [spb.ShiftAudio(frames=b"\0" * 640)],
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "unknown shift": ([header("no-such-shift")], grpc.StatusCode.NOT_FOUND),
    }
    for name, (messages, code) in cases.items():
        assert failing(*messages).code() is code, name

    shift_server.shifts.EndShift(spb.EndShiftRequest(shift_id=other_id))
    assert failing(header(other_id)).code() is grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(grpc.RpcError) as not_enrolled:
        shift_server.enrollment.CreateAgent(
            pb.CreateAgentRequest(agent_id="fresh", display_name="F", consent_reference="HR-9")
        )
        shift_server.shifts.StartShift(
            spb.StartShiftRequest(
                agent_id="fresh", device_id="d3", login_audio=wav_audio(second_half(SPEAKER_A))
            )
        )
    assert not_enrolled.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    # The good shift carried on regardless.
    shift_server.advance(100)
    assert good.next_event().kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED
    good.close()


def test_ending_a_shift_stops_its_stream(shift_server: RunningServer) -> None:
    shift_id = start_shift(shift_server, second_half(SPEAKER_A)).shift.shift_id
    stream = ShiftStream(shift_server.shifts, shift_id)
    stream.next_event()
    ended = shift_server.shifts.EndShift(spb.EndShiftRequest(shift_id=shift_id))
    assert ended.state == spb.SHIFT_STATE_ENDED
    assert ended.HasField("ended_at")
    # The stream says so, then ends normally; the shift stays readable for audit.
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_SHIFT_ENDED
    assert stream.ended()
    state = shift_server.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.state == spb.SHIFT_STATE_ENDED
