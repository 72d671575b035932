"""What the speaker models raise. models/ stands below server/, so these are its own: the
server turns them into its domain errors where it calls in (server/pipeline/analysis.py for
waveforms; `voxauth serve` reports model files that stop the start)."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of the errors a speaker model raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelFilesError(ModelError):
    """Model weights, or their export, are missing or do not match the manifest."""


class UnusableWaveformError(ModelError):
    """The embedder cannot take this waveform: not mono, too short, or not finite."""
