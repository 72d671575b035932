"""The JWKS over HTTP: a real socket on a free port, fetched with urllib as a provider would."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import Message

import pytest

from server.api.jwks_http import JwksHttpServer
from server.security.assurances import (
    AssurancePolicy,
    MemorySigningKeyStore,
    SigningKeyCipher,
    SigningKeyring,
    jwks_document,
)

EXCHANGE_TIMEOUT_SECONDS = 0.3


def serve(scenario: Callable[[SigningKeyring, str], Awaitable[None]]) -> None:
    """Runs the scenario against a JWKS server for a fresh keyring, at http://127.0.0.1:PORT."""
    now = datetime.now(UTC)
    keyring = SigningKeyring.load(
        MemorySigningKeyStore(), SigningKeyCipher(bytes(32)), AssurancePolicy(), now
    )

    async def run() -> None:
        server = JwksHttpServer(
            lambda: jwks_document(keyring, now),
            exchange_timeout_seconds=EXCHANGE_TIMEOUT_SECONDS,
            max_request_head_bytes=1024,
        )
        port = await server.start("127.0.0.1", 0)
        try:
            await scenario(keyring, f"http://127.0.0.1:{port}")
        finally:
            await server.stop()

    asyncio.run(run())


def fetch(url: str, method: str = "GET") -> tuple[int, Message, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as got:
            return got.status, got.headers, got.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.headers, refused.read()


async def fetch_async(url: str, method: str = "GET") -> tuple[int, Message, bytes]:
    return await asyncio.to_thread(fetch, url, method)


async def send_raw(base_url: str, request: bytes) -> tuple[bytes, float]:
    """What the server sends back to a raw client, and after how many seconds it ends."""
    host, port = base_url.removeprefix("http://").split(":")
    # Timed from before the connection exists, so the server's time limit lies within it.
    started = asyncio.get_running_loop().time()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    try:
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    except ConnectionResetError:
        answer = b""
    elapsed = asyncio.get_running_loop().time() - started
    writer.close()
    return answer, elapsed


def test_serves_the_current_jwks_as_cacheable_json() -> None:
    async def scenario(keyring: SigningKeyring, base_url: str) -> None:
        status, headers, body = await fetch_async(f"{base_url}/.well-known/jwks.json")

        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "max-age=300"
        assert json.loads(body) == {
            "keys": [keyring.published_keys(datetime.now(UTC))[0].public_jwk()]
        }

        # A rotation shows in the next answer: the document is made per request.
        keyring.rotate(datetime.now(UTC))
        _, _, body = await fetch_async(f"{base_url}/.well-known/jwks.json")
        assert len(json.loads(body)["keys"]) == 2

        status, headers, body = await fetch_async(f"{base_url}/.well-known/jwks.json", "HEAD")
        assert (status, body) == (200, b"")
        assert int(headers["Content-Length"]) > 0

    serve(scenario)


@pytest.mark.parametrize("path", ["/", "/jwks.json", "/.well-known/jwks.json/extra"])
def test_other_paths_are_not_found(path: str) -> None:
    async def scenario(keyring: SigningKeyring, base_url: str) -> None:
        status, _, _ = await fetch_async(f"{base_url}{path}")
        assert status == 404

    serve(scenario)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_not_allowed(method: str) -> None:
    async def scenario(keyring: SigningKeyring, base_url: str) -> None:
        status, headers, _ = await fetch_async(f"{base_url}/.well-known/jwks.json", method)
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"

    serve(scenario)


def test_a_client_that_does_not_finish_its_request_in_time_is_dropped() -> None:
    async def scenario(keyring: SigningKeyring, base_url: str) -> None:
        answer, elapsed = await send_raw(
            base_url, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: voxauth\r\n"
        )
        assert answer == b""
        assert EXCHANGE_TIMEOUT_SECONDS <= elapsed < 2

    serve(scenario)


def test_an_oversized_request_is_dropped_without_waiting() -> None:
    async def scenario(keyring: SigningKeyring, base_url: str) -> None:
        answer, elapsed = await send_raw(
            base_url, b"GET /.well-known/jwks.json HTTP/1.1\r\nX-Padding: " + b"a" * 4096
        )
        assert answer == b""
        assert elapsed < EXCHANGE_TIMEOUT_SECONDS

    serve(scenario)


def test_a_malformed_request_line_is_a_bad_request() -> None:
    async def scenario(keyring: SigningKeyring, base_url: str) -> None:
        answer, _ = await send_raw(base_url, b"GET /.well-known/jwks.json\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")

    serve(scenario)
