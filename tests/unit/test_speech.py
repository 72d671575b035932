"""Speech detection (server/pipeline/silero.py) on real speech, and the quality gates
(server/pipeline/speech.py)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional
from silero_vad import get_speech_timestamps, load_silero_vad

from models.embedder import Waveform
from server.pipeline.decode import AudioEncoding, decode, encode_mulaw, telephone_channel
from server.pipeline.silero import SileroSpeechDetector, _at_detection_level
from server.pipeline.speech import (
    QualityIssue,
    QualityThresholds,
    SpeechAnalysis,
    SpeechDetector,
    analyse,
)
from tests.fakes import FixedSegments

DATA = Path(__file__).parents[1] / "data"
MIN_SPEECH = 3.0


def load(name: str) -> Waveform:
    samples, rate = sf.read(DATA / name, dtype="float32")
    assert rate == 16000
    return np.asarray(samples)


def rms_dbfs(waveform: Waveform) -> float:
    return float(10 * np.log10(np.mean(np.square(waveform, dtype=np.float64))))


@pytest.fixture(scope="module")
def detector() -> SileroSpeechDetector:
    return SileroSpeechDetector()


@pytest.fixture(scope="module")
def speech() -> Waveform:
    """17.2 s of read speech with pauses."""
    return load("198-126831-0000.flac")


@pytest.fixture(scope="module")
def speech_analysis(speech: Waveform, detector: SpeechDetector) -> SpeechAnalysis:
    return check(speech, detector)


def check(waveform: Waveform, detector: SpeechDetector) -> SpeechAnalysis:
    return analyse(waveform, detector, QualityThresholds(), min_net_speech_seconds=MIN_SPEECH)


def test_real_speech_is_mostly_speech(speech_analysis: SpeechAnalysis) -> None:
    assert speech_analysis.duration_seconds == pytest.approx(17.19)
    assert 13.0 < speech_analysis.net_speech_seconds < 17.0
    assert len(speech_analysis.speech) == round(speech_analysis.net_speech_seconds * 16000)
    assert speech_analysis.issues == ()
    assert speech_analysis.clipped_fraction == 0.0


def test_level_is_measured_over_the_speech(
    speech: Waveform, speech_analysis: SpeechAnalysis
) -> None:
    assert speech_analysis.speech_level_dbfs == pytest.approx(rms_dbfs(speech_analysis.speech))
    # Pauses are left out, so the speech is louder than the whole file.
    assert rms_dbfs(speech) < speech_analysis.speech_level_dbfs < -20


def test_a_short_clip_has_too_little_speech(detector: SpeechDetector) -> None:
    result = check(load("1447-130550-0000.flac"), detector)
    assert 0.5 < result.net_speech_seconds < 1.645
    assert result.issues == (QualityIssue.TOO_LITTLE_SPEECH,)


def test_silence_is_no_speech_and_too_quiet(detector: SpeechDetector) -> None:
    result = check(np.zeros(5 * 16000, dtype=np.float32), detector)
    assert result.net_speech_seconds == 0.0
    assert len(result.speech) == 0
    assert result.speech_level_dbfs == -120.0
    assert result.issues == (QualityIssue.TOO_LITTLE_SPEECH, QualityIssue.TOO_QUIET)


@pytest.mark.parametrize("level_dbfs", [-70.0, -50.0, -30.0])
def test_white_noise_is_not_speech(detector: SpeechDetector, level_dbfs: float) -> None:
    noise = np.random.default_rng(1).standard_normal(5 * 16000) * 10 ** (level_dbfs / 20)
    result = check(noise.astype(np.float32), detector)
    assert result.net_speech_seconds < 0.3
    assert QualityIssue.TOO_LITTLE_SPEECH in result.issues
    # With no speech, the level is that of the whole audio.
    assert result.speech_level_dbfs == pytest.approx(level_dbfs, abs=0.1)


def test_quiet_speech_is_detected_and_flagged_too_quiet(
    speech: Waveform, speech_analysis: SpeechAnalysis, detector: SpeechDetector
) -> None:
    quiet = speech * np.float32(10 ** ((-45 - speech_analysis.speech_level_dbfs) / 20))
    result = check(quiet, detector)
    # Detection does not depend on the level.
    assert result.net_speech_seconds == pytest.approx(speech_analysis.net_speech_seconds, abs=0.1)
    assert result.speech_level_dbfs == pytest.approx(-45, abs=0.5)
    assert result.issues == (QualityIssue.TOO_QUIET,)


def word_string(speech: Waveform, detector: SpeechDetector) -> Waveform:
    """Isolated words: 0.4 s pieces of the speech, each followed by 0.6 s of silence."""
    voiced = np.concatenate([speech[a:b] for a, b in detector.segments(speech)])
    gap = np.zeros(int(0.6 * 16000), dtype=np.float32)
    pieces = [voiced[i : i + 6400] for i in range(0, len(voiced) - 6400, 9600)]
    return np.concatenate([p for piece in pieces for p in (piece, gap)])


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.flac")))
def test_words_on_a_quiet_telephone_line_with_a_click_are_still_speech(
    name: str, detector: SpeechDetector
) -> None:
    words = word_string(load(name), detector)
    spoken = len(words) * 0.4 / 16000  # 0.4 s of every second
    line = telephone_channel(words * np.float32(10 ** ((-44 - rms_dbfs(words)) / 20)))
    line[2000:2010] = 0.9  # a click as the call connects
    result = check(line, detector)
    # The level of the words, not the click's peak, sets what the detector hears.
    assert result.net_speech_seconds >= 0.85 * spoken


@pytest.mark.parametrize("level_dbfs", [-60.0, -40.0, -20.0])
def test_line_noise_and_hum_with_clicks_are_not_speech(
    detector: SpeechDetector, level_dbfs: float
) -> None:
    seconds = np.arange(5 * 16000) / 16000
    hum = np.sin(2 * np.pi * 50 * seconds) * 10 ** (level_dbfs / 20)
    noise = np.random.default_rng(2).standard_normal(len(seconds)) * 10 ** (level_dbfs / 20)
    for audio in (telephone_channel(noise.astype(np.float32)), hum.astype(np.float32)):
        audio[8000:8010] = 0.9
        assert check(audio, detector).net_speech_seconds < 0.3


def test_clipped_speech_is_flagged(speech: Waveform, detector: SpeechDetector) -> None:
    result = check(np.clip(speech * 20, -1.0, 1.0), detector)
    assert result.clipped_fraction > 0.01
    assert result.issues == (QualityIssue.CLIPPED,)


def test_speech_clipped_on_a_telephone_line_is_flagged(
    speech: Waveform, detector: SpeechDetector
) -> None:
    narrowband = torchaudio.functional.resample(torch.from_numpy(speech), 16000, 8000).numpy()
    # G.711 saturates below full scale (0.98 for mu-law).
    line = encode_mulaw(np.clip(narrowband * 20, -1.0, 1.0))
    result = check(decode(line, AudioEncoding.MULAW, 8000, max_seconds=60), detector)
    assert result.clipped_fraction > 0.01
    assert QualityIssue.CLIPPED in result.issues


def test_thresholds_are_configurable(speech: Waveform, detector: SpeechDetector) -> None:
    strict = QualityThresholds(min_speech_level_dbfs=-10.0)
    result = analyse(speech, detector, strict, min_net_speech_seconds=20.0)
    assert result.issues == (QualityIssue.TOO_LITTLE_SPEECH, QualityIssue.TOO_QUIET)


def test_only_the_speech_is_measured_and_kept() -> None:
    waveform = np.full(48000, 0.001, dtype=np.float32)
    waveform[16000:32000] = 0.1
    waveform[20000:20100] = 1.0
    result = check(waveform, FixedSegments([(16000, 24000), (28000, 32000)]))
    assert result.duration_seconds == 3.0
    assert result.net_speech_seconds == 0.75
    np.testing.assert_array_equal(
        result.speech, np.concatenate([waveform[16000:24000], waveform[28000:32000]])
    )
    assert result.clipped_fraction == pytest.approx(100 / 12000)


def test_concurrent_detection_matches_serial(detector: SpeechDetector) -> None:
    clips = [
        load(name)[: 6 * 16000]
        for name in ("198-126831-0000.flac", "8770-295462-0000.flac", "229-130880-0000.flac")
    ] * 2
    serial = [detector.segments(clip) for clip in clips]
    with ThreadPoolExecutor(max_workers=3) as pool:
        concurrent = list(pool.map(detector.segments, clips))
    assert concurrent == serial
    assert all(serial)


@pytest.fixture(scope="module")
def streaming_model() -> Any:
    """silero-vad's TorchScript model, the streaming path the service used before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        return load_silero_vad()


