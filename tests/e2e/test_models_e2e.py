"""The real ECAPA model on real speech, its export, and the benchmark on it (the weight checks
are in tests/unit/test_models.py).

Uses the session-scoped `embedder` fixture from conftest.py (the model loaded once from
VOXAUTH_MODEL_DIR, else models.fetch.default_model_dir(); run `voxauth fetch-model` first).
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.ecapa import EcapaEmbedder
from models.embedder import Embedding, SpeakerEmbedder, Waveform
from models.errors import UnusableWaveformError
from models.export import export_network, export_path
from models.fetch import default_model_dir
from models.manifest import ECAPA_MANIFEST, verify_model_dir
from models.reference import SpeechBrainReference
from server.config import ServerConfig
from server.tools.model_bench import (
    embedding_benchmark,
)

DATA = Path(__file__).parents[1] / "data"
# The four long utterances, one speaker each (see data/README.md).
SPEAKERS = ["198-126831-0000", "8770-295462-0000", "229-130880-0000", "3374-298025-0000"]


def _speech(name: str) -> Waveform:
    audio, rate = sf.read(DATA / f"{name}.flac", dtype="float32")
    assert rate == 16_000
    waveform: Waveform = audio
    return waveform


@pytest.fixture(scope="session")
def model_dir() -> Path:
    directory = ServerConfig.from_environment().model_dir or default_model_dir()
    verify_model_dir(directory)
    return directory


@pytest.fixture(scope="session")
def halves(embedder: SpeakerEmbedder) -> dict[str, tuple[Embedding, Embedding]]:
    """Each speaker's utterance cut in two (about 8.5 s each), embedded separately."""
    result = {}
    for speaker in SPEAKERS:
        audio = _speech(speaker)
        middle = audio.shape[0] // 2
        result[speaker] = (embedder.embed(audio[:middle]), embedder.embed(audio[middle:]))
    return result


def test_describes_itself(embedder: SpeakerEmbedder) -> None:
    assert embedder.model_id == ECAPA_MANIFEST.model_id
    assert embedder.sample_rate == 16_000
    assert embedder.dimension == 192


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> SpeechBrainReference:
    """SpeechBrain's own EncoderClassifier on the same weights."""
    return SpeechBrainReference.load(model_dir)


@pytest.mark.parametrize("seconds", [3.0, 8.0, None])
def test_embedding_agrees_with_speechbrains_own(
    embedder: SpeakerEmbedder, reference: SpeechBrainReference, seconds: float | None
) -> None:
    # The service's faster path (OpenVINO, bfloat16 where the CPU has it) must give the same
    # embedding as SpeechBrain's encode_batch: same model id, same voiceprints.
    for speaker in SPEAKERS:
        audio = _speech(speaker)
        clip = audio if seconds is None else audio[: int(seconds * 16_000)]
        assert float(embedder.embed(clip) @ reference.embed(clip)) >= 0.999


def test_embedding_is_unit_length_float32_and_deterministic(embedder: SpeakerEmbedder) -> None:
    audio = _speech(SPEAKERS[0])[: 5 * 16_000]
    first = embedder.embed(audio)
    assert first.shape == (192,)
    assert first.dtype == np.float32
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(embedder.embed(audio), first, atol=1e-6)


def test_same_speaker_scores_clearly_higher_than_different_speakers(
    halves: dict[str, tuple[Embedding, Embedding]],
) -> None:
    same = [float(a @ b) for a, b in halves.values()]
    different = [
        float(x @ y)
        for s, t in itertools.combinations(SPEAKERS, 2)
        for x in halves[s]
        for y in halves[t]
    ]
    # Measured: same speaker 0.79-0.88, different speakers at most 0.36.
    assert min(same) > 0.6
    assert min(same) - max(different) > 0.25


def test_concurrent_calls_match_sequential_ones(embedder: SpeakerEmbedder) -> None:
    clips = [_speech(speaker)[: 3 * 16_000] for speaker in SPEAKERS]
    sequential = [embedder.embed(clip) for clip in clips]
    with ThreadPoolExecutor(max_workers=len(clips)) as pool:
        concurrent = list(pool.map(embedder.embed, clips))
    for got, expected in zip(concurrent, sequential, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_too_short_audio_is_rejected(embedder: SpeakerEmbedder) -> None:
    audio = _speech(SPEAKERS[0])
    embedder.embed(audio[: embedder.min_samples])
    with pytest.raises(UnusableWaveformError, match="too short"):
        embedder.embed(audio[: embedder.min_samples - 1])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 16_000), dtype=np.float32), "mono"),
        (np.full(16_000, np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_unusable_audio_is_rejected(embedder: SpeakerEmbedder, bad: Waveform, message: str) -> None:
    with pytest.raises(UnusableWaveformError, match=message):
        embedder.embed(bad)


def test_export_is_made_once_from_the_weights_and_replaces_a_stale_one(
    model_dir: Path, tmp_path: Path, embedder: SpeakerEmbedder
) -> None:
    for spec in ECAPA_MANIFEST.files:
        (tmp_path / spec.name).symlink_to(model_dir / spec.name)
    stale = tmp_path / "ecapa-network-0000000000000000-v0.onnx"
    stale.write_bytes(b"an export of other weights")
    made = export_network(tmp_path)
    assert made == export_path(tmp_path)
    assert not stale.exists()
    modified = made.stat().st_mtime_ns
    assert export_network(tmp_path) == made  # current: left alone
    assert made.stat().st_mtime_ns == modified
    audio = _speech(SPEAKERS[1])[: 4 * 16_000]
    rebuilt = EcapaEmbedder.load(tmp_path).embed(audio)
    np.testing.assert_allclose(rebuilt, embedder.embed(audio), atol=1e-5)


def test_benchmark_on_real_speech(embedder: SpeakerEmbedder) -> None:
    report = embedding_benchmark(embedder, _speech(SPEAKERS[0]), seconds=2.0, runs=1)
    assert report.audio_seconds == 2.0
    assert 0 < report.median_rtf < 5
