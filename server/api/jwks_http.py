"""The JWKS document over plain HTTP/1.1, for MFA providers that fetch verification keys by URL
(`GET /.well-known/jwks.json`). Public data only, so no authentication.

Deliberately tiny (one request per connection, no keep-alive, no body read) and hard to hold:
the request head is bounded in size, and a client that has not sent it, or not taken the
answer, within the time limit is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus

from server.security.assurances import JwksDocument

logger = logging.getLogger(__name__)

JWKS_PATH = b"/.well-known/jwks.json"
_ALLOWED_METHODS = (b"GET", b"HEAD")
_HEAD_END = b"\r\n\r\n"


class JwksHttpServer:
    def __init__(
        self,
        jwks: Callable[[], JwksDocument],
        *,
        exchange_timeout_seconds: float = 5.0,
        max_request_head_bytes: int = 8192,
        cache_max_age_seconds: int = 300,
    ) -> None:
        """`jwks` is called per request, so a rotation shows at once. `cache_max_age_seconds`
        bounds how long a provider keeps a copy: a new key is unknown to it for up to that
        long unless it refetches on an unknown kid."""
        self._jwks = jwks
        self._exchange_timeout = exchange_timeout_seconds
        self._max_head = max_request_head_bytes
        self._cache_max_age = cache_max_age_seconds
        self._server: asyncio.Server | None = None
        self._exchanges: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0 picks a free port); returns the port."""
        self._server = await asyncio.start_server(self._exchange, host, port, limit=self._max_head)
        port_bound: int = self._server.sockets[0].getsockname()[1]
        logger.info("serving the JWKS on http://%s:%d%s", host, port_bound, JWKS_PATH.decode())
        return port_bound

    async def stop(self) -> None:
        """Stops listening and drops the connections still open."""
        if self._server is None:
            return
        self._server.close()
        for exchange in list(self._exchanges):
            exchange.cancel()
        await asyncio.gather(*self._exchanges, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs each connection in its own task
        self._exchanges.add(task)
        try:
            async with asyncio.timeout(self._exchange_timeout):
                head = await reader.readuntil(_HEAD_END)
                writer.write(self._answer(head))
                await writer.drain()
        except (
            TimeoutError,
            asyncio.LimitOverrunError,
            asyncio.IncompleteReadError,
            ConnectionError,
        ):
            # Too slow, too long, or gone: drop without an answer, so such a client costs no
            # more than the time limit.
            pass
        finally:
            writer.close()
            self._exchanges.discard(task)

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(HTTPStatus.BAD_REQUEST, b"bad request line\n")
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != JWKS_PATH:
            return _response(HTTPStatus.NOT_FOUND, b"not found\n")
        if method not in _ALLOWED_METHODS:
            return _response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                headers=[("Allow", b", ".join(_ALLOWED_METHODS).decode())],
            )
        body = json.dumps(self._jwks(), separators=(",", ":"), sort_keys=True).encode()
        return _response(
            HTTPStatus.OK,
            body,
            content_type="application/json",
            headers=[("Cache-Control", f"max-age={self._cache_max_age}")],
            send_body=method == b"GET",
        )


def _response(
    status: HTTPStatus,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
    send_body: bool = True,
) -> bytes:
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers or []),
    ]
    return "\r\n".join(lines).encode("ascii") + _HEAD_END + (body if send_body else b"")
