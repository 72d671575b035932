"""Opus packets (RFC 6716) as a WebRTC softphone sends them, one per stream message, decoded
by libopus, the reference decoder, which the PyAV wheel (`av`) ships with FFmpeg.

Each packet's length in time is read from its first byte (the TOC) when it arrives, so a
stream of packets is accounted in 20 ms frames like any other shift audio, and a packet whose
TOC is malformed is refused at once. The payload is decoded only when a checkpoint looks at
it; a packet that libopus then cannot decode is taken as lost and becomes silence of its
length, as a real-time receiver conceals a loss, so the audio keeps its timing.

Decoding is at 48 kHz, Opus's own rate, whatever bandwidth the encoder chose; the result is
resampled to 16 kHz by the pipeline's resampler. Narrowband Opus then carries nothing above
4 kHz, which channel detection takes for telephone band.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from server.errors import InvalidAudioError

OPUS_RATE = 48000
"""Opus's decoding rate and its RTP clock rate (RFC 7587)."""

MAX_PACKET_BYTES = 1275 * 6
"""The largest packet RFC 6716 allows: six frames (120 ms) of at most 1275 bytes."""

_MAX_BYTES_PER_20MS = 1276
"""Opus at its highest rate (510 kbit/s) fills 1275 bytes per 20 ms, plus the TOC byte.
Padding could make a packet larger than its audio warrants; refusing that keeps a shift's
buffer within twice what 16 kHz PCM of the same length takes."""

_MAX_PACKET_SAMPLES = 120 * OPUS_RATE // 1000


class Bandwidth(enum.IntEnum):
    """The audio bandwidth a packet's TOC names, as the rate that carries it."""

    NARROWBAND = 8000
    MEDIUMBAND = 12000
    WIDEBAND = 16000
    SUPERWIDEBAND = 24000
    FULLBAND = 48000


# Per TOC configuration (its top 5 bits, RFC 6716 section 3.1): frame length in 48 kHz
# samples, and bandwidth. 0-11 SILK, 12-15 hybrid, 16-31 CELT.
_SILK_FRAMES = (480, 960, 1920, 2880)
_CELT_FRAMES = (120, 240, 480, 960)
_CONFIGS: tuple[tuple[int, Bandwidth], ...] = (
    *((_SILK_FRAMES[c % 4], Bandwidth.NARROWBAND) for c in range(4)),
    *((_SILK_FRAMES[c % 4], Bandwidth.MEDIUMBAND) for c in range(4)),
    *((_SILK_FRAMES[c % 4], Bandwidth.WIDEBAND) for c in range(4)),
    (480, Bandwidth.SUPERWIDEBAND),
    (960, Bandwidth.SUPERWIDEBAND),
    (480, Bandwidth.FULLBAND),
    (960, Bandwidth.FULLBAND),
    *((_CELT_FRAMES[c % 4], Bandwidth.NARROWBAND) for c in range(4)),
    *((_CELT_FRAMES[c % 4], Bandwidth.WIDEBAND) for c in range(4)),
    *((_CELT_FRAMES[c % 4], Bandwidth.SUPERWIDEBAND) for c in range(4)),
    *((_CELT_FRAMES[c % 4], Bandwidth.FULLBAND) for c in range(4)),
)


def packet_samples(packet: bytes) -> int:
    """The packet's length in 48 kHz samples, from its TOC byte (and, for code 3, its frame
    count byte). Raises InvalidAudioError for what RFC 6716 forbids."""
    if not packet:
        raise InvalidAudioError("an Opus packet is empty", field="frames")
    if len(packet) > MAX_PACKET_BYTES:
        raise InvalidAudioError(
            f"an Opus packet is {len(packet)} bytes; RFC 6716 allows at most {MAX_PACKET_BYTES}",
            field="frames",
        )
    frame, _ = _CONFIGS[packet[0] >> 3]
    code = packet[0] & 0x03
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        if len(packet) < 2:
            raise InvalidAudioError("an Opus packet (code 3) has no frame count", field="frames")
        count = packet[1] & 0x3F
    samples = count * frame
    if count == 0 or samples > _MAX_PACKET_SAMPLES:
        raise InvalidAudioError(
            f"an Opus packet holds {count} frames of {frame / 48:g} ms; RFC 6716 allows 1 to "
            "120 ms",
            field="frames",
        )
    allowed = _MAX_BYTES_PER_20MS * max(1, math.ceil(samples / 960))
    if len(packet) > allowed:
        raise InvalidAudioError(
            f"an Opus packet of {samples / 48:g} ms is {len(packet)} bytes; Opus at its highest "
            f"rate takes at most {allowed}",
            field="frames",
        )
    return samples


def packet_bandwidth(packet: bytes) -> Bandwidth:
    """The bandwidth the packet's TOC names (the packet is checked by `packet_samples`)."""
    return _CONFIGS[packet[0] >> 3][1]


def frame_packets(packet: bytes) -> bytes:
    """One packet as the buffer keeps it: its length (2 bytes, big-endian) before it, so a
    run of packets can be split again. MAX_PACKET_BYTES fits in two bytes."""
    return len(packet).to_bytes(2, "big") + packet


def _packets(framed: bytes) -> Iterator[bytes]:
    offset = 0
    while offset < len(framed):
        length = int.from_bytes(framed[offset : offset + 2], "big")
        yield framed[offset + 2 : offset + 2 + length]
        offset += 2 + length


def decode_packets(framed: bytes) -> npt.NDArray[np.float32]:
    """The packets in `framed` (as `frame_packets` wrote them), decoded in order by one
    decoder, mono float32 at OPUS_RATE; each packet yields exactly its length in samples."""
    # Imported on first use: the FFmpeg libraries load only where Opus arrives.
    import av

    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate = OPUS_RATE
    decoder.layout = "mono"
    pieces: list[npt.NDArray[np.float32]] = []
    for packet in _packets(framed):
        expected = packet_samples(packet)
        try:
            decoded = [f.to_ndarray() for f in decoder.decode(av.Packet(packet))]
        except av.error.FFmpegError:
            decoded = []  # lost: concealed as silence below
        fitted = np.zeros(expected, np.float32)
        filled = 0
        for frame in decoded:
            values = frame.reshape(-1)
            scale = 1 / 32768 if values.dtype == np.int16 else 1.0
            take = min(values.size, expected - filled)
            fitted[filled : filled + take] = values[:take] * scale
            filled += take
        # libopus returns what the TOC says; a damaged packet returns nothing (silence). Either
        # way the packet takes exactly its length, so the blocks keep their timing.
        pieces.append(fitted)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
