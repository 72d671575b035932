"""Service configuration: frozen, documented dataclasses, read from the environment.

Every setting has a default that is safe for a single-node deployment; `VOXAUTH_*` environment
variables (listed on each field) override them, and `voxauth serve` flags override those.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from server.errors import ConfigurationError

# Chosen with `voxauth eval` on 251 LibriSpeech speakers (see README, "Accuracy"): the lowest
# cosine threshold whose false-match rate on that set is at most 1 in 1,000.
DEFAULT_THRESHOLD = 0.46


@dataclass(frozen=True)
class AudioLimits:
    """Bounds on one piece of input audio."""

    max_seconds: float = 60.0
    """Longest audio in one request or streamed utterance (VOXAUTH_MAX_AUDIO_SECONDS)."""

    @property
    def max_encoded_bytes(self) -> int:
        """Bytes that `max_seconds` of the bulkiest accepted input can take (48 kHz stereo
        32-bit WAV) plus headroom for headers: larger input is refused before decoding."""
        return int(self.max_seconds * 48_000 * 2 * 4) + 1024 * 1024


@dataclass(frozen=True)
class EnrollmentPolicy:
    """What enrollment asks for before a voiceprint is built."""

    required_net_speech_seconds: float = 20.0
    """Net speech (silence excluded) needed to finalize (VOXAUTH_ENROLL_NET_SPEECH_SECONDS)."""

    min_utterance_net_speech_seconds: float = 2.0
    """An utterance with less net speech is not kept: too short to embed reliably."""

    max_pending_utterances: int = 32
    """Bound on pending utterances per agent, so a runaway client cannot fill the store."""

    consistency_threshold: float = DEFAULT_THRESHOLD
    """An utterance whose cosine to the others' mean is below this is rejected as not the same
    speaker. Defaults to the verification threshold: an utterance that would not verify against
    the rest of the enrollment does not belong in the voiceprint."""


@dataclass(frozen=True)
class VerificationPolicy:
    """How a score becomes a decision."""

    threshold: float = DEFAULT_THRESHOLD
    """Cosine below which an enrollment utterance is taken for another speaker's
    (VOXAUTH_THRESHOLD). Verification decides by ScoringPolicy.target_fmr instead."""

    min_net_speech_seconds: float = 3.0
    """Less net speech than this gives INCONCLUSIVE (VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS)."""


@dataclass(frozen=True)
class ScoringPolicy:
    """How a cosine becomes a decision: AS-norm against a cohort, calibration, and a threshold
    set by the false-match rate the operator accepts (see README, "Accuracy")."""

    target_fmr: float = 1e-4
    """False-match rate the threshold is set for (VOXAUTH_TARGET_FMR); 1 in 10,000 is NIST
    SP 800-63B's bar for biometrics."""

    scoring_dir: Path | None = None
    """Cohort and calibration made by `voxauth calibrate`; None means the ones shipped in
    models/scoring/ (VOXAUTH_SCORING_DIR)."""

    cohort_includes_agents: bool = False
    """Also normalise against the enrolled agents' own voiceprints, the claimed agent's left
    out (VOXAUTH_COHORT_AGENTS=1). Off by default: the calibration was measured with the
    shipped cohort alone."""

    cohort_refresh_seconds: float = 300.0
    """How old the agents' part of the cohort may grow before it is read again."""


@dataclass(frozen=True)
class ShiftPolicy:
    """Re-verification during a shift: when checkpoints fall, what they need, what locks."""

    mean_checkpoint_interval_seconds: float = 600.0
    """Average time between checkpoints (VOXAUTH_CHECKPOINT_MEAN_SECONDS)."""

    checkpoint_jitter_seconds: float = 480.0
    """Each interval is the mean plus a uniform random offset within +/- this, drawn from the
    operating system's cryptographic source (VOXAUTH_CHECKPOINT_JITTER_SECONDS)."""

    min_checkpoint_gap_seconds: float = 120.0
    """No interval is shorter than this (VOXAUTH_CHECKPOINT_MIN_GAP_SECONDS)."""

    checkpoint_net_speech_seconds: float = 8.0
    """Net speech a checkpoint verifies: the most recent, silence excluded."""

    max_audio_age_seconds: float = 90.0
    """Audio older than this is discarded unused; bounds each shift's buffer (at 16 kHz
    16-bit, 90 s is 2.9 MB)."""

    speech_wait_seconds: float = 120.0
    """How long a due checkpoint waits for enough speech before INSUFFICIENT_SPEECH."""

    speech_recheck_seconds: float = 5.0
    """While waiting, how much new audio arrives between two looks for speech."""

    max_consecutive_failures: int = 2
    """Failed checkpoints in a row that lock the shift (VOXAUTH_LOCK_AFTER_FAILURES)."""

    idle_stream_seconds: float = 600.0
    """A shift with no stream attached for this long is dropped from memory (its state stays
    stored; the softphone resumes it by reconnecting)."""

    max_pending_events: int = 64
    """Events queued for a stream that does not read them; beyond, the oldest are dropped
    (they are all in the audit log and the shift state)."""


