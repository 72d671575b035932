"""A client certificate from the voxauth CA whose CN carries a newline and a forged log line,
used against the real gRPC server, whose log goes through SafeFormatter (issue 10, item 6)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.api.tls import channel_credentials
from server.errors import UnauthenticatedError
from server.runtime.log_format import SafeFormatter
from server.security.certificates import DevelopmentPki, create_pki
from server.security.identity import Role, identity_from_certificate, role_uri
from tests.support import api_server, tls_config
from tests.unit.test_access import certificate_naming

FORGED_LINE = "INFO server.verification: verify agent=boss ACCEPT"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
GET_SHIFT = "/voxauth.v1.ShiftService/GetShift"
GET_CONFIGURATION = "/voxauth.v1.AdminService/GetConfiguration"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    """Everything logged during the test, as `voxauth serve` writes it."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield output
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def client_signed_by_the_ca(
    pki: DevelopmentPki, folder: Path, common_name: str, role: Role
) -> grpc.ChannelCredentials:
    """Credentials with a client certificate the development CA signed for `common_name`."""
    ca = x509.load_pem_x509_certificate(pki.ca_certificate.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(role_uri(role))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    certificate_file, key_file = folder / "client.crt", folder / "client.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return channel_credentials(
        pki.ca_certificate, certificate=certificate_file, private_key=key_file
    )


async def status_of(address: str, credentials: grpc.ChannelCredentials, method: str) -> Any:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        try:
            await channel.unary_unary(
                method, request_serializer=bytes, response_deserializer=bytes
            )(b"", timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def test_a_newline_in_the_certificate_name_cannot_forge_a_log_line(
    tmp_path: Path, pki: DevelopmentPki, server_log: io.StringIO
) -> None:
    forger = client_signed_by_the_ca(pki, tmp_path, f"m\n{FORGED_LINE}", Role.SOFTPHONE)

    async def scenario() -> tuple[Any, Any, list[str]]:
        async with api_server(tls_config(tmp_path, pki)) as server:
            allowed = await status_of(server.address, forger, GET_SHIFT)
            not_allowed = await status_of(server.address, forger, GET_CONFIGURATION)
            return allowed, not_allowed, [event.outcome for event in server.audited]

    allowed, not_allowed, audited = asyncio.run(scenario())
    refusal = (
        grpc.StatusCode.UNAUTHENTICATED,
        "the client certificate's CN contains U+000A (a control character) at position 1: "
        "control and formatting characters are refused, since they can disguise what an audit "
        "export or a SIEM feed shows",
    )
    assert allowed == refusal and not_allowed == refusal
    assert audited == ["UNAUTHENTICATED", "UNAUTHENTICATED"]
    lines = server_log.getvalue().splitlines()
    assert not [line for line in lines if line.startswith(FORGED_LINE)]
    refused = [line for line in lines if line.startswith("WARNING server.api.access: refused")]
    assert len(refused) == 2 and all("U+000A" in line for line in refused)


def test_names_with_spaces_and_any_script_are_callers(
    tmp_path: Path, pki: DevelopmentPki, server_log: io.StringIO
) -> None:
    caller = client_signed_by_the_ca(pki, tmp_path, "José Müller-Łukasz 李", Role.SOFTPHONE)

    async def scenario() -> Any:
        async with api_server(tls_config(tmp_path, pki)) as server:
            return await status_of(server.address, caller, GET_SHIFT)

    # Past access control; the domain of this edge-only server is never ready.
    assert asyncio.run(scenario())[0] is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "hidden",
    ["\n", "\r", "\x1b", "\x7f", "\x85", "\u202e", "\u2066", "\u200b", "\u2028", "\ue000"],
)
def test_a_certificate_name_with_a_hidden_character_is_unauthenticated(hidden: str) -> None:
    pem = certificate_naming(f"ivr{hidden}admin", ["urn:voxauth:role:softphone"])
    with pytest.raises(UnauthenticatedError, match=f"U\\+{ord(hidden):04X}") as refused:
        identity_from_certificate(pem)
    assert "ivr" not in refused.value.message
