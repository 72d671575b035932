"""Wrapping a gRPC method handler's behaviour, whichever of the four kinds it is: the one piece
both interceptors (access control, error mapping) need."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

# grpc is untyped here (ServicerContext is Any to mypy), so the context is plainly Any.
UnaryBehavior = Callable[[Any, Any], Awaitable[Any]]
"""A behaviour that returns one response (unary-unary, stream-unary)."""
StreamBehavior = Callable[[Any, Any], AsyncIterator[Any]]
"""A behaviour that yields responses (unary-stream, stream-stream)."""


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour passed through `unary` or `stream`, as its kind needs."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **serializers)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **serializers)
