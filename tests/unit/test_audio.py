"""server/audio.py: every encoding decodes to 16 kHz mono, and bad input says what is wrong."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import torch
import torchaudio.functional

from models.embedder import Waveform
from server.errors import InvalidAudioError
from server.pipeline.decode import (
    TARGET_RATE,
    AudioEncoding,
    decode,
    encode_alaw,
    encode_mulaw,
    waveform_seconds,
)

SPEECH_FILE = Path(__file__).parents[1] / "data" / "198-126831-0000.flac"
LIMIT = 60.0


@pytest.fixture(scope="module")
def speech() -> Waveform:
    """Four seconds of real speech at 16 kHz."""
    samples, rate = sf.read(SPEECH_FILE, dtype="float32")
    assert rate == TARGET_RATE
    return np.asarray(samples[: 4 * TARGET_RATE])


def resample(waveform: Waveform, rate: int, new_rate: int) -> Waveform:
    """An independent reference resampler (a longer sinc filter than torchaudio's default)."""
    resampled = torchaudio.functional.resample(
        torch.from_numpy(waveform), rate, new_rate, lowpass_filter_width=16
    )
    return np.asarray(resampled.numpy())


def snr_db(signal: Waveform, reference: Waveform) -> float:
    assert len(signal) == len(reference)
    error = signal.astype(np.float64) - reference
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum(error**2)))


def file_bytes(
    samples: npt.NDArray[np.float32], rate: int, *, container: str = "WAV", subtype: str = "PCM_16"
) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def pcm16(waveform: Waveform) -> bytes:
    return np.clip(np.round(waveform * 32768), -32768, 32767).astype("<i2").tobytes()


def test_flac_decodes_unchanged() -> None:
    expected, _ = sf.read(SPEECH_FILE, dtype="float32")
    decoded = decode(SPEECH_FILE.read_bytes(), AudioEncoding.FLAC, 0, max_seconds=LIMIT)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected)
    assert waveform_seconds(decoded) == pytest.approx(17.19)


def test_a_declared_rate_equal_to_the_header_is_accepted() -> None:
    decoded = decode(SPEECH_FILE.read_bytes(), AudioEncoding.FLAC, 16000, max_seconds=LIMIT)
    assert len(decoded) == 275040


@pytest.mark.parametrize(
    ("subtype", "tolerance"),
    [("PCM_16", 1 / 32768), ("PCM_24", 1e-6), ("FLOAT", 0.0), ("ULAW", 0.02), ("ALAW", 0.02)],
)
def test_wav_payloads_at_16k_decode(speech: Waveform, subtype: str, tolerance: float) -> None:
    data = file_bytes(speech, 16000, subtype=subtype)
    decoded = decode(data, AudioEncoding.WAV, 0, max_seconds=LIMIT)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, speech, rtol=0, atol=tolerance)


def test_wav_44k_stereo_is_mixed_to_mono_and_resampled(speech: Waveform) -> None:
    left = resample(speech, 16000, 44100)
    stereo = np.stack([left, 0.5 * left], axis=1)
    decoded = decode(file_bytes(stereo, 44100), AudioEncoding.WAV, 44100, max_seconds=LIMIT)
    assert len(decoded) == len(speech)
    assert snr_db(decoded, 0.75 * speech) > 30


def test_raw_pcm16_at_16k_is_unchanged(speech: Waveform) -> None:
    decoded = decode(pcm16(speech), AudioEncoding.PCM16LE, 16000, max_seconds=LIMIT)
    np.testing.assert_array_equal(decoded, speech)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_raw_pcm16_is_resampled(speech: Waveform, rate: int) -> None:
    at_rate = resample(speech, 16000, rate)
    decoded = decode(pcm16(at_rate), AudioEncoding.PCM16LE, rate, max_seconds=LIMIT)
    # The original limited to the band the rate can carry.
    expected = resample(at_rate, rate, 16000) if rate < 16000 else speech
    assert len(decoded) == len(speech)
    assert snr_db(decoded, expected) > 35


@pytest.mark.parametrize(
    ("encoding", "encoder"),
    [(AudioEncoding.MULAW, encode_mulaw), (AudioEncoding.ALAW, encode_alaw)],
)
def test_g711_round_trip_is_close_to_the_band_limited_original(
    speech: Waveform, encoding: AudioEncoding, encoder: Callable[[Waveform], bytes]
) -> None:
    narrowband = resample(speech, 16000, 8000)
    decoded = decode(encoder(narrowband), encoding, 8000, max_seconds=LIMIT)
    assert len(decoded) == len(speech)
    # G.711 companding gives about 38 dB SNR on speech.
    assert snr_db(decoded, resample(narrowband, 8000, 16000)) > 30


