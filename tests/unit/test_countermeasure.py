"""The countermeasure's own code without its weights: how a check is covered by windows, the
AASIST adapter's handling of audio it cannot score, and the network's fixed sinc front end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.aasist import SAMPLE_RATE, WINDOW_SAMPLES, Aasist, exported_network, sinc_filter_bank
from models.aasist_countermeasure import AasistCountermeasure
from models.countermeasure import WindowBatch, window_starts, windows_of
from models.errors import ModelFilesError, UnusableWaveformError


@pytest.mark.parametrize(
    ("samples", "window", "starts"),
    [
        (10, 10, [0]),
        (4, 10, [0]),
        (11, 10, [0, 1]),
        (20, 10, [0, 10]),
        (25, 10, [0, 8, 15]),
        (128_000, WINDOW_SAMPLES, [0, 63_400]),
    ],
)
def test_fewest_windows_cover_the_audio_evenly(
    samples: int, window: int, starts: list[int]
) -> None:
    assert window_starts(samples, window) == starts


def test_every_sample_is_in_some_window() -> None:
    for samples in range(10, 200):
        covered = np.zeros(samples, bool)
        for start in window_starts(samples, 10):
            assert 0 <= start <= samples - 10
            covered[start : start + 10] = True
        assert covered.all()


def test_short_audio_is_repeated_to_fill_one_window() -> None:
    audio = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(windows_of(audio, 10), [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]])


def test_windows_are_the_audio_at_their_starts() -> None:
    audio = np.arange(25, dtype=np.float32)
    batch = windows_of(audio, 10)
    assert batch.dtype == np.float32
    assert batch.shape == (3, 10)
    np.testing.assert_array_equal(batch[:, 0], [0, 8, 15])
    np.testing.assert_array_equal(batch[-1], audio[15:])


class _RecordingNetwork:
    """Stands in for the network: bona-fide logit = the window's first sample."""

    def __init__(self) -> None:
        self.batches: list[WindowBatch] = []

    def __call__(self, windows: WindowBatch) -> np.ndarray:
        self.batches.append(windows)
        return np.stack([-windows[:, 0], windows[:, 0]], axis=1).astype(np.float32)


def test_score_is_the_mean_bona_fide_logit_over_the_windows() -> None:
    network = _RecordingNetwork()
    countermeasure = AasistCountermeasure(network)
    audio = np.zeros(2 * WINDOW_SAMPLES + 1, np.float32)
    audio[0], audio[-WINDOW_SAMPLES] = 0.3, 0.9  # the first and the last window's first samples
    assert countermeasure.score(audio) == pytest.approx((0.3 + 0.0 + 0.9) / 3)
    # In batches of at most two windows, which bounds the network's memory on long audio.
    assert [batch.shape for batch in network.batches] == [
        (2, WINDOW_SAMPLES),
        (1, WINDOW_SAMPLES),
    ]


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros(SAMPLE_RATE - 1, np.float32), "too short for the countermeasure"),
        (np.zeros((2, SAMPLE_RATE), np.float32), "mono"),
        (np.full(SAMPLE_RATE, np.nan, np.float32), "NaN"),
    ],
)
def test_unusable_audio_is_refused_before_the_network(audio: np.ndarray, message: str) -> None:
    network = _RecordingNetwork()
    with pytest.raises(UnusableWaveformError, match=message):
        AasistCountermeasure(network).score(audio)
    assert network.batches == []


def _gain_db(taps: np.ndarray, hz: float) -> float:
    response = np.abs(np.sum(taps * np.exp(-2j * np.pi * hz / SAMPLE_RATE * np.arange(len(taps)))))
    return float(20 * np.log10(max(response, 1e-12)))


def test_sinc_filters_pass_their_own_mel_band_and_stop_distant_ones() -> None:
    bank = sinc_filter_bank().numpy().astype(np.float64)
    assert bank.shape == (70, 129)
    np.testing.assert_allclose(bank, bank[:, ::-1], atol=1e-7)  # symmetric: linear phase
    mel_edges = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 71)
    edges = 700 * (10 ** (mel_edges / 2595) - 1)
    grid = np.arange(0.0, 8000.0, 5.0)
    for index in (5, 35, 60):
        response = [_gain_db(bank[index], hz) for hz in grid]
        # The peak is at the filter's own band (within what 129 taps resolve, about 120 Hz),
        # and ten bands higher the filter is far below it.
        assert edges[index] - 120 <= grid[int(np.argmax(response))] <= edges[index + 1] + 120
        assert _gain_db(bank[index], edges[index + 10]) < max(response) - 40
    assert _gain_db(bank[60], (edges[60] + edges[61]) / 2) > -3


def test_network_maps_a_batch_of_windows_to_two_logits_each() -> None:
    torch.manual_seed(0)
    network = Aasist().eval()
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    with torch.no_grad():
        logits = network(torch.randn(2, WINDOW_SAMPLES) * 0.1)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_missing_export_names_the_command_that_makes_it(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError) as raised:
        exported_network(tmp_path)
    assert "countermeasure network" in raised.value.message
    assert f"voxauth fetch-model --countermeasure-dir {tmp_path}" in raised.value.message
