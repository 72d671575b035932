"""MP3 and Ogg files recognised by content and decoded through the bounded decoder; Opus
packets of shift streams; hostile files of each new kind failing as InvalidAudioError only."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.embedder import Waveform
from server.errors import InvalidAudioError
from server.pipeline.containers import Container, sniff
from server.pipeline.decode import TARGET_RATE, AudioEncoding, decode, decode_audio
from server.pipeline.opus import (
    MAX_PACKET_BYTES,
    Bandwidth,
    decode_packets,
    frame_packets,
    packet_bandwidth,
    packet_samples,
)
from server.shifts.buffer import ShiftAudioBuffer, StreamFormat
from tests.audio_files import encoded_file, opus_packets, with_last_granule

SPEECH_FILE = Path(__file__).parents[1] / "data" / "198-126831-0000.flac"
LIMIT = 60.0
KINDS = [
    ("MP3", "MPEG_LAYER_III", AudioEncoding.MP3, Container.MP3),
    ("OGG", "VORBIS", AudioEncoding.OGG, Container.OGG_VORBIS),
    ("OGG", "OPUS", AudioEncoding.OGG, Container.OGG_OPUS),
]


@pytest.fixture(scope="module")
def speech() -> Waveform:
    """Four seconds of real speech at 16 kHz."""
    samples, rate = sf.read(SPEECH_FILE, dtype="float32")
    assert rate == TARGET_RATE
    return np.ascontiguousarray(samples[: 4 * rate])


def best_correlation(decoded: Waveform, reference: Waveform, max_lag: int = 2000) -> float:
    """Lossy codecs delay the signal (MP3's decoder delay, Opus's pre-skip): the best
    normalised correlation over small lags."""
    n = min(len(decoded), len(reference)) - max_lag
    best = 0.0
    for lag in range(0, max_lag, 8):
        a, b = decoded[lag : lag + n], reference[:n]
        best = max(best, float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b) + 1e-12)))
    return best


@pytest.mark.parametrize(("container", "subtype", "encoding", "kind"), KINDS)
def test_lossy_files_decode_to_the_speech(
    speech: Waveform, container: str, subtype: str, encoding: AudioEncoding, kind: Container
) -> None:
    data = encoded_file(speech, 16_000, container, subtype)
    assert sniff(data[:4096]).container is kind
    decoded = decode_audio(data, encoding, 0, max_seconds=LIMIT)
    assert decoded.source_rate_hz == 16_000
    assert len(decoded.waveform) == pytest.approx(len(speech), abs=0.05 * TARGET_RATE)
    assert best_correlation(decoded.waveform, speech) > 0.9


def test_an_mp3_at_44k_with_an_id3_tag_is_recognised_and_resampled(speech: Waveform) -> None:
    import torch
    import torchaudio.functional

    at_44k = torchaudio.functional.resample(torch.from_numpy(speech), 16_000, 44_100).numpy()
    mp3 = encoded_file(at_44k, 44_100, "MP3", "MPEG_LAYER_III")
    # An ID3v2.4 tag of 100 bytes (syncsafe size), as tagging tools write before the audio.
    tagged = b"ID3\x04\x00\x00\x00\x00\x00\x64" + bytes(100) + mp3
    assert sniff(tagged).container is Container.MP3
    decoded = decode_audio(tagged, AudioEncoding.MP3, 0, max_seconds=LIMIT)
    assert decoded.source_rate_hz == 44_100
    assert best_correlation(decoded.waveform, speech) > 0.9


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"\0\0\0\x20ftypM4A \0\0\0\0", "MP4/M4A"),
        (b"\x1a\x45\xdf\xa3\x01\0\0\0\0\0", "WebM/Matroska"),
        (b"#!AMR\n" + bytes(20), "AMR"),
        (b"\xff\xf1\x50\x80\x02\x1f\xfc", "AAC (ADTS)"),
        (b"FORM\0\0\0\0AIFF", "AIFF"),
        (b"RF64\xff\xff\xff\xffWAVE", "RF64"),
        (b"RIFF\0\0\0\0AVI LIST", "RIFF 'AVI '"),
        (b"OggS\0\x02" + bytes(20) + b"\x01\x2a\x80theora" + bytes(34), "another codec"),
        (b"OggS\0\x02" + bytes(10), "cut short"),
        (b"hello, this is text", "not a recognised audio file"),
        (b"\xff\xfb\xf0\x00", "not a recognised"),  # MPEG sync with a reserved bitrate
        (b"", "not a recognised"),
    ],
)
def test_unsupported_content_is_named(head: bytes, says: str) -> None:
    found = sniff(head)
    assert found.container is None
    assert says in found.description
    with pytest.raises(InvalidAudioError) as caught:
        decode(head + bytes(64), AudioEncoding.MP3, 0, max_seconds=LIMIT)
    assert caught.value.field == "audio.data"


def test_a_file_declared_as_another_kind_is_refused_naming_both(speech: Waveform) -> None:
    mp3 = encoded_file(speech, 16_000, "MP3", "MPEG_LAYER_III")
    vorbis = encoded_file(speech, 16_000, "OGG", "VORBIS")
    for data, declared, message in [
        (mp3, AudioEncoding.WAV, "audio encoding is WAV but the data is an MP3 file"),
        (vorbis, AudioEncoding.MP3, "audio encoding is MP3 but the data is an Ogg Vorbis file"),
        (SPEECH_FILE.read_bytes(), AudioEncoding.OGG, "the data is a FLAC file; declare it as"),
    ]:
        with pytest.raises(InvalidAudioError) as caught:
            decode(data, declared, 0, max_seconds=LIMIT)
        assert caught.value.field == "audio.encoding"
        assert message in caught.value.message


def test_bare_opus_in_an_audio_message_is_refused() -> None:
    with pytest.raises(InvalidAudioError, match="OPUS is for shift streams") as caught:
        decode(b"\x78\x00", AudioEncoding.OPUS, 48_000, max_seconds=LIMIT)
    assert caught.value.field == "audio.encoding"


def test_a_header_claiming_hours_is_refused_before_decoding(speech: Waveform) -> None:
    for subtype in ("VORBIS", "OPUS"):
        ogg = encoded_file(speech, 16_000, "OGG", subtype)
        # Opus granules count 48 kHz samples whatever the input rate.
        granule = 3600 * (48_000 if subtype == "OPUS" else 16_000)
        started = time.perf_counter()
        with pytest.raises(InvalidAudioError, match=r"long; the limit is 60\.0 s"):
            decode(with_last_granule(ogg, granule), AudioEncoding.OGG, 0, max_seconds=LIMIT)
        assert time.perf_counter() - started < 1.0


def test_a_decompression_bomb_is_refused_by_its_length() -> None:
    # Three minutes of silence compress to a few kilobytes (MP3 at its lowest rate: 1 kB/s);
    # decoding them would take 11.5 MB.
    silence = np.zeros(180 * 8000, dtype=np.float32)
    for container, subtype, encoding, _ in KINDS:
        data = encoded_file(silence, 8000, container, subtype)
        assert len(data) < 180 * 16_000 * 4 // 50
        with pytest.raises(InvalidAudioError, match=r"audio is 180\.\d s long; the limit"):
            decode(data, encoding, 0, max_seconds=LIMIT)


def test_a_header_claiming_less_than_the_file_holds_reads_only_that(speech: Waveform) -> None:
    ogg = encoded_file(speech, 16_000, "OGG", "VORBIS")
    decoded = decode(with_last_granule(ogg, 16_000), AudioEncoding.OGG, 0, max_seconds=LIMIT)
    assert len(decoded) <= 16_000


def test_mangled_and_truncated_lossy_files_raise_only_invalid_audio(speech: Waveform) -> None:
    originals = [
        (encoded_file(speech[:16000], 16_000, c, s), encoding) for c, s, encoding, _ in KINDS
    ]
    rng = random.Random(11)
    for _ in range(150):
        original, encoding = rng.choice(originals)
        data = bytearray(original)
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.4:
            data = data[: rng.randrange(1, len(data) + 1)]
        try:
            decoded = decode(bytes(data), encoding, 0, max_seconds=LIMIT)
        except InvalidAudioError:
            continue
        assert decoded.dtype == np.float32
        assert np.all(np.abs(decoded) <= 1.0)
        assert len(decoded) <= 2 * TARGET_RATE


# --- Opus packets -------------------------------------------------------------------------


def test_packet_lengths_follow_the_toc() -> None:
    # config 1 (SILK NB 20 ms), code 0: one frame.
    assert packet_samples(bytes([1 << 3, 0])) == 960
    assert packet_bandwidth(bytes([1 << 3])) is Bandwidth.NARROWBAND
    # config 31 (CELT FB 20 ms), code 1: two frames.
    assert packet_samples(bytes([31 << 3 | 1, 0])) == 1920
    assert packet_bandwidth(bytes([31 << 3])) is Bandwidth.FULLBAND
    # config 11 (SILK WB 60 ms), code 3 with 2 frames: 120 ms, the most allowed.
    assert packet_samples(bytes([11 << 3 | 3, 2])) == 5760
    for bad, message in [
        (b"", "empty"),
        (bytes([11 << 3 | 3, 3]), "RFC 6716 allows 1 to 120 ms"),
        (bytes([11 << 3 | 3, 0]), "RFC 6716 allows 1 to 120 ms"),
        (bytes([11 << 3 | 3]), "no frame count"),
        (bytes(MAX_PACKET_BYTES + 1), "at most"),
        # 20 ms padded to 5 kB: more than any Opus rate makes of 20 ms.
        (bytes([1 << 3 | 3, 0x41]) + bytes(5000), "takes at most 1276"),
    ]:
        with pytest.raises(InvalidAudioError, match=message):
            packet_samples(bad)


def test_opus_packets_decode_to_the_speech(speech: Waveform) -> None:
    packets = opus_packets(speech)
    assert {packet_samples(p) for p in packets} == {960}
    decoded = decode_packets(b"".join(frame_packets(p) for p in packets))
    assert decoded.size == 960 * len(packets)
    from server.pipeline.decode import to_target_rate

    # A perceptual codec at 24 kbit/s: the waveform is close, not equal.
    assert best_correlation(to_target_rate(decoded, 48_000), speech) > 0.8


def test_a_damaged_packet_becomes_silence_of_its_length(speech: Waveform) -> None:
    packets = opus_packets(speech[:16_000])
    # Keeps the TOC (20 ms) and garbles the payload: libopus refuses it or decodes noise; the
    # timing holds either way.
    damaged = [*packets[:10], packets[10][:1] + b"\xff" * 3, *packets[11:]]
    decoded = decode_packets(b"".join(frame_packets(p) for p in damaged))
    assert decoded.size == 960 * len(damaged)
    assert np.all(np.isfinite(decoded)) and np.all(np.abs(decoded) <= 1.0)
    # A valid TOC (20 ms, code 3, padding) whose padding runs past the end: libopus refuses
    # it, and it becomes 20 ms of silence.
    refused = bytes([1 << 3 | 3, 0x41, 0xFF])
    assert packet_samples(refused) == 960
    concealed = decode_packets(b"".join(frame_packets(p) for p in [packets[0], refused]))
    assert concealed.size == 2 * 960
    assert not concealed[960:].any()


def test_a_shift_stream_of_opus_takes_whole_20ms_packets(speech: Waveform) -> None:
    opus = StreamFormat.declared(AudioEncoding.OPUS, 48_000)
    assert opus.frame_count(opus_packets(speech[:3200], frame_ms=40)[0]) == 2
    with pytest.raises(InvalidAudioError, match="whole 20 ms") as caught:
        opus.frame_count(opus_packets(speech[:3200], frame_ms=10)[0])
    assert caught.value.field == "frames"


class LoudIsSpeech:
    """Speech wherever the level is above -40 dBFS, in 20 ms steps."""

    def segments(self, waveform: Waveform) -> list[tuple[int, int]]:
        step = 320
        loud = [
            i
            for i in range(0, len(waveform) - step + 1, step)
            if np.sqrt(np.mean(waveform[i : i + step] ** 2)) > 0.01
        ]
        return [(i, i + step) for i in loud]


@pytest.mark.parametrize(("cutoff", "rate"), [(None, 24_000), (4000, 8000)])
def test_an_opus_stream_reaches_the_checkpoint_with_its_band(
    speech: Waveform, cutoff: int | None, rate: int
) -> None:
    buffer = ShiftAudioBuffer(StreamFormat.declared(AudioEncoding.OPUS, 0), 60.0)
    for i, packet in enumerate(opus_packets(speech, cutoff_hz=cutoff)):
        buffer.append(packet, 0.02 * (i + 1))
    recent = buffer.recent_speech(LoudIsSpeech(), 1.0)
    assert recent is not None and recent.net_seconds == pytest.approx(1.0)
    # Full band at 24 kbit/s is what libopus chooses (super-wideband, 24 kHz); narrowband
    # (cut off at 4 kHz) is telephone band.
    assert recent.source_rate_hz <= rate if cutoff else recent.source_rate_hz >= 16_000


def test_pcm16_at_8k_in_a_shift_is_telephone_band(speech: Waveform) -> None:
    import torch
    import torchaudio.functional

    at_8k = torchaudio.functional.resample(torch.from_numpy(speech), 16_000, 8_000).numpy()
    data = (np.clip(at_8k, -1, 1) * 32767).astype("<i2").tobytes()
    buffer = ShiftAudioBuffer(StreamFormat.declared(AudioEncoding.PCM16LE, 8_000), 60.0)
    for i in range(0, len(data) - 320 * 50 + 1, 320 * 50):
        buffer.append(data[i : i + 320 * 50], i / 16_000)
    recent = buffer.recent_speech(LoudIsSpeech(), 1.0)
    assert recent is not None and recent.source_rate_hz == 8_000
    from server.pipeline.channel import Channel, channel_of

    assert channel_of(recent.source_rate_hz, recent.speech) is Channel.TELEPHONE
