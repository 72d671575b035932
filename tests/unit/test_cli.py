"""The `voxauth` client commands' own checks, made before any server is reached (here against a
server with the fake model, to see that nothing was done there; the commands with the real
model, and `voxauth eval`, are in tests/e2e/test_cli_e2e.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from voxauth.v1 import voxauth_pb2 as pb

from server.tools.cli import EXIT_USAGE, main
from server.tools.client import AudioFile, AudioFileError
from tests.audio_files import encoded_file
from tests.fakes import FakeEmbedder, fake_scoring
from tests.support import KEY, RunningServer, make_config


def test_local_file_problems_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "agent", str(tmp_path / "missing.wav")]) == EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    raw = tmp_path / "call.pcm"
    raw.write_bytes(b"\0\0" * 100)
    assert main(["verify", "agent", str(raw)]) == EXIT_USAGE
    assert "--rate" in capsys.readouterr().err


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> Path:
    sf.write(path, np.full(int(rate * seconds), 0.1, dtype=np.float32), rate, subtype="PCM_16")
    return path


def test_enroll_checks_every_file_before_creating_the_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = replace(
        make_config(tmp_path),
        scoring=fake_scoring(tmp_path / "scoring", FakeEmbedder.model_id, FakeEmbedder.dimension),
    )
    server = RunningServer(config, FakeEmbedder, KEY)
    try:
        enroll = ["enroll", "--server", f"127.0.0.1:{server.port}", "--insecure", "agent-9"]
        new_agent = ["--name", "Nine", "--consent", "HR-9"]
        good = write_wav(tmp_path / "good.wav", 5.0)
        too_long = write_wav(tmp_path / "long.wav", 70.0, rate=8000)
        m4a_named_wav = tmp_path / "m4a.wav"
        m4a_named_wav.write_bytes(b"\0\0\0\x20ftypM4A \0\0\0\0" + bytes(100))
        raw = tmp_path / "long.pcm"
        raw.write_bytes(bytes(2 * 8000 * 61))
        refusals = [
            ([str(good), str(too_long)], "70.0 s long; the server takes at most 60 s"),
            ([str(m4a_named_wav), str(good)], "an MP4/M4A (AAC or ALAC) file, which is not"),
            ([str(good), str(raw), "--rate", "8000"], "61.0 s long"),
        ]
        for files, reason in refusals:
            assert main([*enroll, *files, *new_agent]) == EXIT_USAGE
            assert reason in capsys.readouterr().err
            with pytest.raises(grpc.RpcError) as missing:
                server.enrollment.GetEnrollmentStatus(
                    pb.GetEnrollmentStatusRequest(agent_id="agent-9")
                )
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND

        assert main([*enroll, str(good), "--no-finalize", *new_agent]) == 0
        assert "created agent agent-9" in capsys.readouterr().out
    finally:
        server.stop()


def test_files_are_sent_as_their_content_says_raw_audio_as_its_name(tmp_path: Path) -> None:
    tone = (0.1 * np.sin(np.arange(16_000) / 5)).astype(np.float32)
    files = {
        "call.wav": encoded_file(tone, 16_000, "MP3", "MPEG_LAYER_III"),
        "call.mp3": encoded_file(tone, 16_000, "OGG", "OPUS"),
        "recording": encoded_file(tone, 16_000, "OGG", "VORBIS"),
        "memo.flac": encoded_file(tone, 16_000, "WAV", "PCM_16"),
        # Raw PCM whose first sample looks like an MPEG frame sync: still raw by its name.
        "desk.pcm": b"\xff\xfb\x90\x00" + bytes(3196),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sent = {name: AudioFile.from_path(tmp_path / name, 16_000).encoding for name in files}
    assert sent == {
        "call.wav": pb.AUDIO_ENCODING_MP3,
        "call.mp3": pb.AUDIO_ENCODING_OGG,
        "recording": pb.AUDIO_ENCODING_OGG,
        "memo.flac": pb.AUDIO_ENCODING_WAV,
        "desk.pcm": pb.AUDIO_ENCODING_PCM16LE,
    }
    assert AudioFile.from_path(tmp_path / "call.wav").check(60.0) == pytest.approx(1.0, abs=0.1)
    # A WAV named .pcm is a WAV: a signature that cannot occur by chance wins over the name.
    (tmp_path / "mislabelled.pcm").write_bytes(files["memo.flac"])
    assert AudioFile.from_path(tmp_path / "mislabelled.pcm").encoding == pb.AUDIO_ENCODING_WAV
    (tmp_path / "notes.txt").write_text("minutes of the meeting")
    with pytest.raises(AudioFileError, match="not a recognised audio file"):
        AudioFile.from_path(tmp_path / "notes.txt")
