"""Throttling of verification attempts as a client sees it over gRPC (the timeline and the
rules are in tests/unit/test_throttling.py)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from voxauth.v1 import voxauth_pb2 as pb

from tests.support import (
    OTHER_1,
    SPEAKER_A,
    RunningServer,
    first_half,
    second_half,
    split,
    wav_audio,
)

AGENT = "agent-7"


def test_a_throttled_verify_gets_resource_exhausted_with_retry_info(
    voxauth: RunningServer,
) -> None:
    voxauth.enroll(AGENT, split(first_half(SPEAKER_A), 2))
    impostor = wav_audio(second_half(OTHER_1))
    for _ in range(5):
        assert voxauth.verify(AGENT, impostor).decision == pb.DECISION_REJECT
    with pytest.raises(grpc.RpcError) as refused:
        voxauth.verify(AGENT, wav_audio(second_half(SPEAKER_A)))
    error = refused.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in 30 s" in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    [detail] = status.details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    assert retry.retry_delay.seconds == 30
