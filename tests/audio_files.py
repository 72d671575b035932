"""Audio in the formats users have, made at test time from tests/data's speech with the same
libraries the service reads them with: MP3 and Ogg files by libsndfile (soundfile), Opus
packets by libopus (PyAV) as a WebRTC softphone's encoder makes them."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from models.embedder import Waveform


def encoded_file(waveform: Waveform, rate: int, container: str, subtype: str) -> bytes:
    """`waveform` (mono float at `rate`) as a file: ("MP3", "MPEG_LAYER_III"),
    ("OGG", "VORBIS"), ("OGG", "OPUS"), ("FLAC", "PCM_16"), ("WAV", "PCM_16")."""
    out = io.BytesIO()
    with sf.SoundFile(out, "w", rate, 1, subtype, format=container) as f:
        # In blocks: libsndfile's Vorbis encoder crashes on one very long write.
        for start in range(0, len(waveform), 1 << 16):
            f.write(waveform[start : start + (1 << 16)])
    return out.getvalue()


def opus_packets(
    waveform: Waveform,
    *,
    rate: int = 16_000,
    frame_ms: int = 20,
    bitrate: int = 24_000,
    cutoff_hz: int | None = None,
) -> list[bytes]:
    """`waveform` (mono float at `rate`) as the Opus packets a softphone sends: 48 kHz input,
    `frame_ms` per packet. `cutoff_hz` 4000 makes the encoder narrowband."""
    import av
    import torch
    import torchaudio.functional

    at_48k = torchaudio.functional.resample(torch.from_numpy(waveform), rate, 48_000).numpy()
    pcm = (np.clip(at_48k, -1.0, 1.0) * 32767).astype(np.int16)
    options = {"frame_duration": str(frame_ms)}
    if cutoff_hz is not None:
        options["cutoff"] = str(cutoff_hz)
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48_000
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = bitrate
    encoder.options = options
    step = 48 * frame_ms
    packets: list[bytes] = []
    for start in range(0, len(pcm) - step + 1, step):
        frame = av.AudioFrame.from_ndarray(
            pcm[None, start : start + step], format="s16", layout="mono"
        )
        frame.sample_rate = 48_000
        frame.pts = start
        packets += [bytes(p) for p in encoder.encode(frame)]
    packets += [bytes(p) for p in encoder.encode(None)]
    return packets


def ogg_crc(page: bytes) -> int:
    """The CRC of an Ogg page (RFC 3533: polynomial 0x04C11DB7, unreflected, initial 0),
    computed with its CRC field zeroed: for tests that alter a page and must keep it valid."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def with_last_granule(ogg: bytes, granule: int) -> bytes:
    """The Ogg file with its last page's granule position (what libsndfile reads the length
    from) set to `granule`, CRC fixed: a header that claims another length."""
    last = ogg.rindex(b"OggS")
    page = bytearray(ogg[last:])
    page[6:14] = granule.to_bytes(8, "little")
    page[22:26] = bytes(4)
    page[22:26] = ogg_crc(bytes(page)).to_bytes(4, "little")
    return ogg[:last] + bytes(page)