@dataclass(frozen=True)
class InferenceLimits:
    """The bounded executor that runs decoding and the model off the event loop."""

    workers: int = 2
    """Requests worked on at once, one per core (VOXAUTH_WORKERS)."""

    threads: int = 1
    """Intra-op threads of each worker's inference, for OpenVINO and torch alike
    (VOXAUTH_THREADS). On the 2-core reference machine one thread per worker with two workers
    embeds the most audio per second (see README, "Speed"; `voxauth bench --throughput`
    measures it on yours)."""

    max_queued: int = 32
    """Requests waiting beyond the workers; more get RESOURCE_EXHAUSTED (VOXAUTH_MAX_QUEUED)."""


@dataclass(frozen=True)
class StoreLimits:
    """The store's own threads, apart from inference (server/runtime/store_pool.py)."""

    workers: int = 4
    """Store calls worked on at once (VOXAUTH_STORE_WORKERS). The SQLite store runs one
    statement at a time on its connection; more threads let sealing, done outside its lock,
    overlap, and a burst of calls waits here."""


@dataclass(frozen=True)
class ThrottlePolicy:
    """Limits on guessing at a voice, as NIST SP 800-63B-4 asks of biometrics: consecutive
    failed verification attempts of one agent delay its next attempt, then disable it."""

    free_failures: int = 5
    """Consecutive failures allowed without delay (VOXAUTH_THROTTLE_FREE_FAILURES)."""

    base_delay_seconds: float = 30.0
    """Wait after the last free failure; it doubles with each further failure
    (VOXAUTH_THROTTLE_DELAY_SECONDS)."""

    max_delay_seconds: float = 86_400.0
    """The doubling stops at one day (VOXAUTH_THROTTLE_MAX_DELAY_SECONDS)."""

    disable_after_failures: int = 50
    """Consecutive failures that disable the agent's biometric verification until an
    administrator re-enables it (VOXAUTH_THROTTLE_DISABLE_AFTER)."""


@dataclass(frozen=True)
class RetentionPolicy:
    """How long biometric data is kept."""

    voiceprint_ttl_days: float = 1095.0
    """A voiceprint no check has scored against for this long is erased: three years
    (VOXAUTH_VOICEPRINT_TTL_DAYS)."""


@dataclass(frozen=True)
class TransportConfig:
    """How callers reach the server and prove who they are."""

    tls_certificate: Path | None = None
    """The server's certificate, PEM (VOXAUTH_TLS_CERT)."""

    tls_private_key: Path | None = None
    """Its private key, PEM (VOXAUTH_TLS_KEY)."""

    client_ca: Path | None = None
    """The CA that issues client certificates; callers must present one (VOXAUTH_TLS_CLIENT_CA)."""

    token_listen_address: str = ""
    """A second TLS port for callers that cannot do mutual TLS and send a bearer token
    instead; empty for none (VOXAUTH_TOKEN_LISTEN)."""

    tokens_file: Path | None = None
    """Hashes of the accepted bearer tokens and their roles (VOXAUTH_TOKENS_FILE)."""

    insecure_development: bool = False
    """Plain text and every caller with every role: for development on one machine only
    (`voxauth serve --insecure-dev`). Logged loudly."""


