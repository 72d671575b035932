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
import logging
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from server.errors import ConfigurationError, InvalidRequestError, UnauthenticatedError
from server.runtime.clock import Clock, SystemClock
from server.validation import validate_text

log = logging.getLogger(__name__)


class Role(enum.Enum):
    SOFTPHONE = "softphone"
    """Login checks and shift streams."""
    HR = "hr"
    """Creates, enrolls, re-enrolls and deletes agents."""
    MFA = "mfa"
    """Reads assurances and subscribes to shift events."""
    ADMIN = "admin"
    """Configuration, audit export, unlocking."""
    SUPERVISOR = "supervisor"
    """Sees shifts and unlocks a locked one after talking to the agent (the console); never
    voiceprints, enrollment or configuration."""


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
DEFAULT_TOKEN_LIFETIME = timedelta(days=90)
"""How long a token from `voxauth token` is valid unless its --ttl says otherwise: a leaked
token stops working within a quarter, and the caller's operator re-mints it as routine."""
_TOKEN_LINE = re.compile(
    r"sha256:(?P<digest>[0-9a-f]{64})\s+(?P<role>\S+)\s+(?P<name>\S+)"
    r"(?:\s+expires=(?P<expires>\S+))?"
)
_TOKEN_LINE_FORM = "`sha256:<64 hex digits> <role> <name> [expires=<UTC time, ISO 8601>]`"


def _token_digest(token: str) -> bytes:
    # Tokens are 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).digest()


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_line(token: str, name: str, role: Role, expires_at: datetime) -> str:
    """The token-file line for a token: its hash, never the token itself."""
    return (
        f"sha256:{_token_digest(token).hex()} {role.value} {check_caller_name(name)} "
        f"expires={_utc_text(expires_at)}"
    )


@dataclass(frozen=True)
class MintedToken:
    token: str
    """Given to the caller once; stored nowhere."""
    line: str
    """Added to the token file."""
    expires_at: datetime


def mint_token(
    name: str,
    role: Role,
    lifetime: timedelta = DEFAULT_TOKEN_LIFETIME,
    *,
    now: datetime | None = None,
) -> MintedToken:
    if lifetime <= timedelta(0):
        raise InvalidRequestError("a token's lifetime must be above zero", field="ttl")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    # Whole seconds: the token file says when, to the second.
    expires_at = ((now or datetime.now(UTC)) + lifetime).replace(microsecond=0)
    return MintedToken(token, token_line(token, name, role, expires_at), expires_at)


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    identity: Identity
    expires_at: datetime | None
    """None for a line written before tokens expired: valid until it is removed."""


class TokenRegistry:
    """The bearer tokens the server accepts, known only by their SHA-256 hashes.

    The token file has one `sha256:<hex> <role> <name> expires=<UTC time>` line per token
    (`voxauth token` prints them); blank lines and lines starting with `#` are ignored. A line
    without `expires=` (made before tokens expired) never expires: re-mint it.
    """

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)
        if len({entry.digest for entry in self._entries}) != len(self._entries):
            raise ConfigurationError("the same bearer token is listed twice")

    @classmethod
    def load(cls, path: Path) -> TokenRegistry:
        return cls.parse(_read_token_file(path), path)

    @classmethod
    def parse(cls, text: str, path: Path) -> TokenRegistry:
        """The tokens of a token file's `text`; errors name `path` and the line."""
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entries.append(_parse_token_line(line, f"{path}:{number}"))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def without_expiry(self) -> int:
        """How many tokens never expire (lines to re-mint)."""
        return sum(entry.expires_at is None for entry in self._entries)

    def identify(self, token: str, now: datetime) -> Identity:
        """The caller `token` names at `now`. Raises UnauthenticatedError for a token not
        listed or expired."""
        digest = _token_digest(token)
        found = None
        # Every entry is compared, in constant time, so the time taken says nothing about
        # which stored hash a guess came close to.
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise UnauthenticatedError("unknown bearer token")
        if found.expires_at is not None and now >= found.expires_at:
            raise UnauthenticatedError(
                f"the bearer token of {found.identity.name} expired at "
                f"{_utc_text(found.expires_at)}; mint a new one with `voxauth token`"
            )
        return found.identity


