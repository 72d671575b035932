"""SpeechBrain's ECAPA-TDNN speaker model (spkrec-ecapa-voxceleb), built offline from verified
weights.

The network is constructed here rather than from the shipped hyperparams.yaml because that
file points SpeechBrain's pretrainer at the hub, which production hosts may not reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
from speechbrain.processing.features import InputNormalization

from models.embedder import Embedding, Waveform
from models.manifest import ECAPA_MANIFEST, verify_model_dir
from server.errors import InvalidAudioError

_SAMPLE_RATE = 16_000
_DIMENSION = 192
_N_MELS = 80
# ECAPA pools statistics over 10 ms frames; below half a second it has too few to be stable.
_MIN_SECONDS = 0.5


class EcapaEmbedder:
    """The SpeakerEmbedder for ECAPA-TDNN. Build it with `EcapaEmbedder.load`."""

    def __init__(
        self,
        features: torch.nn.Module,
        normalization: torch.nn.Module,
        network: torch.nn.Module,
    ) -> None:
        self._features = features.eval()
        self._normalization = normalization.eval()
        self._network = network.eval()

    @classmethod
    def load(cls, model_dir: Path) -> EcapaEmbedder:
        """Verify the weights in `model_dir` against the manifest, then build the model."""
        verify_model_dir(model_dir, ECAPA_MANIFEST)
        network = ECAPA_TDNN(
            input_size=_N_MELS,
            channels=[1024, 1024, 1024, 1024, 3072],
            kernel_sizes=[5, 3, 3, 3, 1],
            dilations=[1, 2, 3, 4, 1],
            attention_channels=128,
            lin_neurons=_DIMENSION,
        )
        state = torch.load(
            model_dir / "embedding_model.ckpt", map_location="cpu", weights_only=True
        )
        network.load_state_dict(state)
        return cls(
            Fbank(n_mels=_N_MELS),
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
        return _DIMENSION

    @property
    def min_samples(self) -> int:
        return int(_MIN_SECONDS * _SAMPLE_RATE)

    def embed(self, waveform: Waveform) -> Embedding:
        """L2-normalised embedding of one utterance.

        Thread-safe: the modules are in eval mode and inference never writes to them.
        Like SpeechBrain's own verification, mean_var_norm_emb is not applied.
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
        whole = torch.ones(1)  # relative length of the one utterance in the batch
        with torch.inference_mode():
            feats = self._normalization(self._features(batch), whole)
            embedding = self._network(feats, whole).reshape(-1)
            embedding = embedding / torch.linalg.vector_norm(embedding)
        result: Embedding = embedding.numpy().astype(np.float32, copy=False)
        return result
