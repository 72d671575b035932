"""Server lifecycle: health reports NOT_SERVING until the model is loaded, reflection lists the
API, shutdown drains. A fake embedder stands in for the model, so loading can be held back."""

from __future__ import annotations

import socket

import numpy as np
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from models.embedder import Embedding, Waveform
from tests.support import RunningServer


class HeldBackEmbedder:
    """Implements SpeakerEmbedder; its loading waits until the test releases it."""

    model_id = "fake-model"
    sample_rate = 16_000
    dimension = 4
    min_samples = 8_000

    def embed(self, waveform: Waveform) -> Embedding:
        return np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])




def test_reflection_lists_the_api(voxauth: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(voxauth.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"voxauth.v1.EnrollmentService", "voxauth.v1.VerificationService"} <= names
    assert "grpc.health.v1.Health" in names
