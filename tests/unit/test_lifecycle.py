"""Server lifecycle: health reports NOT_SERVING until the model is loaded. A fake embedder stands
in for the model, so loading can be held back."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from tests.fakes import FakeEmbedder, fake_scoring
from tests.support import KEY, RunningServer, make_config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_health_is_not_serving_until_the_model_is_loaded(tmp_path: Path) -> None:
    release = threading.Event()

    def load() -> FakeEmbedder:
        release.wait(30)
        return FakeEmbedder()

    # A fixed port, so the test can reach the server while start() is still loading the model.
    port = free_port()
    config = replace(
        make_config(tmp_path),
        listen_address=f"127.0.0.1:{port}",
        scoring=fake_scoring(tmp_path / "scoring", FakeEmbedder.model_id, FakeEmbedder.dimension),
    )
    servers: list[RunningServer] = []
    starting = threading.Thread(target=lambda: servers.append(RunningServer(config, load, KEY)))
    starting.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        loading = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert loading.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as early:
            pb_grpc.VerificationServiceStub(channel).Verify(
                pb.VerifyRequest(agent_id="a", audio=pb.Audio()), timeout=5
            )
        assert early.value.code() is grpc.StatusCode.UNAVAILABLE

        release.set()
        starting.join(30)
        for service in ("", "voxauth.v1.VerificationService", "voxauth.v1.EnrollmentService"):
            ready = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        starting.join(30)
        channel.close()
        for server in servers:
            server.stop()
