"""The shift's audio buffer and checkpoint schedule, with a fake speech detector."""

from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np
import pytest

from server.config import ShiftPolicy
from server.errors import InvalidAudioError
from server.pipeline.decode import AudioEncoding
from server.shifts.buffer import ShiftAudioBuffer, StreamFormat
from server.shifts.schedule import CheckpointSchedule
from tests.fakes import LoudIsSpeech

PCM16 = StreamFormat.declared(AudioEncoding.PCM16LE, 16_000)
MULAW = StreamFormat.declared(AudioEncoding.MULAW, 8_000)


def second(level: float) -> bytes:
    """One second of PCM16 at a constant level: 50 frames."""
    return (np.full(16_000, level) * 32767).astype("<i2").tobytes()


def feed(buffer: ShiftAudioBuffer, data: bytes, start: float) -> float:
    for i in range(0, len(data), 640 * 50):
        start += 1.0
        buffer.append(data[i : i + 640 * 50], start)
    return start


def test_formats_and_frame_sizes() -> None:
    assert PCM16.frame_bytes == 640
    assert MULAW.frame_bytes == 160
    assert PCM16.frame_count(b"\0" * 640 * 3) == 3
    for size in (0, 639, 641, 640 * 51):
        with pytest.raises(InvalidAudioError, match="whole 20 ms frames"):
            PCM16.frame_count(b"\0" * size)
    assert StreamFormat.declared(AudioEncoding.PCM16LE, 8_000).frame_bytes == 320
    assert StreamFormat.declared(AudioEncoding.OPUS, 0).sample_rate_hz == 48_000
    for encoding, rate in ((AudioEncoding.PCM16LE, 22_050), (AudioEncoding.OPUS, 16_000)):
        with pytest.raises(InvalidAudioError, match="PCM16LE at 16000 or 8000"):
            StreamFormat.declared(encoding, rate)
    with pytest.raises(InvalidAudioError):
        StreamFormat.declared(AudioEncoding.WAV, 16_000)


def test_takes_the_most_recent_speech_only() -> None:
    buffer = ShiftAudioBuffer(PCM16, max_age_seconds=60)
    t = feed(buffer, second(0.5) * 3, 0.0)  # 3 s of old speech
    t = feed(buffer, second(0.0) * 2, t)  # 2 s of silence
    feed(buffer, second(0.3) * 4, t)  # 4 s of recent speech
    assert buffer.recent_speech(LoudIsSpeech(), 8.0) is None
    recent = buffer.recent_speech(LoudIsSpeech(), 5.0)
    assert recent is not None
    assert recent.net_seconds == pytest.approx(5.0)
    # Oldest first: the last second of the old speech, then the 4 recent seconds.
    assert recent.speech[:16_000] == pytest.approx(0.5, abs=1e-3)
    assert recent.speech[16_000:] == pytest.approx(0.3, abs=1e-3)
    assert recent.start == pytest.approx(2.0) and recent.end == pytest.approx(9.0)


def test_old_audio_is_dropped_and_memory_stays_bounded() -> None:
    buffer = ShiftAudioBuffer(PCM16, max_age_seconds=10)
    t = feed(buffer, second(0.5) * 5, 0.0)
    feed(buffer, second(0.0) * 60, t)  # a long silence pushes the speech out
    assert buffer.buffered_seconds <= 11
    assert buffer.recent_speech(LoudIsSpeech(), 1.0) is None
    # A client sending far faster than real time is bounded by amount.
    hasty = ShiftAudioBuffer(PCM16, max_age_seconds=10)
    for _ in range(300):
        hasty.append(second(0.5)[: 640 * 50], 1.0)
    assert hasty.buffered_seconds <= 10


def test_speech_detection_runs_once_per_block() -> None:
    detector = LoudIsSpeech()
    buffer = ShiftAudioBuffer(PCM16, max_age_seconds=60)
    t = feed(buffer, second(0.5) * 2, 0.0)
    assert buffer.recent_speech(detector, 5.0) is None
    feed(buffer, second(0.5) * 4, t)
    assert buffer.recent_speech(detector, 5.0) is not None
    # The second look analysed only the 4 new seconds.
    assert detector.analysed == [2 * 16_000, 4 * 16_000]


def test_the_same_audio_sent_again_at_once_is_still_taken() -> None:
    # A client sending faster than real time, the same recording twice: blocks with equal
    # audio and equal clock times.
    buffer = ShiftAudioBuffer(PCM16, max_age_seconds=60)
    for _ in range(2):
        for _ in range(3):
            buffer.append(second(0.5), 5.0)
        buffer.recent_speech(LoudIsSpeech(), 1.0)  # seals the blocks, as a checkpoint does
    recent = buffer.recent_speech(LoudIsSpeech(), 4.0)
    assert recent is not None and recent.net_seconds == pytest.approx(4.0)


def test_telephone_frames_are_decoded_to_16_khz() -> None:
    from server.pipeline.decode import encode_mulaw

    buffer = ShiftAudioBuffer(MULAW, max_age_seconds=60)
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(8_000 * 3) / 8_000)).astype(np.float32)
    data = encode_mulaw(tone)
    for i, start in enumerate(range(0, len(data), 160 * 50)):
        buffer.append(data[start : start + 160 * 50], float(i + 1))
    recent = buffer.recent_speech(LoudIsSpeech(), 1.0)
    assert recent is not None
    assert np.max(np.abs(recent.speech)) == pytest.approx(0.5, abs=0.05)


def test_checkpoint_intervals_are_random_within_the_policy() -> None:
    policy = replace(
        ShiftPolicy(),
        mean_checkpoint_interval_seconds=600,
        checkpoint_jitter_seconds=480,
        min_checkpoint_gap_seconds=200,
    )
    intervals = [CheckpointSchedule(policy).next_interval() for _ in range(2000)]
    assert min(intervals) >= 200
    assert max(intervals) <= 1080
    # Draws below the minimum gap (about 8% here) become the gap; the rest spread evenly and
    # hardly ever repeat.
    above = [i for i in intervals if i > 200]
    assert 0.85 * len(intervals) < len(above) < 0.97 * len(intervals)
    assert len(set(above)) > 0.99 * len(above)
    assert statistics.mean(above) == pytest.approx(640, rel=0.05)
