"""A fake voice for tests that need verification decisions but not the real model: audio with
a positive mean is the enrolled agent's voice, any other audio an impostor's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np

from models.embedder import Embedding, Waveform
from server.config import AudioLimits, ThrottlePolicy, VerificationPolicy
from server.pipeline.analysis import AudioInput, VoiceAnalyser
from server.pipeline.decode import AudioEncoding
from server.pipeline.speech import QualityThresholds
from server.scoring.scorer import Scorer, ScoringModel
from server.storage.interface import Store
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle
from tests.fake_scoring import fake_scoring

MODEL_ID = "fake-model"
AGENT_VOICE = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
IMPOSTOR_VOICE = np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32)
# The fake calibration puts the threshold for this rate between the two voices.
TARGET_FMR = 0.2


class FakeEmbedder:
    """Implements SpeakerEmbedder."""

    model_id = MODEL_ID
    sample_rate = 16_000
    dimension = 4
    min_samples = 8_000

    def embed(self, waveform: Waveform) -> Embedding:
        return AGENT_VOICE if float(np.mean(waveform)) > 0 else IMPOSTOR_VOICE


class AllSpeech:
    """Implements SpeechDetector: every sample is speech."""

    def segments(self, waveform: Waveform) -> list[tuple[int, int]]:
        return [(0, len(waveform))] if len(waveform) else []


def pcm16(level: float, seconds: float) -> bytes:
    """A constant signal: `level` > 0 sounds like the agent, < 0 like an impostor."""
    samples = np.full(int(16_000 * seconds), level * 32767)
    return samples.astype("<i2").tobytes()


def audio(level: float, seconds: float = 4.0) -> AudioInput:
    return AudioInput(pcm16(level, seconds), AudioEncoding.PCM16LE, 16_000)


AGENT_AUDIO = audio(0.1)
IMPOSTOR_AUDIO = audio(-0.1)
TOO_SHORT_AUDIO = audio(0.1, seconds=1.0)


def fake_verification(
    store: Store,
    scoring_dir: Path,
    now: Callable[[], datetime],
    throttle_policy: ThrottlePolicy | None = None,
) -> VerificationService:
    """A VerificationService on the fake voice, the given store and throttle policy."""
    policy = replace(fake_scoring(scoring_dir, MODEL_ID, 4), target_fmr=TARGET_FMR)
    scorer = Scorer(ScoringModel.load(policy, MODEL_ID), policy, voiceprints=list)
    analyser = VoiceAnalyser(FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits())
    throttle = VerificationThrottle(store, throttle_policy or ThrottlePolicy())
    return VerificationService(store, analyser, VerificationPolicy(), scorer, now, throttle)


class MovableNow:
    """The `now` a service reads, moved by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now