@pytest.mark.parametrize(
    ("encoding", "code", "linear"),
    [
        # ITU-T G.711 code words and their 16-bit linear values.
        (AudioEncoding.MULAW, 0xFF, 0),
        (AudioEncoding.MULAW, 0xFE, 8),
        (AudioEncoding.MULAW, 0x7E, -8),
        (AudioEncoding.MULAW, 0x80, 32124),
        (AudioEncoding.MULAW, 0x00, -32124),
        (AudioEncoding.ALAW, 0xD5, 8),
        (AudioEncoding.ALAW, 0x55, -8),
        (AudioEncoding.ALAW, 0xAA, 32256),
        (AudioEncoding.ALAW, 0x2A, -32256),
    ],
)
def test_g711_code_values(encoding: AudioEncoding, code: int, linear: int) -> None:
    # A constant passes the resampler unchanged, so the middle shows the code's value.
    decoded = decode(bytes([code]) * 800, encoding, 8000, max_seconds=LIMIT)
    assert decoded[800] * 32768 == pytest.approx(linear, abs=0.05)


@pytest.mark.parametrize(
    ("encoding", "encoder"),
    [(AudioEncoding.MULAW, encode_mulaw), (AudioEncoding.ALAW, encode_alaw)],
)
def test_g711_encoder_inverts_the_decoder(
    encoding: AudioEncoding, encoder: Callable[[Waveform], bytes]
) -> None:
    codes = [c for c in range(256) if (encoding, c) != (AudioEncoding.MULAW, 0x7F)]
    values = np.array(
        [decode(bytes([c]) * 800, encoding, 8000, max_seconds=LIMIT)[800] for c in codes],
        dtype=np.float32,
    )
    assert encoder(values) == bytes(codes)
    # Mu-law's negative zero comes back as positive zero.
    assert encode_mulaw(np.zeros(1, dtype=np.float32)) == b"\xff"


def test_float_wav_beyond_full_scale_is_clipped_to_the_waveform_range(speech: Waveform) -> None:
    # Near float32's maximum: summing the channels must not overflow.
    huge = np.clip(speech * 100, -1.0, 1.0) * np.float32(3e38)
    data = file_bytes(np.stack([huge, huge], axis=1), 16000, subtype="FLOAT")
    decoded = decode(data, AudioEncoding.WAV, 0, max_seconds=LIMIT)
    assert decoded.min() == -1.0
    assert decoded.max() == 1.0


def test_a_wav_header_claiming_huge_sizes_decodes_the_real_samples(speech: Waveform) -> None:
    data = bytearray(file_bytes(speech, 16000))
    data[4:8] = (0xFFFFFFF0).to_bytes(4, "little")
    chunk = data.find(b"data")
    data[chunk + 4 : chunk + 8] = (0xFFFFFFF0).to_bytes(4, "little")
    decoded = decode(bytes(data), AudioEncoding.WAV, 0, max_seconds=LIMIT)
    assert len(decoded) == len(speech)


def streamed_flac() -> bytes:
    """A FLAC whose header does not state its length, as an encoder writing to a pipe makes."""
    data = bytearray(SPEECH_FILE.read_bytes())
    # STREAMINFO starts at byte 8; its total-samples field is the low 36 bits of bytes 10-17.
    fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


def nan_wav() -> bytes:
    samples = np.zeros(1600, dtype=np.float32)
    samples[100] = np.nan
    return file_bytes(samples, 16000, subtype="FLOAT")


def inf_wav() -> bytes:
    samples = np.zeros((1600, 2), dtype=np.float32)
    samples[100] = [np.inf, -np.inf]
    return file_bytes(samples, 16000, subtype="FLOAT")


SILENCE = np.zeros(16000, dtype=np.float32)
DATA, ENCODING, RATE = "audio.data", "audio.encoding", "audio.sample_rate_hz"


