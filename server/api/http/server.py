"""Runs the HTTP application with uvicorn on the caller's event loop (beside the grpc.aio
server), over TLS with the gRPC port's server certificate.

uvicorn is driven through its protocol and shutdown API rather than `serve()`, which would
install its own signal handlers over `voxauth serve`'s and run a loop of its own. Its HTTP/1.1
parsing is h11's. What uvicorn does not bound is bounded here, as the hand-written server this
replaces did: the TLS handshake, and a request that never finishes arriving
(`_BoundedH11Protocol`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import HttpConfig, TransportConfig
from server.errors import ConfigurationError

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16 * 1024
"""A longer request head is answered 400 at once (h11's bound on an incomplete event)."""
MAX_CONNECTIONS = 256
"""Connections and requests in progress beyond this are answered 503."""
_SHUTDOWN_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class HttpTls:
    certificate: Path
    private_key: Path


def http_tls(transport: TransportConfig) -> HttpTls | None:
    """The server certificate of the gRPC port, for the HTTP side; None (plain HTTP) only in
    insecure development mode. Raises ConfigurationError when TLS is due but not configured."""
    if transport.insecure_development:
        return None
    if transport.tls_certificate is None or transport.tls_private_key is None:
        raise ConfigurationError(
            "the HTTP side needs TLS: set VOXAUTH_TLS_CERT and VOXAUTH_TLS_KEY, or turn it off "
            "with VOXAUTH_HTTP_LISTEN="
        )
    return HttpTls(transport.tls_certificate, transport.tls_private_key)


class HttpServer:
    """`start()` binds and serves at once; `stop()` closes the port and the connections."""

    def __init__(self, app: ASGIApp, config: HttpConfig, tls: HttpTls | None) -> None:
        self._app = app
        self._config = config
        self._tls = tls
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    async def start(self) -> int:
        """Listens on the configured host:port; returns the port (0 picks a free one)."""
        host, port = _host_and_port(self._config.listen_address)
        timeout = self._config.request_timeout_seconds

        class Protocol(_BoundedH11Protocol):
            request_timeout_seconds = timeout

        uvicorn_config = uvicorn.Config(
            self._app,
            http=Protocol,
            lifespan="off",
            # voxauth's logging stays as configured; requests are logged by the application.
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            # No proxy is trusted to name the client.
            proxy_headers=False,
            ws="none",
            limit_concurrency=MAX_CONNECTIONS,
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=int(_SHUTDOWN_GRACE_SECONDS),
            ssl_certfile=None if self._tls is None else self._tls.certificate,
            ssl_keyfile=None if self._tls is None else self._tls.private_key,
        )
        try:
            uvicorn_config.load()
        except (OSError, ValueError) as error:
            # ssl's errors are OSErrors: an unreadable or mismatched certificate and key.
            raise ConfigurationError(f"cannot serve HTTP over TLS: {error}") from error
        server = uvicorn.Server(uvicorn_config)
        server.lifespan = uvicorn_config.lifespan_class(uvicorn_config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listening = socket.create_server((host, port), family=family)
        except OSError as error:
            # Most often another voxauth (or anything) on the port: say so, not a traceback.
            raise ConfigurationError(
                f"cannot listen for HTTP on {host}:{port}: {error.strerror or error}"
                " (VOXAUTH_HTTP_LISTEN; empty turns the HTTP side off)"
            ) from error
        listening.setblocking(False)
        loop = asyncio.get_running_loop()

        def connection() -> asyncio.Protocol:
            return Protocol(
                config=uvicorn_config, server_state=server.server_state, app_state={}, _loop=loop
            )

        # Listening as uvicorn's startup() does, plus a bound on the TLS handshake, which
        # uvicorn leaves at asyncio's 60 s: a client that connects and never completes it
        # holds a descriptor no longer than a slow request would.
        try:
            listener = await loop.create_server(
                connection,
                sock=listening,
                ssl=uvicorn_config.ssl,
                ssl_handshake_timeout=timeout if uvicorn_config.ssl else None,
                backlog=uvicorn_config.backlog,
            )
        except BaseException:
            listening.close()
            raise
        server.servers = [listener]
        server.started = True
        self._server, self._socket = server, listening
        self.port = listening.getsockname()[1]
        scheme = "http" if self._tls is None else "https"
        if self._tls is None:
            log.warning("INSECURE DEVELOPMENT MODE: the HTTP side speaks plain HTTP")
        log.info("HTTP side on %s://%s:%d", scheme, host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stops listening; answers in progress get a moment to finish, then are cut."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await server.shutdown(sockets=[self._socket] if self._socket else None)
        self._socket = None


def _host_and_port(address: str) -> tuple[str, int]:
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        raise ConfigurationError(f"VOXAUTH_HTTP_LISTEN must be host:port, not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a time limit on receiving each request: from the
    connection (or the first byte of a next request) to the end of its body. A client that
    has not sent it all by then is dropped unanswered, so one that trickles bytes, or sends
    nothing, holds a connection for no longer than the limit."""

    request_timeout_seconds = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio turns Nagle off only on sockets it made for TCP by name; the listening
        # socket made here leaves it on, and each answer (head and body written apart) then
        # waited for the client's delayed ACK: 40 ms a request.
        connection = transport.get_extra_info("socket")
        if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._receiving():
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _receiving(self) -> bool:
        # IDLE with bytes buffered: a request head begun; SEND_BODY: its body still coming.
        state = self.conn.their_state
        return (state is h11.IDLE and bool(self.conn.trailing_data[0])) or state is h11.SEND_BODY

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout_seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        state = self.conn.their_state
        if state is h11.IDLE and self.cycle is not None and not self._receiving():
            return  # Between requests: the keep-alive timeout's business.
        if state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.info("HTTP client %s dropped: request not received in time", _peer(self.client))
            self.transport.close()


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"
