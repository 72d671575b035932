"""The gRPC server: the five voxauth services behind access control and error mapping, health
(NOT_SERVING until the domain is ready, and again while draining) and reflection, on the main
port and, where configured, the bearer-token port."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from voxauth.v1 import admin_pb2, admin_pb2_grpc, assurances_pb2, assurances_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.api.access import (
    AccessInterceptor,
    AuditSink,
    CredentialResolver,
    DevelopmentResolver,
    IdentityResolver,
)
from server.api.admin_servicer import AdminServicer
from server.api.assurance_servicer import AssuranceServicer
from server.api.enrollment_servicer import EnrollmentServicer
from server.api.interceptors import ErrorMappingInterceptor
from server.api.malformed_requests import MalformedRequestInterceptor, MalformedRequests
from server.api.metrics import Metrics
from server.api.observability import ObservingInterceptor
from server.api.readiness import Readiness
from server.api.shift_servicer import ShiftServicer
from server.api.tls import server_credentials
from server.api.verification_servicer import VerificationServicer
from server.config import ServerConfig, TransportConfig
from server.errors import ConfigurationError
from server.runtime.audio_budget import AudioBudget
from server.runtime.clock import Clock
from server.runtime.inference import InferencePool
from server.runtime.store_pool import StorePool
from server.security.identity import TokenFile

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
    pb.DESCRIPTOR.services_by_name["VerificationService"].full_name,
    spb.DESCRIPTOR.services_by_name["ShiftService"].full_name,
    assurances_pb2.DESCRIPTOR.services_by_name["AssuranceService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


class GrpcServer:
    """`start()` binds the ports and answers at once, health saying NOT_SERVING and every RPC
    UNAVAILABLE until `serving()`; `stop()` turns health to NOT_SERVING, then drains."""

    def __init__(
        self,
        config: ServerConfig,
        readiness: Readiness,
        inference: InferencePool,
        store_pool: StorePool,
        clock: Clock,
        audio_budget: AudioBudget,
        metrics: Metrics | None = None,
        page_token_key: bytes | None = None,
    ) -> None:
        """`metrics` counts and times every call; None for none. `page_token_key` seals
        listing page tokens: the same on every replica, so a page fetched from one continues
        on another (None: a key of this process's own)."""
        self._config = config
        self._page_token_key = page_token_key
        self._metrics = metrics
        self._readiness = readiness
        self._inference = inference
        self._store_pool = store_pool
        self._audio_budget = audio_budget
        self._clock = clock
        self._health = health.aio.HealthServicer()
        self.malformed_requests = MalformedRequests(clock)
        """Requests refused as not the message their method takes (a count to export)."""
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.token_port = 0

    async def start(self, audit: AuditSink) -> None:
        """Listens and answers; `audit` records the calls that access control refuses."""
        config = self._config
        transport = config.transport
        access = AccessInterceptor(_resolver(transport, self._clock), audit, self._clock)
        server = grpc.aio.server(
            # Observing first, so it sees every call's status (and each call has its request
            # id for the logs of what follows). Access next: an unknown or unauthorised
            # caller reaches nothing else. Malformed requests last: refused behind the access
            # check, through the error mapping.
            interceptors=[
                ObservingInterceptor(self._metrics),
                access,
                ErrorMappingInterceptor(),
                MalformedRequestInterceptor(self.malformed_requests),
            ],
            options=[
                ("grpc.max_receive_message_length", config.audio.max_encoded_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                # Pings find softphones that vanished without closing their shift stream, so
                # the stream is detached instead of waiting forever.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        readiness, inference, store_pool = self._readiness, self._inference, self._store_pool
        pb_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentServicer(
                config.audio,
                inference,
                store_pool,
                readiness,
                self._audio_budget,
                config.streams,
                self._clock,
                self._page_token_key,
            ),
            server,
        )
        pb_grpc.add_VerificationServiceServicer_to_server(
            VerificationServicer(inference, readiness), server
        )
        spb_grpc.add_ShiftServiceServicer_to_server(
            ShiftServicer(readiness, config.streams, self._clock), server
        )
        assurances_pb2_grpc.add_AssuranceServiceServicer_to_server(
            AssuranceServicer(readiness, store_pool), server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(readiness, config, self._clock, store_pool, inference), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _listen(server, transport, config.listen_address, client_auth=True)
        if transport.token_listen_address:
            self.token_port = _listen(
                server, transport, transport.token_listen_address, client_auth=False
            )
        await server.start()
        self._server = server

    async def serving(self) -> None:
        """Health says SERVING: the domain services are in `readiness`."""
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """Health says NOT_SERVING while the domain is ready but cannot work (its store is
        unreachable), so balancers send calls elsewhere; `serving()` again once it can. No
        effect once draining."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await self._health.set("", status)
        for name in SERVICE_NAMES:
            await self._health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Graceful: NOT_SERVING first so balancers drain, then in-flight calls get `grace`
        seconds to finish."""
        self._readiness.drain()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.malformed_requests.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _resolver(transport: TransportConfig, clock: Clock) -> IdentityResolver:
    if transport.insecure_development:
        return DevelopmentResolver()
    # A bad token file stops the start; once started, one reloaded bad keeps the last good.
    tokens = TokenFile(transport.tokens_file, clock) if transport.tokens_file else None
    return CredentialResolver(tokens, clock)


def _listen(
    server: grpc.aio.Server, transport: TransportConfig, address: str, *, client_auth: bool
) -> int:
    """Binds `address`: mutual TLS (or TLS with bearer tokens when `client_auth` is off), or
    plain text only in insecure development mode."""
    if transport.insecure_development:
        log.warning(
            "INSECURE DEVELOPMENT MODE: %s speaks plain text and every caller has every role. "
            "Never use this outside one developer's machine.",
            address,
        )
        port = server.add_insecure_port(address)
    else:
        paths = (transport.tls_certificate, transport.tls_private_key, transport.client_ca)
        if None in paths:
            raise ConfigurationError(
                "TLS is required: set VOXAUTH_TLS_CERT, VOXAUTH_TLS_KEY and "
                "VOXAUTH_TLS_CLIENT_CA (`voxauth certs init` makes a development set), or run "
                "`voxauth serve --insecure-dev` on a development machine"
            )
        certificate, private_key, client_ca = (p for p in paths if p is not None)
        credentials = server_credentials(
            certificate, private_key, client_ca, require_client_auth=client_auth
        )
        port = server.add_secure_port(address, credentials)
    if not port:
        raise ConfigurationError(f"cannot listen on {address} (in use, or not an address here)")
    return port
