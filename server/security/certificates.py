"""The development PKI.

`voxauth certs init` creates, in one folder, a local CA, a server certificate and one client
certificate per role; `voxauth certs client` adds a client, `voxauth certs server` renews the
server certificate. For development and tests only: the keys are written unencrypted (mode
0600) so that a server starts unattended. A production CA needs to put only two things in its
client certificates: the caller's name as the subject CN and its role as the SAN URI
`urn:voxauth:role:<role>` (server/security/identity.py reads them). The gRPC credentials
made from these files are in server/api/tls.py.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.errors import CertificateFilesError
from server.security.identity import Role, check_caller_name, role_uri

CA_NAME = "voxauth development CA"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
DEFAULT_FOLDER = Path("var/pki")
CA_VALIDITY = timedelta(days=3650)
# Leaves are renewed with `voxauth certs server|client --force`; the CA outlives them.
LEAF_VALIDITY = timedelta(days=365)
# Tolerates clocks a little behind the one that issued the certificate.
BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class DevelopmentPki:
    """Where the files of a development PKI live in its folder."""

    folder: Path

    @property
    def ca_certificate(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_certificate(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def client_certificate(self, name: str) -> Path:
        return self.folder / "clients" / f"{check_caller_name(name)}.crt"

    def client_key(self, name: str) -> Path:
        return self.folder / "clients" / f"{check_caller_name(name)}.key"


def create_pki(
    folder: Path, server_names: Sequence[str] = DEFAULT_SERVER_NAMES, *, force: bool = False
) -> DevelopmentPki:
    """A new CA, a server certificate for `server_names`, and a client named after each role.

    Nothing is written when any of these files exists, unless `force`.
    """
    pki = DevelopmentPki(folder)
    files = [pki.ca_certificate, pki.ca_key, pki.server_certificate, pki.server_key]
    for role in Role:
        files += [pki.client_certificate(role.value), pki.client_key(role.value)]
    if not force:
        _refuse_existing(files)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key)
    _write_pair(pki.ca_certificate, pki.ca_key, ca, ca_key, force=force)
    _issue_server(pki, ca, ca_key, server_names, force=force)
    for role in Role:
        _issue_client(pki, ca, ca_key, role.value, role, force=force)
    return pki


def issue_server_certificate(
    pki: DevelopmentPki, server_names: Sequence[str], *, force: bool = False
) -> None:
    ca, ca_key = _load_ca(pki)
    _issue_server(pki, ca, ca_key, server_names, force=force)


def issue_client_certificate(
    pki: DevelopmentPki, name: str, role: Role, *, force: bool = False
) -> None:
    ca, ca_key = _load_ca(pki)
    _issue_client(pki, ca, ca_key, name, role, force=force)


def read_pki_file(path: Path) -> bytes:
    """A certificate or key file, or CertificateFilesError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise CertificateFilesError(f"cannot read {path}: {error.strerror}") from None


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "voxauth (development only)"),
        ]
    )
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    alternative_names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + LEAF_VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _issue_server(
    pki: DevelopmentPki,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    server_names: Sequence[str],
    *,
    force: bool,
) -> None:
    if not server_names:
        raise CertificateFilesError("a server certificate needs at least one DNS name or IP")
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _leaf_certificate(
        ca,
        ca_key,
        key,
        server_names[0],
        [_server_name(name) for name in server_names],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    _write_pair(pki.server_certificate, pki.server_key, certificate, key, force=force)


def _server_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _issue_client(
    pki: DevelopmentPki,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    role: Role,
    *,
    force: bool,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _leaf_certificate(
        ca,
        ca_key,
        key,
        check_caller_name(name),
        [x509.UniformResourceIdentifier(role_uri(role))],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    _write_pair(pki.client_certificate(name), pki.client_key(name), certificate, key, force=force)


def _load_ca(pki: DevelopmentPki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not (pki.ca_certificate.exists() and pki.ca_key.exists()):
        raise CertificateFilesError(
            f"no development CA in {pki.folder}; run `voxauth certs init --dir {pki.folder}`"
        )
    certificate = x509.load_pem_x509_certificate(read_pki_file(pki.ca_certificate))
    key = serialization.load_pem_private_key(read_pki_file(pki.ca_key), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateFilesError(f"{pki.ca_key} is not an EC private key")
    return certificate, key


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise CertificateFilesError(
            f"refusing to overwrite {', '.join(existing)} (use --force to replace them)"
        )


def _write_pair(
    certificate_path: Path,
    key_path: Path,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    force: bool,
) -> None:
    if not force:
        _refuse_existing([certificate_path, key_path])
    # The folder holds the CA key: only its owner may look inside.
    certificate_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    _write_file(key_path, key_pem, 0o600, force=force)
    _write_file(certificate_path, certificate_pem, 0o644, force=force)


def _write_file(path: Path, content: bytes, mode: int, *, force: bool) -> None:
    if force:
        # Removed rather than truncated, so the new file gets `mode` and not the old one's.
        path.unlink(missing_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateFilesError(
            f"refusing to overwrite {path} (use --force to replace it)"
        ) from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
