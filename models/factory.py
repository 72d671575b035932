"""Builds the speaker embedder and the countermeasure, so that whoever needs one depends on the
SpeakerEmbedder or Countermeasure protocol alone: torch, SpeechBrain and OpenVINO load here,
when a model is loaded, and never when models/ is merely imported."""

from __future__ import annotations

from pathlib import Path

from models.countermeasure import Countermeasure, judged_id
from models.embedder import SpeakerEmbedder


def load_speaker_embedder(
    model_dir: Path, *, workers: int = 1, threads: int = 1
) -> SpeakerEmbedder:
    """The ECAPA-TDNN embedder from the verified weights in `model_dir`, compiled for `workers`
    concurrent callers with `threads` intra-op threads each. Raises ModelFilesError when the
    weights or their export are missing or do not match the manifest."""
    from models.ecapa import EcapaEmbedder

    return EcapaEmbedder.load(model_dir, workers=workers, threads=threads)


def load_countermeasure(
    model_dir: Path, *, backend: Path | None = None, workers: int = 1, threads: int = 1
) -> Countermeasure:
    """The AASIST countermeasure from the verified checkpoint in `model_dir`, in OpenVINO at
    the CPU's native precision (the one its calibration was measured at), for `workers`
    concurrent callers, its checks scored by the PAD back-end in `backend` (default: the
    shipped models/scoring/pad_backend.json). Raises ModelFilesError when the files do not
    match the manifest or the back-end is missing, malformed or made for other weights."""
    from models.aasist import READOUT_DIM
    from models.aasist_countermeasure import AasistCountermeasure
    from models.manifest import AASIST_MANIFEST
    from models.pad_backend import SPECTRAL_DIM, PadBackEnd, default_backend_path

    fitted = PadBackEnd.load(
        backend or default_backend_path(),
        judged_id(AASIST_MANIFEST.model_id),
        READOUT_DIM + SPECTRAL_DIM,
    )
    network = AasistCountermeasure.load(model_dir, workers=workers, threads=threads)
    return network.with_backend(fitted)