@pytest.mark.parametrize(
    ("make_data", "encoding", "rate", "field", "message"),
    [
        (lambda: b"", AudioEncoding.FLAC, 0, DATA, "audio data is empty"),
        (lambda: b"", AudioEncoding.MULAW, 8000, DATA, "audio data is empty"),
        (
            lambda: file_bytes(SILENCE, 16000),
            AudioEncoding.WAV,
            8000,
            RATE,
            "sample_rate_hz is 8000 but the WAV header says 16000 Hz",
        ),
        (
            SPEECH_FILE.read_bytes,
            AudioEncoding.WAV,
            0,
            ENCODING,
            "audio encoding is WAV but the data is a FLAC file; declare it as FLAC",
        ),
        (
            lambda: file_bytes(SILENCE, 16000),
            AudioEncoding.FLAC,
            0,
            ENCODING,
            "audio encoding is FLAC but the data is a WAV file; declare it as WAV",
        ),
        (
            lambda: file_bytes(SILENCE[:4000], 5000),
            AudioEncoding.WAV,
            0,
            DATA,
            "the WAV sample rate 5000 Hz is not supported",
        ),
        (
            lambda: b"not audio at all" * 10,
            AudioEncoding.WAV,
            0,
            DATA,
            "audio data is not a recognised audio file",
        ),
        (
            lambda: SPEECH_FILE.read_bytes()[:2000],
            AudioEncoding.FLAC,
            0,
            DATA,
            "not a readable FLAC file",
        ),
        (
            lambda: file_bytes(SILENCE, 16000)[:40],
            AudioEncoding.WAV,
            0,
            DATA,
            "not a readable WAV file",
        ),
        (streamed_flac, AudioEncoding.FLAC, 0, DATA, "header does not state the audio's length"),
        (nan_wav, AudioEncoding.WAV, 0, DATA, "non-finite samples"),
        (inf_wav, AudioEncoding.WAV, 0, DATA, "non-finite samples"),
        (lambda: file_bytes(SILENCE[:0], 16000), AudioEncoding.WAV, 0, DATA, "no samples"),
        (
            lambda: file_bytes(np.zeros(16000 * 11, dtype=np.float32), 16000),
            AudioEncoding.WAV,
            0,
            DATA,
            "audio is 11.0 s long; the limit is 10.0 s",
        ),
        (
            SPEECH_FILE.read_bytes,
            AudioEncoding.FLAC,
            0,
            DATA,
            "audio is 17.2 s long; the limit is 10.0 s",
        ),
        (
            lambda: bytes(2 * (48000 * 10 + 1)),
            AudioEncoding.PCM16LE,
            48000,
            DATA,
            "audio is 10.1 s long; the limit is 10.0 s",
        ),
        (
            lambda: bytes(8000 * 75),
            AudioEncoding.ALAW,
            8000,
            DATA,
            "audio is 75.0 s long; the limit is 10.0 s",
        ),
        (
            lambda: bytes(100),
            AudioEncoding.PCM16LE,
            0,
            RATE,
            "sample_rate_hz is required for PCM16LE; use one of 8000, 16000",
        ),
        (
            lambda: bytes(100),
            AudioEncoding.PCM16LE,
            11025,
            RATE,
            "sample_rate_hz 11025 Hz is not supported for PCM16LE",
        ),
        (lambda: bytes(101), AudioEncoding.PCM16LE, 16000, DATA, "whole 2-byte samples"),
        (
            lambda: bytes(100),
            AudioEncoding.MULAW,
            0,
            RATE,
            "sample_rate_hz is not set; it must be 8000 for MULAW",
        ),
        (
            lambda: bytes(100),
            AudioEncoding.ALAW,
            16000,
            RATE,
            "sample_rate_hz is 16000; it must be 8000 for ALAW",
        ),
    ],
)
def test_bad_input_says_what_is_wrong(
    make_data: Callable[[], bytes], encoding: AudioEncoding, rate: int, field: str, message: str
) -> None:
    with pytest.raises(InvalidAudioError) as caught:
        decode(make_data(), encoding, rate, max_seconds=10.0)
    assert caught.value.field == field
    assert message in caught.value.message


def test_mangled_files_raise_only_invalid_audio(speech: Waveform) -> None:
    originals = [
        file_bytes(speech[:8000], 16000),
        file_bytes(speech[:8000], 44100, subtype="FLOAT"),
        file_bytes(speech[:8000], 8000, subtype="ULAW"),
        file_bytes(speech[:8000], 16000, container="FLAC"),
    ]
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data) + 1)]
        for encoding in (AudioEncoding.WAV, AudioEncoding.FLAC):
            try:
                decoded = decode(bytes(data), encoding, 0, max_seconds=LIMIT)
            except InvalidAudioError:
                continue
            assert decoded.dtype == np.float32
            assert np.all(np.abs(decoded) <= 1.0)
