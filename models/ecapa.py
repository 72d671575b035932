"""SpeechBrain's ECAPA-TDNN speaker model (spkrec-ecapa-voxceleb), from verified weights.

Filterbank features are computed with SpeechBrain's own modules in torch (under 1% of the
time); the network runs in OpenVINO from the export made at setup (models/export.py), cut in
two where attentive statistics pooling begins. The convolutions before the cut (the TDNN and
SE-Res2Net blocks and the feature aggregation, about 90% of the arithmetic) run in bfloat16 on
CPUs that have it; the pooling after it (attention softmax, weighted means and variances), its
batch norm and the final linear layer run in float32. That is about 3.7 times as fast as
SpeechBrain on one core with the same embedding (cosine at least 0.999, tested), so the model id
is unchanged and existing voiceprints stay valid. The whole network in bfloat16 was under 10%
faster again but moved some embeddings to a cosine of 0.996; with the part after the cut in
float32 the lowest on real speech is 0.99998. Marking the pooling's nodes to keep float32 in one
model did not do it (the CPU plugin's fused nodes drop the mark). Without bfloat16 both parts
run in float32, as the whole network did before.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from models.embedder import Embedding, Waveform
from models.errors import UnusableWaveformError
from models.export import (
    DIMENSION,
    EMBEDDING_OUTPUT,
    FRAMES_OUTPUT,
    N_MELS,
    exported_network,
)
from models.manifest import ECAPA_MANIFEST, verify_model_dir
from models.openvino_runtime import stream_settings, warm_up

_SAMPLE_RATE = 16_000
# ECAPA pools statistics over 10 ms frames; below half a second it has too few to be stable.
_MIN_SECONDS = 0.5


class EcapaEmbedder:
    """The SpeakerEmbedder for ECAPA-TDNN. Build it with `EcapaEmbedder.load`."""

    def __init__(
        self,
        features: torch.nn.Module,
        normalization: torch.nn.Module,
        trunk: ov.CompiledModel,
        head: ov.CompiledModel,
    ) -> None:
        self._features = features.eval()
        self._normalization = normalization.eval()
        self._trunk = trunk
        self._head = head
        # Before any worker calls it (models/openvino_runtime.py: a first-call deadlock).
        frames = trunk.create_infer_request()
        frames.infer({0: np.zeros((1, 100, N_MELS), dtype=np.float32)})
        warm_up(head, np.array(frames.get_output_tensor(0).data))
        del frames
        # One pair of infer requests per calling thread: a request is not thread-safe, and each
        # runs on its own OpenVINO stream, so concurrent calls use separate cores.
        self._requests = threading.local()

    @classmethod
    def load(cls, model_dir: Path, *, workers: int = 1, threads: int = 1) -> EcapaEmbedder:
        """Verify the weights in `model_dir` against the manifest, then compile their export
        for `workers` concurrent callers with `threads` intra-op threads each."""
        verify_model_dir(model_dir, ECAPA_MANIFEST)
        core = ov.Core()
        trunk, head = split_network(core.read_model(exported_network(model_dir)))
        streams = stream_settings(workers, threads)
        return cls(
            Fbank(n_mels=N_MELS),
            # Per-utterance mean removal, as in training; it keeps no running statistics.
            InputNormalization(norm_type="sentence", std_norm=False),
            core.compile_model(
                trunk, "CPU", {**streams, "INFERENCE_PRECISION_HINT": trunk_precision(core)}
            ),
            # Explicit: on CPUs with AMX the default would be bfloat16 (see module doc).
            core.compile_model(head, "CPU", {**streams, "INFERENCE_PRECISION_HINT": "f32"}),
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
            raise UnusableWaveformError(f"expected mono audio (1-D), got shape {waveform.shape}")
        if waveform.shape[0] < self.min_samples:
            raise UnusableWaveformError(
                f"audio too short for the speaker model: {waveform.shape[0] / _SAMPLE_RATE:.2f} s,"
                f" need at least {_MIN_SECONDS} s"
            )
        if not np.isfinite(waveform).all():
            raise UnusableWaveformError("audio contains NaN or infinite samples")
        batch = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0)
        with torch.inference_mode():
            features = self._normalization(self._features(batch), torch.ones(1)).numpy()
        trunk, head = self._requests_of_thread()
        trunk.infer({0: features})
        # The frame features pass from one request to the other without a copy.
        head.set_input_tensor(trunk.get_output_tensor(0))
        head.infer()
        output = head.get_output_tensor(0).data
        embedding = np.array(output, dtype=np.float32).reshape(-1)
        result: Embedding = embedding / np.linalg.norm(embedding)
        return result

    def _requests_of_thread(self) -> tuple[ov.InferRequest, ov.InferRequest]:
        requests: tuple[ov.InferRequest, ov.InferRequest] | None = getattr(
            self._requests, "pair", None
        )
        if requests is None:
            requests = (self._trunk.create_infer_request(), self._head.create_infer_request())
            self._requests.pair = requests
        return requests


def split_network(network: ov.Model) -> tuple[ov.Model, ov.Model]:
    """The exported network cut at its frame features: the trunk (features to frame features)
    and the head (frame features to the embedding: attentive statistics pooling, its batch
    norm and the final linear layer)."""
    frames = network.output(FRAMES_OUTPUT).get_node().input_value(0)
    trunk = ov.Model([frames], network.get_parameters(), "ecapa-trunk")
    copy = network.clone()
    copied_frames = copy.output(FRAMES_OUTPUT).get_node().input_value(0)
    pooled = ops.parameter(copied_frames.get_partial_shape(), ov.Type.f32, name=FRAMES_OUTPUT)
    for consumer in copied_frames.get_target_inputs():
        consumer.replace_source_output(pooled.output(0))
    head = ov.Model([copy.output(EMBEDDING_OUTPUT)], [pooled], "ecapa-head")
    return trunk, head


def trunk_precision(core: ov.Core) -> str:
    """bfloat16 where the CPU computes in it natively, float32 elsewhere."""
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"
