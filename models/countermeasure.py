"""The interface every presentation-attack countermeasure sits behind, and how a check longer
than the network's window is covered by windows (numpy only: no model is loaded here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from models.embedder import Waveform

WindowBatch = npt.NDArray[np.float32]
"""Windows of audio, (windows, samples), float32 in [-1, 1]."""


@dataclass(frozen=True)
class CountermeasureEvidence:
    """What one pass of the countermeasure over a check yields."""

    raw_score: float
    """The network's own bona-fide score, uncalibrated (`Countermeasure.score`)."""
    features: npt.NDArray[np.float64]
    """The input of a back-end fitted on the network's outputs (models/pad_backend.py)."""


class Countermeasure(Protocol):
    """Scores how likely audio is a live, genuine voice rather than a presentation attack
    (synthetic, converted or replayed speech)."""

    @property
    def model_id(self) -> str:
        """Identifies the model and its exact weights."""

    @property
    def sample_rate(self) -> int:
        """The rate `score` expects (16 kHz)."""

    @property
    def min_samples(self) -> int:
        """Shortest input `score` accepts; shorter input raises UnusableWaveformError."""

    def score(self, waveform: Waveform) -> float:
        """Bona-fide score of the whole waveform, uncalibrated: higher is more likely genuine.
        Thread-safe; called from worker threads."""

    def evidence(self, waveform: Waveform) -> CountermeasureEvidence:
        """The raw score and the back-end's input, from one pass. Thread-safe."""

    def channel_score(self, evidence: CountermeasureEvidence, channel: str) -> float:
        """The score the channel's threshold applies to ("wideband" or "telephone"): the
        back-end's log-odds where the countermeasure has one, else the raw score."""


def window_starts(samples: int, window: int) -> list[int]:
    """Starts of the fewest windows of `window` samples that cover `samples`, spread evenly
    from the first sample to the last (consecutive windows overlap by less than a window).
    Audio shorter than one window gets one window at 0 (the caller fills it)."""
    if samples <= window:
        return [0]
    count = math.ceil(samples / window)
    last = samples - window
    return [round(index * last / (count - 1)) for index in range(count)]


def windows_of(waveform: Waveform, window: int) -> WindowBatch:
    """The windows of `window_starts`, stacked; audio shorter than one window is repeated
    end to end until it fills it, as the network's authors evaluate short utterances."""
    if len(waveform) < window:
        repeats = math.ceil(window / len(waveform))
        filled: WindowBatch = np.tile(waveform, repeats)[:window][None, :]
        return np.ascontiguousarray(filled, dtype=np.float32)
    batch = np.stack(
        [waveform[start : start + window] for start in window_starts(len(waveform), window)]
    )
    return np.ascontiguousarray(batch, dtype=np.float32)
