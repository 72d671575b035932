"""The interface every speaker model sits behind, so another model can replace ECAPA later."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

Waveform = npt.NDArray[np.float32]
"""Mono audio at the embedder's sample rate, float32 in [-1, 1]."""

Embedding = npt.NDArray[np.float32]
"""A 1-D, L2-normalised speaker embedding."""


class SpeakerEmbedder(Protocol):
    """Turns speech into a fixed-size, L2-normalised speaker embedding."""

    @property
    def model_id(self) -> str:
        """Identifies the model and its exact weights; stored with every voiceprint."""

    @property
    def sample_rate(self) -> int:
        """The rate `embed` expects (16 kHz for ECAPA)."""

    @property
    def dimension(self) -> int:
        """Length of the embeddings."""

    @property
    def min_samples(self) -> int:
        """Shortest input `embed` accepts; shorter input raises UnusableWaveformError."""

    def embed(self, waveform: Waveform) -> Embedding:
        """Embedding of one utterance. Thread-safe; called from worker threads."""
