"""Fakes that implement the service's protocols, for tests that need the pipeline's shape but
not its models (tests/unit/test_fakes.py checks each against its protocol).

The fake voice: audio with a positive mean is the enrolled agent's voice, any other audio an
impostor's. `fake_scoring` writes cohort and calibration files for the fake model, so a server
or a Scorer with the fake embedder can start (the shipped files are for the real model, and
they refuse another)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
from voxauth.v1 import voxauth_pb2 as pb

from models.countermeasure import CountermeasureEvidence, judged_id
from models.embedder import Embedding, Waveform
from models.manifest import AASIST_MANIFEST
from models.pad_backend import backend_model_id, default_backend_path
from server.config import (
    AudioLimits,
    PresentationAttackPolicy,
    ScoringPolicy,
    ThrottlePolicy,
    VerificationPolicy,
)
from server.pipeline.analysis import AudioInput, VoiceAnalyser
from server.pipeline.channel import Channel
from server.pipeline.decode import AudioEncoding
from server.pipeline.presentation import (
    ChannelCalibration,
    PadCalibration,
    PresentationAttackDetector,
)
from server.pipeline.speech import QualityThresholds, Segment
from server.scoring.calibration import (
    Calibration,
    Condition,
    ConditionCalibration,
    LinearInQuality,
    ScoreModel,
    TailModel,
)
from server.scoring.scorer import CALIBRATION_FILE, COHORT_FILE, Scorer, ScoringModel
from server.storage.interface import Store
from server.verification.replay import ReplayGuard
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle

MODEL_ID = "fake-model"
AGENT_VOICE = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
IMPOSTOR_VOICE = np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32)
# The fake calibration puts the threshold for this rate between the two voices.
TARGET_FMR = 0.2


class FakeEmbedder:
    """Implements SpeakerEmbedder with the fake voice. `seconds_per_call` makes each call cost
    that much wall time, as a real model's would. It is never given audio shorter than
    `min_samples`: VoiceAnalyser refuses that before embedding."""

    model_id = MODEL_ID
    sample_rate = 16_000
    dimension = 4
    min_samples = 8_000

    def __init__(self, seconds_per_call: float = 0.0) -> None:
        self._seconds_per_call = seconds_per_call

    def embed(self, waveform: Waveform) -> Embedding:
        if self._seconds_per_call:
            time.sleep(self._seconds_per_call)
        return AGENT_VOICE if float(np.mean(waveform)) > 0 else IMPOSTOR_VOICE


GENUINE_PAD_SCORE = 3.0
"""What FakeCountermeasure gives by default: above both shipped PAD thresholds."""


SHIPPED_COUNTERMEASURE_ID = backend_model_id(
    judged_id(AASIST_MANIFEST.model_id),
    hashlib.sha256(default_backend_path().read_bytes()).hexdigest(),
)
"""The service's countermeasure: AASIST through the shipped back-end."""


class FakeCountermeasure:
    """Implements Countermeasure without a network: every waveform scores `score_of(waveform)`
    (by default GENUINE_PAD_SCORE) on every channel. It stands in for AASIST with the shipped
    back-end, whose shipped calibration it therefore loads (same model id)."""

    model_id = SHIPPED_COUNTERMEASURE_ID
    sample_rate = 16_000
    min_samples = 16_000

    def __init__(self, score_of: Callable[[Waveform], float] | None = None) -> None:
        self._score_of = score_of or (lambda waveform: GENUINE_PAD_SCORE)
        self.scored: list[int] = []
        """Lengths of the waveforms scored, in order."""

    def score(self, waveform: Waveform) -> float:
        self.scored.append(len(waveform))
        return self._score_of(waveform)

    def evidence(self, waveform: Waveform) -> CountermeasureEvidence:
        return CountermeasureEvidence(self.score(waveform), np.zeros(0))

    def channel_score(self, evidence: CountermeasureEvidence, channel: str) -> float:
        return evidence.raw_score


class AllSpeech:
    """Implements SpeechDetector: every sample is speech."""

    def segments(self, waveform: Waveform) -> list[Segment]:
        return [(0, len(waveform))] if len(waveform) else []


class FixedSegments:
    """Implements SpeechDetector: the given segments, whatever the audio."""

    def __init__(self, segments: list[Segment]) -> None:
        self._segments = segments

    def segments(self, waveform: Waveform) -> list[Segment]:
        return self._segments


class LoudIsSpeech:
    """Implements SpeechDetector: any sample above 0.1 in magnitude is speech. Keeps the length
    of each waveform it was asked about, so a test can see what was analysed."""

    def __init__(self) -> None:
        self.analysed: list[int] = []

    def segments(self, waveform: Waveform) -> list[Segment]:
        self.analysed.append(len(waveform))
        loud = np.abs(waveform) > 0.1
        edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
        return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


