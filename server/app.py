"""The composition root: builds the store, the model and the domain services, and hands them to
the gRPC server (server/api/grpc_server.py). It owns no logic of its own."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import timedelta

from enrollment.service import EnrollmentService
from models.countermeasure import Countermeasure
from models.embedder import SpeakerEmbedder
from models.factory import load_countermeasure as load_countermeasure_model
from models.factory import load_speaker_embedder
from models.fetch import default_countermeasure_dir, default_model_dir
from server.api.grpc_server import GrpcServer
from server.api.jwks_http import JwksHttpServer
from server.api.readiness import Readiness, Services
from server.config import MfaConfig, ServerConfig
from server.errors import VoxauthError
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.channel import Channel
from server.pipeline.presentation import (
    PadCalibration,
    PresentationAttackDetector,
    default_pad_calibration_path,
)

# Before the inference pool is built: importing silero_vad sets torch's threads for the whole
# process, and the pool then sets the count the configuration asks for.
from server.pipeline.silero import SileroSpeechDetector
from server.pipeline.speech import QualityThresholds
from server.runtime.audio_budget import AudioBudget
from server.runtime.clock import Clock, SystemClock
from server.runtime.inference import InferencePool
from server.runtime.requests import RequestLedger
from server.runtime.store_pool import StorePool
from server.scoring.scorer import Scorer, ScoringModel
from server.security.assurance_desk import AssuranceDesk
from server.security.assurances import AssurancePolicy, SigningKeyCipher, SigningKeyring
from server.security.audit import AuditKey
from server.security.config_audit import record_configuration
from server.security.crypto import VoiceprintCipher
from server.shifts.service import ShiftService
from server.storage.interface import AuditEvent, Store
from server.storage.sqlite import open_store
from server.verification.replay import ReplayGuard
from server.verification.retention import expire_unused_voiceprints
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle

log = logging.getLogger(__name__)

_RETENTION_PERIOD_SECONDS = 86_400.0


def _assurance_policy(config: MfaConfig) -> AssurancePolicy:
    return AssurancePolicy(
        issuer=config.issuer,
        token_lifetime=timedelta(seconds=config.token_lifetime_seconds),
        key_rotation_interval=timedelta(days=config.key_rotation_days),
    )


class VoxauthServer:
    """One running voxauth server. `start()` binds the port at once and reports NOT_SERVING on
    the health service until the model is loaded; `stop()` drains in-flight calls."""

    def __init__(
        self,
        config: ServerConfig,
        key: bytes,
        *,
        previous_keys: tuple[bytes, ...] = (),
        load_embedder: Callable[[], SpeakerEmbedder] | None = None,
        load_countermeasure: Callable[[], Countermeasure] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._key = key
        self._previous_keys = previous_keys
        self._load_embedder = load_embedder or (
            lambda: load_speaker_embedder(
                config.model_dir or default_model_dir(),
                workers=config.inference.workers,
                threads=config.inference.threads,
            )
        )
        # PAD runs on its own thread beside the embedding (server/pipeline/presentation.py),
        # one stream per inference worker.
        self._load_countermeasure = load_countermeasure or (
            lambda: load_countermeasure_model(
                config.countermeasure_dir or default_countermeasure_dir(),
                workers=config.inference.workers,
                threads=config.inference.threads,
            )
        )
        self._presentation: PresentationAttackDetector | None = None
        self._clock = clock or SystemClock()
        self._readiness = Readiness()
        self._inference = InferencePool(config.inference)
        self._store_pool = StorePool(config.store)
        self.audio_budget = AudioBudget(config.audio.budget_mib * 2**20)
        """The audio all calls in progress hold together."""
        self._api = GrpcServer(
            config,
            self._readiness,
            self._inference,
            self._store_pool,
            self._clock,
            self.audio_budget,
        )
        self._store: Store | None = None
        self._shifts: ShiftService | None = None
        self._jwks_http: JwksHttpServer | None = None
        self._retention: asyncio.Task[None] | None = None
        self.port = 0
        self.token_port = 0
        self.jwks_port = 0

    @property
    def services(self) -> Services | None:
        """The domain services, once the model is loaded (the in-process benchmarks use them)."""
        return self._readiness.current()

    async def start(self) -> int:
        # Opening the store (and the signing keys in it) first means a bad key or database
        # stops the start before any port is open.
        store = await self._store_pool.run(
            lambda: open_store(
                self.config.database_path,
                VoiceprintCipher(self._key, self._previous_keys),
                audit_key=AuditKey(self._key),
            )
        )
        self._store = store
        keyring = await self._store_pool.run(
            lambda: SigningKeyring.load(
                store,
                SigningKeyCipher(self._key, self._previous_keys),
                _assurance_policy(self.config.mfa),
                self._clock.now(),
            )
        )
        assurances = AssuranceDesk(store, keyring, self.config.mfa.audience, self._clock)
        if await self._store_pool.run(
            lambda: record_configuration(store, self.config.as_json(), self._clock.now())
        ):
            log.info("configuration differs from the last start: recorded in the audit log")

        async def audit(event: AuditEvent) -> None:
            await self._store_pool.run(lambda: store.append_audit(event))

        await self._api.start(audit)
        self.port, self.token_port = self._api.port, self._api.token_port
        if self.config.mfa.jwks_listen_address:
            host, port = self.config.mfa.jwks_listen_address.rsplit(":", 1)
            self._jwks_http = JwksHttpServer(assurances.jwks)
            self.jwks_port = await self._jwks_http.start(host, int(port))
        host = self.config.listen_address.rsplit(":", 1)[0]
        log.info("voxauth listening on %s:%d (loading the speaker model)", host, self.port)
        try:
            await self._load_model(store, assurances)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._retention = asyncio.create_task(self._expire_voiceprints(store), name="retention")
        return self.port

    async def _expire_voiceprints(self, store: Store) -> None:
        """Voiceprints unused for longer than the retention period go: now, then daily."""
        while True:
            try:
                await self._store_pool.run(
                    lambda: expire_unused_voiceprints(
                        store, self.config.retention, self._clock.now()
                    )
                )
            except VoxauthError as error:
                log.error("voiceprint expiry failed: %s", error.message)
            await self._clock.sleep_until(self._clock.monotonic() + _RETENTION_PERIOD_SECONDS)

    async def _load_model(self, store: Store, assurances: AssuranceDesk) -> None:
        started = asyncio.get_running_loop().time()
        embedder = await self._inference.run(self._load_embedder)
        detector = await self._inference.run(SileroSpeechDetector)
        countermeasure = await self._inference.run(self._load_countermeasure)
        policy = self.config.presentation
        # A calibration of another countermeasure stops the start here, clearly.
        calibration = await self._inference.run(
            lambda: PadCalibration.load(
                policy.calibration_path or default_pad_calibration_path(), countermeasure.model_id
            )
        )
        self._presentation = PresentationAttackDetector(
            countermeasure, calibration, policy, workers=self.config.inference.workers
        )
        analyser = VoiceAnalyser(
            embedder, detector, QualityThresholds(), self.config.audio, self._presentation
        )
        # Missing or mismatched cohort and calibration files stop the start here, clearly.
        scoring = await self._inference.run(
            lambda: ScoringModel.load(self.config.scoring, embedder.model_id)
        )
        scorer = Scorer(
            scoring, self.config.scoring, voiceprints=lambda: store.voiceprints(embedder.model_id)
        )
        now = self._clock.now
        throttle = VerificationThrottle(store, self.config.throttle)
        verification = VerificationService(
            store,
            analyser,
            self.config.verification,
            scorer,
            now,
            throttle,
            ReplayGuard(store, policy) if policy.replay_detection else None,
        )
        self._shifts = ShiftService(
            store,
            verification,
            analyser,
            detector,
            self._inference,
            self._store_pool,
            self.config.shifts,
            self._clock,
            assurances,
        )
        self._readiness.serve(
            Services(
                enrollment=EnrollmentService(store, analyser, self.config.enrollment, now),
                verification=verification,
                shifts=self._shifts,
                assurances=assurances,
                throttle=throttle,
                store=store,
                requests=RequestLedger(
                    store,
                    self._store_pool,
                    timedelta(hours=self.config.retention.request_id_retention_hours),
                    self._clock,
                ),
            )
        )
        await self._api.serving()
        elapsed = asyncio.get_running_loop().time() - started
        log.info(
            "speaker model %s loaded in %.1f s; serving (target false-match rate %g, "
            "cohort of %d voices%s; countermeasure %s, %s, target BPCER %g: thresholds "
            "wideband %+.2f, telephone %+.2f)",
            embedder.model_id,
            elapsed,
            self.config.scoring.target_fmr,
            len(scoring.cohort(Channel.WIDEBAND)),
            " and the enrolled agents" if self.config.scoring.cohort_includes_agents else "",
            countermeasure.model_id,
            policy.mode,
            policy.target_bpcer,
            self._presentation.threshold(Channel.WIDEBAND),
            self._presentation.threshold(Channel.TELEPHONE),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first so balancers drain, then in-flight calls finish."""
        if self._retention is not None:
            self._retention.cancel()
        await self._api.stop(self.config.shutdown_grace_seconds if grace is None else grace)
        if self._jwks_http is not None:
            await self._jwks_http.stop()
        self._readiness.withdraw()
        if self._shifts is not None:
            await self._shifts.close()
        self._inference.shutdown()
        if self._presentation is not None:
            self._presentation.close()
        if self._store is not None:
            await self._store_pool.run(self._store.close)
            self._store = None
        self._store_pool.shutdown()
        log.info("voxauth stopped")

    async def wait_for_termination(self) -> None:
        await self._api.wait_for_termination()


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
