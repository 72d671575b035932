"""The one place where domain errors become gRPC status codes.

Servicers raise domain exceptions (server/errors.py) and never pick status codes themselves.
Errors with a request field attached also carry a google.rpc.BadRequest detail naming it, and a
throttled verification a google.rpc.RetryInfo detail with the time to wait.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.api.handler_wrapping import (
    Continuation,
    MethodHandler,
    Request,
    Response,
    rewrap,
)
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    AssuranceNotFoundError,
    CapacityError,
    ConfigurationError,
    EnrollmentIncompleteError,
    InvalidAudioError,
    InvalidRequestError,
    ModelMismatchError,
    NotEnrolledError,
    ServiceNotReadyError,
    ShiftEndedError,
    ShiftNotFoundError,
    ShiftNotLockedError,
    ShiftTakenOverError,
    StorageError,
    StreamOrderError,
    ThrottledError,
    UnauthenticatedError,
    VerificationDisabledError,
    VoxauthError,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[VoxauthError], grpc.StatusCode] = {
    InvalidAudioError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    AgentNotFoundError: grpc.StatusCode.NOT_FOUND,
    ShiftNotFoundError: grpc.StatusCode.NOT_FOUND,
    ShiftEndedError: grpc.StatusCode.FAILED_PRECONDITION,
    StreamOrderError: grpc.StatusCode.FAILED_PRECONDITION,
    ShiftTakenOverError: grpc.StatusCode.ABORTED,
    ShiftNotLockedError: grpc.StatusCode.FAILED_PRECONDITION,
    AssuranceNotFoundError: grpc.StatusCode.NOT_FOUND,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    AgentExistsError: grpc.StatusCode.ALREADY_EXISTS,
    NotEnrolledError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    EnrollmentIncompleteError: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ThrottledError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Not PERMISSION_DENIED: the caller may be entitled; the agent's state must change first.
    VerificationDisabledError: grpc.StatusCode.FAILED_PRECONDITION,
    ServiceNotReadyError: grpc.StatusCode.UNAVAILABLE,
    ConfigurationError: grpc.StatusCode.INTERNAL,
    StorageError: grpc.StatusCode.INTERNAL,
}


def status_code_for(error: VoxauthError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    """Ends the call with the status for `error` (context.abort raises)."""
    if isinstance(error, VoxauthError):
        code = status_code_for(error)
        message = error.message
        if code is grpc.StatusCode.INTERNAL:
            # Storage and configuration faults are the operator's business, not the caller's.
            log.error("internal error: %s", message)
            message = "internal error; the server log has the details"
    else:
        log.exception("unexpected error", exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    field = getattr(error, "field", None)
    if field and code is grpc.StatusCode.INVALID_ARGUMENT:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            ]
        )
        status.details.add().Pack(detail)
    if isinstance(error, ThrottledError):
        delay = duration_pb2.Duration(seconds=math.ceil(error.retry_after_seconds))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    await context.abort(
        code, message, trailing_metadata=rpc_status.to_status(status).trailing_metadata
    )


def _passes_through(error: BaseException) -> bool:
    # An abort already carries its status; cancellation must unwind untouched.
    return isinstance(error, grpc.aio.AbortError | grpc.aio.UsageError)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Continuation[Request, Response],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler[Request, Response]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return rewrap(handler, _wrap_unary, _wrap_stream)


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as error:
            if _passes_through(error):
                raise
            await _abort(context, error)

    return wrapper


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def wrapper(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as error:
            if _passes_through(error):
                raise
            await _abort(context, error)

    return wrapper
