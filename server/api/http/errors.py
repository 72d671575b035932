"""The one place where domain errors become HTTP statuses, as server/api/interceptors.py is
for gRPC: a route raises domain exceptions (server/errors.py) and never picks a status. Each
error takes its category's status; internal errors say no more than that (the log has them)."""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

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

HTTP_STATUS_OF_CATEGORY: dict[type[VoxauthError], HTTPStatus] = {
    InvalidInputError: HTTPStatus.BAD_REQUEST,
    UnauthenticatedError: HTTPStatus.UNAUTHORIZED,
    NotFoundError: HTTPStatus.NOT_FOUND,
    PreconditionError: HTTPStatus.CONFLICT,
    OutOfRangeError: HTTPStatus.BAD_REQUEST,  # as Google's mapping of OUT_OF_RANGE
    ConflictError: HTTPStatus.CONFLICT,
    AlreadyExistsError: HTTPStatus.CONFLICT,
    CapacityError: HTTPStatus.TOO_MANY_REQUESTS,
    UnavailableError: HTTPStatus.SERVICE_UNAVAILABLE,
    TimedOutError: HTTPStatus.GATEWAY_TIMEOUT,
    InternalError: HTTPStatus.INTERNAL_SERVER_ERROR,
}
"""The status of each error category (the same categories as gRPC's mapping)."""


def http_status_for(error_type: type[VoxauthError]) -> HTTPStatus:
    for cls in error_type.__mro__:
        if cls in HTTP_STATUS_OF_CATEGORY:
            return HTTP_STATUS_OF_CATEGORY[cls]
    # A VoxauthError raised without a category is a bug of ours, not the caller's.
    return HTTPStatus.INTERNAL_SERVER_ERROR


async def voxauth_error_response(request: Request, error: Exception) -> Response:
    """Starlette's handler for VoxauthError: `{"error": message}` with the category's status
    (and Retry-After when the error knows how long to wait)."""
    assert isinstance(error, VoxauthError)
    status = http_status_for(type(error))
    message = error.message
    if status is HTTPStatus.INTERNAL_SERVER_ERROR:
        log.error("internal error: %s", message)
        message = "internal error; the server log has the details"
    headers = {}
    if isinstance(error, CapacityError) and error.retry_after_seconds is not None:
        headers["Retry-After"] = str(math.ceil(error.retry_after_seconds))
    return JSONResponse({"error": message}, status_code=status, headers=headers)
