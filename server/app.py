"""Assembles and runs the gRPC server: store, model, servicers, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from enrollment.service import EnrollmentService
from models.ecapa import EcapaEmbedder
from models.embedder import SpeakerEmbedder
from models.fetch import default_model_dir
from server.config import ServerConfig
from server.crypto import VoiceprintCipher
from server.inference import InferencePool
from server.interceptors import ErrorMappingInterceptor
from server.servicers import EnrollmentServicer, Readiness, Services, VerificationServicer
from server.speech import QualityThresholds, SileroSpeechDetector
from server.sqlite_store import SqliteVoiceprintStore
from server.store import VoiceprintStore
from server.verification import VerificationService
from server.voice import VoiceAnalyser

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
    pb.DESCRIPTOR.services_by_name["VerificationService"].full_name,
)


def utc_now() -> datetime:
    return datetime.now(UTC)


class VoxauthServer:
    """One running voxauth server. `start()` binds the port at once and reports NOT_SERVING on
    the health service until the model is loaded; `stop()` drains in-flight calls."""

    def __init__(
        self,
        config: ServerConfig,
        key: bytes,
        *,
        load_embedder: Callable[[], SpeakerEmbedder] | None = None,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self._key = key
        self._load_embedder = load_embedder or (
            lambda: EcapaEmbedder.load(config.model_dir or default_model_dir())
        )
        self._now = now
        self._readiness = Readiness()
        self._health = health.aio.HealthServicer()
        self._pool = InferencePool(config.inference)
        self._store: VoiceprintStore | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        # Opening the store first means a bad key or database stops the start before any port
        # is open.
        self._store = SqliteVoiceprintStore.open(
            self.config.database_path, VoiceprintCipher(self._key)
        )
        max_bytes = self.config.audio.max_encoded_bytes
        server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ],
        )
        pb_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentServicer(self.config.audio, self._pool, self._readiness), server
        )
        pb_grpc.add_VerificationServiceServicer_to_server(
            VerificationServicer(self._pool, self._readiness), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(self.config.listen_address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen_address}")
        await server.start()
        self._server = server
        host = self.config.listen_address.rsplit(":", 1)[0]
        log.info("voxauth listening on %s:%d (loading the speaker model)", host, self.port)
        try:
            await self._load_model(self._store)
        except BaseException:
            await self.stop(grace=0)
            raise
        return self.port

    async def _load_model(self, store: VoiceprintStore) -> None:
        started = asyncio.get_running_loop().time()
        embedder = await self._pool.run(self._load_embedder)
        detector = await self._pool.run(SileroSpeechDetector)
        analyser = VoiceAnalyser(embedder, detector, QualityThresholds(), self.config.audio)
        self._readiness.serve(
            Services(
                enrollment=EnrollmentService(store, analyser, self.config.enrollment, self._now),
                verification=VerificationService(
                    store, analyser, self.config.verification, self._now
                ),
            )
        )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        elapsed = asyncio.get_running_loop().time() - started
        log.info(
            "speaker model %s loaded in %.1f s; serving (threshold %.3f)",
            embedder.model_id,
            elapsed,
            self.config.verification.threshold,
        )

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await self._health.set("", status)
        for name in SERVICE_NAMES:
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first so balancers drain, then in-flight calls finish."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_seconds if grace is None else grace)
        self._readiness.withdraw()
        self._pool.shutdown()
        if self._store is not None:
            self._store.close()
        log.info("voxauth stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(server: VoxauthServer) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    log.info("shutdown requested; draining in-flight calls")
    await server.stop()
