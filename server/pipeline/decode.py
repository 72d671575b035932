"""Audio decoding: encoded bytes plus their declared format -> 16 kHz mono float32.

This is the only place that understands audio formats. Every failure is an InvalidAudioError
naming the request field at fault, so bad bytes can never surface as anything else.
"""

from __future__ import annotations

import enum
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf

from models.embedder import Waveform
from server.errors import InvalidAudioError

TARGET_RATE = 16000
"""The rate every decoded waveform has."""

G711_RATE = 8000

RAW_PCM_RATES = frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000})
"""Rates accepted for raw PCM16LE, as documented in the API."""

# File headers may carry any rate, but only standard ones are accepted: the resampler's
# kernel grows with orig / gcd(orig, 16000), so an odd rate such as 44101 Hz would cost
# gigabytes. Below 8 kHz there is too little bandwidth to recognise a speaker.
FILE_RATES = frozenset(
    {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000}
)

# Samples read per block (divided among channels), so a file with many channels never needs
# more than one block of multichannel samples in memory.
_BLOCK_SAMPLES = 1 << 20

# What libsndfile reports as the length of a file whose header does not state it.
_UNKNOWN_LENGTH = 2**63 - 1

# The "kaiser_best" windowed-sinc filter (as in resampy/librosa): flat to 0.95 of the lower
# Nyquist frequency and > 100 dB stop-band, so 8 kHz telephone audio is upsampled without
# images above 4 kHz. torchaudio's default filter leaves the 4.5 kHz image of a 3.5 kHz tone
# only 15 dB down; this one is still a few ms per minute of audio.
_RESAMPLER: dict[str, Any] = {
    "lowpass_filter_width": 64,
    "rolloff": 0.9475937167399596,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.769656459379492,
}


class AudioEncoding(enum.Enum):
    """How audio bytes are encoded. Values are the API's enum numbers."""

    WAV = 1
    FLAC = 2
    PCM16LE = 3
    MULAW = 4
    ALAW = 5


# The Audio message's fields, named in errors.
_DATA = "audio.data"
_ENCODING = "audio.encoding"
_RATE = "audio.sample_rate_hz"

# libsndfile's format names for each file encoding. WAVEX is WAVE_FORMAT_EXTENSIBLE, which
# multichannel and 24-bit WAV files commonly use.
_CONTAINERS = {
    AudioEncoding.WAV: frozenset({"WAV", "WAVEX"}),
    AudioEncoding.FLAC: frozenset({"FLAC"}),
}


def waveform_seconds(waveform: Waveform) -> float:
    """Duration of a waveform at TARGET_RATE."""
    return len(waveform) / TARGET_RATE


@dataclass(frozen=True, eq=False)
class DecodedAudio:
    waveform: Waveform
    """At TARGET_RATE, mono, float32 in [-1, 1]."""
    source_rate_hz: int
    """The rate the audio had before conversion: 8000 means telephone band."""


def decode(
    data: bytes,
    encoding: AudioEncoding,
    sample_rate_hz: int,
    *,
    max_seconds: float,
) -> Waveform:
    """Decodes `data` to 16 kHz mono float32.

    `sample_rate_hz` is the declared rate (0 = not declared). Raises InvalidAudioError, with
    the field of the Audio message at fault, for anything that cannot be used.
    """
    return decode_audio(data, encoding, sample_rate_hz, max_seconds=max_seconds).waveform


def decode_audio(
    data: bytes,
    encoding: AudioEncoding,
    sample_rate_hz: int,
    *,
    max_seconds: float,
) -> DecodedAudio:
    """`decode`, also telling the rate the audio came at."""
    if not data:
        raise InvalidAudioError("audio data is empty", field=_DATA)
    if encoding in (AudioEncoding.WAV, AudioEncoding.FLAC):
        samples, rate = _read_file(data, encoding, sample_rate_hz, max_seconds)
    elif encoding is AudioEncoding.PCM16LE:
        samples, rate = _read_pcm16le(data, sample_rate_hz, max_seconds)
    else:
        samples, rate = _read_g711(data, encoding, sample_rate_hz, max_seconds)
    if samples.size == 0:
        raise InvalidAudioError("audio contains no samples", field=_DATA)
    return DecodedAudio(_to_target_rate(samples, rate), rate)


