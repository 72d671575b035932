"""Who may call what: caller identities and roles, the access policy, bearer tokens, and the
interceptor that enforces them in front of every RPC.

A caller proves who it is with a client certificate from the voxauth CA (mutual TLS) or, where
mutual TLS is not possible, with a bearer token over TLS. Either way it has exactly one role, and
the policy below lists for every RPC the roles that may call it. An RPC missing from the policy
is refused to everyone (least privilege); health checks and reflection need no identity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import enum
import functools
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from server.api.handlers import rewrap
from server.audit_actions import AuditAction
from server.errors import ConfigurationError, InvalidRequestError, UnauthenticatedError
from server.runtime.clock import Clock, SystemClock
from server.storage.interface import AuditEvent

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


# --- the policy ---------------------------------------------------------------------------

_ENROLLMENT = "/voxauth.v1.EnrollmentService/"
_VERIFICATION = "/voxauth.v1.VerificationService/"
_SHIFTS = "/voxauth.v1.ShiftService/"
_ASSURANCES = "/voxauth.v1.AssuranceService/"
_ADMIN_SERVICE = "/voxauth.v1.AdminService/"

ASSURANCE_JWKS = _ASSURANCES + "GetJwks"

_HR = frozenset({Role.HR})
_SOFTPHONE = frozenset({Role.SOFTPHONE})
_MFA = frozenset({Role.MFA})
_ADMIN = frozenset({Role.ADMIN})

ALLOWED_ROLES: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        _ENROLLMENT + "CreateAgent": _HR,
        _ENROLLMENT + "AddEnrollmentAudio": _HR,
        _ENROLLMENT + "StreamEnrollmentAudio": _HR,
        _ENROLLMENT + "GetEnrollmentStatus": _HR,
        _ENROLLMENT + "FinalizeEnrollment": _HR,
        _ENROLLMENT + "DeleteAgent": _HR,
        _VERIFICATION + "Verify": _SOFTPHONE,
        _SHIFTS + "StartShift": _SOFTPHONE,
        _SHIFTS + "CheckLogin": _SOFTPHONE,
        _SHIFTS + "StreamShiftAudio": _SOFTPHONE,
        _SHIFTS + "EndShift": _SOFTPHONE,
        _SHIFTS + "GetShift": frozenset({Role.SOFTPHONE, Role.MFA, Role.ADMIN}),
        _SHIFTS + "SubscribeShiftEvents": _MFA,
        _ASSURANCES + "GetAssurance": _MFA,
        _ADMIN_SERVICE + "UnlockShift": _ADMIN,
        _ADMIN_SERVICE + "EnableVerification": _ADMIN,
        _ADMIN_SERVICE + "ExportAudit": _ADMIN,
        _ADMIN_SERVICE + "GetConfiguration": _ADMIN,
        _ADMIN_SERVICE + "RotateSigningKey": _ADMIN,
    }
)

# Load balancers probe health without credentials; reflection only describes the public API;
# the JWKS holds the public keys that relying parties need to check assurances.
PUBLIC_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
PUBLIC_METHODS = frozenset({ASSURANCE_JWKS})


def is_public(method: str) -> bool:
    return method in PUBLIC_METHODS or method.startswith(PUBLIC_SERVICES)


def is_allowed(identity: Identity, method: str) -> bool:
    return not identity.roles.isdisjoint(ALLOWED_ROLES.get(method, frozenset()))


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
    return Identity(names[0].value, frozenset({role}), CredentialSource.CERTIFICATE)


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


# --- resolving the caller -----------------------------------------------------------------

AuthContext = Mapping[str, Sequence[bytes]]
"""grpc's `context.auth_context()`: TLS peer properties such as `x509_pem_cert`."""
Metadata = Sequence[tuple[str, str | bytes]]


class IdentityResolver(Protocol):
    def resolve(self, auth_context: AuthContext, metadata: Metadata) -> Identity:
        """The caller of one RPC. Raises UnauthenticatedError when it has no identity."""


class CredentialResolver:
    """Production: the verified client certificate, or else a bearer token over TLS."""

    def __init__(self, tokens: TokenRegistry | None = None) -> None:
        self._tokens = tokens if tokens is not None else TokenRegistry(())

    def resolve(self, auth_context: AuthContext, metadata: Metadata) -> Identity:
        certificates = auth_context.get("x509_pem_cert")
        if certificates:
            return identity_from_certificate(certificates[0])
        token = _bearer_token(metadata)
        if token is None:
            raise UnauthenticatedError("no client certificate and no bearer token")
        if b"ssl" not in auth_context.get("transport_security_type", ()):
            raise UnauthenticatedError("bearer tokens are accepted only over TLS")
        identity = self._tokens.identify(token)
        if identity is None:
            raise UnauthenticatedError("unknown bearer token")
        return identity


