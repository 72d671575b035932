"""The HTTP side (server/api/http) on a real TLS socket on a free port: the JWKS as an MFA
provider fetches it, the health probes, and the attacks the hand-written JWKS server it
replaced was tested against (slow, oversized and malformed requests)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.testclient import TestClient

from server.api.http.app import RouteProvider, build_app
from server.api.http.errors import HTTP_STATUS_OF_CATEGORY
from server.api.http.health import HealthRoutes
from server.api.http.jwks import JWKS_PATH, JwksRoutes
from server.api.http.server import HttpServer, HttpTls, http_tls
from server.api.interceptors import STATUS_OF_CATEGORY
from server.api.readiness import Readiness
from server.config import HttpConfig, TransportConfig
from server.errors import AgentNotFoundError, ConfigurationError, StorageError, ThrottledError
from server.security.assurances import (
    AssurancePolicy,
    MemorySigningKeyStore,
    SigningKeyCipher,
    SigningKeyring,
    jwks_document,
)
from server.security.certificates import DevelopmentPki, create_pki
from tests.support import HttpAnswer, http_get, https_context

REQUEST_TIMEOUT_SECONDS = 0.3
T = TypeVar("T")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Side:
    base_url: str
    port: int
    tls: ssl.SSLContext
    keyring: SigningKeyring
    readiness: Readiness

    def get(self, path: str, method: str = "GET") -> HttpAnswer:
        return http_get(f"{self.base_url}{path}", self.tls, method)

    def raw(self, request: bytes, *, tls: bool = True) -> tuple[bytes, float]:
        """What the server sends a raw client, and after how many seconds it ends."""
        with contextlib.ExitStack() as stack:
            connection = stack.enter_context(
                socket.create_connection(("127.0.0.1", self.port), timeout=5)
            )
            if tls:
                connection = stack.enter_context(
                    self.tls.wrap_socket(connection, server_hostname="localhost")
                )
            # Timed from after the handshake: the request's time limit starts there.
            started = time.monotonic()
            connection.sendall(request)
            answer = b""
            try:
                while chunk := connection.recv(65536):
                    answer += chunk
            except (ConnectionResetError, ssl.SSLError):
                pass
            return answer, time.monotonic() - started


def _on_a_loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return loop, thread


def _run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[object, object, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(10)


@pytest.fixture
def side(pki: DevelopmentPki) -> Iterator[Side]:
    now = datetime.now(UTC)
    keyring = SigningKeyring.load(
        MemorySigningKeyStore(), SigningKeyCipher(bytes(32)), AssurancePolicy(), now
    )
    readiness = Readiness()
    providers: list[RouteProvider] = [
        JwksRoutes(lambda: jwks_document(keyring, datetime.now(UTC))),
        HealthRoutes(readiness),
    ]
    server = HttpServer(
        build_app(providers),
        HttpConfig(listen_address="127.0.0.1:0", request_timeout_seconds=REQUEST_TIMEOUT_SECONDS),
        HttpTls(pki.server_certificate, pki.server_key),
    )
    loop, thread = _on_a_loop_thread()
    port = _run(loop, server.start())
    try:
        yield Side(f"https://localhost:{port}", port, https_context(pki), keyring, readiness)
    finally:
        _run(loop, server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_serves_the_current_jwks_as_cacheable_json(side: Side) -> None:
    answer = side.get(JWKS_PATH)

    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "public, max-age=300"
    assert json.loads(answer.body) == {
        "keys": [side.keyring.published_keys(datetime.now(UTC))[0].public_jwk()]
    }

    # A rotation shows in the next answer: the document is made per request.
    side.keyring.rotate(datetime.now(UTC))
    assert len(json.loads((side.get(JWKS_PATH)).body)["keys"]) == 2

    head = side.get(JWKS_PATH, "HEAD")
    assert (head.status, head.body) == (200, b"")
    assert int(head.headers["content-length"]) > 0


def test_every_answer_has_a_request_id_and_the_security_headers(side: Side) -> None:
    for answer in (side.get(JWKS_PATH), side.get("/nowhere")):
        assert len(answer.headers["x-request-id"]) == 24
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["strict-transport-security"].startswith("max-age=")
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert (side.get("/healthz")).headers["cache-control"] == "no-store"


def test_a_well_formed_request_id_of_the_client_is_kept_and_a_hostile_one_replaced(
    side: Side,
) -> None:
    answer, _ = side.raw(
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: call-42:retry.1\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert b"\r\nx-request-id: call-42:retry.1\r\n" in answer
    answer, _ = side.raw(
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: a\x1b[2Jforged\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert b"forged" not in answer
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_answers_on_a_kept_alive_connection_do_not_wait_for_delayed_acks(
    side: Side, pki: DevelopmentPki
) -> None:
    # With Nagle on, each answer (head and body written apart) waited for the client's
    # delayed ACK: 40 ms or more per request on Linux, whatever the load.
    connection = http.client.HTTPSConnection("localhost", side.port, context=side.tls)
    times = []
    for _ in range(30):
        started = time.monotonic()
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b"ok\n"
        times.append(time.monotonic() - started)
    connection.close()
    assert statistics.median(times) < 0.030


def test_readyz_follows_the_readiness_of_the_grpc_health_service(side: Side) -> None:
    assert (side.get("/healthz")).status == 200
    assert (side.get("/readyz")).status == 503  # the model is loading
    side.readiness.serve(object())  # type: ignore[arg-type]
    assert (side.get("/readyz")).status == 200
    side.readiness.drain()
    assert (side.get("/readyz")).status == 503
    assert (side.get("/healthz")).status == 200


@pytest.mark.parametrize("path", ["/", "/jwks.json", "/.well-known/jwks.json/extra"])
def test_other_paths_are_not_found(side: Side, path: str) -> None:
    assert (side.get(path)).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_not_allowed(side: Side, method: str) -> None:
    answer = side.get(JWKS_PATH, method)
    assert answer.status == 405
    assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_a_client_that_does_not_finish_its_request_in_time_is_dropped(side: Side) -> None:
    answer, elapsed = side.raw(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: voxauth\r\n")
    assert answer == b""
    assert REQUEST_TIMEOUT_SECONDS <= elapsed < 2


def test_a_client_that_sends_nothing_is_dropped(side: Side) -> None:
    answer, elapsed = side.raw(b"")
    assert answer == b""
    assert REQUEST_TIMEOUT_SECONDS <= elapsed < 2


def test_a_client_that_never_completes_the_tls_handshake_is_dropped(side: Side) -> None:
    with socket.create_connection(("127.0.0.1", side.port), timeout=5) as plain:
        started = time.monotonic()
        plain.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert plain.recv(1024) == b""
        assert REQUEST_TIMEOUT_SECONDS <= time.monotonic() - started < 2


def test_a_body_that_never_ends_is_dropped(side: Side) -> None:
    answer, elapsed = side.raw(
        b"POST /healthz HTTP/1.1\r\nHost: voxauth\r\nContent-Length: 1000\r\n\r\nabc"
    )
    assert b" 200 " not in answer
    assert elapsed < 2


def test_an_oversized_request_is_refused_without_waiting(side: Side) -> None:
    answer, elapsed = side.raw(
        b"GET /.well-known/jwks.json HTTP/1.1\r\nX-Padding: " + b"a" * 20_000
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert elapsed < REQUEST_TIMEOUT_SECONDS


def test_a_malformed_request_line_is_a_bad_request(side: Side) -> None:
    answer, _ = side.raw(b"GET /.well-known/jwks.json\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_plain_http_on_the_tls_port_gets_no_answer(side: Side) -> None:
    answer, _ = side.raw(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: voxauth\r\n\r\n", tls=False)
    assert b"keys" not in answer


class _Clashing:
    def __init__(self, path: str) -> None:
        self._path = path

    def routes(self) -> Sequence[BaseRoute]:
        return JwksRoutes(lambda: {"keys": []}).routes()


def test_two_providers_cannot_serve_one_path() -> None:
    with pytest.raises(ConfigurationError, match=JWKS_PATH):
        build_app([_Clashing(JWKS_PATH), JwksRoutes(lambda: {"keys": []})])


def test_the_http_side_needs_tls_outside_development(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="VOXAUTH_TLS_CERT"):
        http_tls(TransportConfig())
    assert http_tls(TransportConfig(insecure_development=True)) is None


def test_every_error_category_has_an_http_status_as_it_has_a_grpc_one() -> None:
    assert set(HTTP_STATUS_OF_CATEGORY) == set(STATUS_OF_CATEGORY)


class _Failing:
    def routes(self) -> Sequence[BaseRoute]:
        async def throttled(request: Request) -> Response:
            raise ThrottledError(
                "too many failed verifications: retry in 30 s", retry_after_seconds=29.2
            )

        async def broken(request: Request) -> Response:
            raise StorageError("database /var/secret.db is locked")

        async def not_found(request: Request) -> Response:
            raise AgentNotFoundError("no agent 'a1'")

        return [
            Route("/throttled", throttled),
            Route("/broken", broken),
            Route("/missing", not_found),
        ]


def test_domain_errors_in_a_route_take_their_categorys_status() -> None:
    client = TestClient(build_app([_Failing()]), raise_server_exceptions=False)

    throttled = client.get("/throttled")
    assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "30")
    assert client.get("/missing").json() == {"error": "no agent 'a1'"}
    broken = client.get("/broken")
    assert broken.status_code == 500
    assert "secret" not in broken.text
    assert len(broken.headers["x-request-id"]) == 24
