"""Assembles and runs the gRPC server: store, model, servicers, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from enrollment.service import EnrollmentService
from models.ecapa import EcapaEmbedder
from models.embedder import SpeakerEmbedder
from models.fetch import default_model_dir
from server.channel import Channel
from server.clock import Clock, SystemClock
from server.config import ServerConfig
from server.crypto import VoiceprintCipher
from server.inference import InferencePool
from server.interceptors import ErrorMappingInterceptor
from server.scoring import Scorer, ScoringModel
from server.servicers import EnrollmentServicer, Readiness, Services, VerificationServicer
from server.shift_servicer import ShiftServicer
from server.shifts import ShiftService
from server.speech import QualityThresholds, SileroSpeechDetector
from server.sqlite_store import SqliteVoiceprintStore
from server.store import Store
from server.verification import VerificationService
from server.voice import VoiceAnalyser

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
    pb.DESCRIPTOR.services_by_name["VerificationService"].full_name,
    spb.DESCRIPTOR.services_by_name["ShiftService"].full_name,
)


class VoxauthServer:
    """One running voxauth server. `start()` binds the port at once and reports NOT_SERVING on
    the health service until the model is loaded; `stop()` drains in-flight calls."""

    def __init__(
        self,
        config: ServerConfig,
        key: bytes,
        *,
        load_embedder: Callable[[], SpeakerEmbedder] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._key = key
        self._load_embedder = load_embedder or (
            lambda: EcapaEmbedder.load(config.model_dir or default_model_dir())
        )
        self._clock = clock or SystemClock()
        self._readiness = Readiness()
        self._health = health.aio.HealthServicer()
        self._pool = InferencePool(config.inference)
        self._store: Store | None = None
        self._shifts: ShiftService | None = None
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
                # Pings find softphones that vanished without closing their shift stream, so
                # the stream is detached instead of waiting forever.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        pb_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentServicer(self.config.audio, self._pool, self._readiness), server
        )
        pb_grpc.add_VerificationServiceServicer_to_server(
            VerificationServicer(self._pool, self._readiness), server
        )
        spb_grpc.add_ShiftServiceServicer_to_server(ShiftServicer(self._readiness), server)
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

    async def _load_model(self, store: Store) -> None:
        started = asyncio.get_running_loop().time()
        embedder = await self._pool.run(self._load_embedder)
        detector = await self._pool.run(SileroSpeechDetector)
        analyser = VoiceAnalyser(embedder, detector, QualityThresholds(), self.config.audio)
        # Missing or mismatched cohort and calibration files stop the start here, clearly.
        scoring = await self._pool.run(
            lambda: ScoringModel.load(self.config.scoring, embedder.model_id)
        )
        scorer = Scorer(
            scoring, self.config.scoring, voiceprints=lambda: store.voiceprints(embedder.model_id)
        )
        now = self._clock.now
        verification = VerificationService(store, analyser, self.config.verification, scorer, now)
        self._shifts = ShiftService(
            store,
            verification,
            analyser,
            detector,
            self._pool,
            self.config.shifts,
            self._clock,
        )
        self._readiness.serve(
            Services(
                enrollment=EnrollmentService(store, analyser, self.config.enrollment, now),
                verification=verification,
                shifts=self._shifts,
            )
        )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        elapsed = asyncio.get_running_loop().time() - started
        log.info(
            "speaker model %s loaded in %.1f s; serving (target false-match rate %g, "
            "cohort of %d voices%s)",
            embedder.model_id,
            elapsed,
            self.config.scoring.target_fmr,
            len(scoring.cohort(Channel.WIDEBAND)),
            " and the enrolled agents" if self.config.scoring.cohort_includes_agents else "",
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
        if self._shifts is not None:
            await self._shifts.close()
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