def _bearer_token(metadata: Metadata) -> str | None:
    values = [value for key, value in metadata if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise UnauthenticatedError("more than one authorization header")
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError("the authorization header must be `Bearer <token>`")
    return token.strip()


class DevelopmentResolver:
    """--insecure-dev only: every caller, unauthenticated, is one identity with every role."""

    def __init__(self, name: str = "developer") -> None:
        self._identity = Identity(
            check_caller_name(name), frozenset(Role), CredentialSource.DEVELOPMENT
        )
        log.warning(
            "INSECURE DEVELOPMENT MODE: callers are not authenticated; every caller is %r "
            "with every role (%s). Never run this where anyone else can reach the port.",
            name,
            ", ".join(role.value for role in Role),
        )

    def resolve(self, auth_context: AuthContext, metadata: Metadata) -> Identity:
        return self._identity


# --- enforcing it -------------------------------------------------------------------------

# grpc.aio runs every RPC in a task of its own, and a task works on a copy of the context, so a
# value set here is seen by that call's servicer only and vanishes with the call.
_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("voxauth_caller")


def caller_identity() -> Identity:
    """The identity of the caller of the current RPC, for servicers (e.g. audit: who)."""
    try:
        return _caller.get()
    except LookupError:
        raise UnauthenticatedError(
            "no caller identity: the call did not pass the access interceptor"
        ) from None


AuditSink = Callable[[AuditEvent], None]
"""Records one audit event; blocking (e.g. `Store.append_audit`), so it runs in a thread."""


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without an identity (UNAUTHENTICATED) or whose role the policy does not
    allow (PERMISSION_DENIED), audits and logs the refusal, and otherwise makes the caller
    available to the servicer through `caller_identity()`.

    Goes first in the server's interceptors, before the error-mapping one.
    """

    def __init__(
        self, resolver: IdentityResolver, audit: AuditSink, clock: Clock | None = None
    ) -> None:
        self._resolver = resolver
        self._audit = audit
        self._clock = clock or SystemClock()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        # Without a handler grpc answers UNIMPLEMENTED and nothing runs.
        if handler is None or is_public(method):
            return handler

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self._admit(method, context)

        return rewrap(
            handler,
            lambda behavior: _guard_unary(admit, behavior),
            lambda behavior: _guard_stream(admit, behavior),
        )

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Records the caller for the servicer, or ends the call (context.abort raises)."""
        try:
            identity = self._resolver.resolve(
                context.auth_context(), context.invocation_metadata() or ()
            )
        except UnauthenticatedError as denial:
            await self._refuse(
                context, method, None, grpc.StatusCode.UNAUTHENTICATED, denial.message
            )
            return
        if not is_allowed(identity, method):
            roles = ", ".join(sorted(role.value for role in identity.roles))
            await self._refuse(
                context,
                method,
                identity,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name} ({roles}) may not call {method}",
            )
            return
        _caller.set(identity)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        identity: Identity | None,
        code: grpc.StatusCode,
        reason: str,
    ) -> None:
        peer: str = context.peer()
        log.warning("refused %s: %s: %s (peer %s)", method, code.name, reason, peer)
        details = {"method": method, "peer": peer, "reason": reason}
        if identity is not None:
            details |= identity.describe()
        event = AuditEvent(
            action=AuditAction.ACCESS_DENIED,
            agent_id="",
            outcome=code.name,
            at=self._clock.now(),
            details=details,
        )
        try:
            await asyncio.to_thread(self._audit, event)
        except Exception:
            # The refusal stands even when it cannot be recorded.
            log.exception("could not audit the refused call to %s", method)
        await context.abort(code, reason)


Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _guard_unary(
    admit: Admit,
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await admit(context)
        return await behavior(request, context)

    return guarded


def _guard_stream(
    admit: Admit,
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    # Streaming servicers yield their responses; the error-mapping interceptor behind this one
    # turns every stream handler into such a generator anyway.
    async def guarded(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await admit(context)
        async for response in behavior(request, context):
            yield response

    return guarded


# --- `voxauth token` ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`voxauth token --name NAME --role ROLE`: mints a bearer token for a caller that cannot
    use a client certificate."""
    parser = argparse.ArgumentParser(
        prog="voxauth token",
        description="Mint a bearer token for a caller that cannot use mutual TLS.",
    )
    parser.add_argument("--name", required=True, help="the caller's name, as audited")
    parser.add_argument("--role", required=True, choices=[role.value for role in Role])
    args = parser.parse_args(argv)
    try:
        minted = mint_token(args.name, Role(args.role))
    except InvalidRequestError as error:
        parser.error(error.message)
    print(f"token (give it to {args.name}; it is not stored anywhere): {minted.token}")
    print(f"line to add to the token file: {minted.line}")
    return 0