@dataclass(frozen=True)
class MfaConfig:
    """Signed assurances for the MFA provider."""

    audience: str = "mfa"
    """The `aud` claim: the MFA provider's identifier (VOXAUTH_ASSURANCE_AUDIENCE)."""

    issuer: str = "voxauth"
    """The `iss` claim (VOXAUTH_ASSURANCE_ISSUER)."""

    token_lifetime_seconds: float = 8 * 3600.0
    """How long an assurance is valid: one shift (VOXAUTH_ASSURANCE_LIFETIME_SECONDS)."""

    key_rotation_days: float = 30.0
    """Age at which the signing key is replaced (VOXAUTH_SIGNING_KEY_ROTATION_DAYS)."""

    jwks_listen_address: str = "127.0.0.1:8080"
    """host:port of the HTTP endpoint /.well-known/jwks.json; empty for none
    (VOXAUTH_JWKS_LISTEN)."""


@dataclass(frozen=True)
class ServerConfig:
    listen_address: str = "127.0.0.1:50051"
    """host:port to listen on; port 0 picks a free port (VOXAUTH_LISTEN)."""

    database_path: Path = Path("var/voxauth.db")
    """SQLite file of the embedded store (VOXAUTH_DB)."""

    model_dir: Path | None = None
    """Verified model files; None means models.fetch.default_model_dir() (VOXAUTH_MODEL_DIR)."""

    shutdown_grace_seconds: float = 10.0
    """On SIGTERM, in-flight calls get this long to finish."""

    audio: AudioLimits = field(default_factory=AudioLimits)
    enrollment: EnrollmentPolicy = field(default_factory=EnrollmentPolicy)
    verification: VerificationPolicy = field(default_factory=VerificationPolicy)
    scoring: ScoringPolicy = field(default_factory=ScoringPolicy)
    inference: InferenceLimits = field(default_factory=InferenceLimits)
    store: StoreLimits = field(default_factory=StoreLimits)
    shifts: ShiftPolicy = field(default_factory=ShiftPolicy)
    transport: TransportConfig = field(default_factory=TransportConfig)
    mfa: MfaConfig = field(default_factory=MfaConfig)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)

    def as_json(self) -> str:
        """The effective configuration as JSON. It holds no secrets: keys come from the
        environment and are never part of ServerConfig."""
        return json.dumps(dataclasses.asdict(self), default=_plain, sort_keys=True, indent=2)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if env is None else env
        base = cls()
        model_dir = env.get("VOXAUTH_MODEL_DIR")
        threshold = _float(env, "VOXAUTH_THRESHOLD", base.verification.threshold)
        transport = TransportConfig(
            tls_certificate=_path(env, "VOXAUTH_TLS_CERT"),
            tls_private_key=_path(env, "VOXAUTH_TLS_KEY"),
            client_ca=_path(env, "VOXAUTH_TLS_CLIENT_CA"),
            token_listen_address=env.get("VOXAUTH_TOKEN_LISTEN", ""),
            tokens_file=_path(env, "VOXAUTH_TOKENS_FILE"),
        )
        mfa = MfaConfig(
            audience=env.get("VOXAUTH_ASSURANCE_AUDIENCE", base.mfa.audience),
            issuer=env.get("VOXAUTH_ASSURANCE_ISSUER", base.mfa.issuer),
            token_lifetime_seconds=_float(
                env, "VOXAUTH_ASSURANCE_LIFETIME_SECONDS", base.mfa.token_lifetime_seconds
            ),
            key_rotation_days=_float(
                env, "VOXAUTH_SIGNING_KEY_ROTATION_DAYS", base.mfa.key_rotation_days
            ),
            jwks_listen_address=env.get("VOXAUTH_JWKS_LISTEN", base.mfa.jwks_listen_address),
        )
        return replace(
            base,
            transport=transport,
            mfa=mfa,
            listen_address=env.get("VOXAUTH_LISTEN", base.listen_address),
            database_path=Path(env.get("VOXAUTH_DB", str(base.database_path))),
            model_dir=Path(model_dir) if model_dir else None,
            audio=AudioLimits(
                max_seconds=_float(env, "VOXAUTH_MAX_AUDIO_SECONDS", base.audio.max_seconds)
            ),
            enrollment=replace(
                base.enrollment,
                required_net_speech_seconds=_float(
                    env,
                    "VOXAUTH_ENROLL_NET_SPEECH_SECONDS",
                    base.enrollment.required_net_speech_seconds,
                ),
                consistency_threshold=threshold,
            ),
            verification=VerificationPolicy(
                threshold=threshold,
                min_net_speech_seconds=_float(
                    env,
                    "VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS",
                    base.verification.min_net_speech_seconds,
                ),
            ),
            scoring=_scoring(env, base.scoring),
            throttle=_throttle(env, base.throttle),
            retention=_retention(env, base.retention),
            shifts=replace(
                base.shifts,
                mean_checkpoint_interval_seconds=_float(
                    env,
                    "VOXAUTH_CHECKPOINT_MEAN_SECONDS",
                    base.shifts.mean_checkpoint_interval_seconds,
                ),
                checkpoint_jitter_seconds=_float(
                    env, "VOXAUTH_CHECKPOINT_JITTER_SECONDS", base.shifts.checkpoint_jitter_seconds
                ),
                min_checkpoint_gap_seconds=_float(
                    env,
                    "VOXAUTH_CHECKPOINT_MIN_GAP_SECONDS",
                    base.shifts.min_checkpoint_gap_seconds,
                ),
                max_consecutive_failures=_int(
                    env, "VOXAUTH_LOCK_AFTER_FAILURES", base.shifts.max_consecutive_failures
                ),
            ),
            inference=InferenceLimits(
                workers=_int(env, "VOXAUTH_WORKERS", base.inference.workers),
                threads=_int(env, "VOXAUTH_THREADS", base.inference.threads),
                max_queued=_int(env, "VOXAUTH_MAX_QUEUED", base.inference.max_queued),
            ),
            store=StoreLimits(workers=_int(env, "VOXAUTH_STORE_WORKERS", base.store.workers)),
        )


