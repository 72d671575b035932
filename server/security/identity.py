"""Who a caller is: roles, identities, caller names, the identity a client certificate carries,
bearer tokens, and the identity of the caller of the current call.

Nothing here knows about a transport: the API edge (server/api/access.py) resolves a caller
from its TLS peer or bearer token to an `Identity`, makes it the current caller, and domain code
that needs to say who acted reads it with `caller_identity()`.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from server.errors import ConfigurationError, InvalidRequestError, UnauthenticatedError
from server.validation import validate_text


class Role(enum.Enum):
    SOFTPHONE = "softphone"
    """Login checks and shift streams."""
    HR = "hr"
    """Creates, enrolls, re-enrolls and deletes agents."""
    MFA = "mfa"
    """Reads assurances and subscribes to shift events."""
    ADMIN = "admin"
    """Configuration, audit export, unlocking."""


class CredentialSource(enum.Enum):
    CERTIFICATE = "certificate"
    TOKEN = "token"
    DEVELOPMENT = "development"
    """--insecure-dev: no credential at all, every caller is the development identity."""


@dataclass(frozen=True)
class Identity:
    """A caller. Certificates and tokens grant exactly one role; only the insecure development
    identity holds them all, which is why this is a set."""

    name: str
    roles: frozenset[Role]
    source: CredentialSource

    def describe(self) -> dict[str, Any]:
        """The identity as audit details."""
        return {
            "caller": self.name,
            "roles": sorted(role.value for role in self.roles),
            "credential": self.source.value,
        }


# Caller names become certificate CNs, file names and token-file fields: no spaces, no slashes.
_CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def check_caller_name(name: str) -> str:
    if not _CALLER_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"caller name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit",
            field="name",
        )
    return name


# --- client certificates ------------------------------------------------------------------

# The role travels as a SAN URI of the client certificate, the caller's name as its subject CN.
ROLE_URI_PREFIX = "urn:voxauth:role:"


def role_uri(role: Role) -> str:
    return ROLE_URI_PREFIX + role.value


@functools.lru_cache(maxsize=1024)
def identity_from_certificate(pem: bytes) -> Identity:
    """The caller named by a client certificate that TLS has already verified against the CA.

    Cached because a client presents the same certificate on every call of its connection.
    """
    certificate = x509.load_pem_x509_certificate(pem)
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise UnauthenticatedError("the client certificate must name the caller in one CN")
    name = _certificate_caller_name(names[0].value)
    try:
        alternative_names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        uris = alternative_names.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    roles = [uri.removeprefix(ROLE_URI_PREFIX) for uri in uris if uri.startswith(ROLE_URI_PREFIX)]
    if len(roles) != 1:
        raise UnauthenticatedError(
            f"the client certificate must carry exactly one {ROLE_URI_PREFIX}<role> SAN URI"
        )
    try:
        role = Role(roles[0])
    except ValueError:
        raise UnauthenticatedError(
            f"the client certificate carries an unknown role {roles[0]!r}"
        ) from None
    return Identity(name, frozenset({role}), CredentialSource.CERTIFICATE)


# X.509 bounds a CN at 64 characters (ub-common-name, RFC 5280).
_MAX_COMMON_NAME = 64


def _certificate_caller_name(common_name: str) -> str:
    """The caller's name from its certificate's CN. Another CA than voxauth's may issue names
    with spaces and letters of any script; none may hold a control or format character (a
    newline would forge log lines, a bidi override disguise audit records), and the refusal
    names the character, never the CN."""
    try:
        return validate_text(common_name, "the client certificate's CN", _MAX_COMMON_NAME)
    except InvalidRequestError as error:
        raise UnauthenticatedError(error.message) from None


# --- bearer tokens ------------------------------------------------------------------------

TOKEN_PREFIX = "vxa_"  # lets secret scanners recognise a leaked token
_TOKEN_LINE = re.compile(r"sha256:(?P<digest>[0-9a-f]{64})\s+(?P<role>\S+)\s+(?P<name>\S+)")


def _token_digest(token: str) -> bytes:
    # Tokens are 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).digest()


def token_line(token: str, name: str, role: Role) -> str:
    """The token-file line for a token: its hash, never the token itself."""
    return f"sha256:{_token_digest(token).hex()} {role.value} {check_caller_name(name)}"


@dataclass(frozen=True)
class MintedToken:
    token: str
    """Given to the caller once; stored nowhere."""
    line: str
    """Added to the token file."""


def mint_token(name: str, role: Role) -> MintedToken:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return MintedToken(token, token_line(token, name, role))


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    identity: Identity


class TokenRegistry:
    """The bearer tokens the server accepts, known only by their SHA-256 hashes.

    The token file has one `sha256:<hex> <role> <name>` line per token (`voxauth token` prints
    them); blank lines and lines starting with `#` are ignored.
    """

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)
        if len({entry.digest for entry in self._entries}) != len(self._entries):
            raise ConfigurationError("the same bearer token is listed twice")

    @classmethod
    def load(cls, path: Path) -> TokenRegistry:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigurationError(f"cannot read the token file {path}: {error}") from None
        entries = []
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            entries.append(_parse_token_line(text, f"{path}:{number}"))
        return cls(entries)

    def identify(self, token: str) -> Identity | None:
        digest = _token_digest(token)
        found = None
        # Every entry is compared, in constant time, so the time taken says nothing about
        # which stored hash a guess came close to.
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.identity
        return found


def _parse_token_line(text: str, where: str) -> TokenEntry:
    match = _TOKEN_LINE.fullmatch(text)
    if match is None:
        raise ConfigurationError(f"{where}: expected `sha256:<64 hex digits> <role> <name>`")
    try:
        role = Role(match["role"])
        name = check_caller_name(match["name"])
    except (ValueError, InvalidRequestError) as error:
        raise ConfigurationError(f"{where}: {error}") from None
    return TokenEntry(
        bytes.fromhex(match["digest"]), Identity(name, frozenset({role}), CredentialSource.TOKEN)
    )


# --- the caller of the current call -------------------------------------------------------

# grpc.aio runs every RPC in a task of its own, and a task works on a copy of the context, so a
# value set for one call is seen by that call only and vanishes with it.
_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("voxauth_caller")


def admit_caller(identity: Identity) -> None:
    """Makes `identity` the caller of the current call (the access check does, once per call)."""
    _caller.set(identity)


def caller_identity() -> Identity:
    """The identity of the caller of the current call (e.g. for audit: who)."""
    try:
        return _caller.get()
    except LookupError:
        raise UnauthenticatedError(
            "no caller identity: the call did not pass the access interceptor"
        ) from None
