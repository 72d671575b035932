"""Builds the speaker embedder, so that whoever needs one depends on the SpeakerEmbedder
protocol alone: torch, SpeechBrain and OpenVINO load here, when a model is loaded, and never
when models/ is merely imported."""

from __future__ import annotations

from pathlib import Path

from models.embedder import SpeakerEmbedder


def load_speaker_embedder(
    model_dir: Path, *, workers: int = 1, threads: int = 1
) -> SpeakerEmbedder:
    """The ECAPA-TDNN embedder from the verified weights in `model_dir`, compiled for `workers`
    concurrent callers with `threads` intra-op threads each. Raises ModelFilesError when the
    weights or their export are missing or do not match the manifest."""
    from models.ecapa import EcapaEmbedder

    return EcapaEmbedder.load(model_dir, workers=workers, threads=threads)
