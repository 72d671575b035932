"""Client streams that send nothing are closed after a configurable time, on the server's
clock (issue 10, item 10). The shift stream's case, with resuming, is in
tests/e2e/test_idle_streams.py: it needs a verified shift, so the real model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.api.streams import idle_limited
from server.config import StreamLimits
from server.errors import InvalidAudioError, StreamIdleError
from tests.clock import ManualClock
from tests.support import api_server, make_config


async def settle() -> None:
    """Lets every task that can run do so, up to its next wait."""
    for _ in range(10):
        await asyncio.sleep(0)


class Client:
    """A client stream driven by the test: messages go when the test sends them, and between
    them the client is silent."""

    def __init__(self) -> None:
        self._outbox: asyncio.Queue[int | None] = asyncio.Queue()

    def send(self, message: int | None) -> None:
        """A message, or None to end the stream."""
        self._outbox.put_nowait(message)

    async def messages(self) -> AsyncIterator[int]:
        while (message := await self._outbox.get()) is not None:
            yield message


def test_a_stream_silent_for_the_limit_ends_with_the_idle_error() -> None:
    async def scenario() -> None:
        clock, client, received = ManualClock(), Client(), []

        async def serve() -> None:
            async for message in idle_limited(client.messages(), 60, clock, closing="idle"):
                received.append(message)

        serving = asyncio.create_task(serve())
        client.send(1)
        await settle()
        clock.advance(59)
        await settle()
        assert not serving.done()
        clock.advance(1)
        await settle()
        assert serving.done()
        with pytest.raises(StreamIdleError, match=r"^idle$"):
            serving.result()
        assert received == [1]

    asyncio.run(scenario())


def test_messages_and_the_servers_own_work_keep_a_stream_open() -> None:
    async def scenario() -> list[int]:
        clock, client, received = ManualClock(), Client(), []

        async def serve() -> None:
            async for message in idle_limited(client.messages(), 60, clock, closing="idle"):
                received.append(message)
                if message == 3:
                    # Working on a message for longer than the limit is not the client's idling.
                    await clock.sleep_until(clock.monotonic() + 100)

        serving = asyncio.create_task(serve())
        for message in range(1, 6):
            client.send(message)
            await settle()
            clock.advance(50)
            await settle()
        # Message 3 kept the server busy from 100 s to 200 s; the client has been silent for
        # 50 s since message 5.
        assert clock.monotonic() == 250
        assert not serving.done()
        client.send(None)
        await serving
        return received

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5]


def test_the_wait_may_move_between_tasks_and_the_watchdog_ends_with_the_call() -> None:
    async def scenario() -> None:
        clock, client = ManualClock(), Client()
        requests = idle_limited(client.messages(), 30, clock, closing="idle")
        client.send(1)
        assert await anext(requests) == 1  # the header, read by the handler itself

        async def read_the_rest() -> None:
            async for _ in requests:
                pass

        reader = asyncio.create_task(read_the_rest())
        await settle()
        clock.advance(30)
        await settle()
        with pytest.raises(StreamIdleError):
            reader.result()

        # The client going away (grpc cancels the call) is not turned into the idle error.
        other = Client()

        async def serve() -> None:
            async for _ in idle_limited(other.messages(), 30, clock, closing="idle"):
                pass

        serving = asyncio.create_task(serve())
        await settle()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving

        # A servicer that refuses a message stops reading, leaving the stream unclosed.
        refusing = Client()

        # Held here, as a traceback may hold it in a server: not closed by garbage collection.
        unclosed = idle_limited(refusing.messages(), 30, clock, closing="idle")

        async def refuse() -> None:
            async for _ in unclosed:
                raise InvalidAudioError("too long")

        refused = asyncio.create_task(refuse())
        refusing.send(1)
        await settle()
        with pytest.raises(InvalidAudioError):
            refused.result()
        await settle()
        # No watchdog outlives its stream or its call.
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(scenario())


def test_an_enrollment_upload_that_goes_quiet_is_deadline_exceeded(tmp_path: Path) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        silent = asyncio.Event()

        async def one_chunk_then_nothing() -> AsyncIterator[pb.EnrollmentAudioChunk]:
            yield pb.EnrollmentAudioChunk(
                agent_id="agent-a", encoding=pb.AUDIO_ENCODING_WAV, data=b"RIFF"
            )
            await silent.wait()

        async with (
            api_server(replace(make_config(tmp_path), streams=StreamLimits())) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            # The client's own deadline is far off: the server must be the one that gives up,
            # after its default 60 s.
            call = pb_grpc.EnrollmentServiceStub(channel).StreamEnrollmentAudio(
                one_chunk_then_nothing(), timeout=10
            )
            upload = asyncio.ensure_future(call)
            for _ in range(40):
                await asyncio.sleep(0.05)
                if upload.done():
                    break
                server.clock.advance(61)
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                await upload
            silent.set()
            return closed.value

    closed = asyncio.run(scenario())
    assert closed.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert closed.details() == (
        "no audio chunk for 60 s: the server closed this idle upload; send the recording again"
    )