def _parse_token_line(text: str, where: str) -> TokenEntry:
    match = _TOKEN_LINE.fullmatch(text)
    if match is None:
        raise ConfigurationError(f"{where}: expected {_TOKEN_LINE_FORM}")
    try:
        role = Role(match["role"])
        name = check_caller_name(match["name"])
    except (ValueError, InvalidRequestError) as error:
        raise ConfigurationError(f"{where}: {error}") from None
    expires_at = None
    if match["expires"] is not None:
        expires_at = _parse_expiry(match["expires"], where)
    return TokenEntry(
        bytes.fromhex(match["digest"]),
        Identity(name, frozenset({role}), CredentialSource.TOKEN),
        expires_at,
    )


def _parse_expiry(text: str, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ConfigurationError(
            f"{where}: expires={text!r} is not a time with its offset, e.g. "
            "expires=2027-03-01T00:00:00Z"
        )
    return moment.astimezone(UTC)


class TokenFile:
    """The token file, read again when it changes, so tokens are added and revoked without a
    restart: a line added works, and a line removed stops working, within a second.

    Whether it changed (modification time, size, inode: an editor's or `mv`'s replacement
    counts) is checked when a token is presented, at most once per `check_seconds`; a stat
    costs microseconds, so this stays on the event loop. A file that no longer reads or parses
    keeps the tokens last read, and the log says why, once per change.
    """

    def __init__(self, path: Path, clock: Clock | None = None, check_seconds: float = 1.0):
        self._path = path
        self._clock = clock or SystemClock()
        self._check_seconds = check_seconds
        # Stat before reading: a change made while reading is seen at the next check.
        self._version = _file_version(path)
        self._text = _read_token_file(path)
        self._registry = TokenRegistry.parse(self._text, path)
        self._checked_at = self._clock.monotonic()
        _warn_without_expiry(path, self._registry)

    def identify(self, token: str, now: datetime) -> Identity:
        self._reload_if_changed()
        return self._registry.identify(token, now)

    def _reload_if_changed(self) -> None:
        checked_at = self._clock.monotonic()
        if checked_at - self._checked_at < self._check_seconds:
            return
        self._checked_at = checked_at
        version = _file_version(self._path)
        if version == self._version and not _recently_modified(version):
            return
        self._version = version
        try:
            text = _read_token_file(self._path)
        except ConfigurationError as error:
            self._keep(error)
            return
        if text == self._text:
            return
        self._text = text
        try:
            registry = TokenRegistry.parse(text, self._path)
        except ConfigurationError as error:
            self._keep(error)
            return
        self._registry = registry
        log.info("token file %s reloaded: %d tokens", self._path, len(registry))
        _warn_without_expiry(self._path, registry)

    def _keep(self, error: ConfigurationError) -> None:
        log.error(
            "token file not reloaded, the %d tokens read before stay in force: %s",
            len(self._registry),
            error.message,
        )


_FileVersion = tuple[int, int, int] | None
# Two writes within one tick of the file system's clock can leave the same modification time
# (and, for token lines of one length, the same size): a file changed this recently is read
# again at each check until its time is older, and compared by content.
_RACY_NANOSECONDS = 2_000_000_000


def _file_version(path: Path) -> _FileVersion:
    try:
        status = path.stat()
    except OSError:
        return None  # reading it says why
    return status.st_mtime_ns, status.st_size, status.st_ino


def _recently_modified(version: _FileVersion) -> bool:
    return version is not None and time.time_ns() - version[0] < _RACY_NANOSECONDS


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read the token file {path}: {error}") from None


def _warn_without_expiry(path: Path, registry: TokenRegistry) -> None:
    if registry.without_expiry:
        log.warning(
            "%d bearer token(s) in %s have no expiry and stay valid until removed: re-mint "
            "them with `voxauth token`",
            registry.without_expiry,
            path,
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
