"""Audio decoding: encoded bytes plus their declared format -> 16 kHz mono float32.

This is the only place that understands audio formats. Every failure is an InvalidAudioError
naming the request field at fault, so bad bytes can never surface as anything else. Audio that
arrives in pieces is decoded piece by piece where the format allows (AudioStream), and every
buffer decoding fills can be claimed from the server's audio budget first.
"""

from __future__ import annotations

import enum
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf

from models.embedder import Waveform
from server.errors import InvalidAudioError
from server.pipeline.containers import SNIFF_BYTES, Container, sniff
from server.runtime.audio_budget import AudioReservation

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

# A stream's sample buffer starts at this many samples (10 s at 16 kHz), then doubles up to
# the length limit.
_INITIAL_SAMPLES = 10 * 16000

_FLOAT_BYTES = 4

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
    MP3 = 40
    OGG = 41
    """An Ogg file holding Vorbis or Opus."""
    OPUS = 42
    """Opus packets as a softphone sends them (one per message): shift streams only, see
    server/pipeline/opus.py. A file of Opus audio is OGG."""


# The Audio message's fields, named in errors.
_DATA = "audio.data"
_ENCODING = "audio.encoding"
_RATE = "audio.sample_rate_hz"

# libsndfile's format names for each file encoding. WAVEX is WAVE_FORMAT_EXTENSIBLE, which
# multichannel and 24-bit WAV files commonly use.
_CONTAINERS = {
    AudioEncoding.WAV: frozenset({"WAV", "WAVEX"}),
    AudioEncoding.FLAC: frozenset({"FLAC"}),
    AudioEncoding.MP3: frozenset({"MP3"}),
    AudioEncoding.OGG: frozenset({"OGG"}),
}

# The file encoding each container (as its first bytes tell it) is declared as.
FILE_ENCODINGS = {
    Container.WAV: AudioEncoding.WAV,
    Container.FLAC: AudioEncoding.FLAC,
    Container.MP3: AudioEncoding.MP3,
    Container.OGG_VORBIS: AudioEncoding.OGG,
    Container.OGG_OPUS: AudioEncoding.OGG,
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
    reservation: AudioReservation | None = None,
) -> DecodedAudio:
    """`decode`, also telling the rate the audio came at. The buffers decoding fills are
    claimed from `reservation` (if given) before they are filled; `data` itself is the
    caller's to account for."""
    if not data:
        raise InvalidAudioError("audio data is empty", field=_DATA)
    stream = AudioStream(encoding, sample_rate_hz, max_seconds=max_seconds, reservation=reservation)
    stream.feed(data, held_elsewhere=True)
    return stream.finish()


