"""Server lifecycle with the real model: reflection lists the API (health while the model
loads is in tests/unit/test_lifecycle.py)."""

from __future__ import annotations

from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import RunningServer


def test_reflection_lists_the_api(voxauth: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(voxauth.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"voxauth.v1.EnrollmentService", "voxauth.v1.VerificationService"} <= names
    assert "grpc.health.v1.Health" in names
