"""SpeechBrain's own inference (`EncoderClassifier`) on the verified weights: the baseline the
benchmark compares against and the reference embedding the accuracy tests hold ours to.

Loaded offline: the shipped hyperparams.yaml sends SpeechBrain's pretrainer to the hub for a
classifier and label encoder that embedding does not need, so a minimal copy of it that loads
only the embedding network is written to a temporary folder with links to the weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from speechbrain.inference.speaker import EncoderClassifier

from models.embedder import Embedding, Waveform
from models.manifest import ECAPA_MANIFEST, verify_model_dir

_HPARAMS = """\
n_mels: 80
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [1024, 1024, 1024, 1024, 3072]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: {weights}
"""


class SpeechBrainReference:
    """ECAPA exactly as SpeechBrain runs it: `EncoderClassifier.encode_batch`."""

    def __init__(self, classifier: EncoderClassifier) -> None:
        self._classifier = classifier

    @classmethod
    def load(cls, model_dir: Path) -> SpeechBrainReference:
        verify_model_dir(model_dir, ECAPA_MANIFEST)
        # The weights are in memory once loaded; the folder is only for the loading.
        with tempfile.TemporaryDirectory(prefix="voxauth-speechbrain-") as workdir:
            source = Path(workdir) / "source"
            source.mkdir()
            (source / "hyperparams.yaml").write_text(
                _HPARAMS.format(weights=(model_dir / "embedding_model.ckpt").resolve())
            )
            classifier = EncoderClassifier.from_hparams(
                source=str(source), savedir=str(Path(workdir) / "saved"), run_opts={"device": "cpu"}
            )
        return cls(classifier)

    @property
    def model_id(self) -> str:
        return ECAPA_MANIFEST.model_id

    @property
    def sample_rate(self) -> int:
        return 16_000

    @property
    def dimension(self) -> int:
        return 192

    @property
    def min_samples(self) -> int:
        return 8_000

    def embed(self, waveform: Waveform) -> Embedding:
        """L2-normalised `encode_batch` embedding of one utterance."""
        batch = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0)
        embedding = self._classifier.encode_batch(batch).reshape(-1)
        embedding = embedding / torch.linalg.vector_norm(embedding)
        result: Embedding = embedding.numpy().astype(np.float32, copy=False)
        return result
