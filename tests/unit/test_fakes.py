"""The shared fakes (tests/fakes.py) and the test clock (tests/clock.py) keep the promises of the
protocols they stand in for, so what a test learns on a fake holds for the real thing. mypy
checks the structure through the annotated assignments; these tests check the behaviour."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
import pytest
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from models.embedder import SpeakerEmbedder
from server.pipeline.channel import Channel
from server.pipeline.speech import SpeechDetector
from server.runtime.clock import Clock
from server.scoring.scorer import Scorer, ScoringModel
from server.storage.interface import Voiceprint
from tests.clock import ManualClock
from tests.fakes import (
    AGENT_VOICE,
    IMPOSTOR_VOICE,
    MODEL_ID,
    TARGET_FMR,
    AllSpeech,
    BusyVerificationStub,
    FakeEmbedder,
    FixedSegments,
    LoudIsSpeech,
    fake_scoring,
)


def protocol_members(protocol: type) -> set[str]:
    """The public names a protocol asks for (its own and those of the protocols it extends)."""
    return {
        name
        for cls in protocol.__mro__
        if cls is not Protocol and getattr(cls, "_is_protocol", False)
        for name in (*vars(cls), *getattr(cls, "__annotations__", {}))
        if not name.startswith("_")
    }


def missing(fake: object, protocol: type) -> set[str]:
    return {name for name in protocol_members(protocol) if not hasattr(fake, name)}


def test_the_fake_embedder_is_a_speaker_embedder() -> None:
    embedder: SpeakerEmbedder = FakeEmbedder()
    members = {"model_id", "sample_rate", "dimension", "min_samples", "embed"}
    assert protocol_members(SpeakerEmbedder) == members
    assert missing(embedder, SpeakerEmbedder) == set()
    embeddings = [
        embedder.embed(np.full(embedder.min_samples, level, dtype=np.float32))
        for level in (0.1, -0.1)
    ]
    for embedding in embeddings:
        assert embedding.shape == (embedder.dimension,)
        assert embedding.dtype == np.float32
        assert np.linalg.norm(embedding) == pytest.approx(1.0)
    # The agent's voice and an impostor's are as far apart as voices get.
    assert float(embeddings[0] @ embeddings[1]) == 0.0


def test_a_fake_embedder_with_a_cost_takes_its_time() -> None:
    started = time.monotonic()
    FakeEmbedder(seconds_per_call=0.05).embed(np.ones(8_000, dtype=np.float32))
    assert time.monotonic() - started >= 0.05


DETECTORS: list[SpeechDetector] = [
    AllSpeech(),
    FixedSegments([(1_000, 2_000), (3_000, 4_000)]),
    LoudIsSpeech(),
]


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_each_fake_detector_is_a_speech_detector(detector: SpeechDetector) -> None:
    assert protocol_members(SpeechDetector) == {"segments"}
    assert missing(detector, SpeechDetector) == set()
    waveform = np.zeros(16_000, dtype=np.float32)
    waveform[1_000:2_000] = 0.5
    waveform[3_000:4_000] = -0.5
    segments = detector.segments(waveform)
    assert segments
    # In order, not overlapping, inside the waveform.
    bounds = [bound for segment in segments for bound in segment]
    assert bounds == sorted(bounds)
    assert all(start < end for start, end in segments)
    assert bounds[0] >= 0 and bounds[-1] <= len(waveform)


def test_loud_is_speech_finds_the_loud_parts_and_keeps_what_it_analysed() -> None:
    detector = LoudIsSpeech()
    waveform = np.zeros(16_000, dtype=np.float32)
    waveform[1_000:2_000] = 0.5
    waveform[3_000:4_000] = -0.5
    assert detector.segments(waveform) == [(1_000, 2_000), (3_000, 4_000)]
    assert detector.segments(waveform[:8_000]) == [(1_000, 2_000), (3_000, 4_000)]
    assert detector.analysed == [16_000, 8_000]


def test_the_fake_scoring_files_load_and_part_the_fake_voices(tmp_path: Path) -> None:
    files = fake_scoring(tmp_path, MODEL_ID, FakeEmbedder.dimension)
    policy = replace(files, target_fmr=TARGET_FMR)
    scorer = Scorer(ScoringModel.load(policy, MODEL_ID), policy, voiceprints=list)
    enrolled = Voiceprint("a1", MODEL_ID, AGENT_VOICE, datetime(2026, 1, 1, tzinfo=UTC), 3, 20.0)
    assert scorer.score(enrolled, AGENT_VOICE, 4.0, Channel.WIDEBAND).accepted
    assert not scorer.score(enrolled, IMPOSTOR_VOICE, 4.0, Channel.WIDEBAND).accepted


def test_the_manual_clock_is_a_clock_that_moves_only_when_told() -> None:
    start = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    clock: Clock = ManualClock(start=start)
    assert protocol_members(Clock) == {"monotonic", "now", "sleep_until"}
    assert missing(clock, Clock) == set()
    manual = ManualClock(start=start)
    assert (manual.monotonic(), manual.now()) == (0.0, start)
    manual.advance(1.5)
    manual.advance(timedelta(minutes=1))
    assert manual.monotonic() == 61.5
    assert manual.now() == start + timedelta(seconds=61.5)
    with pytest.raises(ValueError, match="never goes back"):
        manual.advance(-1.0)
    assert manual.monotonic() == 61.5


def test_the_manual_clock_wakes_a_sleeper_once_its_deadline_has_come() -> None:
    async def scenario() -> list[str]:
        clock = ManualClock()
        woken: list[str] = []

        async def sleeper(name: str, deadline: float) -> None:
            await clock.sleep_until(deadline)
            woken.append(name)

        tasks = [asyncio.create_task(sleeper(n, d)) for n, d in (("at 10", 10.0), ("at 0", 0.0))]
        await asyncio.sleep(0)
        assert woken == ["at 0"]  # a deadline already past returns at once
        clock.advance(9.0)
        await asyncio.sleep(0)
        assert woken == ["at 0"]
        clock.advance(1.0)
        await asyncio.gather(*tasks)
        return woken

    assert asyncio.run(scenario()) == ["at 0", "at 10"]


def test_the_busy_stub_answers_like_the_generated_one_and_refuses_every_third_call() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        assert callable(pb_grpc.VerificationServiceStub(channel).Verify)

    async def three_calls() -> list[pb.VerifyResponse | grpc.StatusCode]:
        stub = BusyVerificationStub()
        answers: list[pb.VerifyResponse | grpc.StatusCode] = []
        for agent in ("a1", "a2", "a1"):
            try:
                answers.append(await stub.Verify(pb.VerifyRequest(agent_id=agent), timeout=1.0))
            except grpc.aio.AioRpcError as refused:
                answers.append(refused.code())
        assert (stub.calls, stub.agents) == (3, {"a1", "a2"})
        return answers

    first, second, third = asyncio.run(three_calls())
    assert first == second == pb.VerifyResponse(decision=pb.DECISION_ACCEPT)
    assert third is grpc.StatusCode.RESOURCE_EXHAUSTED
