"""gRPC servicer of ShiftService: protobuf <-> the domain's ShiftService, nothing more (the
domain service runs its model work on the inference pool and its store work on the store's).
The shift service writes in several steps, so a request id's completion is recorded right
after the call (server/api/retries.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from grpc.aio import ServicerContext
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc

from server.api.convert import audio_input, login_response, shift_event_message, shift_message
from server.api.readiness import Readiness
from server.api.retries import RequestDigest, once
from server.api.shift_listing import list_shifts
from server.api.streams import idle_limited
from server.config import StreamLimits
from server.errors import InvalidAudioError, StreamOrderError
from server.pipeline.analysis import AudioInput
from server.pipeline.decode import AudioEncoding
from server.runtime.clock import Clock
from server.runtime.requests import Receipt
from server.shifts.buffer import StreamFormat
from server.shifts.service import ShiftStream


class ShiftServicer(spb_grpc.ShiftServiceServicer):
    def __init__(self, readiness: Readiness, streams: StreamLimits, clock: Clock) -> None:
        self._readiness = readiness
        self._streams = streams
        self._clock = clock

    async def StartShift(
        self,
        request: spb.StartShiftRequest,
        context: ServicerContext[spb.StartShiftRequest, spb.LoginCheckResponse],
    ) -> spb.LoginCheckResponse:
        services = self._readiness.require()
        audio = _login_audio(request)

        async def act(_: Receipt | None) -> tuple[spb.LoginCheckResponse, str]:
            response = login_response(
                await services.shifts.start(request.agent_id, request.device_id, audio)
            )
            return response, response.shift.agent_id

        return await once(
            services.requests,
            "StartShift",
            request.request_id,
            RequestDigest.of(request),
            spb.LoginCheckResponse,
            act,
        )

    async def CheckLogin(
        self,
        request: spb.CheckLoginRequest,
        context: ServicerContext[spb.CheckLoginRequest, spb.LoginCheckResponse],
    ) -> spb.LoginCheckResponse:
        services = self._readiness.require()
        audio = _login_audio(request)

        async def act(_: Receipt | None) -> tuple[spb.LoginCheckResponse, str]:
            response = login_response(await services.shifts.check_login(request.shift_id, audio))
            return response, response.shift.agent_id

        return await once(
            services.requests,
            "CheckLogin",
            request.request_id,
            RequestDigest.of(request),
            spb.LoginCheckResponse,
            act,
        )

    async def StreamShiftAudio(
        self,
        request_iterator: AsyncIterator[spb.ShiftAudio],
        context: ServicerContext[spb.ShiftAudio, spb.ShiftEvent],
    ) -> AsyncIterator[spb.ShiftEvent]:
        shifts = self._readiness.require().shifts
        idle = self._streams.shift_idle_seconds
        # Idle, the stream detaches as a disconnected one does: the shift can be resumed.
        requests = idle_limited(
            request_iterator,
            idle,
            self._clock,
            closing=f"no audio for {idle:g} s: the server closed this idle shift stream; "
            "open a new one to resume the shift",
        )
        first = await anext(requests, None)
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
        reader = asyncio.create_task(_read_frames(requests, stream))
        try:
            while (event := await stream.next_event()) is not None:
                yield shift_event_message(event)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            stream.detach()

    async def SubscribeShiftEvents(
        self,
        request: spb.SubscribeShiftEventsRequest,
        context: ServicerContext[spb.SubscribeShiftEventsRequest, spb.ShiftEvent],
    ) -> AsyncIterator[spb.ShiftEvent]:
        after = request.after_event_id if request.HasField("after_event_id") else None
        subscription = self._readiness.require().shifts.subscribe(request.agent_id, after)
        try:
            while True:
                yield shift_event_message(await subscription.next_event())
        finally:
            subscription.close()

    async def EndShift(
        self, request: spb.EndShiftRequest, context: ServicerContext[spb.EndShiftRequest, spb.Shift]
    ) -> spb.Shift:
        services = self._readiness.require()

        async def act(_: Receipt | None) -> tuple[spb.Shift, str]:
            record = await services.shifts.end(request.shift_id)
            return shift_message(record), record.agent_id

        return await once(
            services.requests,
            "EndShift",
            request.request_id,
            RequestDigest.of(request),
            spb.Shift,
            act,
        )

    async def GetShift(
        self, request: spb.GetShiftRequest, context: ServicerContext[spb.GetShiftRequest, spb.Shift]
    ) -> spb.Shift:
        record = await self._readiness.require().shifts.get(request.shift_id)
        return shift_message(record)

    async def ListShifts(
        self,
        request: spb.ListShiftsRequest,
        context: ServicerContext[spb.ListShiftsRequest, spb.ListShiftsResponse],
    ) -> spb.ListShiftsResponse:
        return await list_shifts(self._readiness.require().shifts, request)


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
