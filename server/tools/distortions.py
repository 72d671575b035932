"""Domain shifts that `voxauth eval` puts test speech through: the channels, rooms and codecs
that the calibration never saw (its trials are clean read speech, wideband and through a
simulated G.711 u-law call).

Each distortion is deterministic for a recording (its noise is seeded by the file), so the
embeddings can be cached. The test channel is the one the service would score the result on:
16 kHz audio with its upper band is wideband; audio sent at 8 kHz is telephone.
"""

from __future__ import annotations

import enum
import functools
import io
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from models.embedder import Waveform
from server.pipeline.channel import Channel
from server.pipeline.decode import G711_RATE, TARGET_RATE, AudioEncoding, decode, encode_alaw

Segments = list[tuple[int, int]]


class Distortion(enum.Enum):
    NOISE_20DB = "noise-20db"
    """Pink noise at 20 dB below the speech."""
    NOISE_10DB = "noise-10db"
    NOISE_5DB = "noise-5db"
    REVERB = "reverb"
    """A 5 x 4 x 3 m room with a reverberation time of 0.6 s, speaker 2.2 m from the mic."""
    SPEED_SLOW = "speed-0.9"
    """Played 10% slower (pitch 10% lower)."""
    SPEED_FAST = "speed-1.1"
    OPUS = "opus-16k"
    """Opus at 16 kHz and about 14 kbit/s: a low-bitrate wideband codec."""
    ALAW = "alaw"
    """A G.711 A-law call (8 kHz) instead of the calibration's u-law."""
    MP3 = "mp3-8k"
    """MP3 at 8 kHz and about 14 kbit/s: a low-bitrate narrowband codec."""
    QUIET_TELEPHONE = "telephone-44dbfs"
    """A u-law call whose speech lies at -44 dBFS: a quiet line."""
    WORDS = "words-8k"
    """Isolated short words over a u-law call: 0.3-0.6 s pieces of the speech, 0.5 s of
    silence after each, as a caller reads digits or a passphrase word by word."""

    @property
    def channel(self) -> Channel:
        """The channel the service scores the distorted speech on."""
        return Channel.TELEPHONE if self in _NARROWBAND else Channel.WIDEBAND

    def apply(self, waveform: Waveform, speech: Segments, seed: int) -> Waveform:
        """`waveform` (16 kHz) through this distortion; `speech` are the VAD's segments of
        it (the word strings are cut from them); `seed` makes the noise reproducible."""
        return _APPLY[self](np.ascontiguousarray(waveform, dtype=np.float32), speech, seed)


_NARROWBAND = frozenset(
    {Distortion.ALAW, Distortion.MP3, Distortion.QUIET_TELEPHONE, Distortion.WORDS}
)
_WORD_GAP_SECONDS = 0.5


def _resample(waveform: Waveform, rate: int, to_rate: int) -> Waveform:
    import torch
    import torchaudio.functional

    result: Waveform = torchaudio.functional.resample(
        torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), rate, to_rate
    ).numpy()
    return result


def _clipped(waveform: npt.NDArray[np.floating]) -> Waveform:
    result: Waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32)
    return result


def _speech_power(waveform: Waveform) -> float:
    """Mean power of the louder half of 20 ms frames: the speech, not the pauses."""
    frames = waveform[: len(waveform) // 320 * 320].reshape(-1, 320).astype(np.float64)
    power = (frames**2).mean(axis=1)
    return float(np.mean(power[power >= np.median(power)])) if len(power) else 0.0


def _pink_noise(samples: int, seed: int) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.normal(size=samples))
    frequencies = np.fft.rfftfreq(samples, 1.0 / TARGET_RATE)
    spectrum[1:] /= np.sqrt(frequencies[1:])
    spectrum[0] = 0.0
    noise: npt.NDArray[np.float64] = np.fft.irfft(spectrum, samples)
    noise /= np.sqrt(np.mean(noise**2))
    return noise


