"""A shift stream that sends nothing is closed after the configured time, and its shift can be
resumed as after a disconnect (issue 10, item 10). The real model verifies the login; the
clock is the test's."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
from voxauth.v1 import shifts_pb2 as spb

from server.config import StreamLimits
from tests.softphone import POLICY, ShiftStream
from tests.support import (
    SPEAKER_A,
    RunningServer,
    first_half,
    make_config,
    second_half,
    split,
    wav_audio,
)


def closed_when_idle(server: RunningServer, stream: ShiftStream, step: float) -> grpc.RpcError:
    """Moves the server's clock on by `step` until the stream fails (a few tries: the server
    may not be waiting for the stream's next message yet when the clock first moves)."""
    for _ in range(5):
        server.advance(step)
        try:
            return stream.error(timeout=1)
        except queue.Empty:
            continue
    raise AssertionError("the idle stream stayed open")


def test_an_idle_shift_stream_is_closed_and_the_shift_resumes(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # The default limit, 30 s.
    server = start_server(replace(make_config(tmp_path), shifts=POLICY, streams=StreamLimits()))
    server.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    started = server.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a",
            device_id="softphone-7",
            login_audio=wav_audio(second_half(SPEAKER_A)),
        )
    )
    shift_id = started.shift.shift_id
    stream = ShiftStream(server.shifts, shift_id)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    stream.send(second_half(SPEAKER_A)[:16_000])  # one second of audio, then nothing

    # Steps shorter than the checkpoint interval (100 s): no checkpoint falls meanwhile.
    closed = closed_when_idle(server, stream, 31)
    assert closed.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "closed this idle shift stream" in (closed.details() or "")
    stream.close()

    # As after a disconnect: the shift is still verified, and a new stream resumes it.
    assert server.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id)).state == (
        spb.SHIFT_STATE_VERIFIED
    )
    resumed = ShiftStream(server.shifts, shift_id)
    attached = resumed.next_event()
    assert attached.kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    assert attached.shift.state == spb.SHIFT_STATE_VERIFIED
    resumed.close()
