"""The trials `voxauth calibrate` makes: uneven cuts of one file per speaker give long tests and
long voiceprints, each trial carrying both sides' net speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.pipeline.channel import Channel
from server.scoring.calibration import Condition
from server.tools.calibrate import (
    HALVES_PLAN,
    UNEVEN_PLAN,
    CohortVoices,
    Plan,
    Setting,
    calibration_trials,
)
from server.tools.corpus import Embedded, Part, Recording, Segment, Side, SpeechCorpus
from server.tools.distortions import Distortion
from server.tools.evaluation import LONG_ENROLLMENT, LONG_TEST, Trials

DIMENSION = 16
NET_SPEECH = {"s0": 16.0, "s1": 14.0, "s2": 12.0, "s3": 10.0, "s4": 7.0}
"""Each speaker's one file: its net speech, whole."""


class FakeCorpus(SpeechCorpus):
    """A speaker's embedding is its own direction plus noise that shrinks with the speech
    taken; net speech is counted as the real corpus counts it, from the part's speech."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.voices = {s: rng.normal(size=DIMENSION) for s in NET_SPEECH}
        self.rng = rng

    @property
    def dimension(self) -> int:
        return DIMENSION

    def embed(
        self,
        recording: Recording,
        side: Side,
        segment: Segment,
        distortion: Distortion | None = None,
    ) -> Embedded:
        whole = NET_SPEECH[recording.speaker]
        available = whole if segment.part is Part.WHOLE else whole / 2
        left = max(available - segment.start, 0.0)
        taken = left if segment.seconds is None else min(left, segment.seconds)
        if segment.seconds is not None and taken < segment.seconds:
            return Embedded(None, taken)
        noisy = self.voices[recording.speaker] + self.rng.normal(size=DIMENSION) / np.sqrt(taken)
        embedding: Embedding = (noisy / np.linalg.norm(noisy)).astype(np.float32)
        return Embedded(embedding, taken)


@pytest.fixture
def corpus() -> FakeCorpus:
    return FakeCorpus()


def trials_of(corpus: FakeCorpus, plan: Plan) -> Trials:
    files = [Recording(Path(f"{s}-0-0.flac"), s) for s in NET_SPEECH]
    rng = np.random.default_rng(2)
    cohort_rows = rng.normal(size=(12, DIMENSION))
    cohort_rows /= np.linalg.norm(cohort_rows, axis=1, keepdims=True)
    cohort = CohortVoices(
        [f"c{i}" for i in range(12)], {channel: cohort_rows for channel in Channel}
    )
    return calibration_trials(
        corpus,
        files,
        cohort,
        Condition.WIDEBAND,
        Setting(False, 5),
        min_enrollment_seconds=2.0,
        min_test_seconds=3.0,
        plan=plan,
    )


def test_uneven_cuts_give_long_tests_and_long_voiceprints_with_both_lengths(
    corpus: FakeCorpus,
) -> None:
    trials = trials_of(corpus, UNEVEN_PLAN)
    assert trials.target_enrollment_seconds is not None
    assert trials.impostor_enrollment_seconds is not None
    pairs = sorted(
        (round(float(t), 2), round(float(e), 2))
        for t, e in zip(trials.target_seconds, trials.target_enrollment_seconds, strict=True)
    )
    # The first 3 s against all after 4 s; long tests (all after 4.5 s) against the first
    # 4 s, where the 7 s file leaves 2.5 s of test, under the service's 3 s: no trial.
    long_voiceprints = [(3.0, 3.0), (3.0, 6.0), (3.0, 8.0), (3.0, 10.0), (3.0, 12.0)]
    long_tests = [(5.5, 4.0), (7.5, 4.0), (9.5, 4.0), (11.5, 4.0)]
    assert pairs == [*long_voiceprints, *long_tests]
    # Every other speaker's cut is an impostor trial with its own lengths.
    assert len(trials.impostor) == 5 * 4 - 4 + 5 * 5 - 5
    assert set(np.round(trials.impostor_enrollment_seconds, 1)) == {3.0, 4.0, 6.0, 8.0, 10.0, 12.0}
    # The genuine trials score higher: the same voice on both sides.
    assert trials.target.mean() > trials.impostor.mean() + 2


def test_halves_cannot_give_a_test_longer_than_half_a_file(corpus: FakeCorpus) -> None:
    halves = trials_of(corpus, HALVES_PLAN)
    uneven = trials_of(corpus, UNEVEN_PLAN)
    longest_file = max(NET_SPEECH.values())
    assert halves.target_seconds.max() <= longest_file / 2
    assert uneven.target_seconds.max() > longest_file / 2 + 3
    assert halves.target_enrollment_seconds is not None
    assert uneven.target_enrollment_seconds is not None
    assert uneven.target_enrollment_seconds.max() > halves.target_enrollment_seconds.max() + 3


@pytest.mark.parametrize("cut", [LONG_TEST, LONG_ENROLLMENT])
def test_the_two_sides_of_an_uneven_cut_share_no_speech(cut: tuple[Segment, Segment]) -> None:
    enrolled, tested = cut
    assert enrolled.part is tested.part is Part.WHOLE
    first, second = sorted(cut, key=lambda segment: segment.start)
    assert first.start == 0.0 and first.seconds is not None
    # A gap of net speech, for a telephone side's VAD that counts the speech a little
    # differently (server/tools/evaluation.py).
    assert second.start >= first.seconds + 0.5