class AudioStream:
    """Encoded audio that arrives in pieces (a streamed utterance), decoded as it comes where
    the format allows.

    PCM16LE and G.711 pieces become float samples as they arrive and their bytes are not kept;
    the length limit is checked on each piece, so an over-long stream is refused at
    `max_seconds` instead of being buffered to its end. WAV and FLAC are read by libsndfile,
    which needs the whole file: their bytes are kept in one buffer, up to `max_encoded_bytes`,
    and decoded by `finish`. Every buffer is claimed from `reservation` before it is filled, so
    the audio budget refuses a stream the moment it would exceed it.

    The rate and encoding are checked when the stream is made (its first piece); `feed` runs
    on the event loop (it only copies and converts), `finish` on a worker (it resamples).
    """

    def __init__(
        self,
        encoding: AudioEncoding,
        sample_rate_hz: int,
        *,
        max_seconds: float,
        max_encoded_bytes: int | None = None,
        reservation: AudioReservation | None = None,
    ) -> None:
        self._encoding = encoding
        self._declared_rate = sample_rate_hz
        self._max_seconds = max_seconds
        self._max_encoded_bytes = max_encoded_bytes
        self._reservation = reservation
        self._received = 0
        if encoding is AudioEncoding.PCM16LE:
            self._rate = _pcm16le_rate(sample_rate_hz)
        elif encoding in (AudioEncoding.MULAW, AudioEncoding.ALAW):
            self._rate = _g711_rate(encoding, sample_rate_hz)
        elif encoding is AudioEncoding.OPUS:
            # Bare Opus packets have no framing of their own: only a shift stream, whose
            # messages frame them, carries them.
            raise InvalidAudioError(
                "OPUS is for shift streams (one packet per message); send a recording in Opus "
                "as an OGG file",
                field=_ENCODING,
            )
        else:
            self._rate = 0  # a file's header tells it
        self._max_samples = int(max_seconds * self._rate)
        # Samples at the source rate, of which the first `_count` are filled. Grown by
        # doubling, in place (realloc: large blocks are remapped, not copied).
        self._samples = np.empty(0, dtype=np.float32)
        self._count = 0
        self._odd_byte = b""
        """The first byte of a PCM16 sample split between two pieces."""
        self._file: bytes | io.BytesIO | None = None

    @property
    def _is_file(self) -> bool:
        return self._encoding in _CONTAINERS

    def feed(self, data: bytes, *, held_elsewhere: bool = False) -> None:
        """Takes the next piece. Raises InvalidAudioError when the audio exceeds the
        per-request limits, AudioBudgetExceededError when the budget cannot hold it.
        `held_elsewhere`: the caller keeps `data` alive anyway (and accounts for it), so a
        file made of this one piece is read from it without a copy."""
        first = self._received == 0
        self._received += len(data)
        if self._is_file:
            self._feed_file(data, held_elsewhere)
        elif self._encoding is AudioEncoding.PCM16LE:
            self._feed_pcm16le(data, first)
        else:
            self._feed_g711(data, first)

    def finish(self) -> DecodedAudio:
        """The audio at TARGET_RATE. Blocking (decoding, resampling): call from a worker."""
        if self._received == 0:
            raise InvalidAudioError("audio data is empty", field=_DATA)
        if self._is_file:
            samples, rate = self._read_file()
        else:
            if self._odd_byte:
                raise InvalidAudioError(
                    f"PCM16LE data must be whole 2-byte samples; got {self._received} bytes",
                    field=_DATA,
                )
            samples, rate = self._samples, self._rate
            # The unused tail of the last doubling goes back to the allocator.
            samples.resize(self._count, refcheck=False)
        self._samples = np.empty(0, dtype=np.float32)
        if samples.size == 0:
            raise InvalidAudioError("audio contains no samples", field=_DATA)
        if rate != TARGET_RATE:
            self._claim(_resampled_length(samples.size, rate) * _FLOAT_BYTES)
        return DecodedAudio(_to_target_rate(samples, rate), rate)

    def _claim(self, nbytes: int) -> None:
        if self._reservation is not None:
            self._reservation.claim(nbytes)

    def _feed_file(self, data: bytes, held_elsewhere: bool) -> None:
        if self._max_encoded_bytes is not None and self._received > self._max_encoded_bytes:
            raise InvalidAudioError(
                f"streamed audio exceeds {self._max_encoded_bytes} bytes, more than "
                f"{self._max_seconds:.0f} s of audio in any supported format",
                field=_DATA,
            )
        if self._file is None and held_elsewhere:
            self._file = data
            return
        self._claim(len(data))
        if self._file is None:
            self._file = io.BytesIO()
        elif isinstance(self._file, bytes):
            self._claim(len(self._file))
            self._file = io.BytesIO(self._file)
            self._file.seek(0, io.SEEK_END)
        self._file.write(data)

    def _feed_pcm16le(self, data: bytes, first: bool) -> None:
        pieces: list[npt.NDArray[np.int16]] = []
        start = 0
        if self._odd_byte and data:
            pieces.append(np.frombuffer(self._odd_byte + data[:1], dtype="<i2"))
            self._odd_byte, start = b"", 1
        whole = (len(data) - start) // 2
        if whole:
            pieces.append(np.frombuffer(data, dtype="<i2", count=whole, offset=start))
        if (len(data) - start) % 2:
            self._odd_byte = data[-1:]
        for ints in pieces:
            # int16 / 2**15: exact in float32. The slot is not kept: the next growth may
            # move the buffer.
            np.multiply(ints, np.float32(1 / 32768), out=self._room_for(ints.size, first))

    def _feed_g711(self, data: bytes, first: bool) -> None:
        table = _MULAW_TABLE if self._encoding is AudioEncoding.MULAW else _ALAW_TABLE
        codes = np.frombuffer(data, dtype=np.uint8)
        np.take(table, codes, out=self._room_for(codes.size, first))

    def _room_for(self, samples: int, first: bool) -> npt.NDArray[np.float32]:
        """The next `samples` slots of the sample buffer, grown (and claimed) as needed."""
        count = self._count + samples
        if count > self._max_samples:
            if first:
                _check_duration(count, self._rate, self._max_seconds)
            # A stream is refused as soon as it is too long; its true length is never known.
            received = math.ceil(count / self._rate * 10) / 10
            raise InvalidAudioError(
                f"streamed audio is longer than the limit of {self._max_seconds:.1f} s "
                f"({received:.1f} s received when it was cut off)",
                field=_DATA,
            )
        capacity = self._samples.size
        if count > capacity:
            grown = min(max(count, 2 * capacity, _INITIAL_SAMPLES), self._max_samples)
            self._claim((grown - capacity) * _FLOAT_BYTES)
            self._samples.resize(grown, refcheck=False)
        self._count = count
        return self._samples[count - samples : count]

    def _read_file(self) -> tuple[npt.NDArray[np.float32], int]:
        source = self._file
        self._file = None  # the encoded bytes go as soon as they are read
        if isinstance(source, bytes):
            source = io.BytesIO(source)  # shares the bytes: no copy
        assert source is not None
        source.seek(0)
        return _read_file(
            source, self._encoding, self._declared_rate, self._max_seconds, self._claim
        )


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


