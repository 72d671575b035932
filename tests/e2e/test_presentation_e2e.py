"""Presentation-attack detection end to end: the real speaker model and the real, calibrated
countermeasure over a real gRPC socket. A replayed enrollment recording and a Griffin-Lim
resynthesis of the agent's own voice (the attack corpus's transform) are refused with the PAD
fields set; genuine speech is still accepted; a refused checkpoint counts toward the lock and
the MFA provider's subscription sees it; an attack offered as an enrollment utterance is
refused with the reason."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from server.config import PresentationAttackPolicy
from server.pipeline.channel import Channel
from server.pipeline.presentation import PadCalibration, default_pad_calibration_path
from server.tools.attack_corpus import at_level, griffin_lim, rms
from tests.fakes import SHIPPED_COUNTERMEASURE_ID
from tests.softphone import POLICY, ShiftStream
from tests.support import (
    SPEAKER_B,
    RunningServer,
    Samples,
    first_half,
    make_config,
    second_half,
    split,
    wav_audio,
)

# Speaker B: the back-end scores its Griffin-Lim resyntheses far below the wideband threshold
# and its genuine halves above it.
AGENT = "agent-b"
SUSPECTED = (pb.PRESENTATION_DECISION_ATTACK, pb.PRESENTATION_DECISION_REPLAY)


def resynthesised(samples: Samples) -> Samples:
    """The corpus's Griffin-Lim attack on `samples`, at their level."""
    attacked, _ = griffin_lim(samples, np.random.default_rng(0))
    return at_level(attacked, rms(samples)).astype(np.float32)


@pytest.fixture
def server(start_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    config = replace(make_config(tmp_path), shifts=POLICY, presentation=PresentationAttackPolicy())
    running = start_server(config)
    finalized = running.enroll(AGENT, split(first_half(SPEAKER_B), 2))
    assert finalized.voiceprint.utterance_count == 2
    return running


def test_genuine_speech_is_accepted_with_the_pad_fields_set(server: RunningServer) -> None:
    response = server.verify(AGENT, wav_audio(second_half(SPEAKER_B)))
    assert response.decision == pb.DECISION_ACCEPT
    pad = response.presentation_attack
    assert pad.decision == pb.PRESENTATION_DECISION_BONA_FIDE
    assert pad.enforced
    assert pad.score >= pad.threshold
    # The shipped calibration's wideband threshold at the default target.
    shipped = PadCalibration.load(default_pad_calibration_path(), SHIPPED_COUNTERMEASURE_ID)
    expected = shipped.channels[Channel.WIDEBAND].threshold(PresentationAttackPolicy.target_bpcer)
    assert pad.threshold == pytest.approx(expected, abs=1e-3)


def test_a_replayed_enrollment_recording_is_refused_as_replay(server: RunningServer) -> None:
    enrolled = split(first_half(SPEAKER_B), 2)[0]
    response = server.verify(AGENT, wav_audio(enrolled))
    assert response.decision == pb.DECISION_REJECT
    assert response.presentation_attack.decision == pb.PRESENTATION_DECISION_REPLAY
    # The voice itself matched: only replay detection refused it.
    assert response.score >= response.threshold


def test_the_same_login_recording_sent_twice_is_a_replay(server: RunningServer) -> None:
    login = wav_audio(second_half(SPEAKER_B))
    assert server.verify(AGENT, login).decision == pb.DECISION_ACCEPT
    again = server.verify(AGENT, login)
    assert again.decision == pb.DECISION_REJECT
    assert again.presentation_attack.decision == pb.PRESENTATION_DECISION_REPLAY


def test_a_resynthesised_voice_of_the_agent_is_refused_with_the_pad_fields(
    server: RunningServer,
) -> None:
    response = server.verify(AGENT, wav_audio(resynthesised(second_half(SPEAKER_B))))
    assert response.decision == pb.DECISION_REJECT
    pad = response.presentation_attack
    assert pad.decision == pb.PRESENTATION_DECISION_ATTACK
    assert pad.score < pad.threshold - 2


def test_an_attack_offered_for_enrollment_is_refused_with_the_reason(
    server: RunningServer,
) -> None:
    server.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="agent-new", display_name="New", consent_reference="HR-2")
    )
    response = server.enrollment.AddEnrollmentAudio(
        pb.AddEnrollmentAudioRequest(
            agent_id="agent-new", audio=wav_audio(resynthesised(first_half(SPEAKER_B)))
        )
    )
    assert not response.utterance.accepted
    assert "presentation attack" in response.utterance.rejection_reason
    assert response.utterance.presentation_attack.decision == pb.PRESENTATION_DECISION_ATTACK
    assert response.status.net_speech_seconds == 0


def test_refused_checkpoints_lock_the_shift_and_the_subscriber_sees_them(
    server: RunningServer,
) -> None:
    subscription = server.shifts.SubscribeShiftEvents(
        spb.SubscribeShiftEventsRequest(agent_id=AGENT)
    )
    seen: queue.Queue[spb.ShiftEvent] = queue.Queue()

    def listen() -> None:
        try:
            for event in subscription:
                seen.put(event)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.CANCELLED

    threading.Thread(target=listen, daemon=True).start()
    started = server.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id=AGENT, device_id="softphone-7", login_audio=wav_audio(second_half(SPEAKER_B))
        )
    )
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED
    assert started.verification.presentation_attack.decision == (pb.PRESENTATION_DECISION_BONA_FIDE)
    stream = ShiftStream(server.shifts, started.shift.shift_id)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    attack = resynthesised(second_half(SPEAKER_B))
    # Every checkpoint on the attack fails on PAD; the lock comes with the second failure
    # that judged speech heard after the first, which needs 8 s of fresh speech: more than one
    # copy of the attack holds, so two per round.
    failures = 0
    event = None
    for _ in range(4):
        stream.send(attack)
        stream.send(attack)
        server.advance(100)
        event = stream.next_event()
        while event.kind == spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH:
            event = stream.next_event()
        if event.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED:
            break
        assert event.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED
        # The countermeasure refuses it; made from the login recording, it also embeds like
        # it, so replay detection may name it first.
        pad = event.presentation_attack
        assert pad.score < pad.threshold
        assert pad.decision in SUSPECTED
        failures += 1
        if event.shift.state == spb.SHIFT_STATE_LOCKED:
            event = stream.next_event()
            break
    assert event is not None and event.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED
    assert event.shift.state == spb.SHIFT_STATE_LOCKED
    assert 2 <= failures <= 4

    # A spoofed login check is announced too, with its own kind.
    spoofed = server.shifts.CheckLogin(
        spb.CheckLoginRequest(
            shift_id=started.shift.shift_id,
            login_audio=wav_audio(resynthesised(first_half(SPEAKER_B))),
        )
    )
    assert spoofed.shift.state == spb.SHIFT_STATE_LOCKED
    kinds = [seen.get(timeout=30).kind]
    while kinds[-1] != spb.SHIFT_EVENT_KIND_PRESENTATION_ATTACK:
        kinds.append(seen.get(timeout=30).kind)
    ignored = (spb.SHIFT_EVENT_KIND_STREAM_ATTACHED, spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH)
    assert [k for k in kinds if k not in ignored] == [
        *[spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED] * failures,
        spb.SHIFT_EVENT_KIND_SHIFT_LOCKED,
        spb.SHIFT_EVENT_KIND_PRESENTATION_ATTACK,
    ]
    subscription.cancel()
    stream.close()
