"""AASIST, the spoofing countermeasure of Jung et al., "AASIST: Audio Anti-Spoofing using
Integrated Spectro-Temporal Graph Attention Networks" (ICASSP 2022), as trained on ASVspoof
2019 LA by its authors (clovaai/aasist, MIT licence), written for this project from the
published architecture and the shapes of its configuration `config/AASIST.conf`.

The network reads a raw 16 kHz waveform through a fixed bank of 70 mel-spaced sinc band-pass
filters, a residual 2-D convolutional encoder, one graph over the spectral and one over the
temporal positions of the encoder's output, and two branches of heterogeneous graph attention
that join both graphs through a learned master node. It outputs two logits; the second is the
bona-fide score the authors rank by (higher: more likely genuine speech).

Module and parameter names are the checkpoint's own, so its state dict loads strictly. Two
quirks of the published network are kept because the weights were trained with them: the
pre-activation (batch norm, SELU) that every residual block after the first defines is not
applied to the block's input, and the first heterogeneous layer of each branch starts from the
learned master node itself, not one per batch item (they are the same in eval mode).

The export to ONNX for OpenVINO is made at setup (`voxauth fetch-model`) and cached beside the
weights under a name that carries their SHA-256 and the export format, as for the speaker model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.manifest import (
    AASIST_MANIFEST,
    ModelManifest,
    export_file,
    install_export,
    require_export,
    verify_model_dir,
)

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 64_600
"""The input length the network was trained and evaluated on (about 4 s)."""
BONA_FIDE_CLASS = 1
"""Index of the bona-fide logit in the output (the other is spoof)."""
WEIGHTS_FILE = "AASIST.pth"
LOGITS_OUTPUT = "logits"
READOUT_OUTPUT = "readout"
READOUT_DIM = 160
"""Width of the readout the output layer reads (5 x the heterogeneous graphs' 32 dimensions):
the embedding a back-end classifier (models/pad_backend.py) is fitted on."""
# Bump when the export step changes (opset, inputs, outputs), so older exports are rebuilt.
# 2: the readout is a second output. 3: SELU written as a scaled ELU (see _selu). 4: the
# filter bank's pooling taken along time first (see _pooled_bands).
EXPORT_FORMAT = 4
_OPSET = 17

# The published configuration (config/AASIST.conf).
_SINC_FILTERS = 70
_SINC_TAPS = 129  # `first_conv` 128, made odd so that every filter is symmetric
_ENCODER_CHANNELS = ((1, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 64))
_GRAPH_DIMS = (64, 32)
_SPECTRAL_NODES = 23  # 70 filters after the 3 x 3 max pooling
_POOL_SPECTRAL = 0.5
_POOL_TEMPORAL = 0.7
_POOL_HETEROGENEOUS = 0.5
_TEMPERATURE_SPECTRAL = 2.0
_TEMPERATURE_TEMPORAL = 2.0
_TEMPERATURE_HETEROGENEOUS = 100.0


def _mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def sinc_filter_bank() -> torch.Tensor:
    """The fixed front end: band-pass filters (filters, taps) whose edges are equally spaced
    on the mel scale from 0 Hz to the Nyquist frequency, each a difference of two windowed
    sinc low-pass filters. Computed in float64, used in float32."""
    edges = _hz(np.linspace(0.0, _mel(np.array(SAMPLE_RATE / 2)), _SINC_FILTERS + 1))
    taps = np.arange(_SINC_TAPS, dtype=np.float64) - (_SINC_TAPS - 1) / 2

    def low_pass(cutoff: np.ndarray) -> np.ndarray:
        relative = 2.0 * cutoff[:, None] / SAMPLE_RATE
        result: np.ndarray = relative * np.sinc(relative * taps[None, :])
        return result

    bank = (low_pass(edges[1:]) - low_pass(edges[:-1])) * np.hamming(_SINC_TAPS)[None, :]
    return torch.from_numpy(bank.astype(np.float32))


class SincFront(nn.Module):
    """The sinc filter bank as a 1-D convolution; it has no trained parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filters", sinc_filter_bank().unsqueeze(1), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, filters, samples - taps + 1)."""
        return F.conv1d(waveform.unsqueeze(1), self.get_buffer("filters"))


class ResidualBlock(nn.Module):
    """Two (2, 3) convolutions with a shortcut, then max pooling by 3 along time."""

    def __init__(self, channels_in: int, channels_out: int, *, first: bool) -> None:
        super().__init__()
        if not first:
            # Trained and saved, never applied (see the module doc); kept for the strict load.
            self.bn1 = nn.BatchNorm2d(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, kernel_size=(2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, kernel_size=(2, 3), padding=(0, 1))
        self.conv_downsample = (
            nn.Conv2d(channels_in, channels_out, kernel_size=(1, 3), padding=(0, 1))
            if channels_in != channels_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(_selu(self.bn2(self.conv1(x))))
        shortcut = x if self.conv_downsample is None else self.conv_downsample(x)
        pooled: torch.Tensor = F.max_pool2d(out + shortcut, (1, 3))
        return pooled


_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _selu(x: torch.Tensor) -> torch.Tensor:
    """SELU as its definition, scale * ELU(x, alpha), so the export holds an Elu and a Multiply
    rather than a Selu. OpenVINO's CPU plugin has no optimised kernel for Selu: it ran each one
    in a float32 reference loop, with conversions from and to the bfloat16 convolutions around
    it, and that was two thirds of the network's time (146 ms of a 4 s window, against 66 ms
    with Elu, which it fuses into the convolutions; `bench --check` shows the check)."""
    return _SELU_SCALE * F.elu(x, _SELU_ALPHA)


def _pooled_bands(bank: torch.Tensor) -> torch.Tensor:
    """The published front end's max pooling by 3 x 3 of the filter bank's magnitudes,
    (batch, filters, time) -> (batch, 1, filters // 3, time // 3): the same values as
    `F.max_pool2d(bank.unsqueeze(1), (3, 3))` (a maximum is a maximum of maxima), taken along
    time first in the filter bank's own 1-D layout. Written as a 2-D pool, it made OpenVINO
    reorder all 70 x 64,472 magnitudes into a 2-D layout before pooling: 16 ms of a 4 s
    window's 141 ms, where reordering the pooled third costs a few."""
    pooled = F.max_pool1d(bank, 3)
    batch, filters, time = pooled.shape
    kept = filters // 3 * 3  # as the 2-D pool, the last filter of 70 is left out
    grouped = pooled[:, :kept].reshape(batch, filters // 3, 3, time)
    return grouped.amax(dim=2).unsqueeze(1)


def _batch_norm_nodes(norm: nn.BatchNorm1d, nodes: torch.Tensor) -> torch.Tensor:
    """Batch norm of each node's features: (batch, nodes, dim) normalised along dim."""
    normalised: torch.Tensor = norm(nodes.reshape(-1, nodes.shape[-1]))
    return normalised.reshape(nodes.shape)


def _pair_products(nodes: torch.Tensor) -> torch.Tensor:
    """(batch, n, dim) -> (batch, n, n, dim): element-wise products of every pair of nodes."""
    return nodes.unsqueeze(2) * nodes.unsqueeze(1)


class GraphAttentionLayer(nn.Module):
    """Graph attention over a fully connected graph: each node's new features are a
    projection of itself plus a projection of the attention-weighted mean of all nodes."""

    def __init__(self, dim_in: int, dim_out: int, *, temperature: float) -> None:
        super().__init__()
        self.att_proj = nn.Linear(dim_in, dim_out)
        self.att_weight = nn.Parameter(torch.empty(dim_out, 1))
        self.proj_with_att = nn.Linear(dim_in, dim_out)
        self.proj_without_att = nn.Linear(dim_in, dim_out)
        self.bn = nn.BatchNorm1d(dim_out)
        self.temperature = temperature

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        scores = torch.tanh(self.att_proj(_pair_products(nodes))) @ self.att_weight
        attention = torch.softmax(scores.squeeze(-1) / self.temperature, dim=-1)
        updated = self.proj_with_att(attention @ nodes) + self.proj_without_att(nodes)
        return _selu(_batch_norm_nodes(self.bn, updated))


class HeterogeneousGraphAttentionLayer(nn.Module):
    """Graph attention over the union of two graphs (temporal, then spectral nodes) with one
    attention vector within each graph and one across them, plus a master node that attends
    to all nodes."""

    def __init__(self, dim_in: int, dim_out: int, *, temperature: float) -> None:
        super().__init__()
        self.proj_type1 = nn.Linear(dim_in, dim_in)
        self.proj_type2 = nn.Linear(dim_in, dim_in)
        self.att_proj = nn.Linear(dim_in, dim_out)
        self.att_projM = nn.Linear(dim_in, dim_out)
        self.att_weight11 = nn.Parameter(torch.empty(dim_out, 1))
        self.att_weight22 = nn.Parameter(torch.empty(dim_out, 1))
        self.att_weight12 = nn.Parameter(torch.empty(dim_out, 1))
        self.att_weightM = nn.Parameter(torch.empty(dim_out, 1))
        self.proj_with_att = nn.Linear(dim_in, dim_out)
        self.proj_without_att = nn.Linear(dim_in, dim_out)
        self.proj_with_attM = nn.Linear(dim_in, dim_out)
        self.proj_without_attM = nn.Linear(dim_in, dim_out)
        self.bn = nn.BatchNorm1d(dim_out)
        self.temperature = temperature

    def forward(
        self, first: torch.Tensor, second: torch.Tensor, master: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_first = first.shape[1]
        nodes = torch.cat([self.proj_type1(first), self.proj_type2(second)], dim=1)

        hidden = torch.tanh(self.att_proj(_pair_products(nodes)))
        within_first = hidden[:, :n_first, :n_first] @ self.att_weight11
        within_second = hidden[:, n_first:, n_first:] @ self.att_weight22
        # One vector scores the edges across the graphs in both directions.
        first_to_second = hidden[:, :n_first, n_first:] @ self.att_weight12
        second_to_first = hidden[:, n_first:, :n_first] @ self.att_weight12
        scores = torch.cat(
            [
                torch.cat([within_first, first_to_second], dim=2),
                torch.cat([second_to_first, within_second], dim=2),
            ],
            dim=1,
        ).squeeze(-1)
        attention = torch.softmax(scores / self.temperature, dim=-1)

        master_scores = torch.tanh(self.att_projM(nodes * master)) @ self.att_weightM
        master_attention = torch.softmax(master_scores / self.temperature, dim=1)
        new_master = self.proj_with_attM(
            master_attention.transpose(1, 2) @ nodes
        ) + self.proj_without_attM(master)

        updated = self.proj_with_att(attention @ nodes) + self.proj_without_att(nodes)
        updated = _selu(_batch_norm_nodes(self.bn, updated))
        return updated[:, :n_first], updated[:, n_first:], new_master


class GraphPool(nn.Module):
    """Keeps the `ratio` of nodes with the highest learned gate (sigmoid of a projection),
    each scaled by its gate, in order of decreasing gate."""

    def __init__(self, ratio: float, dim: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(dim, 1)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.proj(nodes))
        kept = max(int(nodes.shape[1] * self.ratio), 1)
        # Decreasing order matters: the two branches are later joined node by node.
        _, order = torch.topk(gates, kept, dim=1)
        return torch.gather(nodes * gates, 1, order.expand(-1, -1, nodes.shape[-1]))


class Aasist(nn.Module):
    """The AASIST network: (batch, samples) at 16 kHz -> (batch, 2) logits, spoof and bona
    fide. Build it from verified weights with `build_network`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_time = SincFront()
        self.first_bn = nn.BatchNorm2d(1)
        self.encoder = nn.Sequential(
            *(
                nn.Sequential(ResidualBlock(channels_in, channels_out, first=index == 0))
                for index, (channels_in, channels_out) in enumerate(_ENCODER_CHANNELS)
            )
        )
        graph, hetero = _GRAPH_DIMS
        encoded = _ENCODER_CHANNELS[-1][1]
        self.pos_S = nn.Parameter(torch.zeros(1, _SPECTRAL_NODES, encoded))
        self.master1 = nn.Parameter(torch.zeros(1, 1, graph))
        self.master2 = nn.Parameter(torch.zeros(1, 1, graph))
        self.GAT_layer_S = GraphAttentionLayer(encoded, graph, temperature=_TEMPERATURE_SPECTRAL)
        self.GAT_layer_T = GraphAttentionLayer(encoded, graph, temperature=_TEMPERATURE_TEMPORAL)
        t = _TEMPERATURE_HETEROGENEOUS
        self.HtrgGAT_layer_ST11 = HeterogeneousGraphAttentionLayer(graph, hetero, temperature=t)
        self.HtrgGAT_layer_ST12 = HeterogeneousGraphAttentionLayer(hetero, hetero, temperature=t)
        self.HtrgGAT_layer_ST21 = HeterogeneousGraphAttentionLayer(graph, hetero, temperature=t)
        self.HtrgGAT_layer_ST22 = HeterogeneousGraphAttentionLayer(hetero, hetero, temperature=t)
        self.pool_S = GraphPool(_POOL_SPECTRAL, graph)
        self.pool_T = GraphPool(_POOL_TEMPORAL, graph)
        self.pool_hS1 = GraphPool(_POOL_HETEROGENEOUS, hetero)
        self.pool_hT1 = GraphPool(_POOL_HETEROGENEOUS, hetero)
        self.pool_hS2 = GraphPool(_POOL_HETEROGENEOUS, hetero)
        self.pool_hT2 = GraphPool(_POOL_HETEROGENEOUS, hetero)
        self.out_layer = nn.Linear(5 * hetero, 2)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logits, _ = self.logits_and_readout(waveform)
        return logits

    def logits_and_readout(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the readout they are a linear function of, (batch, READOUT_DIM)."""
        bands = _pooled_bands(self.conv_time(waveform).abs())
        encoded = self.encoder(_selu(self.first_bn(bands)))  # (batch, channels, freq, time)

        spectral = encoded.abs().amax(dim=3).transpose(1, 2) + self.pos_S
        spectral = self.pool_S(self.GAT_layer_S(spectral))
        temporal = encoded.abs().amax(dim=2).transpose(1, 2)
        temporal = self.pool_T(self.GAT_layer_T(temporal))

        first = self._branch(
            temporal, spectral, self.master1, self.HtrgGAT_layer_ST11, self.HtrgGAT_layer_ST12,
            self.pool_hT1, self.pool_hS1,
        )  # fmt: skip
        second = self._branch(
            temporal, spectral, self.master2, self.HtrgGAT_layer_ST21, self.HtrgGAT_layer_ST22,
            self.pool_hT2, self.pool_hS2,
        )  # fmt: skip
        # The branches join node by node: each keeps the larger activation.
        temporal, spectral, master = (
            torch.maximum(one, other) for one, other in zip(first, second, strict=True)
        )
        readout = torch.cat(
            [
                temporal.abs().amax(dim=1),
                temporal.mean(dim=1),
                spectral.abs().amax(dim=1),
                spectral.mean(dim=1),
                master.squeeze(1),
            ],
            dim=1,
        )
        logits: torch.Tensor = self.out_layer(readout)
        return logits, readout

    @staticmethod
    def _branch(
        temporal: torch.Tensor,
        spectral: torch.Tensor,
        master: torch.Tensor,
        join: HeterogeneousGraphAttentionLayer,
        refine: HeterogeneousGraphAttentionLayer,
        pool_temporal: GraphPool,
        pool_spectral: GraphPool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One branch: join the two graphs, pool each, then add a second layer's refinement."""
        temporal, spectral, master = join(temporal, spectral, master)
        temporal, spectral = pool_temporal(temporal), pool_spectral(spectral)
        more_temporal, more_spectral, more_master = refine(temporal, spectral, master)
        return temporal + more_temporal, spectral + more_spectral, master + more_master


class _WithReadout(nn.Module):
    """What the export runs: both outputs, so one pass serves the raw score and a back-end."""

    def __init__(self, network: Aasist) -> None:
        super().__init__()
        self.network = network

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.logits_and_readout(waveform)


def build_network(model_dir: Path) -> Aasist:
    """AASIST with the checkpoint from `model_dir` (verify it first), loaded strictly, in
    eval mode."""
    network = Aasist()
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    network.eval()
    return network


def export_path(model_dir: Path, manifest: ModelManifest = AASIST_MANIFEST) -> Path:
    """Where the export of these weights in this format lives."""
    return export_file(model_dir, manifest, WEIGHTS_FILE, "aasist-network", EXPORT_FORMAT)


def exported_network(model_dir: Path, manifest: ModelManifest = AASIST_MANIFEST) -> Path:
    """The current export, or ModelFilesError naming the command that makes it."""
    return require_export(
        export_path(model_dir, manifest), model_dir, manifest, "countermeasure network"
    )


def export_network(model_dir: Path, manifest: ModelManifest = AASIST_MANIFEST) -> Path:
    """Export the verified checkpoint's network to ONNX (input: a batch of windows of
    WINDOW_SAMPLES samples, the batch axis dynamic; outputs: the logits and the readout)
    unless the current export is there; remove older exports. Returns the export's path."""
    verify_model_dir(model_dir, manifest)
    target = export_path(model_dir, manifest)
    if target.is_file():
        return target
    network = build_network(model_dir)

    def write(temp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns that node counts become constants: they are, for a fixed
            # window length; the export is checked against the torch network by the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _WithReadout(network),
                (torch.zeros(1, WINDOW_SAMPLES),),
                str(temp),
                input_names=["waveform"],
                output_names=[LOGITS_OUTPUT, READOUT_OUTPUT],
                dynamic_axes={
                    "waveform": {0: "windows"},
                    LOGITS_OUTPUT: {0: "windows"},
                    READOUT_OUTPUT: {0: "windows"},
                },
                opset_version=_OPSET,
                dynamo=False,
            )

    return install_export(target, "aasist-network", write)
