"""What every gRPC call leaves for operations: a request id that its log lines carry
(server/runtime/request_context.py), its count and latency by method and status code
(server/api/metrics.py), and one log line when it ends.

The outermost interceptor, so it sees every status, access refusals and mapped domain errors
alike. Only methods the server serves are counted (a handler was found): a caller cannot make
up method names to grow the metrics without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

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
from server.api.metrics import Metrics
from server.runtime.request_context import REQUEST_ID_HEADER, acceptable_request_id, request_scope

log = logging.getLogger(__name__)

_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
"""Probes and tooling: their calls are logged at DEBUG, so balancers do not flood the log."""


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Continuation[Request, Response],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler[Request, Response]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        offered = _metadata_value(handler_call_details, REQUEST_ID_HEADER)
        call = _Call(method, offered, self._metrics)
        return rewrap(handler, call.unary, call.stream)


class _Call:
    def __init__(self, method: str, offered_id: str | None, metrics: Metrics | None) -> None:
        self._method = method
        self._offered = offered_id
        self._metrics = metrics

    def unary(self, behavior: UnaryBehavior) -> UnaryBehavior:
        async def observed(request: Any, context: Context) -> Any:
            with request_scope(acceptable_request_id(self._offered, _field_id(request))):
                started = time.monotonic()
                try:
                    response = await behavior(request, context)
                except BaseException as error:
                    self._ended(started, _code_after(error, context))
                    raise
                self._ended(started, _code_after(None, context))
                return response

        return observed

    def stream(self, behavior: StreamBehavior) -> StreamBehavior:
        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            with request_scope(acceptable_request_id(self._offered, _field_id(request))):
                started = time.monotonic()
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    self._ended(started, _code_after(error, context))
                    raise
                self._ended(started, _code_after(None, context))

        return observed

    def _ended(self, started: float, code: grpc.StatusCode) -> None:
        elapsed = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.rpcs.labels(self._method, code.name).inc()
            self._metrics.rpc_seconds.labels(self._method).observe(elapsed)
        quiet = self._method.startswith(_QUIET_PREFIXES)
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "rpc %s %s %.1f ms",
            self._method,
            code.name,
            elapsed * 1000,
        )


_CODE_OF_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def _code_after(error: BaseException | None, context: Context) -> grpc.StatusCode:
    """The status the call ends with: what an abort or the servicer set, else OK, or for an
    exception that escapes every interceptor, CANCELLED or UNKNOWN as grpc answers them."""
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int) and code in _CODE_OF_VALUE:
        return _CODE_OF_VALUE[code]
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _field_id(request: Any) -> str | None:
    """A mutating request's own `request_id` (what makes its retry safe) names it too."""
    if not isinstance(request, Message):
        return None  # A stream of requests: the metadata's id or a fresh one.
    if "request_id" not in request.DESCRIPTOR.fields_by_name:
        return None
    value = getattr(request, "request_id", None)
    return value if isinstance(value, str) else None


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key and isinstance(value, str):
            return value
    return None
