"""Enrollment uploads against the audio budget, on a real gRPC server with the fake model: a
stream the budget cannot hold is refused at once with RESOURCE_EXHAUSTED and a retry delay, and
a cancelled stream gives its audio back."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from voxauth.v1 import voxauth_pb2 as pb

from server.config import AudioLimits
from tests.fakes import FakeEmbedder, fake_scoring
from tests.support import KEY, RunningServer, make_config

MAX_SECONDS = 1.0
BUDGET_MIB = 4  # the least a 1 s limit allows: one upload of the largest kind


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    config = replace(
        make_config(tmp_path),
        audio=AudioLimits(max_seconds=MAX_SECONDS, budget_mib=BUDGET_MIB),
        scoring=fake_scoring(tmp_path / "scoring", FakeEmbedder.model_id, FakeEmbedder.dimension),
    )
    running = RunningServer(config, FakeEmbedder, KEY)
    running.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="a1", display_name="A", consent_reference="HR-1")
    )
    yield running
    running.stop()


def wav_file(seconds: float) -> bytes:
    """A 48 kHz stereo float WAV: the bulkiest kind, 384 kB a second."""
    buffer = io.BytesIO()
    samples = np.full((int(48_000 * seconds), 2), 0.1, dtype=np.float32)
    sf.write(buffer, samples, 48_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


class HeldStream:
    """A StreamEnrollmentAudio call that sends `data`, then waits to be let go or cancelled."""

    def __init__(self, server: RunningServer, data: bytes) -> None:
        self._release = threading.Event()
        self.call = server.enrollment.StreamEnrollmentAudio.future(self._chunks(data))

    def _chunks(self, data: bytes) -> Iterator[pb.EnrollmentAudioChunk]:
        yield pb.EnrollmentAudioChunk(agent_id="a1", encoding=pb.AUDIO_ENCODING_WAV, data=data)
        self._release.wait(30)

    def finish(self) -> pb.AddEnrollmentAudioResponse:
        self._release.set()
        response: pb.AddEnrollmentAudioResponse = self.call.result(30)
        return response

    def cancel(self) -> None:
        self.call.cancel()
        self._release.set()


def wait_until(condition: Callable[[], bool]) -> None:
    """Waits for something the server does on its own threads (not a timing assertion)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def test_a_stream_the_budget_cannot_hold_is_refused_at_once(server: RunningServer) -> None:
    budget = server.server.audio_budget
    data = wav_file(0.9)  # 346 kB; the budget holds 4 MiB
    held = [HeldStream(server, data) for _ in range(14)]
    try:
        wait_until(lambda: any(h.call.done() for h in held))
        assert budget.held_bytes <= BUDGET_MIB * 2**20
        refused = [h for h in held if h.call.done()]
        # While twelve hold their audio, the others are turned away.
        assert 1 <= len(refused) <= 2
        error = refused[0].call.exception()
        assert isinstance(error, grpc.Call)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "MiB across the uploads in progress" in (error.details() or "")
        status = rpc_status.from_call(error)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details)
        assert retry.retry_delay.seconds >= 1
    finally:
        for stream in held:
            stream.cancel()
    wait_until(lambda: budget.held_bytes == 0)
    # With the budget free again, the same upload is decoded and analysed.
    response = HeldStream(server, data).finish()
    assert response.utterance.quality.duration_seconds == pytest.approx(0.9)


def test_a_cancelled_stream_gives_its_audio_back(server: RunningServer) -> None:
    budget = server.server.audio_budget
    stream = HeldStream(server, wav_file(0.9))
    wait_until(lambda: budget.held_bytes > 0)
    stream.cancel()
    wait_until(lambda: budget.held_bytes == 0)
    with pytest.raises(grpc.FutureCancelledError):
        stream.call.result()
