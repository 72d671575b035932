"""gRPC servicer of ShiftService: protobuf <-> the domain's ShiftService, nothing more."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc

from server.api.servicers import Readiness, audio_input, timestamp, verify_response
from server.errors import InvalidAudioError, StreamOrderError
from server.pipeline.analysis import AudioInput
from server.pipeline.decode import AudioEncoding
from server.shifts.buffer import StreamFormat
from server.shifts.service import LoginOutcome, ShiftEvent, ShiftEventKind, ShiftStream
from server.storage.interface import ShiftRecord, ShiftState

_STATES = {
    ShiftState.VERIFIED: spb.SHIFT_STATE_VERIFIED,
    ShiftState.UNVERIFIED: spb.SHIFT_STATE_UNVERIFIED,
    ShiftState.LOCKED: spb.SHIFT_STATE_LOCKED,
    ShiftState.ENDED: spb.SHIFT_STATE_ENDED,
}
_KINDS = {
    ShiftEventKind.STREAM_ATTACHED: spb.SHIFT_EVENT_KIND_STREAM_ATTACHED,
    ShiftEventKind.CHECKPOINT_PASSED: spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED,
    ShiftEventKind.CHECKPOINT_FAILED: spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED,
    ShiftEventKind.INSUFFICIENT_SPEECH: spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH,
    ShiftEventKind.SHIFT_LOCKED: spb.SHIFT_EVENT_KIND_SHIFT_LOCKED,
    ShiftEventKind.SHIFT_VERIFIED: spb.SHIFT_EVENT_KIND_SHIFT_VERIFIED,
    ShiftEventKind.SHIFT_ENDED: spb.SHIFT_EVENT_KIND_SHIFT_ENDED,
}


class ShiftServicer(spb_grpc.ShiftServiceServicer):
    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    async def StartShift(
        self, request: spb.StartShiftRequest, context: Any
    ) -> spb.LoginCheckResponse:
        shifts = self._readiness.require().shifts
        audio = _login_audio(request)
        return _login_response(await shifts.start(request.agent_id, request.device_id, audio))

    async def CheckLogin(
        self, request: spb.CheckLoginRequest, context: Any
    ) -> spb.LoginCheckResponse:
        shifts = self._readiness.require().shifts
        audio = _login_audio(request)
        return _login_response(await shifts.check_login(request.shift_id, audio))

    async def StreamShiftAudio(
        self, request_iterator: AsyncIterator[spb.ShiftAudio], context: Any
    ) -> AsyncIterator[spb.ShiftEvent]:
        shifts = self._readiness.require().shifts
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("message") != "header":
            raise StreamOrderError("the first message must be the header (shift id and format)")
        header = first.header
        try:
            encoding = AudioEncoding(header.encoding)
        except ValueError:
            raise InvalidAudioError(
                "header.encoding is not set or not supported", field="header.encoding"
            ) from None
        stream = await shifts.attach(
            header.shift_id, StreamFormat.declared(encoding, header.sample_rate_hz)
        )
        reader = asyncio.create_task(_read_frames(request_iterator, stream))
        try:
            while (event := await stream.next_event()) is not None:
                yield _event(event)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            stream.detach()

    async def SubscribeShiftEvents(
        self, request: spb.SubscribeShiftEventsRequest, context: Any
    ) -> AsyncIterator[spb.ShiftEvent]:
        subscription = self._readiness.require().shifts.subscribe(request.agent_id)
        try:
            while True:
                yield _event(await subscription.next_event())
        finally:
            subscription.close()

    async def EndShift(self, request: spb.EndShiftRequest, context: Any) -> spb.Shift:
        record = await self._readiness.require().shifts.end(request.shift_id)
        return shift_message(record)

    async def GetShift(self, request: spb.GetShiftRequest, context: Any) -> spb.Shift:
        record = await self._readiness.require().shifts.get(request.shift_id)
        return shift_message(record)


async def _read_frames(requests: AsyncIterator[spb.ShiftAudio], stream: ShiftStream) -> None:
    """Feeds the stream's audio to the shift; ends the event stream when the client stops
    sending (normally, or with the error its audio caused)."""
    try:
        async for message in requests:
            if message.WhichOneof("message") != "frames":
                raise StreamOrderError("only the first message may be a header")
            stream.push(message.frames)
    except Exception as error:
        stream.close(error)
    else:
        stream.close()


def _login_audio(request: spb.StartShiftRequest | spb.CheckLoginRequest) -> AudioInput:
    if not request.HasField("login_audio"):
        raise InvalidAudioError("login_audio is required", field="login_audio")
    return audio_input(request.login_audio)


def _login_response(outcome: LoginOutcome) -> spb.LoginCheckResponse:
    return spb.LoginCheckResponse(
        shift=shift_message(outcome.shift),
        verification=verify_response(outcome.verification),
        assurance=outcome.assurance.token if outcome.assurance else "",
    )


def shift_message(record: ShiftRecord) -> spb.Shift:
    message = spb.Shift(
        shift_id=record.shift_id,
        agent_id=record.agent_id,
        device_id=record.device_id,
        state=_STATES[record.state],
        started_at=timestamp(record.started_at),
        updated_at=timestamp(record.updated_at),
        consecutive_failures=record.consecutive_failures,
        checkpoints_passed=record.checkpoints_passed,
        checkpoints_failed=record.checkpoints_failed,
        checkpoints_insufficient_speech=record.checkpoints_insufficient,
    )
    if record.ended_at is not None:
        message.ended_at.CopyFrom(timestamp(record.ended_at))
    return message


def _event(event: ShiftEvent) -> spb.ShiftEvent:
    message = spb.ShiftEvent(
        kind=_KINDS[event.kind],
        shift_id=event.shift.shift_id,
        at=timestamp(event.at),
        score=event.score,
        threshold=event.threshold,
        net_speech_seconds=event.net_speech_seconds,
        shift=shift_message(event.shift),
    )
    for field, value in (
        ("scheduled_at", event.scheduled_at),
        ("audio_start", event.audio_start),
        ("audio_end", event.audio_end),
    ):
        if value is not None:
            getattr(message, field).CopyFrom(timestamp(value))
    return message
