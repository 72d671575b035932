"""The one place where domain errors become gRPC status codes.

Servicers raise domain exceptions (server/errors.py) and never pick status codes themselves:
each error takes the status of its category. Invalid input with a request field attached also
carries a google.rpc.BadRequest detail naming it, and a capacity error that knows how long to
wait (a throttled verification, a full inference queue, the audio budget) a google.rpc.RetryInfo
detail with that time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
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
    AlreadyExistsError,
    CapacityError,
    ConflictError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    OutOfRangeError,
    PreconditionError,
    TimedOutError,
    UnauthenticatedError,
    UnavailableError,
    VoxauthError,
)

log = logging.getLogger(__name__)

STATUS_OF_CATEGORY: dict[type[VoxauthError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    ConflictError: grpc.StatusCode.ABORTED,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    TimedOutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
}
"""The status of each error category (server/errors.py); an error takes its nearest one's."""


def category_of(error_type: type[VoxauthError]) -> type[VoxauthError] | None:
    """The nearest category `error_type` belongs to; None for one outside every category."""
    return next((cls for cls in error_type.__mro__ if cls in STATUS_OF_CATEGORY), None)


def status_code_for(error_type: type[VoxauthError]) -> grpc.StatusCode:
    category = category_of(error_type)
    if category is None:
        # A VoxauthError raised without a category is a bug of ours, not the caller's.
        return grpc.StatusCode.INTERNAL
    return STATUS_OF_CATEGORY[category]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    """Ends the call with the status for `error` (context.abort raises)."""
    if isinstance(error, VoxauthError):
        code = status_code_for(type(error))
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
    if field and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            ]
        )
        status.details.add().Pack(detail)
    if isinstance(error, CapacityError) and error.retry_after_seconds is not None:
        status.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=retry_delay(error.retry_after_seconds))
        )
    await context.abort(
        code, message, trailing_metadata=rpc_status.to_status(status).trailing_metadata
    )


def retry_delay(seconds: float) -> duration_pb2.Duration:
    """A RetryInfo's delay: whole seconds and nanos, to the microsecond, so the inference
    pool's hint of 0.5 s is not stretched to 1 s (the throttle's and the audio budget's are
    whole seconds already). A client must read both fields (Duration.ToTimedelta does, as
    server/tools/login_ramp.py); one that reads `seconds` alone retries up to a second early."""
    delay = duration_pb2.Duration()
    delay.FromTimedelta(timedelta(seconds=max(0.0, seconds)))
    return delay


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
