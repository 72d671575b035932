"""Every domain error reaches callers with the status its category was chosen for."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import threading
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import enrollment
import models
import server
from server.api.interceptors import (
    STATUS_OF_CATEGORY,
    _abort,
    _wrap_unary,
    category_of,
    status_code_for,
)
from server.config import InferenceLimits
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    AlreadyExistsError,
    AssuranceNotFoundError,
    AssuranceRevokedError,
    AudioBudgetExceededError,
    CapacityError,
    CertificateFilesError,
    ConfigurationError,
    ConflictError,
    EnrollmentIncompleteError,
    EventsExpiredError,
    InternalError,
    InvalidAudioError,
    InvalidInputError,
    InvalidRequestError,
    MalformedMessageError,
    ModelMismatchError,
    NotEnrolledError,
    NotFoundError,
    NothingHeldError,
    OutOfRangeError,
    PreconditionError,
    RequestIdReusedError,
    ServiceNotReadyError,
    ShiftEndedError,
    ShiftLeaseLostError,
    ShiftNotFoundError,
    ShiftNotLockedError,
    ShiftTakenOverError,
    StorageError,
    StreamIdleError,
    StreamOrderError,
    ThrottledError,
    TimedOutError,
    UnauthenticatedError,
    UnavailableError,
    VerificationDisabledError,
    VoxauthError,
    WatchlistAudioRefusedError,
    WatchlistEntryNotFoundError,
)
from server.runtime.inference import RETRY_HINT_MAX_SECONDS, RETRY_HINT_MIN_SECONDS, InferencePool

Code = grpc.StatusCode

# Decided one by one: a new error class fails this test until its status is written here.
EXPECTED: dict[type[VoxauthError], grpc.StatusCode] = {
    InvalidInputError: Code.INVALID_ARGUMENT,
    InvalidAudioError: Code.INVALID_ARGUMENT,
    InvalidRequestError: Code.INVALID_ARGUMENT,
    MalformedMessageError: Code.INVALID_ARGUMENT,
    UnauthenticatedError: Code.UNAUTHENTICATED,
    NotFoundError: Code.NOT_FOUND,
    AgentNotFoundError: Code.NOT_FOUND,
    ShiftNotFoundError: Code.NOT_FOUND,
    AssuranceNotFoundError: Code.NOT_FOUND,
    PreconditionError: Code.FAILED_PRECONDITION,
    ShiftEndedError: Code.FAILED_PRECONDITION,
    ShiftNotLockedError: Code.FAILED_PRECONDITION,
    AssuranceRevokedError: Code.FAILED_PRECONDITION,
    StreamOrderError: Code.FAILED_PRECONDITION,
    NotEnrolledError: Code.FAILED_PRECONDITION,
    ModelMismatchError: Code.FAILED_PRECONDITION,
    EnrollmentIncompleteError: Code.FAILED_PRECONDITION,
    NothingHeldError: Code.FAILED_PRECONDITION,
    WatchlistAudioRefusedError: Code.FAILED_PRECONDITION,
    WatchlistEntryNotFoundError: Code.NOT_FOUND,
    VerificationDisabledError: Code.FAILED_PRECONDITION,
    RequestIdReusedError: Code.FAILED_PRECONDITION,
    OutOfRangeError: Code.OUT_OF_RANGE,
    EventsExpiredError: Code.OUT_OF_RANGE,
    ConflictError: Code.ABORTED,
    ShiftTakenOverError: Code.ABORTED,
    ShiftLeaseLostError: Code.ABORTED,
    AlreadyExistsError: Code.ALREADY_EXISTS,
    AgentExistsError: Code.ALREADY_EXISTS,
    CapacityError: Code.RESOURCE_EXHAUSTED,
    ThrottledError: Code.RESOURCE_EXHAUSTED,
    AudioBudgetExceededError: Code.RESOURCE_EXHAUSTED,
    UnavailableError: Code.UNAVAILABLE,
    ServiceNotReadyError: Code.UNAVAILABLE,
    TimedOutError: Code.DEADLINE_EXCEEDED,
    StreamIdleError: Code.DEADLINE_EXCEEDED,
    InternalError: Code.INTERNAL,
    ConfigurationError: Code.INTERNAL,
    CertificateFilesError: Code.INTERNAL,
    StorageError: Code.INTERNAL,
}


def _all_error_classes() -> set[type[VoxauthError]]:
    # Import every module first: an error class defined anywhere must be found.
    for package in (server, enrollment, models):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: set[type[VoxauthError]] = set()
    pending = [VoxauthError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    # Errors the tests' fakes raise (tests/fake_storage.py) are not the service's.
    return {error for error in found if not error.__module__.startswith("tests.")}


def test_every_error_class_has_a_decided_status() -> None:
    found = _all_error_classes()
    assert sorted(c.__qualname__ for c in found - EXPECTED.keys()) == [], "status not decided"
    assert sorted(c.__qualname__ for c in EXPECTED.keys() - found) == [], "class gone"
    assert {c: status_code_for(c) for c in found} == {c: EXPECTED[c] for c in found}


def test_statuses_follow_from_one_category_each() -> None:
    categories = set(STATUS_OF_CATEGORY)
    for error_type in _all_error_classes():
        category = category_of(error_type)
        # No error reaches INTERNAL (or UNKNOWN) by falling outside every category.
        assert category is not None, error_type.__qualname__
        # Single inheritance only: an error belongs to one line of categories.
        assert len(error_type.__bases__) == 1, error_type.__qualname__
        assert issubclass(error_type, category)
        if error_type not in categories:
            # Concrete errors add no status of their own.
            assert status_code_for(error_type) is STATUS_OF_CATEGORY[category]
    assert Code.UNKNOWN not in STATUS_OF_CATEGORY.values()
    assert status_code_for(VoxauthError) is Code.INTERNAL


class _AbortingContext:
    """Just enough of grpc.aio.ServicerContext for _abort: keeps what the call ended with."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.metadata: tuple[tuple[str, Any], ...] = ()

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]
    ) -> None:
        self.code, self.details, self.metadata = code, details, trailing_metadata


