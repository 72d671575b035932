"""Requests whose bytes are not the protobuf message their method takes.

grpc parses a request before any behaviour runs, and a parse error there ends the call as
UNKNOWN, naming protobuf's DecodeError, with an ERROR and a traceback in the log for each call:
anyone who can open a connection could flood the log. The interceptor here wraps the parser of
every method: bytes that do not parse become a `MalformedMessage`, which the method's behaviour
refuses with INVALID_ARGUMENT ("the request is not a valid <type> message"). That happens in the
behaviour, after the access check, so a caller without an identity or a role still gets
UNAUTHENTICATED or PERMISSION_DENIED (audited, as every refusal is) and learns nothing more.

Each malformed request is counted (`MalformedRequests.count`, for a metrics exporter) and not
audited (it changes nothing and is not about anyone); the first of a burst is logged at WARNING,
and the others of its window are summed up in one line when the window closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.api.handler_wrapping import (
    Context,
    Continuation,
    Handler,
    MethodHandler,
    Request,
    Response,
    check_requests,
)
from server.errors import MalformedMessageError
from server.runtime.clock import Clock, SystemClock

log = logging.getLogger(__name__)

LOG_WINDOW_SECONDS = 60.0
"""After a malformed request is logged, the next ones for this long are only counted."""


@dataclass(frozen=True)
class MalformedMessage:
    """What a method's parser gives for bytes that are not its request message."""

    message_type: str


class MalformedRequests:
    """Counts the malformed requests refused, and logs them at most once per window: the first
    at once, the number of the others when the window closes."""

    def __init__(self, clock: Clock | None = None, window_seconds: float = LOG_WINDOW_SECONDS):
        self._clock = clock or SystemClock()
        self._window_seconds = window_seconds
        self._count = 0
        self._unlogged = 0
        self._window: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """Malformed requests refused since the server started."""
        return self._count

    def refuse(self, method: str, message_type: str, peer: str) -> MalformedMessageError:
        """Counts one malformed request, logs it if it opens a window, and gives the error that
        ends its call. Runs on the server's event loop."""
        self._count += 1
        if self._window is None:
            log.warning(
                "refused %s from %s: INVALID_ARGUMENT: not a valid %s message (more in the next "
                "%g s are counted, then summed up)",
                method,
                peer,
                message_type,
                self._window_seconds,
            )
            self._window = asyncio.get_running_loop().create_task(
                self._close_window(), name="malformed-requests-window"
            )
        else:
            self._unlogged += 1
        return MalformedMessageError(f"the request is not a valid {message_type} message")

    async def _close_window(self) -> None:
        try:
            await self._clock.sleep_until(self._clock.monotonic() + self._window_seconds)
        finally:
            self._window = None
            if self._unlogged:
                log.warning(
                    "refused %d more malformed requests since the one logged before "
                    "(%d since the start)",
                    self._unlogged,
                    self._count,
                )
                self._unlogged = 0

    async def close(self) -> None:
        """Closes the open window now, summing it up (the server is stopping)."""
        window = self._window
        if window is not None:
            window.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await window


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Refuses malformed requests with INVALID_ARGUMENT (server/errors.py MalformedMessageError).

    Goes last in the server's interceptors: its refusals are raised from the behaviour, behind
    the access check and inside the error mapping."""

    def __init__(self, malformed: MalformedRequests) -> None:
        self._malformed = malformed

    async def intercept_service(
        self,
        continuation: Continuation[Request, Response],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler[Request, Response]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            # No handler: UNIMPLEMENTED; no parser: the method takes raw bytes.
            return handler
        checked: Handler = refuse_malformed(
            handler, handler_call_details.method, handler.request_deserializer, self._malformed
        )
        return checked


def refuse_malformed(
    handler: Handler,
    method: str,
    parse: Callable[[bytes], Any],
    malformed: MalformedRequests,
) -> Handler:
    """`handler` with a parser that never raises, and a behaviour that refuses what it could not
    parse."""
    message_type = _message_type(parse)

    def tolerant_parse(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return MalformedMessage(message_type)

    def one(request: Any, context: Context) -> Any:
        if isinstance(request, MalformedMessage):
            raise malformed.refuse(method, request.message_type, context.peer())
        return request

    async def stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for request in requests:
            yield one(request, context)

    return check_requests(handler, tolerant_parse, one, stream)


def _message_type(parse: Callable[[bytes], Any]) -> str:
    # Generated code registers `<Message>.FromString`, a method bound to the message class.
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    return full_name if isinstance(full_name, str) else "protobuf"
