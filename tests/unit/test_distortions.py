"""The domain shifts of `voxauth eval`: what they do to the audio, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from server.pipeline.channel import Channel
from server.pipeline.decode import TARGET_RATE
from server.scoring.calibration import Condition
from server.tools.distortions import Distortion, word_string
from server.tools.evaluation import shift_condition

RNG = np.random.default_rng(3)


def voiced(seconds: float) -> np.ndarray:
    """A stand-in for speech: a 150 Hz tone at -20 dBFS."""
    t = np.arange(int(seconds * TARGET_RATE)) / TARGET_RATE
    return (0.1 * np.sin(2 * np.pi * 150 * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("distortion", "snr_db"),
    [(Distortion.NOISE_20DB, 20), (Distortion.NOISE_10DB, 10), (Distortion.NOISE_5DB, 5)],
)
def test_noise_lies_the_stated_decibels_below_the_speech(
    distortion: Distortion, snr_db: float
) -> None:
    speech = voiced(4.0)
    noisy = distortion.apply(speech, [(0, len(speech))], seed=1)
    noise = noisy - speech
    measured = 10 * np.log10(np.mean(speech**2) / np.mean(noise**2))
    assert measured == pytest.approx(snr_db, abs=0.3)
    # The same file gets the same noise: embeddings can be cached.
    assert np.array_equal(noisy, distortion.apply(speech, [(0, len(speech))], seed=1))
    assert not np.array_equal(noisy, distortion.apply(speech, [(0, len(speech))], seed=2))


def test_word_strings_are_short_pieces_of_the_speech_with_silence_between() -> None:
    speech = voiced(6.0)
    words = word_string(speech, [(0, 3 * TARGET_RATE), (4 * TARGET_RATE, 6 * TARGET_RATE)], 7)
    frames = np.abs(words[: len(words) // 160 * 160].reshape(-1, 160)).max(axis=1) > 0
    # Runs of sounding 10 ms frames: the words.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], frames.astype(int), [0]])))
    runs = (edges[1::2] - edges[::2]) / 100
    assert len(runs) >= 5
    assert all(0.29 <= run <= 0.61 for run in runs)
    # No more speech than was given, and half a second of silence after every word.
    assert np.count_nonzero(frames) / 100 <= 5.0
    # (each run is measured to the 10 ms frame that holds its end)
    assert len(words) / TARGET_RATE == pytest.approx(runs.sum() + 0.5 * len(runs), abs=0.15)


def test_each_shift_is_scored_as_the_service_scores_its_channel() -> None:
    assert shift_condition(Distortion.REVERB) is Condition.WIDEBAND
    assert shift_condition(Distortion.OPUS) is Condition.WIDEBAND
    for narrowband in (Distortion.ALAW, Distortion.MP3, Distortion.WORDS):
        assert narrowband.channel is Channel.TELEPHONE
        assert shift_condition(narrowband) is Condition.TELEPHONE
