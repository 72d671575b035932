"""Raw bytes that are not the request message, sent on the wire to the real gRPC server (its
servicers, interceptors and TLS ports; no model loaded): INVALID_ARGUMENT without internals,
after the access check, counted, and logged once per burst (issue 10, item 5)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from server.security.certificates import DevelopmentPki, create_pki
from server.security.identity import Role
from tests.support import ApiServer, api_server, as_role, tls_config

CREATE_AGENT = "/voxauth.v1.EnrollmentService/CreateAgent"
STREAM_ENROLLMENT_AUDIO = "/voxauth.v1.EnrollmentService/StreamEnrollmentAudio"
SUBSCRIBE = "/voxauth.v1.ShiftService/SubscribeShiftEvents"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
# A field tag with wire type 7, which does not exist: no message parses from this.
MALFORMED = b"\xff\xff\xff"
Code = grpc.StatusCode


def as_bytes(message: bytes) -> bytes:
    return message


RAW = {"request_serializer": as_bytes, "response_deserializer": as_bytes}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


def running(
    tmp_path: Path, pki: DevelopmentPki
) -> contextlib.AbstractAsyncContextManager[ApiServer]:
    """Mutual TLS on one port, TLS for bearer tokens on another; the domain is never ready, so
    a well-formed call gets UNAVAILABLE."""
    base = tls_config(tmp_path, pki)
    return api_server(
        replace(base, transport=replace(base.transport, token_listen_address="127.0.0.1:0"))
    )


async def unary(
    address: str, credentials: grpc.ChannelCredentials, method: str
) -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await channel.unary_unary(method, **RAW)(MALFORMED, timeout=10)
    return failure.value


async def events(
    address: str, credentials: grpc.ChannelCredentials, method: str
) -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            [reply async for reply in channel.unary_stream(method, **RAW)(MALFORMED, timeout=10)]
    return failure.value


async def streamed(
    address: str, credentials: grpc.ChannelCredentials, method: str, messages: list[bytes]
) -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            if method == REFLECTION:
                call = channel.stream_stream(method, **RAW)(iter(messages), timeout=10)
                [reply async for reply in call]
            else:
                await channel.stream_unary(method, **RAW)(iter(messages), timeout=10)
    return failure.value


def outcome(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    return error.code(), error.details() or ""


def test_malformed_bytes_are_invalid_argument_after_the_access_check(
    tmp_path: Path, pki: DevelopmentPki, caplog: pytest.LogCaptureFixture
) -> None:
    anonymous = grpc.ssl_channel_credentials(pki.ca_certificate.read_bytes())
    hr, mfa = as_role(pki, Role.HR), as_role(pki, Role.MFA)

    async def scenario() -> tuple[dict[str, tuple[grpc.StatusCode, str]], int, list[str]]:
        async with running(tmp_path, pki) as server:
            outcomes = {
                # Authentication and authorisation come first, malformed or not.
                "no credential": outcome(
                    await unary(server.token_address, anonymous, CREATE_AGENT)
                ),
                "wrong role": outcome(await unary(server.address, mfa, CREATE_AGENT)),
                "allowed caller": outcome(await unary(server.address, hr, CREATE_AGENT)),
                "stream, second message": outcome(
                    await streamed(server.address, hr, STREAM_ENROLLMENT_AUDIO, [b"", MALFORMED])
                ),
                "server stream": outcome(await events(server.address, mfa, SUBSCRIBE)),
                # Public methods take no identity.
                "health check": outcome(await unary(server.token_address, anonymous, HEALTH_CHECK)),
                "reflection stream": outcome(
                    await streamed(server.token_address, anonymous, REFLECTION, [MALFORMED])
                ),
            }
            return (
                outcomes,
                server.api.malformed_requests.count,
                [event.outcome for event in server.audited],
            )

    with caplog.at_level(logging.INFO):
        outcomes, count, audited = asyncio.run(scenario())
    assert outcomes == {
        "no credential": (Code.UNAUTHENTICATED, "no client certificate and no bearer token"),
        "wrong role": (
            Code.PERMISSION_DENIED,
            f"mfa (mfa) may not call {CREATE_AGENT}",
        ),
        "allowed caller": (
            Code.INVALID_ARGUMENT,
            "the request is not a valid voxauth.v1.CreateAgentRequest message",
        ),
        "stream, second message": (
            Code.INVALID_ARGUMENT,
            "the request is not a valid voxauth.v1.EnrollmentAudioChunk message",
        ),
        "server stream": (
            Code.INVALID_ARGUMENT,
            "the request is not a valid voxauth.v1.SubscribeShiftEventsRequest message",
        ),
        "health check": (
            Code.INVALID_ARGUMENT,
            "the request is not a valid grpc.health.v1.HealthCheckRequest message",
        ),
        "reflection stream": (
            Code.INVALID_ARGUMENT,
            "the request is not a valid grpc.reflection.v1alpha.ServerReflectionRequest message",
        ),
    }
    assert count == 5
    assert audited == ["UNAUTHENTICATED", "PERMISSION_DENIED"]
    assert "DecodeError" not in caplog.text
    assert all(record.levelno < logging.ERROR and not record.exc_info for record in caplog.records)


def test_a_burst_is_counted_and_logged_once(
    tmp_path: Path, pki: DevelopmentPki, caplog: pytest.LogCaptureFixture
) -> None:
    hr = as_role(pki, Role.HR)

    def malformed_logs() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if record.name == "server.api.malformed_requests"
        ]

    async def scenario() -> tuple[list[tuple[grpc.StatusCode, str]], int, list[str], list[str]]:
        async with running(tmp_path, pki) as server:
            async with grpc.aio.secure_channel(server.address, hr) as channel:
                create_agent = channel.unary_unary(CREATE_AGENT, **RAW)
                outcomes = []
                for _ in range(50):
                    with pytest.raises(grpc.aio.AioRpcError) as failure:
                        await create_agent(MALFORMED, timeout=10)
                    outcomes.append(outcome(failure.value))
            during_the_burst = malformed_logs()
            # The window closes: the others are summed up in one line.
            server.clock.advance(61)
            for _ in range(5):
                await asyncio.sleep(0)
            return outcomes, server.api.malformed_requests.count, during_the_burst, malformed_logs()

    with caplog.at_level(logging.INFO):
        outcomes, count, during, after = asyncio.run(scenario())
    assert set(outcomes) == {
        (Code.INVALID_ARGUMENT, "the request is not a valid voxauth.v1.CreateAgentRequest message")
    }
    assert count == 50
    assert len(during) == 1
    assert "not a valid voxauth.v1.CreateAgentRequest message" in during[0]
    assert after[1:] == [
        "refused 49 more malformed requests since the one logged before (50 since the start)"
    ]
    assert all(record.levelno < logging.ERROR and not record.exc_info for record in caplog.records)


def test_well_formed_requests_pass_through(tmp_path: Path, pki: DevelopmentPki) -> None:
    hr = as_role(pki, Role.HR)

    async def scenario() -> grpc.StatusCode:
        async with (
            running(tmp_path, pki) as server,
            grpc.aio.secure_channel(server.address, hr) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                # An empty message is a valid one; the servicer then finds the server not ready.
                await channel.unary_unary(CREATE_AGENT, **RAW)(b"", timeout=10)
            return failure.value.code()

    assert asyncio.run(scenario()) is Code.UNAVAILABLE
