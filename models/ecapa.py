"""SpeechBrain's ECAPA-TDNN speaker model (spkrec-ecapa-voxceleb), from verified weights.

Filterbank features are computed with SpeechBrain's own modules in torch (under 1% of the
time); the network runs in OpenVINO from the export made at setup (models/export.py), in
float32: about twice as fast as torch on one core, with the same embedding as SpeechBrain's
(cosine at least 0.999, tested), so the model id is unchanged and existing voiceprints stay
valid. bfloat16 would be faster again but moved some embeddings to a cosine of 0.996.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from models.embedder import Embedding, Waveform
from models.export import DIMENSION, N_MELS, exported_network
from models.manifest import ECAPA_MANIFEST, verify_model_dir
from server.errors import InvalidAudioError

_SAMPLE_RATE = 16_000
# ECAPA pools statistics over 10 ms frames; below half a second it has too few to be stable.
_MIN_SECONDS = 0.5


class EcapaEmbedder:
    """The SpeakerEmbedder for ECAPA-TDNN. Build it with `EcapaEmbedder.load`."""

    def __init__(
        self,
        features: torch.nn.Module,
        normalization: torch.nn.Module,
        network: ov.CompiledModel,
    ) -> None:
        self._features = features.eval()
        self._normalization = normalization.eval()
        self._network = network
        # One infer request per calling thread: a request is not thread-safe, and each
        # runs on its own OpenVINO stream, so concurrent calls use separate cores.
        self._requests = threading.local()

    @classmethod
    def load(cls, model_dir: Path, *, workers: int = 1, threads: int = 1) -> EcapaEmbedder:
        """Verify the weights in `model_dir` against the manifest, then compile their export
        for `workers` concurrent callers with `threads` intra-op threads each."""
        verify_model_dir(model_dir, ECAPA_MANIFEST)
        network = ov.Core().compile_model(
            exported_network(model_dir),
            "CPU",
            {
                "NUM_STREAMS": workers,
                "INFERENCE_NUM_THREADS": workers * threads,
                # Explicit: on CPUs with AMX the default would be bfloat16 (see module doc).
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        return cls(
            Fbank(n_mels=N_MELS),
            # Per-utterance mean removal, as in training; it keeps no running statistics.
            InputNormalization(norm_type="sentence", std_norm=False),
            network,
        )

    @property
    def model_id(self) -> str:
        return ECAPA_MANIFEST.model_id

    @property
    def sample_rate(self) -> int:
        return _SAMPLE_RATE

    @property
    def dimension(self) -> int:
        return DIMENSION

    @property
    def min_samples(self) -> int:
        return int(_MIN_SECONDS * _SAMPLE_RATE)

    def embed(self, waveform: Waveform) -> Embedding:
        """L2-normalised embedding of one utterance.

        Thread-safe: the torch modules are in eval mode and never written to, and each thread
        has its own infer request. Like SpeechBrain's own verification, mean_var_norm_emb is
        not applied.
        """
        if waveform.ndim != 1:
            raise InvalidAudioError(
                f"expected mono audio (1-D), got shape {waveform.shape}", field="audio"
            )
        if waveform.shape[0] < self.min_samples:
            raise InvalidAudioError(
                f"audio too short for the speaker model: {waveform.shape[0] / _SAMPLE_RATE:.2f} s,"
                f" need at least {_MIN_SECONDS} s",
                field="audio",
            )
        if not np.isfinite(waveform).all():
            raise InvalidAudioError("audio contains NaN or infinite samples", field="audio")
        batch = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0)
        with torch.inference_mode():
            features = self._normalization(self._features(batch), torch.ones(1)).numpy()
        output = self._request().infer({0: features})[0]
        embedding = np.asarray(output, dtype=np.float32).reshape(-1)
        result: Embedding = embedding / np.linalg.norm(embedding)
        return result

    def _request(self) -> ov.InferRequest:
        request: ov.InferRequest | None = getattr(self._requests, "request", None)
        if request is None:
            request = self._network.create_infer_request()
            self._requests.request = request
        return request
