"""Domain exceptions. Every error voxauth raises on purpose derives from VoxauthError, through
exactly one category; the category says what the caller can do about it, and the gRPC edge
(server/api/interceptors.py) maps each category to one status code, so no domain module needs
to know about grpc and a new error is mapped by the category it joins.

The whole hierarchy (status code in brackets):

    VoxauthError
    ├── InvalidInputError              the request itself is wrong [INVALID_ARGUMENT]
    │   ├── InvalidAudioError
    │   ├── InvalidRequestError
    │   └── MalformedMessageError
    ├── UnauthenticatedError           no usable caller identity [UNAUTHENTICATED]
    ├── NotFoundError                  the thing asked about does not exist [NOT_FOUND]
    │   ├── AgentNotFoundError
    │   ├── ShiftNotFoundError
    │   └── AssuranceNotFoundError
    ├── PreconditionError              not now: some state must change first
    │   │                              [FAILED_PRECONDITION]
    │   ├── ShiftEndedError
    │   ├── ShiftNotLockedError
    │   ├── AssuranceRevokedError
    │   ├── StreamOrderError
    │   ├── NotEnrolledError
    │   ├── ModelMismatchError
    │   ├── EnrollmentIncompleteError
    │   ├── VerificationDisabledError
    │   └── RequestIdReusedError
    ├── ConflictError                  lost to concurrent activity on the same thing [ABORTED]
    │   ├── ShiftTakenOverError
    │   │   └── ShiftLeaseLostError
    │   └── AlreadyExistsError         the thing to create is already there [ALREADY_EXISTS]
    │       └── AgentExistsError
    ├── OutOfRangeError                past what the service still holds [OUT_OF_RANGE]
    │   └── EventsExpiredError
    ├── CapacityError                  a bound is reached; retry later [RESOURCE_EXHAUSTED]
    │   ├── ThrottledError
    │   └── AudioBudgetExceededError
    ├── UnavailableError               the service cannot serve right now [UNAVAILABLE]
    │   └── ServiceNotReadyError
    ├── TimedOutError                  the server stopped waiting for the caller
    │   │                              [DEADLINE_EXCEEDED]
    │   └── StreamIdleError
    └── InternalError                  the operator's problem, not the caller's [INTERNAL]
        ├── ConfigurationError
        │   └── CertificateFilesError
        └── StorageError

Catch a category where any of its members calls for the same handling; raise the concrete class
(or the category itself where no finer name helps, as CapacityError for a full queue).
"""

from __future__ import annotations


class VoxauthError(Exception):
    """Base class of all voxauth domain errors. Raise a category or a concrete class, never
    this: an error without a category reaches the caller as INTERNAL."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The request field at fault, when there is one (reported as google.rpc.BadRequest).
        self.field = field


# --- categories ---------------------------------------------------------------------------


class InvalidInputError(VoxauthError):
    """The request is wrong whatever the state of the service: fixing the request is the only
    way through. `field` names the request field at fault."""


class UnauthenticatedError(VoxauthError):
    """The caller has no usable identity: no client certificate with a role, or a missing,
    unknown or malformed bearer token."""


class NotFoundError(VoxauthError):
    """What the request names does not exist (or no longer does)."""


class PreconditionError(VoxauthError):
    """The request is well formed but cannot be served in the current state of what it names;
    retrying is useless until that state changes (enroll, finalize, re-enable, new shift...)."""


class ConflictError(VoxauthError):
    """The request lost to concurrent activity on the same thing (e.g. a newer stream for the
    same shift); the caller decides whether to retry from the top."""


class AlreadyExistsError(ConflictError):
    """The thing the request would create already exists."""


class OutOfRangeError(VoxauthError):
    """The request is well formed but reaches past what the service still holds (or holds
    yet): asking again the same way cannot succeed. `field` names the request field at
    fault."""


class CapacityError(VoxauthError):
    """A bounded resource is full (inference queue, pending utterances) or a rate limit is
    reached; retry later. `retry_after_seconds`, when known, is how long to wait."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_seconds = retry_after_seconds


class UnavailableError(VoxauthError):
    """The service cannot serve any request right now (starting, stopping); retry with
    back-off."""


class TimedOutError(VoxauthError):
    """The server stopped waiting for the caller (e.g. a stream that sent nothing for too long).
    Nothing the caller sent was wrong; it may call again when it has something to send."""