class BusyVerificationStub:
    """Stands in for the generated VerificationServiceStub: answers ACCEPT after 10 ms and
    refuses every third call as a full queue would."""

    def __init__(self) -> None:
        self.calls = 0
        self.agents: set[str] = set()

    # The generated stub's signature, `timeout` included.
    async def Verify(self, request: pb.VerifyRequest, timeout: float) -> pb.VerifyResponse:  # noqa: ASYNC109
        self.calls += 1
        number = self.calls
        self.agents.add(request.agent_id)
        await asyncio.sleep(0.01)
        if number % 3 == 0:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "busy"
            )
        return pb.VerifyResponse(decision=pb.DECISION_ACCEPT)


def fake_scoring(directory: Path, model_id: str, dimension: int) -> ScoringPolicy:
    """Writes cohort and calibration files for a fake model into `directory`; the policy that
    reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    condition = ConditionCalibration(
        # The fake agent (normalised score 1) is evidence for the agent: LLR +3, over the
        # default LLR floor.
        llr_weights=(2.0, 1.0, 0.0, 0.0),
        impostor=TailModel(0.0, 1.0, 0.01),
        target=ScoreModel(LinearInQuality(8.0, 0.0), LinearInQuality(1.0, 0.0)),
        quality_range=(1.0, 3.0),
        target_trials=1,
        impostor_trials=1,
    )
    calibration = Calibration(model_id, 2, False, dict.fromkeys(Condition, condition), {})
    (directory / CALIBRATION_FILE).write_text(calibration.to_json())
    voices = np.eye(dimension, dtype=np.float32)[:3]
    np.savez(
        directory / COHORT_FILE,
        model_id=np.array(model_id),
        wideband=voices,
        telephone=voices,
    )
    return ScoringPolicy(scoring_dir=directory)


def pcm16(level: float, seconds: float) -> bytes:
    """A constant signal: `level` > 0 sounds like the agent, < 0 like an impostor."""
    samples = np.full(int(16_000 * seconds), level * 32767)
    return samples.astype("<i2").tobytes()


def audio(level: float, seconds: float = 4.0) -> AudioInput:
    return AudioInput(pcm16(level, seconds), AudioEncoding.PCM16LE, 16_000)


AGENT_AUDIO = audio(0.1)
IMPOSTOR_AUDIO = audio(-0.1)
TOO_SHORT_AUDIO = audio(0.1, seconds=1.0)


FAKE_PAD_CALIBRATION = PadCalibration(
    AASIST_MANIFEST.model_id,
    {
        Channel.WIDEBAND: ChannelCalibration(mean=1.0, sd=1.0, count=50),
        Channel.TELEPHONE: ChannelCalibration(mean=0.0, sd=1.0, count=50),
    },
)
"""Thresholds at BPCER 0.05: -0.64 wideband, -1.64 telephone."""


def fake_presentation(
    countermeasure: FakeCountermeasure, policy: PresentationAttackPolicy | None = None
) -> PresentationAttackDetector:
    return PresentationAttackDetector(
        countermeasure, FAKE_PAD_CALIBRATION, policy or PresentationAttackPolicy()
    )


FAKE_VOICE_POLICY = VerificationPolicy(min_net_speech_seconds_telephone=0.0)
"""The fake voice is a constant level: nothing above 4 kHz, so the service takes it for
telephone speech. Tests that are not about the telephone minimum give it the general one (a
telephone minimum below it does not lower it)."""


def fake_verification(
    store: Store,
    scoring_dir: Path,
    now: Callable[[], datetime],
    throttle_policy: ThrottlePolicy | None = None,
    presentation: PresentationAttackDetector | None = None,
    replay: PresentationAttackPolicy | None = None,
    verification_policy: VerificationPolicy = FAKE_VOICE_POLICY,
) -> VerificationService:
    """A VerificationService on the fake voice, the given store and throttle policy (and PAD
    detector and replay detection under the given policy, if any)."""
    policy = replace(fake_scoring(scoring_dir, MODEL_ID, 4), target_fmr=TARGET_FMR)
    scorer = Scorer(ScoringModel.load(policy, MODEL_ID), policy, voiceprints=list)
    analyser = VoiceAnalyser(
        FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits(), presentation
    )
    throttle = VerificationThrottle(store, throttle_policy or ThrottlePolicy())
    guard = None if replay is None else ReplayGuard(store, replay)
    return VerificationService(store, analyser, verification_policy, scorer, now, throttle, guard)
