"""The same recording counts once toward enrollment (issue 10, item 9), with the real model:
sent again, or re-encoded and trimmed, it is refused with the reason; another utterance of the
same speaker is taken."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from voxauth.v1 import voxauth_pb2 as pb

from server.pipeline.decode import encode_mulaw
from tests.support import SPEAKER_A, RunningServer, first_half, second_half, wav_audio


def add(voxauth: RunningServer, audio: pb.Audio) -> pb.Utterance:
    response = voxauth.enrollment.AddEnrollmentAudio(
        pb.AddEnrollmentAudioRequest(agent_id="dup", audio=audio)
    )
    return response.utterance


def flac_audio(samples: np.ndarray) -> pb.Audio:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="FLAC")
    return pb.Audio(encoding=pb.AUDIO_ENCODING_FLAC, data=buffer.getvalue())


def test_the_same_recording_counts_once(voxauth: RunningServer) -> None:
    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="dup", display_name="Dup", consent_reference="HR-9")
    )
    recording = first_half(SPEAKER_A)

    outcomes = [add(voxauth, wav_audio(recording)) for _ in range(3)]
    assert [u.accepted for u in outcomes] == [True, False, False]
    kept = outcomes[0].utterance_id
    for refused in outcomes[1:]:
        assert f"same recording as pending utterance {kept}" in refused.rejection_reason

    # Re-encoded as G.711 u-law after trimming half a second at each edge...
    trimmed = recording[8_000:-8_000]
    narrowband = resample_poly(trimmed, 1, 2).astype(np.float32)
    mulaw = pb.Audio(
        encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8_000, data=encode_mulaw(narrowband)
    )
    assert "same recording" in add(voxauth, mulaw).rejection_reason, "a telephone copy"
    # ...or 6 dB quieter as FLAC: still the same recording.
    assert "same recording" in add(voxauth, flac_audio(recording * 0.5)).rejection_reason

    other = add(voxauth, wav_audio(second_half(SPEAKER_A)))
    assert other.accepted, other.rejection_reason

    status = voxauth.enrollment.GetEnrollmentStatus(pb.GetEnrollmentStatusRequest(agent_id="dup"))
    assert len(status.pending_utterances) == 2
    finalized = voxauth.enrollment.FinalizeEnrollment(pb.FinalizeEnrollmentRequest(agent_id="dup"))
    assert finalized.voiceprint.utterance_count == 2
