"""The HTTP application: the routes of every provider behind the middleware every page needs.

To add pages, write a route provider (an object with `routes()`, e.g. server/api/http/jwks.py)
and add it to the list the composition root (server/app.py, `_http_routes`) hands to
`build_app`. Paths must not clash: `build_app` refuses a path two providers both serve.

A route raises domain errors (server/errors.py); server/api/http/errors.py gives each its
category's status, as server/api/interceptors.py does for gRPC. What every response gets
here, so no provider can forget it:
- a request id (`X-Request-Id`: the client's if well formed, else a fresh one), set for the
  logs of the whole request (server/runtime/request_context.py);
- headers against sniffing, framing, referrer leaks and foreign or inline scripts (a default
  Content-Security-Policy a route may replace with its own), `Cache-Control: no-store` unless
  the route chose its own caching, and HSTS when served over TLS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.http.errors import voxauth_error_response
from server.errors import ConfigurationError, VoxauthError
from server.runtime.request_context import (
    REQUEST_ID_HEADER,
    acceptable_request_id,
    request_scope,
)

log = logging.getLogger(__name__)


class RouteProvider(Protocol):
    """A part of the HTTP side: the routes it serves."""

    def routes(self) -> Sequence[BaseRoute]: ...


_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    # Pages may load their own scripts and styles, nothing inline or from elsewhere, and may
    # not be framed; a route that needs more sets its own policy.
    (
        b"content-security-policy",
        b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
)
_HSTS = (b"strict-transport-security", b"max-age=31536000")


def build_app(providers: Sequence[RouteProvider]) -> ASGIApp:
    """The application serving every provider's routes. Raises ConfigurationError when two
    routes claim one path."""
    routes: list[BaseRoute] = []
    seen: set[str] = set()
    for provider in providers:
        for route in provider.routes():
            path = route.path if isinstance(route, Route | Mount) else None
            if path is not None:
                if path in seen:
                    raise ConfigurationError(f"two HTTP routes serve {path}")
                seen.add(path)
            routes.append(route)
    application = Starlette(
        routes=routes, exception_handlers={VoxauthError: voxauth_error_response}
    )
    return ResponseHeaders(application)


class ResponseHeaders:
    """ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers streamed answers):
    the request id and the security headers of every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        offered = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = acceptable_request_id(offered)
        tls = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                headers.extend(h for h in _SECURITY_HEADERS if h[0] not in names)
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                if tls:
                    headers.append(_HSTS)
                message = {**message, "headers": headers}
            await send(message)

        with request_scope(request_id):
            await self._app(scope, receive, send_with_headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            # Latin-1 maps every byte, so any header decodes; the id check refuses odd ones.
            decoded: str = value.decode("latin-1")
            return decoded
    return None