def telephone_channel(waveform: Waveform) -> Waveform:
    """What a 16 kHz waveform becomes over a G.711 telephone call: band-limited to 8 kHz
    sampling, mu-law coded, and decoded back to 16 kHz by the same path as a client's u-law."""
    narrowband = _resample(np.ascontiguousarray(waveform, dtype=np.float32), TARGET_RATE, G711_RATE)
    return _to_target_rate(
        _MULAW_TABLE[np.frombuffer(encode_mulaw(narrowband), np.uint8)], G711_RATE
    )


def encode_mulaw(waveform: Waveform) -> bytes:
    """G.711 mu-law bytes of `waveform` (float in [-1, 1], meant to be at 8 kHz)."""
    # ITU-T G.711 mu-law, as in the Sun reference implementation: 14-bit magnitude, biased
    # by 33 so every segment boundary is a power of two.
    pcm = _to_int16(waveform) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + 0x21
    segment = np.searchsorted(_MULAW_SEGMENT_ENDS, magnitude)
    code = np.where(
        segment >= 8,
        0x7F,  # beyond the last segment: the largest magnitude
        (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F),
    )
    return (code ^ mask).astype(np.uint8).tobytes()


def encode_alaw(waveform: Waveform) -> bytes:
    """G.711 A-law bytes of `waveform` (float in [-1, 1], meant to be at 8 kHz)."""
    # ITU-T G.711 A-law, as in the Sun reference implementation: 13-bit magnitude; a
    # 16-bit input never exceeds the last segment.
    pcm = _to_int16(waveform) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude)
    code = (segment << 4) | ((magnitude >> np.maximum(segment, 1)) & 0x0F)
    return (code ^ mask).astype(np.uint8).tobytes()


def _check_duration(frames: int, rate: int, max_seconds: float) -> None:
    seconds = frames / rate
    if seconds > max_seconds:
        # Rounded up, so 60.01 s is not reported as "60.0 s long; the limit is 60.0 s".
        shown = math.ceil(seconds * 10) / 10
        raise InvalidAudioError(
            f"audio is {shown:.1f} s long; the limit is {max_seconds:.1f} s",
            field=_DATA,
        )


def _read_file(
    data: bytes,
    encoding: AudioEncoding,
    declared_rate: int,
    max_seconds: float,
) -> tuple[npt.NDArray[np.float32], int]:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format not in _CONTAINERS[encoding]:
                raise InvalidAudioError(
                    f"audio encoding is {encoding.name} but the data is in {f.format} format",
                    field=_ENCODING,
                )
            rate = int(f.samplerate)
            if declared_rate not in (0, rate):
                raise InvalidAudioError(
                    f"sample_rate_hz is {declared_rate} but the {encoding.name} header says"
                    f" {rate} Hz; set it to 0 or {rate}",
                    field=_RATE,
                )
            if rate not in FILE_RATES:
                raise InvalidAudioError(
                    f"the {encoding.name} sample rate {rate} Hz is not supported; use one of"
                    f" {_rate_list(FILE_RATES)} Hz",
                    field=_DATA,
                )
            samples = _read_mono(f, encoding, rate, max_seconds)
    except sf.LibsndfileError as e:
        raise InvalidAudioError(
            f"audio data is not a readable {encoding.name} file: {e.error_string}",
            field=_DATA,
        ) from e
    except sf.SoundFileError as e:
        raise InvalidAudioError(
            f"audio data is not a readable {encoding.name} file: {e}", field=_DATA
        ) from e
    return samples, rate


