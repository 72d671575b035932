"""`voxauth bench --check`: the stage breakdown of one check on fake models, and its report.
(The figures themselves come from running the bench on real models, never from a test.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.tools.model_bench import (
    CheckBreakdown,
    Stage,
    check_breakdown,
    format_breakdown,
    wav_bytes,
)
from tests.fakes import MODEL_ID, FakeCountermeasure, FakeEmbedder, LoudIsSpeech, fake_scoring

RATE = 16_000


def _speech_then_silence(speech_seconds: float, silence_seconds: float) -> np.ndarray:
    return np.concatenate(
        [
            np.full(int(speech_seconds * RATE), 0.5, dtype=np.float32),
            np.zeros(int(silence_seconds * RATE), dtype=np.float32),
        ]
    )


def test_the_breakdown_times_every_stage_of_the_check_and_pad_hears_it_as_it_arrived(
    tmp_path: Path,
) -> None:
    countermeasure = FakeCountermeasure()
    detector = LoudIsSpeech()
    breakdown = check_breakdown(
        FakeEmbedder(seconds_per_call=0.001),
        countermeasure,
        detector,
        fake_scoring(tmp_path, MODEL_ID, 4),
        wav_bytes(_speech_then_silence(4.0, 4.0)),
        _speech_then_silence(5.0, 1.0),
        runs=3,
    )
    assert set(breakdown.medians) == set(Stage)
    assert breakdown.runs == 3
    assert breakdown.audio_seconds == pytest.approx(8.0)
    # Speech detection found the check's speech, and only that was embedded and scored.
    assert breakdown.net_speech_seconds == pytest.approx(4.0)
    # A warm-up and three timed checks, each judged whole, pauses included.
    assert countermeasure.scored == [8 * RATE] * 4
    assert breakdown.total_seconds == pytest.approx(sum(breakdown.medians.values()))


def test_the_breakdown_needs_a_timed_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runs"):
        check_breakdown(
            FakeEmbedder(),
            FakeCountermeasure(),
            LoudIsSpeech(),
            fake_scoring(tmp_path, MODEL_ID, 4),
            wav_bytes(_speech_then_silence(4.0, 4.0)),
            _speech_then_silence(5.0, 1.0),
            runs=0,
        )


BREAKDOWN = CheckBreakdown(
    audio_seconds=8.0,
    net_speech_seconds=6.5,
    runs=7,
    medians={
        Stage.DECODE: 0.001,
        Stage.SPEECH: 0.010,
        Stage.EMBEDDING: 0.040,
        Stage.PAD: 0.100,
        Stage.SCORING: 0.002,
    },
)


def test_the_report_lists_each_stage_beside_speechbrain_with_the_pad_ratio() -> None:
    report = format_breakdown(BREAKDOWN, speechbrain_seconds=0.200)
    for stage in Stage:
        assert stage.value in report
    assert "plain SpeechBrain embedding" in report
    assert "PAD / embedding: 2.50 (target: at most 0.50)" in report
    assert "whole check / plain SpeechBrain embedding: 0.77" in report


def test_without_a_speechbrain_figure_for_the_check_the_report_says_nothing_of_it() -> None:
    report = format_breakdown(BREAKDOWN, speechbrain_seconds=None)
    assert "SpeechBrain" not in report
    assert "PAD / embedding: 2.50" in report
