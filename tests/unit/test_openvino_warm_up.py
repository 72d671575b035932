"""Each compiled network runs once in the loading thread, before any worker calls it: two
workers' first inferences at once can deadlock in OpenVINO's Python bindings
(models/openvino_runtime.py). Fakes stand in for the compiled networks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.aasist import WINDOW_SAMPLES
from models.aasist_countermeasure import _OpenVinoWindows
from models.ecapa import EcapaEmbedder
from models.openvino_runtime import stream_settings, warm_up


class _Tensor:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data


class _Request:
    def __init__(self, network: _Compiled) -> None:
        self._network = network

    def infer(self, inputs: dict[int, np.ndarray]) -> None:
        self._network.inferred.append(inputs[0].shape)

    def get_output_tensor(self, index: int) -> _Tensor:
        self._network.read.append(index)
        return _Tensor(np.zeros((1, 4), dtype=np.float32))


class _Compiled:
    def __init__(self, outputs: int) -> None:
        self.outputs = [object()] * outputs
        self.inferred: list[tuple[int, ...]] = []
        self.read: list[int] = []
        self.requests = 0

    def create_infer_request(self) -> _Request:
        self.requests += 1
        return _Request(self)


def test_warm_up_runs_once_and_reads_every_output() -> None:
    compiled = _Compiled(outputs=2)
    warm_up(compiled, np.zeros((1, 8), dtype=np.float32))
    assert compiled.inferred == [(1, 8)]
    assert compiled.read == [0, 1]


def test_the_countermeasure_network_runs_once_when_it_is_wrapped() -> None:
    compiled = _Compiled(outputs=2)
    _OpenVinoWindows(compiled)
    assert compiled.inferred == [(1, WINDOW_SAMPLES)]
    assert compiled.read == [0, 1]


def test_both_parts_of_the_speaker_network_run_once_when_it_is_built() -> None:
    trunk, head = _Compiled(outputs=1), _Compiled(outputs=1)
    identity: Any = torch.nn.Identity()
    EcapaEmbedder(identity, identity, trunk, head)
    assert len(trunk.inferred) == 1 and trunk.read == [0]
    assert head.inferred == [(1, 4)] and head.read == [0]


def test_streams_are_not_pinned_to_cores() -> None:
    """Pinned, the speaker network's and the countermeasure's first streams share core 0
    while a check runs them side by side (models/openvino_runtime.py)."""
    settings = stream_settings(2, 1)
    assert settings == {"NUM_STREAMS": 2, "INFERENCE_NUM_THREADS": 2, "ENABLE_CPU_PINNING": False}