def _noise(snr_db: float) -> Callable[[Waveform, Segments, int], Waveform]:
    def apply(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
        noise = _pink_noise(len(waveform), seed) * np.sqrt(_speech_power(waveform))
        return _clipped(waveform + noise * 10 ** (-snr_db / 20))

    return apply


@functools.cache
def _room_impulse_response() -> npt.NDArray[np.float64]:
    import pyroomacoustics as pra

    absorption, max_order = pra.inverse_sabine(0.6, [5.0, 4.0, 3.0])
    room = pra.ShoeBox(
        [5.0, 4.0, 3.0],
        fs=TARGET_RATE,
        materials=pra.Material(absorption),
        max_order=max_order,
    )
    room.add_source([1.5, 1.2, 1.6])
    room.add_microphone([3.5, 2.5, 1.2])
    room.compute_rir()
    response: npt.NDArray[np.float64] = np.asarray(room.rir[0][0], dtype=np.float64)
    response /= np.abs(response).max()
    return response


def _reverb(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    from scipy.signal import fftconvolve

    wet = fftconvolve(waveform.astype(np.float64), _room_impulse_response())[: len(waveform)]
    # The level the speech had: a room changes the sound, the caller's gain keeps the level.
    wet *= np.sqrt(_speech_power(waveform) / max(_speech_power(wet.astype(np.float32)), 1e-12))
    return _clipped(wet)


def _speed(factor: float) -> Callable[[Waveform, Segments, int], Waveform]:
    def apply(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
        return _clipped(_resample(waveform, round(TARGET_RATE * factor), TARGET_RATE))

    return apply


def _through_soundfile(
    waveform: Waveform, rate: int, container: str, subtype: str, compression: float
) -> Waveform:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(
        buffer, waveform, rate, format=container, subtype=subtype, compression_level=compression
    )
    buffer.seek(0)
    decoded, decoded_rate = soundfile.read(buffer, dtype="float32")
    # Codecs add a few frames of delay; the length stays what was sent.
    return _clipped(_resample(decoded[: len(waveform)], decoded_rate, TARGET_RATE))


def _opus(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    return _through_soundfile(waveform, TARGET_RATE, "OGG", "OPUS", 1.0)


def _mp3(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    narrowband = _resample(waveform, TARGET_RATE, G711_RATE)
    return _through_soundfile(narrowband, G711_RATE, "MP3", "MPEG_LAYER_III", 0.9)


def _alaw(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    narrowband = _resample(waveform, TARGET_RATE, G711_RATE)
    return decode(encode_alaw(narrowband), AudioEncoding.ALAW, G711_RATE, max_seconds=1e9)


def _ulaw_call(waveform: Waveform) -> Waveform:
    from server.pipeline.decode import telephone_channel

    return telephone_channel(waveform)


def _quiet_telephone(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    target_power = 10 ** (-44 / 10)
    scaled = waveform * np.sqrt(target_power / max(_speech_power(waveform), 1e-12))
    return _ulaw_call(_clipped(scaled))


def word_string(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    """Pieces of 0.3 to 0.6 s cut from the speech (its segments joined), 0.2 to 0.5 s of it
    skipped between two, each piece followed by 0.5 s of silence: isolated words."""
    if not speech:
        return np.zeros(0, dtype=np.float32)
    voiced = np.concatenate([waveform[start:end] for start, end in speech])
    rng = np.random.default_rng(seed)
    gap = np.zeros(int(_WORD_GAP_SECONDS * TARGET_RATE), dtype=np.float32)
    pieces: list[Waveform] = []
    position = 0
    while True:
        length = int(rng.uniform(0.3, 0.6) * TARGET_RATE)
        if position + length > len(voiced):
            break
        pieces += [voiced[position : position + length], gap]
        position += length + int(rng.uniform(0.2, 0.5) * TARGET_RATE)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def _words(waveform: Waveform, speech: Segments, seed: int) -> Waveform:
    words = word_string(waveform, speech, seed)
    return _ulaw_call(words) if len(words) else words


_APPLY: dict[Distortion, Callable[[Waveform, Segments, int], Waveform]] = {
    Distortion.NOISE_20DB: _noise(20.0),
    Distortion.NOISE_10DB: _noise(10.0),
    Distortion.NOISE_5DB: _noise(5.0),
    Distortion.REVERB: _reverb,
    Distortion.SPEED_SLOW: _speed(0.9),
    Distortion.SPEED_FAST: _speed(1.1),
    Distortion.OPUS: _opus,
    Distortion.ALAW: _alaw,
    Distortion.MP3: _mp3,
    Distortion.QUIET_TELEPHONE: _quiet_telephone,
    Distortion.WORDS: _words,
}