@pytest.mark.parametrize(
    "name",
    [
        "198-126831-0000.flac",
        "1447-130550-0000.flac",
        "229-130880-0000.flac",
        "8770-295462-0000.flac",
    ],
)
@pytest.mark.parametrize("through_a_call", [False, True], ids=["wideband", "telephone"])
def test_segments_are_the_streaming_models(
    detector: SileroSpeechDetector, streaming_model: Any, name: str, through_a_call: bool
) -> None:
    """The sequence model in OpenVINO finds exactly what silero-vad's own streaming path
    (its TorchScript model, frame by frame) finds on the same levelled audio: the segments,
    and with them net speech and every cached embedding, are the same as before the swap."""
    audio = load(name)
    if through_a_call:
        audio = telephone_channel(audio)
    stamps = get_speech_timestamps(
        torch.from_numpy(_at_detection_level(audio)), streaming_model, sampling_rate=16_000
    )
    assert detector.segments(audio) == [(s["start"], s["end"]) for s in stamps]


@pytest.mark.parametrize("samples", [0, 1, 300, 511, 512, 513, 16_000 * 17 + 7])
def test_any_length_is_detected_without_error(detector: SileroSpeechDetector, samples: int) -> None:
    audio = np.resize(load("198-126831-0000.flac"), samples).astype(np.float32)
    for start, end in detector.segments(audio):
        assert 0 <= start < end <= samples
