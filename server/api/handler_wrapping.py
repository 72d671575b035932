"""Interceptor plumbing: wrapping a gRPC method handler's behaviour, whichever of the four kinds
it is. Both interceptors (access control, error mapping) need it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar, cast

import grpc

# The aliases are strings: grpc's classes are generic only in their type stubs.
# An interceptor sees every method of the server, so requests and responses are of any type.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
UnaryBehavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
"""A behaviour that returns one response (unary-unary, stream-unary)."""
StreamBehavior: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"
"""A behaviour that yields responses (unary-stream, stream-stream)."""

Request = TypeVar("Request")
Response = TypeVar("Response")
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Request, Response] | None"
"""What `intercept_service` returns: a method's handler, or None for a method not served."""
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler[Request, Response]]]"
)
"""The next step of `intercept_service`: the handler the rest of the chain chose, if any."""


def rewrap(
    handler: Handler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> Handler:
    """`handler` with its behaviour passed through `unary` or `stream`, as its kind needs."""
    # grpc.aio keeps coroutine functions in these fields; the stubs type them as the
    # synchronous server's callables, hence the casts.
    serializers: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        behavior = unary(cast(UnaryBehavior, handler.unary_unary))
        return grpc.unary_unary_rpc_method_handler(behavior, **serializers)
    if handler.stream_unary:
        behavior = unary(cast(UnaryBehavior, handler.stream_unary))
        return grpc.stream_unary_rpc_method_handler(behavior, **serializers)
    if handler.unary_stream:
        streaming = stream(cast(StreamBehavior, handler.unary_stream))
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    streaming = stream(cast(StreamBehavior, handler.stream_stream))
    return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