def _scoring(env: Mapping[str, str], base: ScoringPolicy) -> ScoringPolicy:
    target_fmr = _float(env, "VOXAUTH_TARGET_FMR", base.target_fmr)
    if not 0 < target_fmr < 0.5:
        raise ConfigurationError(
            f"VOXAUTH_TARGET_FMR={target_fmr:g} must be a rate between 0 and 0.5 (e.g. 0.0001)"
        )
    scoring_dir = env.get("VOXAUTH_SCORING_DIR")
    agents = env.get("VOXAUTH_COHORT_AGENTS", "")
    if agents not in ("", "0", "1"):
        raise ConfigurationError(f"VOXAUTH_COHORT_AGENTS={agents!r} must be 0 or 1")
    return replace(
        base,
        target_fmr=target_fmr,
        scoring_dir=Path(scoring_dir) if scoring_dir else base.scoring_dir,
        cohort_includes_agents=agents == "1" if agents else base.cohort_includes_agents,
    )


def _throttle(env: Mapping[str, str], base: ThrottlePolicy) -> ThrottlePolicy:
    policy = ThrottlePolicy(
        free_failures=_int(env, "VOXAUTH_THROTTLE_FREE_FAILURES", base.free_failures),
        base_delay_seconds=_float(env, "VOXAUTH_THROTTLE_DELAY_SECONDS", base.base_delay_seconds),
        max_delay_seconds=_float(env, "VOXAUTH_THROTTLE_MAX_DELAY_SECONDS", base.max_delay_seconds),
        disable_after_failures=_int(
            env, "VOXAUTH_THROTTLE_DISABLE_AFTER", base.disable_after_failures
        ),
    )
    if not 0 < policy.base_delay_seconds <= policy.max_delay_seconds:
        raise ConfigurationError(
            "VOXAUTH_THROTTLE_DELAY_SECONDS must be above zero and at most "
            "VOXAUTH_THROTTLE_MAX_DELAY_SECONDS"
        )
    if policy.disable_after_failures <= policy.free_failures:
        raise ConfigurationError(
            "VOXAUTH_THROTTLE_DISABLE_AFTER must be more than VOXAUTH_THROTTLE_FREE_FAILURES"
        )
    return policy


def _retention(env: Mapping[str, str], base: RetentionPolicy) -> RetentionPolicy:
    days = _float(env, "VOXAUTH_VOICEPRINT_TTL_DAYS", base.voiceprint_ttl_days)
    if days == 0:
        # Zero would erase every voiceprint at the next expiry run.
        raise ConfigurationError("VOXAUTH_VOICEPRINT_TTL_DAYS must be above zero")
    return replace(base, voiceprint_ttl_days=days)


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot show {type(value).__name__} in the configuration")


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw) if raw else None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None
    if not value >= 0:
        raise ConfigurationError(f"{name}={raw!r} must be zero or positive")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ConfigurationError(f"{name}={raw!r} must be at least 1")
    return value
