"""A softphone's side of a shift stream, driven from a test thread, and the shift policy the
shift tests share."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import grpc
import numpy as np
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb

from server.config import ShiftPolicy
from tests.support import Samples

# Checkpoints exactly every 100 s of test-clock time (no jitter), verifying 6 s of speech (10 s
# when a failure would lock: one test recording holds about 14 s), and only those: the change
# watch, which starts checkpoints in between, is tested on its own
# (tests/e2e/test_change_watch_e2e.py turns it on).
POLICY = replace(
    ShiftPolicy(),
    mean_checkpoint_interval_seconds=100.0,
    checkpoint_jitter_seconds=0.0,
    min_checkpoint_gap_seconds=10.0,
    checkpoint_net_speech_seconds=6.0,
    confirm_net_speech_seconds=10.0,
    speech_wait_seconds=30.0,
    speech_recheck_seconds=2.0,
    change_watch=False,
)
FRAME = 320  # 20 ms at 16 kHz


def pcm16_frames(samples: Samples, frames_per_message: int = 50) -> list[bytes]:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    pcm = pcm[: len(pcm) - len(pcm) % (2 * FRAME)]
    step = 2 * FRAME * frames_per_message
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


class ShiftStream:
    """A softphone's bidirectional stream, driven from the test thread."""

    def __init__(
        self,
        shifts: spb_grpc.ShiftServiceStub,
        shift_id: str,
        encoding: pb.AudioEncoding.ValueType = pb.AUDIO_ENCODING_PCM16LE,
        sample_rate_hz: int = 16000,
    ) -> None:
        """`send` streams PCM16LE at 16 kHz; other formats go by `send_raw`."""
        self._outbox: queue.Queue[spb.ShiftAudio | None] = queue.Queue()
        self._outbox.put(
            spb.ShiftAudio(
                header=spb.ShiftAudioHeader(
                    shift_id=shift_id, encoding=encoding, sample_rate_hz=sample_rate_hz
                )
            )
        )
        self.call = shifts.StreamShiftAudio(self._requests())
        self._events: queue.Queue[spb.ShiftEvent | grpc.RpcError | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[spb.ShiftAudio]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for event in self.call:
                self._events.put(event)
        except grpc.RpcError as error:
            self._events.put(error)
        else:
            self._events.put(None)  # The server ended the stream normally.

    def send(self, samples: Samples) -> None:
        for chunk in pcm16_frames(samples):
            self._outbox.put(spb.ShiftAudio(frames=chunk))

    def send_raw(self, message: spb.ShiftAudio) -> None:
        self._outbox.put(message)

    def next_event(self, timeout: float = 60.0) -> spb.ShiftEvent:
        item = self._events.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        assert item is not None, "the stream ended"
        return item

    def ended(self, timeout: float = 60.0) -> bool:
        return self._events.get(timeout=timeout) is None

    def error(self, timeout: float = 60.0) -> grpc.RpcError:
        item = self._events.get(timeout=timeout)
        while not isinstance(item, grpc.RpcError):
            item = self._events.get(timeout=timeout)
        return item

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()


def fail_until_locked(
    stream: ShiftStream, advance: Callable[[float], None], impostors: Sequence[Samples]
) -> spb.ShiftEvent:
    """Another speaker on the headset: one failed checkpoint per recording (the real model
    decides), until the shift locks (POLICY: two consecutive failures). The lock event."""
    for samples in impostors:
        stream.send(samples)
        advance(POLICY.mean_checkpoint_interval_seconds)
        failed = stream.next_event()
        assert failed.kind == spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED, failed
    locked = stream.next_event()
    assert locked.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED, locked
    return locked
