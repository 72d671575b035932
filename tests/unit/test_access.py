"""Access control against a real grpc.aio server over TLS on port 0: every RPC of the API (and
the ones issue 4 will add) is served by a stub that answers with the caller's name, behind the
access interceptor and the error-mapping interceptor in the order the server uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from voxauth.v1 import admin_pb2, assurances_pb2
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from server.api.access import (
    ALLOWED_ROLES,
    ASSURANCE_JWKS,
    PUBLIC_METHODS,
    AccessInterceptor,
    CredentialResolver,
    DevelopmentResolver,
    IdentityResolver,
)
from server.api.interceptors import ErrorMappingInterceptor
from server.api.tls import channel_credentials, server_credentials
from server.errors import ConfigurationError, StorageError, UnauthenticatedError
from server.security.certificates import DevelopmentPki, create_pki
from server.security.identity import (
    CredentialSource,
    Identity,
    Role,
    TokenRegistry,
    caller_identity,
    identity_from_certificate,
    mint_token,
)
from server.storage.interface import AuditEvent
from server.tools.token_cli import main

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

UNLISTED = "/voxauth.v1.ShiftService/NotInThePolicy"
GET_SHIFT = "/voxauth.v1.ShiftService/GetShift"
VERIFY = "/voxauth.v1.VerificationService/Verify"
CREATE_AGENT = "/voxauth.v1.EnrollmentService/CreateAgent"


def api_methods() -> dict[str, tuple[bool, bool]]:
    """Every RPC in the proto files: (client streaming, server streaming)."""
    return {
        f"/{service.full_name}/{method.name}": (method.client_streaming, method.server_streaming)
        for file in (pb.DESCRIPTOR, spb.DESCRIPTOR, assurances_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for method in service.methods
    }


# Every RPC of the API, and one that the policy does not list.
METHODS = {**api_methods(), UNLISTED: (False, False)}


def caller_name() -> bytes:
    try:
        return caller_identity().name.encode()
    except UnauthenticatedError:
        return b"anonymous"


def as_bytes(message: bytes) -> bytes:
    return message


def stub_handler(
    client_streaming: bool, server_streaming: bool
) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def unary_unary(request: bytes, context: Any) -> bytes:
        return caller_name()

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        async for _ in requests:
            pass
        return caller_name()

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield caller_name()

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield caller_name()

    if client_streaming and server_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_stream)
    if client_streaming:
        return grpc.stream_unary_rpc_method_handler(stream_unary)
    if server_streaming:
        return grpc.unary_stream_rpc_method_handler(unary_stream)
    return grpc.unary_unary_rpc_method_handler(unary_unary)


@contextlib.asynccontextmanager
async def serving(
    resolver: IdentityResolver,
    audited: list[AuditEvent],
    credentials: grpc.ServerCredentials | None,
) -> AsyncIterator[str]:
    """A server on 127.0.0.1:0, TLS unless `credentials` is None; yields its address."""

    async def audit(event: AuditEvent) -> None:
        audited.append(event)

    server = grpc.aio.server(
        interceptors=[AccessInterceptor(resolver, audit), ErrorMappingInterceptor()]
    )
    by_service: dict[str, dict[str, grpc.RpcMethodHandler[bytes, bytes]]] = defaultdict(dict)
    for method, kind in METHODS.items():
        service, name = method.strip("/").split("/")
        by_service[service][name] = stub_handler(*kind)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items()]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"localhost:{port}"
    finally:
        await server.stop(0)


async def call(
    channel: grpc.aio.Channel, method: str, metadata: Sequence[tuple[str, str]] = ()
) -> tuple[grpc.StatusCode, bytes]:
    """Calls `method` the way its kind requires; the status and what the stub answered."""
    client_streaming, server_streaming = METHODS[method]
    options: dict[str, Any] = {"timeout": 5, "metadata": tuple(metadata)}
    # The stub handlers take and give raw bytes.
    raw = {"request_serializer": as_bytes, "response_deserializer": as_bytes}
    try:
        if client_streaming and server_streaming:
            stream_stream = channel.stream_stream(method, **raw)
            replies = [r async for r in stream_stream(iter([b""]), **options)]
            return OK, b"".join(replies)
        if client_streaming:
            return OK, await channel.stream_unary(method, **raw)(iter([b"", b""]), **options)
        if server_streaming:
            replies = [r async for r in channel.unary_stream(method, **raw)(b"", **options)]
            return OK, b"".join(replies)
        return OK, await channel.unary_unary(method, **raw)(b"", **options)
    except grpc.aio.AioRpcError as error:
        return error.code(), b""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


def mutual_tls(pki: DevelopmentPki, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
    return server_credentials(
        pki.server_certificate,
        pki.server_key,
        pki.ca_certificate,
        require_client_auth=require_client_auth,
    )


def client_of(pki: DevelopmentPki, name: str) -> grpc.ChannelCredentials:
    return channel_credentials(
        pki.ca_certificate,
        certificate=pki.client_certificate(name),
        private_key=pki.client_key(name),
    )


def test_each_role_reaches_exactly_the_rpcs_the_policy_gives_it(pki: DevelopmentPki) -> None:
    audited: list[AuditEvent] = []

    async def probe(address: str, role: Role) -> dict[str, tuple[grpc.StatusCode, bytes]]:
        async with grpc.aio.secure_channel(address, client_of(pki, role.value)) as channel:
            return {method: await call(channel, method) for method in METHODS}

    async def scenario() -> list[dict[str, tuple[grpc.StatusCode, bytes]]]:
        async with serving(CredentialResolver(), audited, mutual_tls(pki)) as address:
            # All roles at once: each servicer must see its own caller.
            return await asyncio.gather(*(probe(address, role) for role in Role))

    refused = 0
    for role, outcomes in zip(Role, asyncio.run(scenario()), strict=True):
        for method, outcome in outcomes.items():
            if method == ASSURANCE_JWKS:
                expected = (OK, b"anonymous")
            elif role in ALLOWED_ROLES.get(method, ()):
                expected = (OK, role.value.encode())
            else:
                expected = (PERMISSION_DENIED, b"")
                refused += 1
            assert outcome == expected, (role, method)
    assert [event.outcome for event in audited] == ["PERMISSION_DENIED"] * refused


def test_refused_calls_are_audited_with_method_caller_and_outcome(pki: DevelopmentPki) -> None:
    audited: list[AuditEvent] = []

    async def scenario() -> tuple[grpc.StatusCode, bytes]:
        async with (
            serving(CredentialResolver(), audited, mutual_tls(pki)) as address,
            grpc.aio.secure_channel(address, client_of(pki, "hr")) as channel,
        ):
            return await call(channel, VERIFY)

    assert asyncio.run(scenario()) == (PERMISSION_DENIED, b"")
    [event] = audited
    assert (event.action, event.agent_id, event.outcome) == (
        "access.denied",
        "",
        "PERMISSION_DENIED",
    )
    assert event.details["method"] == VERIFY
    assert event.details["caller"] == "hr"
    assert event.details["roles"] == ["hr"]
    assert event.details["credential"] == "certificate"
    assert event.details["peer"].startswith("ipv4:127.0.0.1:")


def test_a_refusal_stands_when_the_audit_cannot_record_it(pki: DevelopmentPki) -> None:
    class BrokenAudit(list[AuditEvent]):
        def append(self, event: AuditEvent) -> None:
            raise StorageError("the audit log is read-only")

    async def scenario() -> tuple[grpc.StatusCode, bytes]:
        async with (
            serving(CredentialResolver(), BrokenAudit(), mutual_tls(pki)) as address,
            grpc.aio.secure_channel(address, client_of(pki, "mfa")) as channel,
        ):
            return await call(channel, CREATE_AGENT)

    assert asyncio.run(scenario()) == (PERMISSION_DENIED, b"")


def test_a_client_without_a_certificate_is_refused_at_the_handshake(pki: DevelopmentPki) -> None:
    audited: list[AuditEvent] = []

    async def scenario() -> tuple[grpc.StatusCode, bytes]:
        async with serving(CredentialResolver(), audited, mutual_tls(pki)) as address:
            anonymous = channel_credentials(pki.ca_certificate)
            async with grpc.aio.secure_channel(address, anonymous) as channel:
                return await call(channel, GET_SHIFT)

    assert asyncio.run(scenario()) == (grpc.StatusCode.UNAVAILABLE, b"")
    assert audited == []  # no call ever reached the server


def test_the_server_certificate_cannot_stand_in_for_a_client(pki: DevelopmentPki) -> None:
    audited: list[AuditEvent] = []
    # Same CA, but issued for server authentication only, and naming no role.
    server_as_client = channel_credentials(
        pki.ca_certificate, certificate=pki.server_certificate, private_key=pki.server_key
    )

    async def scenario() -> tuple[grpc.StatusCode, bytes]:
        async with (
            serving(CredentialResolver(), audited, mutual_tls(pki)) as address,
            grpc.aio.secure_channel(address, server_as_client) as channel,
        ):
            return await call(channel, GET_SHIFT)

    assert asyncio.run(scenario()) == (grpc.StatusCode.UNAVAILABLE, b"")
    assert audited == []


def certificate_naming(common_name: str, uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
    )
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_a_client_certificate_must_carry_exactly_one_known_role() -> None:
    identity = identity_from_certificate(
        certificate_naming("ivr", ["https://ivr.example", "urn:voxauth:role:softphone"])
    )
    assert identity == Identity("ivr", frozenset({Role.SOFTPHONE}), CredentialSource.CERTIFICATE)
    for uris in (
        [],
        ["urn:voxauth:role:softphone", "urn:voxauth:role:admin"],
        ["urn:voxauth:role:root"],
    ):
        with pytest.raises(UnauthenticatedError):
            identity_from_certificate(certificate_naming("ivr", uris))


def test_without_client_certificates_callers_identify_with_bearer_tokens(
    pki: DevelopmentPki, tmp_path: Path
) -> None:
    minted = mint_token("crm-bridge", Role.MFA)
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# callers without mutual TLS\n{minted.line}\n")
    tokens = TokenRegistry.load(token_file)
    audited: list[AuditEvent] = []

    async def as_caller(address: str, credentials: grpc.ChannelCredentials, method: str) -> Any:
        async with grpc.aio.secure_channel(address, credentials) as channel:
            return await call(channel, method)

    async def scenario() -> dict[str, Any]:
        tls = mutual_tls(pki, require_client_auth=False)
        async with serving(CredentialResolver(tokens), audited, tls) as address:
            anonymous = channel_credentials(pki.ca_certificate)
            with_token = channel_credentials(pki.ca_certificate, bearer_token=minted.token)
            wrong_token = channel_credentials(pki.ca_certificate, bearer_token="vxa_guess")
            async with grpc.aio.secure_channel(address, anonymous) as channel:
                health_check = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            return {
                "nothing": await as_caller(address, anonymous, GET_SHIFT),
                "token, allowed": await as_caller(address, with_token, GET_SHIFT),
                "token, not allowed": await as_caller(address, with_token, VERIFY),
                "wrong token": await as_caller(address, wrong_token, GET_SHIFT),
                # Without required client auth grpc does not ask for certificates at all.
                "certificate": await as_caller(address, client_of(pki, "admin"), GET_SHIFT),
                "public keys": await as_caller(address, anonymous, ASSURANCE_JWKS),
                "health": health_check.status,
            }

    assert asyncio.run(scenario()) == {
        "nothing": (UNAUTHENTICATED, b""),
        "token, allowed": (OK, b"crm-bridge"),
        "token, not allowed": (PERMISSION_DENIED, b""),
        "wrong token": (UNAUTHENTICATED, b""),
        "certificate": (UNAUTHENTICATED, b""),
        "public keys": (OK, b"anonymous"),
        "health": health_pb2.HealthCheckResponse.SERVING,
    }
    assert [event.outcome for event in audited] == [
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
    ]
    assert audited[1].details["credential"] == "token"
    assert all(minted.token not in str(event) for event in audited)


def test_bearer_tokens_are_refused_over_plaintext(tmp_path: Path) -> None:
    minted = mint_token("crm-bridge", Role.MFA)
    token_file = tmp_path / "tokens"
    token_file.write_text(minted.line + "\n")
    audited: list[AuditEvent] = []

    async def scenario() -> tuple[grpc.StatusCode, bytes]:
        resolver = CredentialResolver(TokenRegistry.load(token_file))
        async with (
            serving(resolver, audited, None) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            return await call(channel, GET_SHIFT, [("authorization", f"Bearer {minted.token}")])

    assert asyncio.run(scenario()) == (UNAUTHENTICATED, b"")
    assert audited[0].details["reason"] == "bearer tokens are accepted only over TLS"


def test_insecure_development_mode_says_so_and_grants_every_listed_rpc(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audited: list[AuditEvent] = []
    with caplog.at_level(logging.WARNING, logger="server.api.access"):
        resolver = DevelopmentResolver("dev-laptop")
    assert "INSECURE DEVELOPMENT MODE" in caplog.text

    async def scenario() -> dict[str, tuple[grpc.StatusCode, bytes]]:
        async with (
            serving(resolver, audited, None) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            return {method: await call(channel, method) for method in METHODS}

    outcomes = asyncio.run(scenario())
    assert outcomes.pop(UNLISTED) == (PERMISSION_DENIED, b"")
    assert outcomes.pop(ASSURANCE_JWKS) == (OK, b"anonymous")
    assert set(outcomes.values()) == {(OK, b"dev-laptop")}


def test_every_rpc_of_the_api_is_in_the_policy() -> None:
    assert set(api_methods()) <= set(ALLOWED_ROLES) | PUBLIC_METHODS


def test_the_token_file_holds_hashes_and_says_where_it_is_wrong(tmp_path: Path) -> None:
    minted = mint_token("crm-bridge", Role.MFA)
    token_file = tmp_path / "tokens"
    token_file.write_text(minted.line + "\n")
    assert minted.token not in token_file.read_text()
    now = datetime.now(UTC)
    assert TokenRegistry.load(token_file).identify(minted.token, now).name == "crm-bridge"
    with pytest.raises(UnauthenticatedError, match="unknown bearer token"):
        TokenRegistry.load(token_file).identify(minted.token + "x", now)

    token_file.write_text(f"\n{minted.line}\nsha256:{'0' * 64} root crm\n")
    with pytest.raises(ConfigurationError, match=r"tokens:3: 'root' is not a valid Role"):
        TokenRegistry.load(token_file)
    token_file.write_text(f"{minted.line}\n{minted.line}\n")
    with pytest.raises(ConfigurationError, match="listed twice"):
        TokenRegistry.load(token_file)


def test_token_command_prints_a_token_once_and_the_line_that_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--name", "crm-bridge", "--role", "mfa"]) == 0
    token_line, file_line = capsys.readouterr().out.splitlines()
    token = token_line.rsplit(" ", 1)[1]
    token_file = tmp_path / "tokens"
    token_file.write_text(file_line.removeprefix("line to add to the token file: ") + "\n")
    identity = TokenRegistry.load(token_file).identify(token, datetime.now(UTC))
    assert identity.roles == {Role.MFA}


def test_there_is_no_caller_outside_a_call() -> None:
    with pytest.raises(UnauthenticatedError):
        caller_identity()


def test_a_supervisor_sees_and_unlocks_shifts_and_reaches_nothing_else() -> None:
    # Supervisors are the people closest to the agents, not the biometric system's operators:
    # no enrollment, no voiceprints, no verification, no configuration or audit export.
    reach = {method for method, roles in ALLOWED_ROLES.items() if Role.SUPERVISOR in roles}
    assert reach == {
        "/voxauth.v1.ShiftService/GetShift",
        "/voxauth.v1.ShiftService/ListShifts",
        "/voxauth.v1.ShiftService/SubscribeShiftEvents",
        "/voxauth.v1.AdminService/UnlockShift",
    }
    assert Role.SUPERVISOR not in ALLOWED_ROLES["/voxauth.v1.AdminService/EnableVerification"]
