"""Interceptor plumbing: wrapping a gRPC method handler's behaviour, or checking its requests,
whichever of the four kinds it is. Every interceptor of the server (access control, error
mapping, malformed requests) needs it."""

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
    return _rebuilt(
        handler,
        handler.request_deserializer,
        unary_unary=unary,
        stream_unary=unary,
        unary_stream=stream,
        stream_stream=stream,
    )


def _rebuilt(
    handler: Handler,
    request_deserializer: Callable[[bytes], Any] | None,
    *,
    unary_unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream_unary: Callable[[UnaryBehavior], UnaryBehavior],
    unary_stream: Callable[[StreamBehavior], StreamBehavior],
    stream_stream: Callable[[StreamBehavior], StreamBehavior],
) -> Handler:
    """A handler of `handler`'s kind, reading requests with `request_deserializer`, whose
    behaviour is its own passed through the wrapper for that kind."""
    # grpc.aio keeps coroutine functions in these fields; the stubs type them as the
    # synchronous server's callables, hence the casts.
    serializers: dict[str, Any] = {
        "request_deserializer": request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        behavior = unary_unary(cast(UnaryBehavior, handler.unary_unary))
        return grpc.unary_unary_rpc_method_handler(behavior, **serializers)
    if handler.stream_unary:
        behavior = stream_unary(cast(UnaryBehavior, handler.stream_unary))
        return grpc.stream_unary_rpc_method_handler(behavior, **serializers)
    if handler.unary_stream:
        streaming = unary_stream(cast(StreamBehavior, handler.unary_stream))
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    streaming = stream_stream(cast(StreamBehavior, handler.stream_stream))
    return grpc.stream_stream_rpc_method_handler(streaming, **serializers)


OneRequest: TypeAlias = "Callable[[Any, Context], Any]"
"""Checks the one request of a method that takes one, and gives the request to serve."""
RequestStream: TypeAlias = "Callable[[AsyncIterator[Any], Context], AsyncIterator[Any]]"
"""Wraps the request iterator of a method that takes a stream of requests."""


def check_requests(
    handler: Handler,
    request_deserializer: Callable[[bytes], Any],
    one: OneRequest,
    stream: RequestStream,
) -> Handler:
    """`handler` reading its requests with `request_deserializer`, each one passed through `one`
    (methods taking one request) or the request iterator through `stream` (methods taking a
    stream) before its behaviour sees them. A request that `one` refuses, or that the iterator
    refuses while the behaviour reads it, raises out of the behaviour, as its own errors do."""

    def one_unary(behavior: UnaryBehavior) -> UnaryBehavior:
        async def checked(request: Any, context: Context) -> Any:
            return await behavior(one(request, context), context)

        return checked

    def one_streaming(behavior: StreamBehavior) -> StreamBehavior:
        async def checked(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behavior(one(request, context), context):
                yield response

        return checked

    def many_unary(behavior: UnaryBehavior) -> UnaryBehavior:
        async def checked(requests: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(stream(requests, context), context)

        return checked

    def many_streaming(behavior: StreamBehavior) -> StreamBehavior:
        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for response in behavior(stream(requests, context), context):
                yield response

        return checked

    return _rebuilt(
        handler,
        request_deserializer,
        unary_unary=one_unary,
        stream_unary=many_unary,
        unary_stream=one_streaming,
        stream_stream=many_streaming,
    )