def _check_duration(frames: int, rate: int, max_seconds: float, *, at_least: bool = False) -> None:
    seconds = frames / rate
    if seconds > max_seconds:
        # Rounded up, so 60.01 s is not reported as "60.0 s long; the limit is 60.0 s".
        shown = math.ceil(seconds * 10) / 10
        raise InvalidAudioError(
            f"audio is {'at least ' if at_least else ''}{shown:.1f} s long; the limit is "
            f"{max_seconds:.1f} s",
            field=_DATA,
        )


def _read_file(
    source: io.BytesIO,
    encoding: AudioEncoding,
    declared_rate: int,
    max_seconds: float,
    claim: Callable[[int], None],
) -> tuple[npt.NDArray[np.float32], int]:
    _check_container(source, encoding)
    try:
        with sf.SoundFile(source) as f:
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
            samples = _read_mono(f, encoding, rate, max_seconds, claim)
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


def _check_container(source: io.BytesIO, encoding: AudioEncoding) -> None:
    """Refuses a file whose first bytes are not of the declared kind before libsndfile, which
    guesses formats by its own rules, reads anything of it."""
    head = source.read(SNIFF_BYTES)
    source.seek(0)
    found = sniff(head)
    if found.container is not None and FILE_ENCODINGS[found.container] is not encoding:
        raise InvalidAudioError(
            f"audio encoding is {encoding.name} but the data is {found.description}; declare "
            f"it as {FILE_ENCODINGS[found.container].name}",
            field=_ENCODING,
        )
    if found.container is None:
        raise InvalidAudioError(
            f"audio data is {found.description}; send WAV, FLAC, MP3 or Ogg (Vorbis or Opus) "
            "files, or raw PCM16LE, MULAW or ALAW",
            field=_DATA,
        )


