"""Builds the speaker embedder and the countermeasure, so that whoever needs one depends on the
SpeakerEmbedder or Countermeasure protocol alone: torch, SpeechBrain and OpenVINO load here,
when a model is loaded, and never when models/ is merely imported."""

from __future__ import annotations

from pathlib import Path

from models.countermeasure import Countermeasure
from models.embedder import SpeakerEmbedder


def load_speaker_embedder(
    model_dir: Path, *, workers: int = 1, threads: int = 1
) -> SpeakerEmbedder:
    """The ECAPA-TDNN embedder from the verified weights in `model_dir`, compiled for `workers`
    concurrent callers with `threads` intra-op threads each. Raises ModelFilesError when the
    weights or their export are missing or do not match the manifest."""
    from models.ecapa import EcapaEmbedder

    return EcapaEmbedder.load(model_dir, workers=workers, threads=threads)


def load_countermeasure(model_dir: Path, *, workers: int = 1, threads: int = 1) -> Countermeasure:
    """The AASIST countermeasure from the verified checkpoint in `model_dir`, in OpenVINO at
    the CPU's native precision (the one its calibration was measured at), for `workers`
    concurrent callers. Raises ModelFilesError when the files do not match the manifest."""
    from models.aasist_countermeasure import AasistCountermeasure

    return AasistCountermeasure.load(model_dir, workers=workers, threads=threads)
