"""The change watch end to end: the real model on real speech over a real gRPC socket. With the
random checkpoint 1,000 s away, someone else taking over the agent's line starts a checkpoint
at once and the follow-up locks the shift, and the MFA provider's subscription sees the same
triggered events; the agent's own voice triggers nothing."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from voxauth.v1 import shifts_pb2 as spb

from tests.softphone import POLICY, ShiftStream
from tests.support import (
    OTHER_1,
    OTHER_2,
    SPEAKER_A,
    RunningServer,
    first_half,
    make_config,
    second_half,
    speech,
    split,
    wav_audio,
)

WATCH_POLICY = replace(
    POLICY,
    mean_checkpoint_interval_seconds=1000.0,
    change_watch=True,
    change_watch_interval_seconds=10.0,
)
_CHECKPOINTS = (spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED, spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED)


@pytest.fixture
def watch_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    server = start_server(replace(make_config(tmp_path), shifts=WATCH_POLICY))
    server.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    return server


def start_shift(server: RunningServer) -> tuple[str, ShiftStream]:
    started = server.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a",
            device_id="softphone-7",
            login_audio=wav_audio(second_half(SPEAKER_A)),
        )
    )
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED
    stream = ShiftStream(server.shifts, started.shift.shift_id)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
    return started.shift.shift_id, stream


def test_a_takeover_starts_a_checkpoint_at_once_and_the_follow_up_locks(
    watch_server: RunningServer,
) -> None:
    subscription = watch_server.shifts.SubscribeShiftEvents(
        spb.SubscribeShiftEventsRequest(agent_id="agent-a")
    )
    seen: queue.Queue[spb.ShiftEvent] = queue.Queue()

    def listen() -> None:
        try:
            for event in subscription:
                seen.put(event)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.CANCELLED

    threading.Thread(target=listen, daemon=True).start()
    shift_id, stream = start_shift(watch_server)
    stream.send(speech(SPEAKER_A))
    # Someone else takes over the headset; no time passes on the server's clock, so every
    # checkpoint until the lock was started by the watch or by a failure.
    impostors = [OTHER_1, OTHER_2, OTHER_1]
    stream.send(speech(impostors.pop(0)))
    checkpoints: list[spb.ShiftEvent] = []
    while True:
        event = stream.next_event(timeout=120)
        if event.kind in _CHECKPOINTS:
            checkpoints.append(event)
            if event.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED and impostors:
                stream.send(speech(impostors.pop(0)))  # fresh speech for the follow-up
        if event.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED:
            break
    failures = [e for e in checkpoints if e.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED]
    assert len(failures) == 2
    assert failures[0].trigger == spb.CHECKPOINT_TRIGGER_CHANGE_WATCH
    assert 0 < failures[0].change_similarity < WATCH_POLICY.change_watch_threshold
    assert failures[1].trigger in (
        spb.CHECKPOINT_TRIGGER_FOLLOW_UP,
        spb.CHECKPOINT_TRIGGER_CHANGE_WATCH,
    )
    assert all(e.trigger != spb.CHECKPOINT_TRIGGER_SCHEDULED for e in checkpoints)
    state = watch_server.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.state == spb.SHIFT_STATE_LOCKED

    # The MFA provider saw the same triggered checkpoints and the lock.
    mfa: list[spb.ShiftEvent] = []
    while not mfa or mfa[-1].kind != spb.SHIFT_EVENT_KIND_SHIFT_LOCKED:
        mfa.append(seen.get(timeout=30))
    assert [(e.kind, e.trigger) for e in mfa if e.kind in _CHECKPOINTS] == [
        (e.kind, e.trigger) for e in checkpoints
    ]
    subscription.cancel()
    stream.close()


def test_the_agent_streaming_triggers_no_checkpoint_and_no_lock(
    watch_server: RunningServer,
) -> None:
    shift_id, stream = start_shift(watch_server)
    for _ in range(3):
        stream.send(speech(SPEAKER_A))
    # The random checkpoint comes: the first checkpoint of the shift, and it passes.
    watch_server.advance(1000)
    event = stream.next_event(timeout=120)
    assert event.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED
    assert event.trigger == spb.CHECKPOINT_TRIGGER_SCHEDULED
    state = watch_server.shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id))
    assert state.state == spb.SHIFT_STATE_VERIFIED
    assert (state.checkpoints_passed, state.checkpoints_failed) == (1, 0)
    stream.close()
