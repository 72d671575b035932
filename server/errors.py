"""Domain exceptions. Every error voxauth raises on purpose derives from VoxauthError.

Domain code raises these; the gRPC edge maps them to status codes in one place
(server/interceptors.py), so no domain module needs to know about grpc.
"""

from __future__ import annotations


class VoxauthError(Exception):
    """Base class of all voxauth domain errors."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The request field at fault, when there is one (reported as google.rpc.BadRequest).
        self.field = field


class InvalidAudioError(VoxauthError):
    """The audio cannot be used: unknown format, bad rate, empty, too long, corrupt, NaN..."""


class InvalidRequestError(VoxauthError):
    """A request field other than audio is missing or malformed."""


class AgentNotFoundError(VoxauthError):
    """No agent with the given id."""


class ShiftNotFoundError(VoxauthError):
    """No shift with the given id."""


class ShiftEndedError(VoxauthError):
    """The shift has ended; start a new one."""


class ShiftTakenOverError(VoxauthError):
    """A newer stream for the same shift replaced this one."""


class StreamOrderError(VoxauthError):
    """Messages of a stream came in the wrong order (e.g. audio before the stream header)."""


class AgentExistsError(VoxauthError):
    """An agent with the given id already exists."""


class NotEnrolledError(VoxauthError):
    """The agent exists but has no voiceprint yet."""


class ModelMismatchError(VoxauthError):
    """The stored voiceprint was made by a different speaker model than the one loaded."""


class EnrollmentIncompleteError(VoxauthError):
    """Finalize was asked for before enough consistent net speech was collected."""


class CapacityError(VoxauthError):
    """A bounded resource is full (inference queue, pending utterances); retry later."""


class ConfigurationError(VoxauthError):
    """The service cannot start as configured (missing key, missing model files...)."""


class StorageError(VoxauthError):
    """The store could not read or write (including a voiceprint that fails to decrypt)."""


class ServiceNotReadyError(VoxauthError):
    """The server is starting (model not loaded yet) or shutting down."""


class UnauthenticatedError(VoxauthError):
    """The caller has no usable identity: no client certificate with a role, or a missing,
    unknown or malformed bearer token."""


class CertificateFilesError(ConfigurationError):
    """TLS certificates or keys are missing, unreadable or invalid, or writing a development
    PKI would overwrite existing files."""


class AssuranceNotFoundError(VoxauthError):
    """The shift has no valid assurance (no passed login check, or it expired)."""


class ShiftNotLockedError(VoxauthError):
    """An unlock was asked for a shift that is not locked."""


class ThrottledError(VoxauthError):
    """Too many consecutive failed verifications of the agent: the next attempt must wait."""

    def __init__(self, message: str, *, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class VerificationDisabledError(VoxauthError):
    """The agent's biometric verification is disabled after too many consecutive failures,
    until an administrator re-enables it."""
