"""Streamed audio (AudioStream): pieces decode to exactly what the whole upload decodes to, an
over-long stream is refused as it arrives, and every buffer is claimed from the audio budget
before it is filled."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from server.errors import AudioBudgetExceededError, InvalidAudioError
from server.pipeline.decode import AudioEncoding, AudioStream, decode, encode_mulaw
from server.runtime.audio_budget import AudioBudget

SPEECH_FILE = Path(__file__).parents[1] / "data" / "198-126831-0000.flac"
LIMIT = 60.0
MIB = 2**20


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    samples, _ = sf.read(SPEECH_FILE, dtype="float32")
    return np.asarray(samples[: 4 * 16000])


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def streamed(
    data: bytes, encoding: AudioEncoding, rate: int, size: int, budget: AudioBudget | None = None
) -> np.ndarray:
    reservation = budget.reserve() if budget else None
    stream = AudioStream(encoding, rate, max_seconds=LIMIT, reservation=reservation)
    for piece in pieces(data, size):
        stream.feed(piece)
    return stream.finish().waveform


@pytest.mark.parametrize("size", [3, 4095, 4096, 1 << 20])
def test_pcm16_in_pieces_of_any_size_decodes_as_the_whole(speech: np.ndarray, size: int) -> None:
    # Odd sizes split samples between pieces.
    data = (speech * 32767).astype("<i2").tobytes()
    whole = decode(data, AudioEncoding.PCM16LE, 16000, max_seconds=LIMIT)
    np.testing.assert_array_equal(streamed(data, AudioEncoding.PCM16LE, 16000, size), whole)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_resampled_pcm16_in_pieces_decodes_as_the_whole(speech: np.ndarray, rate: int) -> None:
    data = (np.resize(speech, rate * 3) * 32767).astype("<i2").tobytes()
    whole = decode(data, AudioEncoding.PCM16LE, rate, max_seconds=LIMIT)
    np.testing.assert_array_equal(streamed(data, AudioEncoding.PCM16LE, rate, 7777), whole)


def test_g711_in_pieces_decodes_as_the_whole(speech: np.ndarray) -> None:
    data = encode_mulaw(speech[::2])
    whole = decode(data, AudioEncoding.MULAW, 8000, max_seconds=LIMIT)
    np.testing.assert_array_equal(streamed(data, AudioEncoding.MULAW, 8000, 1000), whole)


def test_a_flac_file_in_pieces_decodes_as_the_whole() -> None:
    data = SPEECH_FILE.read_bytes()
    whole = decode(data, AudioEncoding.FLAC, 0, max_seconds=LIMIT)
    np.testing.assert_array_equal(streamed(data, AudioEncoding.FLAC, 0, 65536), whole)


def test_a_stream_is_refused_once_it_passes_the_limit_without_reading_on() -> None:
    stream = AudioStream(AudioEncoding.PCM16LE, 16000, max_seconds=10.0)
    second = bytes(2 * 16000)
    for _ in range(10):
        stream.feed(second)
    with pytest.raises(InvalidAudioError) as refused:
        stream.feed(b"\0\0")
    assert refused.value.field == "audio.data"
    assert "longer than the limit of 10.0 s" in refused.value.message


def test_a_streamed_file_beyond_the_byte_limit_is_refused() -> None:
    stream = AudioStream(AudioEncoding.WAV, 0, max_seconds=LIMIT, max_encoded_bytes=1000)
    stream.feed(bytes(600))
    with pytest.raises(InvalidAudioError) as refused:
        stream.feed(bytes(600))
    assert "exceeds 1000 bytes" in refused.value.message


def test_an_odd_number_of_pcm16_bytes_in_all_is_refused() -> None:
    stream = AudioStream(AudioEncoding.PCM16LE, 16000, max_seconds=LIMIT)
    stream.feed(bytes(3))
    stream.feed(bytes(2))
    with pytest.raises(InvalidAudioError) as refused:
        stream.finish()
    assert "whole 2-byte samples; got 5 bytes" in refused.value.message


def test_a_bad_rate_is_refused_before_any_audio() -> None:
    with pytest.raises(InvalidAudioError) as refused:
        AudioStream(AudioEncoding.ALAW, 16000, max_seconds=LIMIT)
    assert refused.value.field == "audio.sample_rate_hz"


def test_a_stream_holds_its_decoded_samples_not_its_bytes() -> None:
    budget = AudioBudget(64 * MIB)
    with budget.reserve() as reservation:
        stream = AudioStream(
            AudioEncoding.PCM16LE, 16000, max_seconds=LIMIT, reservation=reservation
        )
        for _ in range(60):
            stream.feed(bytes(2 * 16000))
        # 60 s of float32 at 16 kHz, claimed as the buffer doubled up to the limit.
        assert budget.held_bytes == 60 * 16000 * 4
        assert len(stream.finish().waveform) == 60 * 16000
    assert budget.held_bytes == 0


def test_a_streamed_file_holds_its_bytes_then_its_samples() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(8000 * 10, dtype=np.float32), 8000, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    budget = AudioBudget(64 * MIB)
    with budget.reserve() as reservation:
        stream = AudioStream(AudioEncoding.WAV, 0, max_seconds=LIMIT, reservation=reservation)
        for piece in pieces(data, 4096):
            stream.feed(piece)
        assert budget.held_bytes == len(data)
        assert len(stream.finish().waveform) == 16000 * 10
        # The file, its samples at 8 kHz and the waveform at 16 kHz.
        assert budget.held_bytes == len(data) + 8000 * 10 * 4 + 16000 * 10 * 4


def test_a_piece_the_budget_cannot_hold_is_refused_before_it_is_decoded() -> None:
    budget = AudioBudget(MIB)
    with budget.reserve() as reservation:
        stream = AudioStream(
            AudioEncoding.PCM16LE, 16000, max_seconds=LIMIT, reservation=reservation
        )
        stream.feed(bytes(2 * 16000 * 10))  # 10 s: 640 kB of samples
        with pytest.raises(AudioBudgetExceededError):
            stream.feed(bytes(2 * 16000))  # the buffer would double past 1 MiB
        assert budget.held_bytes == 10 * 16000 * 4
