"""The composition root: builds the store, the model and the domain services, and hands them to
the gRPC server (server/api/grpc_server.py). It owns no logic of its own."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta

from enrollment.listing import AgentDirectory
from enrollment.passive import PassiveEnrollment
from enrollment.service import EnrollmentService
from enrollment.watchlist import WatchlistService, expire_watchlist
from models.countermeasure import Countermeasure
from models.embedder import SpeakerEmbedder
from models.factory import load_countermeasure as load_countermeasure_model
from models.factory import load_speaker_embedder
from models.fetch import default_countermeasure_dir, default_model_dir
from server.api.console.routes import ConsoleRoutes
from server.api.grpc_server import GrpcServer
from server.api.http.app import RouteProvider, build_app
from server.api.http.health import HealthRoutes
from server.api.http.jwks import JwksRoutes
from server.api.http.metrics import MetricsRoutes
from server.api.http.server import HttpServer, http_tls
from server.api.metrics import Metrics
from server.api.readiness import Readiness, Services
from server.audit_actions import AuditAction
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
from server.runtime.log_format import PSEUDONYMS
from server.runtime.requests import RequestLedger
from server.runtime.store_pool import StorePool
from server.scoring.gallery import GallerySearch
from server.scoring.scorer import Scorer, ScoringModel
from server.scoring.watchlist import WatchlistScreen
from server.security.assurance_desk import AssuranceDesk
from server.security.assurances import (
    KEYRING_SYNC_SECONDS,
    AssurancePolicy,
    SigningKeyCipher,
    SigningKeyring,
)
from server.security.audit import AuditKey
from server.security.config_audit import record_configuration
from server.security.crypto import VoiceprintCipher, derive_subkey
from server.security.identity import TokenFile
from server.shifts.event_bus import EventBus, StoreEventBus
from server.shifts.service import ShiftService
from server.storage.databases import event_wakeups, open_store
from server.storage.interface import AuditEvent, Store
from server.verification.replay import ReplayGuard
from server.verification.retention import expire_unused_voiceprints
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle

log = logging.getLogger(__name__)

_RETENTION_PERIOD_SECONDS = 86_400.0
# HKDF info of the listings' page-token key: changing it invalidates tokens in flight only.
_PAGE_TOKEN_PURPOSE = "voxauth listing page tokens v1"
_STORE_PROBE_SECONDS = 1.0
_STORE_PROBE_TIMEOUT_SECONDS = 2.0


def _forget_pseudonyms_on_erasure(event: AuditEvent) -> None:
    # A new key for the log's agent pseudonyms: the erased agent's lines become unlinkable.
    if event.action == AuditAction.AGENT_DELETE:
        PSEUDONYMS.forget()
        log.info("agent erased: agent pseudonyms in the log from now on are new")


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
                backend=config.presentation.backend_path,
                workers=config.inference.workers,
                threads=config.inference.threads,
            )
        )
        self._presentation: PresentationAttackDetector | None = None
        self._clock = clock or SystemClock()
        self._readiness = Readiness()
        self.metrics = Metrics()
        """What /metrics serves."""
        self._inference = InferencePool(config.inference, self.metrics)
        self._store_pool = StorePool(config.store, self.metrics)
        live = self.metrics.live
        live.inference_in_flight = lambda: self._inference.in_flight
        live.inference_queued = lambda: self._inference.queued
        live.ready = self._readiness.is_ready
        self.audio_budget = AudioBudget(config.audio.budget_mib * 2**20)
        """The audio all calls in progress hold together."""
        self._api = GrpcServer(
            config,
            self._readiness,
            self._inference,
            self._store_pool,
            self._clock,
            self.audio_budget,
            self.metrics,
            derive_subkey(self._key, _PAGE_TOKEN_PURPOSE),
        )
        self._store: Store | None = None
        self._shifts: ShiftService | None = None
        self._http: HttpServer | None = None
        self._console: ConsoleRoutes | None = None
        self._events: EventBus | None = None
        self._retention: asyncio.Task[None] | None = None
        self._key_sync: asyncio.Task[None] | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self.port = 0
        self.token_port = 0
        self.http_port = 0

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
                connections=self.config.store.workers,
            )
        )
        self._store = store
        # Decisions, locks and refusals are counted from their audit records as they commit.
        store.on_audit(self.metrics.audit_committed)
        store.on_audit(_forget_pseudonyms_on_erasure)
        free_failures = self.config.throttle.free_failures
        self.metrics.live.census = lambda: store.census(free_failures)
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
        if self.config.http.listen_address:
            self._http = HttpServer(
                build_app(self._http_routes(assurances, audit)),
                self.config.http,
                http_tls(self.config.transport),
            )
            try:
                self.http_port = await self._http.start()
            except BaseException:
                # The gRPC side already listens: close it, or it outlives the failed start.
                self._http = None
                await self.stop(grace=0)
                raise
        host = self.config.listen_address.rsplit(":", 1)[0]
        log.info("voxauth listening on %s:%d (loading the speaker model)", host, self.port)
        try:
            await self._load_model(store, assurances)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._retention = asyncio.create_task(self._expire_voiceprints(store), name="retention")
        self._key_sync = asyncio.create_task(
            self._follow_signing_keys(keyring), name="signing-key-sync"
        )
        self._store_watch = asyncio.create_task(self._watch_store(store), name="store-health")
        return self.port

    def _http_routes(
        self, assurances: AssuranceDesk, audit: Callable[[AuditEvent], Awaitable[None]]
    ) -> list[RouteProvider]:
        """What the HTTP side serves (server/api/http/app.py says how to add to it)."""
        tokens = self.config.transport.tokens_file
        self._console = ConsoleRoutes(
            self._readiness,
            TokenFile(tokens, self._clock) if tokens else None,
            audit,
            self._clock,
            self.config,
            [AuditKey(known) for known in (self._key, *self._previous_keys)],
            self._store_pool,
        )
        return [
            JwksRoutes(assurances.jwks),
            HealthRoutes(self._readiness),
            MetricsRoutes(self.metrics, self._store_pool.run),
            self._console,
        ]

    async def _watch_store(self, store: Store) -> None:
        """Health follows the store: NOT_SERVING while a cheap read fails or takes over
        _STORE_PROBE_TIMEOUT_SECONDS (a shared PostgreSQL restarting), SERVING again once it
        answers, so a balancer stops sending calls this replica could only fail."""
        reachable = True
        probe: asyncio.Future[int] | None = None
        while True:
            await asyncio.sleep(_STORE_PROBE_SECONDS)
            if probe is None or probe.done():
                if probe is not None and not probe.cancelled():
                    probe.exception()  # Seen (below, or by the wait that timed out).
                # One probe at a time: a hung one holds a store thread until it times out.
                probe = asyncio.ensure_future(self._store_pool.run(store.latest_event_id))
            try:
                await asyncio.wait_for(asyncio.shield(probe), _STORE_PROBE_TIMEOUT_SECONDS)
                ok = True
            except (TimeoutError, VoxauthError):
                ok = False
            if ok != reachable:
                reachable = ok
                if ok:
                    log.info("the store answers again: serving")
                    await self._api.serving()
                else:
                    log.error("the store does not answer: NOT_SERVING until it does")
                    await self._api.not_serving()

    async def _follow_signing_keys(self, keyring: SigningKeyring) -> None:
        """Other replicas on the store may rotate the signing key: follow the stored keyring,
        so this replica's JWKS publishes their keys too (server/security/assurances.py)."""
        while True:
            await self._clock.sleep_until(self._clock.monotonic() + KEYRING_SYNC_SECONDS)
            try:
                await self._store_pool.run(keyring.sync)
            except VoxauthError as error:
                log.warning("cannot follow the stored signing keys: %s", error.message)

    async def _expire_voiceprints(self, store: Store) -> None:
        """Voiceprints unused for longer than the retention period go: now, then daily."""
        while True:
            try:
                await self._store_pool.run(
                    lambda: expire_unused_voiceprints(
                        store, self.config.retention, self._clock.now()
                    )
                )
                await self._store_pool.run(lambda: expire_watchlist(store, self._clock.now()))
            except VoxauthError as error:
                log.error("voiceprint expiry failed: %s", error.message)
            await self._clock.sleep_until(self._clock.monotonic() + _RETENTION_PERIOD_SECONDS)

    async def _load_model(self, store: Store, assurances: AssuranceDesk) -> None:
        started = asyncio.get_running_loop().time()
        embedder = await self._inference.run(self._load_embedder)
        detector = await self._inference.run(
            lambda: SileroSpeechDetector(streams=self.config.inference.workers)
        )
        countermeasure = await self._inference.run(self._load_countermeasure)
        policy = self.config.presentation
        # A calibration of another countermeasure stops the start here, clearly.
        calibration = await self._inference.run(
            lambda: PadCalibration.load(
                policy.calibration_path or default_pad_calibration_path(), countermeasure.model_id
            )
        )
        self._presentation = PresentationAttackDetector(
            countermeasure,
            calibration,
            policy,
            workers=self.config.inference.workers,
            telemetry=self.metrics,
        )
        analyser = VoiceAnalyser(
            embedder,
            detector,
            QualityThresholds(),
            self.config.audio,
            self._presentation,
            telemetry=self.metrics,
        )
        self.metrics.models_loaded(embedder.model_id, countermeasure.model_id)
        # Missing or mismatched cohort and calibration files stop the start here, clearly.
        scoring = await self._inference.run(
            lambda: ScoringModel.load(self.config.scoring, embedder.model_id)
        )
        scorer = Scorer(
            scoring, self.config.scoring, voiceprints=lambda: store.voiceprints(embedder.model_id)
        )
        now = self._clock.now
        throttle = VerificationThrottle(store, self.config.throttle)
        gallery = GallerySearch(scorer)
        enrolling = self.config.enrollment
        watchlist = WatchlistScreen(store, gallery, enrolling.watchlist_false_alarm, now)
        verification = VerificationService(
            store,
            analyser,
            self.config.verification,
            scorer,
            now,
            throttle,
            ReplayGuard(store, policy) if policy.replay_detection else None,
            watchlist,
        )
        events: EventBus = StoreEventBus(
            store,
            self._store_pool,
            event_wakeups(self.config.database_path),
            self._clock,
            self.config.retention.shift_event_retention_hours * 3600.0,
        )
        await events.open()
        self._events = events
        enrollment = EnrollmentService(store, analyser, enrolling, now, gallery, watchlist)
        self._shifts = ShiftService(
            store,
            verification,
            analyser,
            detector,
            self._inference,
            self._store_pool,
            self.config.shifts,
            self._clock,
            events,
            assurances,
            PassiveEnrollment(store, enrollment, analyser, enrolling),
            telemetry=self.metrics,
        )
        self._readiness.serve(
            Services(
                enrollment=enrollment,
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
                agents=AgentDirectory(store, self.config.enrollment, self.config.retention),
                watchlist=WatchlistService(store, analyser, enrolling, now),
            )
        )
        await self._api.serving()
        elapsed = asyncio.get_running_loop().time() - started
        log.info(
            "speaker model %s loaded in %.1f s; serving (target false-match rate %g, "
            "cohort of %d voices%s; countermeasure %s, %s, target BPCER %g wideband, %g "
            "telephone: thresholds wideband %+.2f, telephone %+.2f)",
            embedder.model_id,
            elapsed,
            self.config.scoring.target_fmr,
            len(scoring.cohort(Channel.WIDEBAND)),
            " and the enrolled agents" if self.config.scoring.cohort_includes_agents else "",
            countermeasure.model_id,
            policy.mode,
            policy.target_bpcer,
            policy.target_bpcer_telephone,
            self._presentation.threshold(Channel.WIDEBAND),
            self._presentation.threshold(Channel.TELEPHONE),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first so balancers drain, then in-flight calls finish."""
        if self._retention is not None:
            self._retention.cancel()
        if self._key_sync is not None:
            self._key_sync.cancel()
        if self._store_watch is not None:
            self._store_watch.cancel()
        await self._api.stop(self.config.shutdown_grace_seconds if grace is None else grace)
        if self._http is not None:
            await self._http.stop()
        if self._console is not None:
            await self._console.close()
        self._readiness.withdraw()
        if self._shifts is not None:
            await self._shifts.close()
        if self._events is not None:
            await self._events.close()
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
