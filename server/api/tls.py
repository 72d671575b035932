"""gRPC credentials made from certificate files: TLS for the server's ports, and for clients
(the CLI, benchmarks, tests) mutual TLS or a bearer token over TLS."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.errors import CertificateFilesError
from server.security.certificates import read_pki_file


def server_credentials(
    certificate: Path, private_key: Path, client_ca: Path, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """TLS for a server port. Without `require_client_auth` grpc does not even ask for client
    certificates, so callers on such a port can only identify with bearer tokens."""
    return grpc.ssl_server_credentials(
        [(read_pki_file(private_key), read_pki_file(certificate))],
        root_certificates=read_pki_file(client_ca),
        require_client_auth=require_client_auth,
    )


def channel_credentials(
    ca_certificate: Path,
    *,
    certificate: Path | None = None,
    private_key: Path | None = None,
    bearer_token: str | None = None,
) -> grpc.ChannelCredentials:
    """TLS for a client: the CA that signed the server, and either a client certificate and
    key (mutual TLS) or a bearer token, sent as `authorization: Bearer ...` on every call."""
    if (certificate is None) != (private_key is None):
        raise CertificateFilesError("a client certificate needs its key, and a key its certificate")
    tls = grpc.ssl_channel_credentials(
        root_certificates=read_pki_file(ca_certificate),
        private_key=None if private_key is None else read_pki_file(private_key),
        certificate_chain=None if certificate is None else read_pki_file(certificate),
    )
    if bearer_token is None:
        return tls
    return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(bearer_token))