def _read_mono(
    f: Any, encoding: AudioEncoding, rate: int, max_seconds: float
) -> npt.NDArray[np.float32]:
    """The samples of an open sound file, channels averaged, read block by block."""
    if f.frames == _UNKNOWN_LENGTH:
        # A FLAC written to a pipe has no length in its header, and libsndfile fails at the
        # end of such a file; nor could the length limit be checked before decoding.
        raise InvalidAudioError(
            f"the {encoding.name} header does not state the audio's length (the file was"
            " written to a stream); write it to a file, or send PCM16LE",
            field=_DATA,
        )
    # Checked from the header before any sample is decoded, so an over-long upload costs
    # nothing; libsndfile never reads past the length the header states.
    _check_duration(int(f.frames), rate, max_seconds)
    blocks = []
    for block in f.blocks(
        blocksize=max(1, _BLOCK_SAMPLES // int(f.channels)), dtype="float32", always_2d=True
    ):
        # Only float files can hold these; checked before mixing, where inf - inf is NaN.
        if not np.isfinite(block).all():
            raise InvalidAudioError(
                "audio contains non-finite samples (NaN or infinity)", field=_DATA
            )
        # In float64, so float files' huge values cannot overflow while summed.
        blocks.append(block.mean(axis=1, dtype=np.float64).astype(np.float32))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def _read_pcm16le(
    data: bytes, declared_rate: int, max_seconds: float
) -> tuple[npt.NDArray[np.float32], int]:
    if declared_rate not in RAW_PCM_RATES:
        problem = "is required" if declared_rate == 0 else f"{declared_rate} Hz is not supported"
        raise InvalidAudioError(
            f"sample_rate_hz {problem} for PCM16LE; use one of {_rate_list(RAW_PCM_RATES)}",
            field=_RATE,
        )
    if len(data) % 2:
        raise InvalidAudioError(
            f"PCM16LE data must be whole 2-byte samples; got {len(data)} bytes",
            field=_DATA,
        )
    _check_duration(len(data) // 2, declared_rate, max_seconds)
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32)
    samples /= 32768
    return samples, declared_rate


def _read_g711(
    data: bytes,
    encoding: AudioEncoding,
    declared_rate: int,
    max_seconds: float,
) -> tuple[npt.NDArray[np.float32], int]:
    if declared_rate != G711_RATE:
        found = "is not set" if declared_rate == 0 else f"is {declared_rate}"
        raise InvalidAudioError(
            f"sample_rate_hz {found}; it must be {G711_RATE} for {encoding.name}",
            field=_RATE,
        )
    _check_duration(len(data), G711_RATE, max_seconds)
    table = _MULAW_TABLE if encoding is AudioEncoding.MULAW else _ALAW_TABLE
    return table[np.frombuffer(data, dtype=np.uint8)], G711_RATE


def _to_target_rate(samples: npt.NDArray[np.float32], rate: int) -> Waveform:
    if rate != TARGET_RATE:
        samples = _resample(samples, rate, TARGET_RATE)
    # Float files may exceed full scale, and resampling overshoots near it; the Waveform
    # contract is [-1, 1], and such samples are clipped in any case.
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def _resample(samples: npt.NDArray[np.float32], rate: int, to_rate: int) -> Waveform:
    # torch is imported on first use, not with this module: the domain modules that name audio
    # types stay importable without it.
    import torch
    import torchaudio.functional

    resampled = torchaudio.functional.resample(
        torch.from_numpy(samples), rate, to_rate, **_RESAMPLER
    )
    result: Waveform = resampled.numpy()
    return result


def _to_int16(waveform: Waveform) -> npt.NDArray[np.int32]:
    scaled = np.clip(np.round(waveform.astype(np.float64) * 32768), -32768, 32767)
    return scaled.astype(np.int32)


def _rate_list(rates: frozenset[int]) -> str:
    return ", ".join(str(r) for r in sorted(rates))


def _mulaw_table() -> npt.NDArray[np.float32]:
    # ITU-T G.711 mu-law expansion: bits are stored inverted; magnitude is
    # ((2 * mantissa + 33) << exponent) - 33 in 14-bit units, here scaled to 16 bits.
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    linear = np.where(code & 0x80, -magnitude, magnitude)
    return (linear / 32768).astype(np.float32)


def _alaw_table() -> npt.NDArray[np.float32]:
    # ITU-T G.711 A-law expansion: even bits are stored inverted (XOR 0x55); the sign bit set
    # means positive; segment 0 is linear, the others double in step size.
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    linear = np.where(code & 0x80, magnitude, -magnitude)
    return (linear / 32768).astype(np.float32)


_MULAW_TABLE = _mulaw_table()
_ALAW_TABLE = _alaw_table()
_MULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
