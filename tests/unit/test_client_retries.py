"""The CLI's client retries a call whose answer was lost, with the same request id, so the
server answers the retry instead of acting twice."""

from __future__ import annotations

import grpc
import pytest

from server.tools.client import _with_retries


class LostAnswer(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_a_lost_answer_is_retried_with_the_same_request_id() -> None:
    seen: list[str] = []

    def call(request_id: str) -> str:
        seen.append(request_id)
        if len(seen) < 3:
            raise LostAnswer(grpc.StatusCode.UNAVAILABLE)
        return "finalized"

    assert _with_retries(call, pauses=(0, 0, 0)) == "finalized"
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0]


def test_a_refusal_is_not_retried_and_retries_give_up() -> None:
    calls: list[str] = []

    def refused(request_id: str) -> str:
        calls.append(request_id)
        raise LostAnswer(grpc.StatusCode.FAILED_PRECONDITION)

    with pytest.raises(grpc.RpcError):
        _with_retries(refused, pauses=(0, 0))
    assert len(calls) == 1

    def down(request_id: str) -> str:
        calls.append(request_id)
        raise LostAnswer(grpc.StatusCode.UNAVAILABLE)

    calls.clear()
    with pytest.raises(grpc.RpcError):
        _with_retries(down, pauses=(0, 0))
    assert len(calls) == 3