def _status_details(context: _AbortingContext) -> list[Any]:
    (raw,) = [value for key, value in context.metadata if key == "grpc-status-details-bin"]
    return list(status_pb2.Status.FromString(raw).details)


def _aborted(error: Exception) -> _AbortingContext:
    context = _AbortingContext()
    asyncio.run(_abort(context, error))  # type: ignore[arg-type]
    return context


def _retry_delay(context: _AbortingContext) -> float:
    (detail,) = _status_details(context)
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    return float(retry.retry_delay.ToTimedelta().total_seconds())


def test_a_throttled_call_says_when_to_retry() -> None:
    context = _aborted(ThrottledError("wait", retry_after_seconds=30))
    assert context.code is Code.RESOURCE_EXHAUSTED
    assert _retry_delay(context) == 30.0
    # The time as given, not rounded up to whole seconds: 0.5 s stays 0.5 s.
    (detail,) = _status_details(_aborted(CapacityError("busy", retry_after_seconds=0.5)))
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (0, 500_000_000)
    assert _retry_delay(_aborted(CapacityError("busy", retry_after_seconds=29.2))) == 29.2
    busy = _aborted(CapacityError("server is busy"))
    assert busy.code is Code.RESOURCE_EXHAUSTED
    assert _status_details(busy) == []


def test_a_full_inference_queue_is_refused_with_a_retry_hint() -> None:
    """Through the error-mapping interceptor's wrapper, as a servicer sees it: a call that
    finds the inference pool full ends RESOURCE_EXHAUSTED with a RetryInfo in its bounds."""

    async def scenario() -> _AbortingContext:
        pool = InferencePool(InferenceLimits(workers=1, threads=1, max_queued=1))
        release = threading.Event()
        held = [asyncio.ensure_future(pool.run(lambda: release.wait(10))) for _ in range(2)]
        await asyncio.sleep(0.05)

        async def verify(request: object, context: object) -> object:
            return await pool.run(lambda: "verified")

        context = _AbortingContext()
        try:
            await _wrap_unary(verify)(object(), context)  # type: ignore[arg-type]
        finally:
            release.set()
            await asyncio.gather(*held)
            pool.shutdown()
        return context

    context = asyncio.run(scenario())
    assert context.code is Code.RESOURCE_EXHAUSTED
    assert "busy" in context.details and "retry in about" in context.details
    assert RETRY_HINT_MIN_SECONDS <= _retry_delay(context) <= RETRY_HINT_MAX_SECONDS
    assert _retry_delay(context) == pytest.approx(float(context.details.split()[-2]), abs=0.05)


def test_invalid_input_names_the_field_and_internal_errors_say_nothing() -> None:
    context = _aborted(InvalidAudioError("too long", field="audio.data"))
    assert context.code is Code.INVALID_ARGUMENT
    (detail,) = _status_details(context)
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["audio.data"]
    hidden = _aborted(StorageError("disk /var/lib/voxauth is full"))
    assert hidden.code is Code.INTERNAL
    assert "/var/lib" not in hidden.details
