"""Store work and model work on separate pools: a burst of Verify calls that fills the inference
queue leaves the store-only calls (CreateAgent, GetEnrollmentStatus, GetShift, EndShift,
DeleteAgent) answering at once. The real model over a real socket; only the timing of its
embedding is held back, so that the queue stays full while the test looks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from server.config import InferenceLimits
from tests.support import (
    KEY,
    SPEAKER_A,
    RunningServer,
    first_half,
    make_config,
    second_half,
    split,
    wav_audio,
)

T = TypeVar("T")

# One worker and two waiting: the third Verify of a burst already fills the queue.
LIMITS = InferenceLimits(workers=1, threads=1, max_queued=2)
BURST = 8
PROMPT_SECONDS = 2.0


class GatedEmbedder:
    """The real speaker model, whose embedding waits while the gate is shut."""

    def __init__(self, model: SpeakerEmbedder) -> None:
        self._model = model
        self.gate = threading.Event()
        self.gate.set()

    @property
    def model_id(self) -> str:
        return self._model.model_id

    @property
    def sample_rate(self) -> int:
        return self._model.sample_rate

    @property
    def dimension(self) -> int:
        return self._model.dimension

    @property
    def min_samples(self) -> int:
        return self._model.min_samples

    def embed(self, waveform: Waveform) -> Embedding:
        self.gate.wait(60)
        return self._model.embed(waveform)


@pytest.fixture
def gated(embedder: SpeakerEmbedder) -> GatedEmbedder:
    return GatedEmbedder(embedder)


@pytest.fixture
def busy_server(tmp_path: Path, gated: GatedEmbedder) -> Iterator[RunningServer]:
    config = replace(make_config(tmp_path), inference=LIMITS)
    server = RunningServer(config, lambda: gated, KEY)
    try:
        yield server
    finally:
        gated.gate.set()  # nothing may stay held when the server drains
        server.stop()


def timed(call: Callable[[], T]) -> tuple[T, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_store_calls_answer_while_a_verify_burst_fills_the_inference_queue(
    busy_server: RunningServer, gated: GatedEmbedder
) -> None:
    voxauth = busy_server
    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    login = voxauth.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a",
            device_id="softphone-1",
            login_audio=wav_audio(second_half(SPEAKER_A)),
        )
    )
    shift_id = login.shift.shift_id

    gated.gate.clear()
    request = pb.VerifyRequest(agent_id="agent-a", audio=wav_audio(second_half(SPEAKER_A)))
    burst = [voxauth.verification.Verify.future(request, timeout=60) for _ in range(BURST)]
    admitted = LIMITS.workers + LIMITS.max_queued
    # The calls beyond the queue are refused at once; the others wait on the held model.
    deadline = time.monotonic() + 30
    while sum(call.done() for call in burst) < BURST - admitted:
        assert time.monotonic() < deadline, "the burst was not refused beyond the queue"
        time.sleep(0.01)
    refused = [call for call in burst if call.done()]
    assert {call.code() for call in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}

    enrollment, shifts = voxauth.enrollment, voxauth.shifts
    store_calls: dict[str, Callable[[], object]] = {
        "CreateAgent": lambda: enrollment.CreateAgent(
            pb.CreateAgentRequest(
                agent_id="agent-b", display_name="Agent B", consent_reference="HR-2"
            ),
            timeout=10,
        ),
        "GetEnrollmentStatus": lambda: enrollment.GetEnrollmentStatus(
            pb.GetEnrollmentStatusRequest(agent_id="agent-b"), timeout=10
        ),
        "GetShift": lambda: shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id), timeout=10),
        "EndShift": lambda: shifts.EndShift(spb.EndShiftRequest(shift_id=shift_id), timeout=10),
        "DeleteAgent": lambda: enrollment.DeleteAgent(
            pb.DeleteAgentRequest(agent_id="agent-b"), timeout=10
        ),
    }
    took = {name: timed(call)[1] for name, call in store_calls.items()}
    # Still full: every admitted Verify is waiting on the model.
    assert not any(call.done() for call in burst if call not in refused)
    assert max(took.values()) < PROMPT_SECONDS, took

    gated.gate.set()
    for call in burst:
        if call not in refused:
            assert call.result().decision == pb.DECISION_ACCEPT
    ended = shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id), timeout=10)
    assert ended.state == spb.SHIFT_STATE_ENDED
