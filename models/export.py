"""The ECAPA-TDNN network, built from the verified weights and exported once to ONNX for
OpenVINO, which runs it about 3.7 times as fast as torch on one core (see README, "Speed").

Besides the embedding, the export outputs the frame features that attentive statistics pooling
reads (FRAMES_OUTPUT, the output of the multi-layer feature aggregation): models/ecapa.py cuts
the network there, to run the convolutions before it in bfloat16 and the pooling after it in
float32.

The export runs during setup (`voxauth fetch-model`), not in the server, and is cached next to
the weights under a name that carries the weights' SHA-256 and the export format: new weights
or a changed export step give a new name, so a stale export is never loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

from models.manifest import (
    ECAPA_MANIFEST,
    ModelManifest,
    export_file,
    install_export,
    require_export,
    verify_model_dir,
)

N_MELS = 80
DIMENSION = 192
WEIGHTS_FILE = "embedding_model.ckpt"
EMBEDDING_OUTPUT = "embedding"
FRAMES_OUTPUT = "frames"
# Bump when the export step changes (opset, inputs, outputs, wrapping), so older exports are
# rebuilt. 2: the frame features as a second output.
EXPORT_FORMAT = 2
_OPSET = 17
_EXAMPLE_FRAMES = 300


def build_network(model_dir: Path) -> torch.nn.Module:
    """ECAPA-TDNN with SpeechBrain's spkrec-ecapa-voxceleb hyperparameters and the weights
    from `model_dir` (verify them first), in eval mode."""
    network: torch.nn.Module = ECAPA_TDNN(
        input_size=N_MELS,
        channels=[1024, 1024, 1024, 1024, 3072],
        kernel_sizes=[5, 3, 3, 3, 1],
        dilations=[1, 2, 3, 4, 1],
        attention_channels=128,
        lin_neurons=DIMENSION,
    )
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    network.eval()
    return network


class _WithFrames(torch.nn.Module):
    """The network, also returning the output of its multi-layer feature aggregation (mfa),
    the frame features (batch, 3072, frames) that attentive statistics pooling reads."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self._frames: list[torch.Tensor] = []
        network.get_submodule("mfa").register_forward_hook(self._keep_frames)

    def _keep_frames(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._frames.append(output)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._frames.clear()
        embedding = self.network(features)
        (frames,) = self._frames
        self._frames.clear()
        return embedding, frames


def export_path(model_dir: Path, manifest: ModelManifest = ECAPA_MANIFEST) -> Path:
    """Where the export of these weights in this format lives."""
    return export_file(model_dir, manifest, WEIGHTS_FILE, "ecapa-network", EXPORT_FORMAT)


def exported_network(model_dir: Path, manifest: ModelManifest = ECAPA_MANIFEST) -> Path:
    """The current export, or ModelFilesError naming the command that makes it."""
    return require_export(export_path(model_dir, manifest), model_dir, manifest, "speaker network")


def export_network(model_dir: Path, manifest: ModelManifest = ECAPA_MANIFEST) -> Path:
    """Export the verified weights' network to ONNX (time axis dynamic; outputs the embedding
    and the frame features) unless the current export is there; remove older exports. Returns
    the export's path."""
    verify_model_dir(model_dir, manifest)
    target = export_path(model_dir, manifest)
    if target.is_file():
        return target
    network = build_network(model_dir)

    def write(temp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            # The exporter's notes on constant folding of slices concern its own graph
            # passes; the export is checked against SpeechBrain's embedding by the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _WithFrames(network),
                (torch.zeros(1, _EXAMPLE_FRAMES, N_MELS),),
                str(temp),
                input_names=["features"],
                output_names=[EMBEDDING_OUTPUT, FRAMES_OUTPUT],
                dynamic_axes={"features": {1: "frames"}, FRAMES_OUTPUT: {2: "frames"}},
                opset_version=_OPSET,
                dynamo=False,
            )

    return install_export(target, "ecapa-network", write)
