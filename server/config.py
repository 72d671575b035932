"""Service configuration: frozen, documented dataclasses, read from the environment.

Every setting has a default that is safe for a single-node deployment; `VOXAUTH_*` environment
variables (listed on each field) override them, and `voxauth serve` flags override those.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
    """Cosine score at or above which the voice is accepted (VOXAUTH_THRESHOLD)."""

    min_net_speech_seconds: float = 3.0
    """Less net speech than this gives INCONCLUSIVE (VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS)."""


@dataclass(frozen=True)
class InferenceLimits:
    """The bounded executor that runs decoding and the model off the event loop."""

    workers: int = 2
    """Requests worked on at once, one per core (VOXAUTH_WORKERS)."""

    torch_threads: int = 2
    """torch intra-op threads, shared by the workers (VOXAUTH_TORCH_THREADS). On the 2-core
    reference machine, 2 threads with 2 workers embedded the most audio per second (see
    README, "Speed"; `voxauth bench --throughput` measures it on yours)."""

    max_queued: int = 32
    """Requests waiting beyond the workers; more get RESOURCE_EXHAUSTED (VOXAUTH_MAX_QUEUED)."""


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
    inference: InferenceLimits = field(default_factory=InferenceLimits)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if env is None else env
        base = cls()
        model_dir = env.get("VOXAUTH_MODEL_DIR")
        threshold = _float(env, "VOXAUTH_THRESHOLD", base.verification.threshold)
        return replace(
            base,
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
            inference=InferenceLimits(
                workers=_int(env, "VOXAUTH_WORKERS", base.inference.workers),
                torch_threads=_int(env, "VOXAUTH_TORCH_THREADS", base.inference.torch_threads),
                max_queued=_int(env, "VOXAUTH_MAX_QUEUED", base.inference.max_queued),
            ),
        )


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
