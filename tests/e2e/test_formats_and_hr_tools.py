"""The audio people have and HR's tools, end to end with the real model over a real socket:
enrollment from MP3 and Ogg files (recognised by content), shift streams in Opus (as a
WebRTC softphone sends it) and in PCM16 at 8 kHz, bulk enrollment of a folder and its re-run,
and ListAgents paging through `voxauth agents list`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torchaudio.functional
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from server.audit_actions import AuditAction
from server.config import PresentationAttackPolicy
from server.security.crypto import VoiceprintCipher
from server.storage.databases import open_store
from server.tools.agents_cli import EXIT_INCOMPLETE
from server.tools.cli import EXIT_OK, EXIT_REJECT, main
from tests.audio_files import encoded_file, opus_packets
from tests.softphone import POLICY, ShiftStream
from tests.support import (
    KEY,
    OTHER_1,
    SHORT_CLIP,
    SPEAKER_A,
    RunningServer,
    first_half,
    make_config,
    second_half,
    speech,
    split,
    wav_audio,
)


def client(server: RunningServer) -> list[str]:
    return ["--server", f"127.0.0.1:{server.port}", "--insecure"]


def test_enroll_from_mp3_and_ogg_files_and_verify(
    voxauth: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = split(first_half(SPEAKER_A), 2)
    mp3 = tmp_path / "part1.mp3"
    mp3.write_bytes(encoded_file(one, 16_000, "MP3", "MPEG_LAYER_III"))
    # Ogg Vorbis under a misleading name: the content decides.
    vorbis = tmp_path / "part2.wav"
    vorbis.write_bytes(encoded_file(two, 16_000, "OGG", "VORBIS"))
    genuine = tmp_path / "genuine.opus"
    genuine.write_bytes(encoded_file(second_half(SPEAKER_A), 16_000, "OGG", "OPUS"))
    impostor = tmp_path / "impostor.mp3"
    impostor.write_bytes(encoded_file(second_half(OTHER_1), 16_000, "MP3", "MPEG_LAYER_III"))

    enroll = ["enroll", *client(voxauth), "agent-mp3", str(mp3), str(vorbis)]
    assert main([*enroll, "--name", "Mia", "--consent", "HR-3"]) == EXIT_OK
    assert "agent-mp3 enrolled: 2 utterance(s)" in capsys.readouterr().out
    assert main(["verify", *client(voxauth), "agent-mp3", str(genuine)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("ACCEPT")
    assert main(["verify", *client(voxauth), "agent-mp3", str(impostor)]) == EXIT_REJECT

    # Over the API, an MP3 declared as WAV is refused, naming what it is.
    with pytest.raises(grpc.RpcError) as caught:
        voxauth.verification.Verify(
            pb.VerifyRequest(
                agent_id="agent-mp3",
                audio=pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=impostor.read_bytes()),
            )
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "the data is an MP3 file" in (caught.value.details() or "")


@pytest.fixture
def shift_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    # PAD reports but does not refuse here: these tests are about the stream formats, and one
    # of their genuine clips sent as Opus scores at the wideband PAD threshold itself (-2.564
    # against -2.56), a bona-fide rejection of the kind README's coded-genuine BPCER counts.
    presentation = PresentationAttackPolicy(mode="monitor")
    return start_server(replace(make_config(tmp_path), shifts=POLICY, presentation=presentation))


def start_shift(voxauth: RunningServer) -> str:
    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    started = voxauth.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a",
            device_id="webrtc-1",
            login_audio=wav_audio(second_half(SPEAKER_A)),
        )
    )
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED
    return started.shift.shift_id


def test_an_opus_shift_stream_reaches_a_checkpoint(shift_server: RunningServer) -> None:
    shift_id = start_shift(shift_server)
    stream = ShiftStream(shift_server.shifts, shift_id, pb.AUDIO_ENCODING_OPUS, 48_000)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    for packet in opus_packets(speech(SPEAKER_A)):
        stream.send_raw(spb.ShiftAudio(frames=packet))
    shift_server.advance(100)
    passed = stream.next_event()
    assert passed.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED, passed
    assert passed.score >= passed.threshold
    assert passed.net_speech_seconds == pytest.approx(6.0, abs=0.01)

    # A packet of 10 ms is not whole 20 ms frames: the stream ends INVALID_ARGUMENT.
    stream.send_raw(spb.ShiftAudio(frames=opus_packets(speech(SPEAKER_A)[:1600], frame_ms=10)[0]))
    error = stream.error()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    stream.close()
    assert audited_checkpoint_channels(shift_server) == ["wideband"]


def test_a_pcm16_shift_stream_at_8k_reaches_a_checkpoint_as_telephone_band(
    shift_server: RunningServer,
) -> None:
    shift_id = start_shift(shift_server)
    stream = ShiftStream(shift_server.shifts, shift_id, pb.AUDIO_ENCODING_PCM16LE, 8_000)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    at_8k = torchaudio.functional.resample(torch.from_numpy(speech(SPEAKER_A)), 16_000, 8_000)
    pcm = (np.clip(at_8k.numpy(), -1, 1) * 32767).astype("<i2").tobytes()
    step = 320 * 50  # 50 frames of 20 ms at 8 kHz
    for start in range(0, len(pcm) - step + 1, step):
        stream.send_raw(spb.ShiftAudio(frames=pcm[start : start + step]))
    shift_server.advance(100)
    checked = stream.next_event()
    # A decision on the whole checkpoint's speech, not INSUFFICIENT_SPEECH. (Whether it
    # passes is the telephone band's accuracy: this speaker's 6 s over G.711 u-law fails it
    # too, so the test does not depend on it.)
    assert checked.kind in (
        spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED,
        spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
    )
    assert checked.net_speech_seconds == pytest.approx(6.0, abs=0.01)
    stream.close()
    assert audited_checkpoint_channels(shift_server) == ["telephone"]


def audited_checkpoint_channels(server: RunningServer) -> list[str]:
    server.stop()
    store = open_store(server.config.database_path, VoiceprintCipher(KEY))
    try:
        events = store.audit_events("agent-a")
    finally:
        store.close()
    checkpoint = AuditAction.SHIFT_CHECKPOINT.value
    return [str(e.details["channel"]) for e in events if e.action == checkpoint]


def test_bulk_enrollment_of_a_folder_then_a_rerun_that_skips(
    voxauth: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    team = tmp_path / "team"
    (team / "agent-a").mkdir(parents=True)
    for i, part in enumerate(split(first_half(SPEAKER_A), 2)):
        (team / "agent-a" / f"{i}.flac").write_bytes(encoded_file(part, 16_000, "FLAC", "PCM_16"))
    one, two = split(first_half(OTHER_1), 2)
    (team / "agent-b_1.mp3").write_bytes(encoded_file(one, 16_000, "MP3", "MPEG_LAYER_III"))
    (team / "agent-b_2.ogg").write_bytes(encoded_file(two, 16_000, "OGG", "OPUS"))
    # Too little speech: this agent fails, the others go ahead.
    (team / "agent-c_1.wav").write_bytes(encoded_file(speech(SHORT_CLIP), 16_000, "WAV", "PCM_16"))
    report = tmp_path / "report.csv"
    bulk = ["agents", "enroll-bulk", *client(voxauth), str(team), "--consent", "HR-batch-1"]

    assert main([*bulk, "--report", str(report)]) == EXIT_INCOMPLETE
    captured = capsys.readouterr()
    assert "enrolled 2, skipped 0, failed 1" in captured.out
    assert "failed agent-c:" in captured.out
    assert "[##############################] 3/3" in captured.err
    assert report.read_text().splitlines()[0] == "agent_id,result,reason"

    assert main(bulk) == EXIT_INCOMPLETE
    assert "enrolled 0, skipped 2, failed 1" in capsys.readouterr().out

    # ListAgents, a page of one agent at a time.
    listing = ["agents", "list", *client(voxauth), "--page-size", "1", "--format", "csv"]
    assert main(listing) == EXIT_OK
    rows = [line.split(",") for line in capsys.readouterr().out.splitlines()]
    assert [(row[0], row[2]) for row in rows[1:]] == [
        ("agent-a", "enrolled"),
        ("agent-b", "enrolled"),
        ("agent-c", "not-started"),
    ]
    assert main(["agents", "list", *client(voxauth), "--state", "enrolled"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "agent-a" in out and "agent-c" not in out
    assert main(["agents", "show", *client(voxauth), "agent-b"]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "state        enrolled" in shown and "unless a check uses it" in shown
