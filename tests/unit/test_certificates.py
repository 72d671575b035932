"""The development PKI: what `voxauth certs` writes, and that the certificates hold up under
RFC 5280 path validation (cryptography's verifier), not just under grpc."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from server.errors import CertificateFilesError
from server.security.certificates import CA_NAME, DevelopmentPki, create_pki
from server.security.identity import CredentialSource, Identity, Role, identity_from_certificate
from server.tools.certs_cli import main


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verifier_policy(pki: DevelopmentPki) -> PolicyBuilder:
    return PolicyBuilder().store(Store([load(pki.ca_certificate)]))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_a_server_and_a_client_per_role_with_private_keys(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "pki"
    assert main(["init", "--dir", str(folder)]) == 0
    pki = DevelopmentPki(folder)

    ca = load(pki.ca_certificate)
    assert ca.subject.rfc4514_string().startswith(f"O=voxauth (development only),CN={CA_NAME}")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    keys = [pki.ca_key, pki.server_key, *(pki.client_key(role.value) for role in Role)]
    assert [mode(key) for key in keys] == [0o600] * len(keys)
    assert mode(folder) == 0o700
    for role in Role:
        assert identity_from_certificate(pki.client_certificate(role.value).read_bytes()) == (
            Identity(role.value, frozenset({role}), CredentialSource.CERTIFICATE)
        )


def test_server_certificate_is_valid_for_localhost_and_127_0_0_1_and_chains_to_the_ca(
    tmp_path: Path,
) -> None:
    pki = create_pki(tmp_path)
    server = load(pki.server_certificate)
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = verifier_policy(pki).build_server_verifier(name).verify(server, [])
        assert chain[-1] == load(pki.ca_certificate)
    with pytest.raises(x509.verification.VerificationError):
        verifier_policy(pki).build_server_verifier(x509.DNSName("example.org")).verify(server, [])


def test_client_command_issues_a_certificate_with_the_name_and_role(tmp_path: Path) -> None:
    pki = create_pki(tmp_path)
    assert main(["client", "--dir", str(tmp_path), "--name", "hr-portal", "--role", "hr"]) == 0

    certificate = load(pki.client_certificate("hr-portal"))
    verified = verifier_policy(pki).build_client_verifier().verify(certificate, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:voxauth:role:hr")]
    assert identity_from_certificate(pki.client_certificate("hr-portal").read_bytes()) == Identity(
        "hr-portal", frozenset({Role.HR}), CredentialSource.CERTIFICATE
    )
    assert mode(pki.client_key("hr-portal")) == 0o600
    # A client certificate is no server certificate.
    with pytest.raises(x509.verification.VerificationError):
        verifier_policy(pki).build_server_verifier(x509.DNSName("localhost")).verify(
            certificate, []
        )


def test_existing_files_are_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = create_pki(tmp_path)
    before = pki.ca_key.read_bytes()

    assert main(["init", "--dir", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["client", "--dir", str(tmp_path), "--name", "mfa", "--role", "mfa"]) == 2
    assert pki.ca_key.read_bytes() == before

    pki.ca_key.chmod(0o644)
    assert main(["init", "--dir", str(tmp_path), "--force"]) == 0
    assert pki.ca_key.read_bytes() != before
    assert mode(pki.ca_key) == 0o600


def test_server_command_renews_the_server_certificate_for_other_names(tmp_path: Path) -> None:
    pki = create_pki(tmp_path)
    command = ["server", "--dir", str(tmp_path), "--server-name", "voxauth.test", "--force"]
    assert main(command) == 0
    verifier = verifier_policy(pki).build_server_verifier(x509.DNSName("voxauth.test"))
    verifier.verify(load(pki.server_certificate), [])


def test_clients_need_an_existing_ca_and_a_plain_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client", "--dir", str(tmp_path), "--name", "crm", "--role", "mfa"]) == 2
    assert "no development CA" in capsys.readouterr().err
    create_pki(tmp_path)
    assert main(["client", "--dir", str(tmp_path), "--name", "../crm", "--role", "mfa"]) == 2
    assert "caller name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["client", "--dir", str(tmp_path), "--name", "crm", "--role", "root"])


def test_init_refuses_before_writing_anything(tmp_path: Path) -> None:
    pki = DevelopmentPki(tmp_path)
    pki.client_key("admin").parent.mkdir(parents=True)
    pki.client_key("admin").write_text("someone's key")
    with pytest.raises(CertificateFilesError):
        create_pki(tmp_path)
    assert not pki.ca_certificate.exists()
