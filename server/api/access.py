"""Who may call what: the access policy, how a caller's credential becomes its identity, and
the interceptor that enforces the policy in front of every RPC.

A caller proves who it is with a client certificate from the voxauth CA (mutual TLS) or, where
mutual TLS is not possible, with a bearer token over TLS. Either way it has exactly one role
(server/security/identity.py), and the policy below lists for every RPC the roles that may call
it. An RPC missing from the policy is refused to everyone (least privilege); health checks and
reflection need no identity.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Never, Protocol

import grpc

from server.api.handler_wrapping import (
    Context,
    Continuation,
    MethodHandler,
    Request,
    Response,
    StreamBehavior,
    UnaryBehavior,
    rewrap,
)
from server.audit_actions import AuditAction
from server.errors import UnauthenticatedError
from server.runtime.clock import Clock, SystemClock
from server.security.identity import (
    CredentialSource,
    Identity,
    Role,
    TokenRegistry,
    admit_caller,
    check_caller_name,
    identity_from_certificate,
)
from server.storage.interface import AuditEvent

log = logging.getLogger(__name__)


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
# Supervisors see shifts and unlock them, nothing else: no voiceprints, no enrollment.
_SHIFT_WATCHERS = frozenset({Role.SUPERVISOR, Role.ADMIN})

ALLOWED_ROLES: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        _ENROLLMENT + "CreateAgent": _HR,
        _ENROLLMENT + "AddEnrollmentAudio": _HR,
        _ENROLLMENT + "StreamEnrollmentAudio": _HR,
        _ENROLLMENT + "GetEnrollmentStatus": _HR,
        _ENROLLMENT + "FinalizeEnrollment": _HR,
        _ENROLLMENT + "DeleteAgent": _HR,
        _ENROLLMENT + "ListAgents": frozenset({Role.HR, Role.ADMIN}),
        _ENROLLMENT + "ReviewVoiceprint": _HR | {Role.ADMIN},
        _VERIFICATION + "Verify": _SOFTPHONE,
        _SHIFTS + "StartShift": _SOFTPHONE,
        _SHIFTS + "CheckLogin": _SOFTPHONE,
        _SHIFTS + "StreamShiftAudio": _SOFTPHONE,
        _SHIFTS + "EndShift": _SOFTPHONE,
        _SHIFTS + "GetShift": frozenset({Role.SOFTPHONE, Role.MFA, Role.ADMIN, Role.SUPERVISOR}),
        # HR too: it learns there when a passive enrollment completes or is held.
        _SHIFTS + "SubscribeShiftEvents": frozenset({Role.MFA, Role.SUPERVISOR, Role.HR}),
        _SHIFTS + "ListShifts": _SHIFT_WATCHERS,
        _ASSURANCES + "GetAssurance": _MFA,
        _ASSURANCES + "IntrospectAssurance": _MFA,
        _ADMIN_SERVICE + "UnlockShift": _SHIFT_WATCHERS,
        _ADMIN_SERVICE + "EnableVerification": _ADMIN,
        _ADMIN_SERVICE + "ExportAudit": _ADMIN,
        _ADMIN_SERVICE + "GetConfiguration": _ADMIN,
        _ADMIN_SERVICE + "RotateSigningKey": _ADMIN,
        _ADMIN_SERVICE + "AddWatchlistEntry": _ADMIN,
        _ADMIN_SERVICE + "ListWatchlist": _ADMIN,
        _ADMIN_SERVICE + "DeleteWatchlistEntry": _ADMIN,
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


# --- resolving the caller -----------------------------------------------------------------

AuthContext = Mapping[str, Iterable[bytes]]
"""grpc's `context.auth_context()`: TLS peer properties such as `x509_pem_cert`."""
Metadata = Iterable[tuple[str, str | bytes]]


class IdentityResolver(Protocol):
    def resolve(self, auth_context: AuthContext, metadata: Metadata) -> Identity:
        """The caller of one RPC. Raises UnauthenticatedError when it has no identity."""


class BearerTokens(Protocol):
    """TokenRegistry, or TokenFile, which reloads one when its file changes."""

    def identify(self, token: str, now: datetime) -> Identity:
        """The caller `token` names at `now`; UnauthenticatedError if unknown or expired."""


class CredentialResolver:
    """Production: the verified client certificate, or else a bearer token over TLS."""

    def __init__(self, tokens: BearerTokens | None = None, clock: Clock | None = None) -> None:
        self._tokens = tokens if tokens is not None else TokenRegistry(())
        self._clock = clock or SystemClock()

    def resolve(self, auth_context: AuthContext, metadata: Metadata) -> Identity:
        certificate = next(iter(auth_context.get("x509_pem_cert", ())), None)
        if certificate:
            return identity_from_certificate(certificate)
        token = _bearer_token(metadata)
        if token is None:
            raise UnauthenticatedError("no client certificate and no bearer token")
        if b"ssl" not in auth_context.get("transport_security_type", ()):
            raise UnauthenticatedError("bearer tokens are accepted only over TLS")
        return self._tokens.identify(token, self._clock.now())


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

AuditSink = Callable[[AuditEvent], Awaitable[None]]
"""Records one audit event without holding up the event loop (the server appends it to the
store on the store's threads)."""


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without an identity (UNAUTHENTICATED) or whose role the policy does not
    allow (PERMISSION_DENIED), audits and logs the refusal, and otherwise makes the caller
    the current one for the servicer (`server.security.identity.caller_identity()`).

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
        continuation: Continuation[Request, Response],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler[Request, Response]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Without a handler grpc answers UNIMPLEMENTED and nothing runs.
        if handler is None or is_public(method):
            return handler

        async def admit(context: Context) -> None:
            await self._admit(method, context)

        return rewrap(
            handler,
            lambda behavior: _guard_unary(admit, behavior),
            lambda behavior: _guard_stream(admit, behavior),
        )

    async def _admit(self, method: str, context: Context) -> None:
        """Makes the caller the current one, or ends the call (context.abort raises)."""
        try:
            identity = self._resolver.resolve(
                context.auth_context(), context.invocation_metadata() or ()
            )
        except UnauthenticatedError as denial:
            await self._refuse(
                context, method, None, grpc.StatusCode.UNAUTHENTICATED, denial.message
            )
        if not is_allowed(identity, method):
            roles = ", ".join(sorted(role.value for role in identity.roles))
            await self._refuse(
                context,
                method,
                identity,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name} ({roles}) may not call {method}",
            )
        admit_caller(identity)

    async def _refuse(
        self,
        context: Context,
        method: str,
        identity: Identity | None,
        code: grpc.StatusCode,
        reason: str,
    ) -> Never:
        peer = context.peer()
        log.warning("refused %s: %s: %s (peer %s)", method, code.name, reason, peer)
        details: dict[str, Any] = {"method": method, "peer": peer, "reason": reason}
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
            await self._audit(event)
        except Exception:
            # The refusal stands even when it cannot be recorded.
            log.exception("could not audit the refused call to %s", method)
        await context.abort(code, reason)


Admit = Callable[[Context], Awaitable[None]]


def _guard_unary(admit: Admit, behavior: UnaryBehavior) -> UnaryBehavior:
    async def guarded(request: Any, context: Context) -> Any:
        await admit(context)
        return await behavior(request, context)

    return guarded


def _guard_stream(admit: Admit, behavior: StreamBehavior) -> StreamBehavior:
    # Streaming servicers yield their responses; the error-mapping interceptor behind this one
    # turns every stream handler into such a generator anyway.
    async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
        await admit(context)
        async for response in behavior(request, context):
            yield response

    return guarded