class InternalError(VoxauthError):
    """A fault of the deployment or of the service itself (configuration, storage): callers
    get no details; the server log has them."""


# --- invalid input ------------------------------------------------------------------------


class InvalidAudioError(InvalidInputError):
    """The audio cannot be used: unknown format, bad rate, empty, too long, corrupt, NaN..."""


class InvalidRequestError(InvalidInputError):
    """A request field other than audio is missing or malformed."""


class MalformedMessageError(InvalidInputError):
    """The bytes of a request are not the protobuf message the method takes."""


# --- not found ----------------------------------------------------------------------------


class AgentNotFoundError(NotFoundError):
    """No agent with the given id."""


class ShiftNotFoundError(NotFoundError):
    """No shift with the given id."""


class AssuranceNotFoundError(NotFoundError):
    """The shift has no valid assurance (no passed login check, or it expired)."""


# --- precondition -------------------------------------------------------------------------


class ShiftEndedError(PreconditionError):
    """The shift has ended; start a new one."""


class ShiftNotLockedError(PreconditionError):
    """An unlock was asked for a shift that is not locked."""


class AssuranceRevokedError(PreconditionError):
    """The shift's latest assurance was revoked (its shift ended or locked); the message ends
    in the reason. After a lock, a passing login check issues a fresh one."""


class StreamOrderError(PreconditionError):
    """Messages of a stream came in the wrong order (e.g. audio before the stream header)."""


class NotEnrolledError(PreconditionError):
    """The agent exists but has no voiceprint yet."""


class ModelMismatchError(PreconditionError):
    """The stored voiceprint was made by a different speaker model than the one loaded."""


class EnrollmentIncompleteError(PreconditionError):
    """Finalize was asked for before enough consistent net speech was collected."""


class VerificationDisabledError(PreconditionError):
    """The agent's biometric verification is disabled after too many consecutive failures,
    until an administrator re-enables it. A precondition, not a permission: the caller may be
    entitled; the agent's state must change first."""


class RequestIdReusedError(PreconditionError):
    """A request id came again with a different request while the first one's completion is
    kept (server/runtime/requests.py): a retry must repeat its request exactly."""


# --- conflict -----------------------------------------------------------------------------


class ShiftTakenOverError(ConflictError):
    """A newer stream for the same shift replaced this one."""


class ShiftLeaseLostError(ShiftTakenOverError):
    """Another replica took the shift's lease over (server/shifts/lease.py): a write carrying
    an older fencing token is refused, so a replica that lost the shift cannot change it."""


class AgentExistsError(AlreadyExistsError):
    """An agent with the given id already exists."""


# --- capacity -----------------------------------------------------------------------------


class ThrottledError(CapacityError):
    """Too many consecutive failed verifications of the agent: the next attempt must wait."""

    retry_after_seconds: float

    def __init__(self, message: str, *, retry_after_seconds: float) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds)


class AudioBudgetExceededError(CapacityError):
    """The requests in progress already hold as much audio as the server allows
    (AudioLimits.budget_mib); this one would exceed it."""


# --- unavailable --------------------------------------------------------------------------


class ServiceNotReadyError(UnavailableError):
    """The server is starting (model not loaded yet) or shutting down."""


# --- timed out ----------------------------------------------------------------------------


class StreamIdleError(TimedOutError):
    """A client stream sent no message for longer than the server waits."""


# --- internal -----------------------------------------------------------------------------


class ConfigurationError(InternalError):
    """The service cannot start as configured (missing key, missing model files...)."""


class CertificateFilesError(ConfigurationError):
    """TLS certificates or keys are missing, unreadable or invalid, or writing a development
    PKI would overwrite existing files."""


class StorageError(InternalError):
    """The store could not read or write (including a voiceprint that fails to decrypt)."""


class NothingHeldError(PreconditionError):
    """A voiceprint review for an agent that has no voiceprint waiting for one."""


class WatchlistAudioRefusedError(PreconditionError):
    """The audio offered for a watchlist entry failed the quality gates or the
    countermeasure."""


class WatchlistEntryNotFoundError(NotFoundError):
    """No watchlist entry with the id (erased, or expired)."""


class EventsExpiredError(OutOfRangeError):
    """A subscription asked to resume after an event older than the store keeps shift events:
    what followed it may be gone, so the subscriber must read the current state instead."""