def _read_mono(
    f: Any, encoding: AudioEncoding, rate: int, max_seconds: float, claim: Callable[[int], None]
) -> npt.NDArray[np.float32]:
    """The samples of an open sound file, channels averaged, read block by block into one
    buffer of the length the header states."""
    if f.frames == _UNKNOWN_LENGTH:
        # A FLAC written to a pipe has no length in its header, and libsndfile fails at the
        # end of such a file; nor could the length limit be checked before decoding.
        raise InvalidAudioError(
            f"the {encoding.name} header does not state the audio's length (the file was"
            " written to a stream, or cut short); write it to a file, or send PCM16LE",
            field=_DATA,
        )
    # Checked from the header before any sample is decoded, so an over-long upload costs
    # nothing; libsndfile never reads past the length the header states.
    frames = int(f.frames)
    _check_duration(frames, rate, max_seconds)
    claim(frames * _FLOAT_BYTES)
    samples = np.empty(frames, dtype=np.float32)
    filled = 0
    for block in f.blocks(
        blocksize=max(1, _BLOCK_SAMPLES // int(f.channels)), dtype="float32", always_2d=True
    ):
        # Only float files can hold these; checked before mixing, where inf - inf is NaN.
        if not np.isfinite(block).all():
            raise InvalidAudioError(
                "audio contains non-finite samples (NaN or infinity)", field=_DATA
            )
        if filled + len(block) > frames:
            # Never seen (libsndfile stops at the stated length), but a compressed format's
            # length is the decoder's estimate: more samples than claimed are refused, not
            # written past the buffer.
            raise InvalidAudioError(
                f"the {encoding.name} file holds more audio than its header states",
                field=_DATA,
            )
        # In float64, so float files' huge values cannot overflow while summed.
        samples[filled : filled + len(block)] = block.mean(axis=1, dtype=np.float64)
        filled += len(block)
    # A file cut short holds fewer frames than its header states.
    samples.resize(filled, refcheck=False)
    return samples


def _pcm16le_rate(declared_rate: int) -> int:
    if declared_rate not in RAW_PCM_RATES:
        problem = "is required" if declared_rate == 0 else f"{declared_rate} Hz is not supported"
        raise InvalidAudioError(
            f"sample_rate_hz {problem} for PCM16LE; use one of {_rate_list(RAW_PCM_RATES)}",
            field=_RATE,
        )
    return declared_rate


def _g711_rate(encoding: AudioEncoding, declared_rate: int) -> int:
    if declared_rate != G711_RATE:
        found = "is not set" if declared_rate == 0 else f"is {declared_rate}"
        raise InvalidAudioError(
            f"sample_rate_hz {found}; it must be {G711_RATE} for {encoding.name}",
            field=_RATE,
        )
    return G711_RATE


def _resampled_length(samples: int, rate: int) -> int:
    return math.ceil(samples * TARGET_RATE / rate)


def to_target_rate(samples: npt.NDArray[np.float32], rate: int) -> Waveform:
    """Samples at `rate` (which this takes over) at TARGET_RATE, by the pipeline's resampler:
    for decoders outside this module (server/pipeline/opus.py)."""
    return _to_target_rate(samples, rate)


def resampled(samples: npt.NDArray[np.float32], rate: int, to_rate: int) -> Waveform:
    """`samples` from `rate` to `to_rate` by the pipeline's resampler (the one
    `telephone_channel` uses to reach 8 kHz): for tools that simulate a call."""
    return _resample(samples, rate, to_rate)


def _to_target_rate(samples: npt.NDArray[np.float32], rate: int) -> Waveform:
    """`samples` (which this takes over) at TARGET_RATE."""
    if rate != TARGET_RATE:
        samples = _resample(samples, rate, TARGET_RATE)
    # Float files may exceed full scale, and resampling overshoots near it; the Waveform
    # contract is [-1, 1], and such samples are clipped in any case. In place: no copy.
    return np.clip(samples, -1.0, 1.0, out=samples)


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
