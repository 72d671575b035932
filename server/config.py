"""Configuration: frozen, documented dataclasses, each setting declared once, read strictly.

Every setting has a default that is safe for a single-node deployment. A setting the environment
may override names its `VOXAUTH_*` variable where the field is declared, in its metadata
(`field(default=..., metadata=setting("VOXAUTH_..."))`), and `from_environment` is the one
reader of those variables: it parses each by its field's type and refuses any `VOXAUTH_*` name
that no setting declares, so a typo stops the command instead of being ignored. Every value is
checked when its dataclass is made (`__post_init__`), however it is made: from the
environment, by `dataclasses.replace()` (`voxauth serve` flags) or directly.

Three groups, read alike:
- ServerConfig: what `voxauth serve` runs with; recorded in the audit log when it changes, so
  it holds no secrets;
- KeySettings: where the voiceprint encryption keys come from (secrets: `voxauth config` shows
  only whether they are set, and the key ids);
- ClientSettings: how the `voxauth` client commands and benchmarks reach a server.

Text to value, by field type: numbers as written; a path as given; `bool` as 0 or 1; an empty
variable counts as unset, except for a plain `str` setting, where it is the value (e.g.
`VOXAUTH_HTTP_LISTEN=` turns the HTTP side off).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, get_args, get_type_hints

from server.errors import ConfigurationError

# Chosen with `voxauth eval` on 251 LibriSpeech speakers (see README, "Accuracy"): the lowest
# cosine threshold whose false-match rate on that set is at most 1 in 1,000.
DEFAULT_THRESHOLD = 0.46

# Measured with `voxauth eval --duration 3..6` and scripts/measure_telephone_minimum.py on the
# held-out speakers (README, "Accuracy"): a telephone check's false non-matches at the
# service's bound fall with its net speech, 16.2% (18/111) at 3 s, 11.9% (12/101) at 4 s,
# 11.1% (10/90) at 5 s, 8.1% (5/62) at 6 s; on the same 62 tests at every length 19.4 / 12.9
# / 11.3 / 8.1%. 6 s is the shortest that meets the 10% target, and not by one count alone:
# the fall is steady on the same trials and full halves (median 6.1 s) give 9.0% (10/111).
# The interval at 6 s reaches 17.5%, so 10% is met by the estimate, not shown beyond chance.
TELEPHONE_MIN_NET_SPEECH_SECONDS = 6.0

_S = TypeVar("_S", bound="Settings")

Check = Callable[[Any], str | None]
"""A rule a setting's value must meet: None when it does, else what is wrong ("must be ...")."""


@dataclass(frozen=True)
class Variable:
    """The environment variable that overrides a setting."""

    name: str
    secret: bool = False
    """The value is a secret: never shown, never quoted in an error."""


_VARIABLE = "voxauth.variable"
_CHECK = "voxauth.check"


def setting(
    variable: str | None = None, *, check: Check | None = None, secret: bool = False
) -> dict[str, object]:
    """The metadata that declares a configuration field as a setting: the `VOXAUTH_*`
    variable that overrides its default (if the environment may), and the rule its value must
    meet beyond its type (if any). Use as `field(default=..., metadata=setting(...))`."""
    metadata: dict[str, object] = {}
    if variable is not None:
        metadata[_VARIABLE] = Variable(variable, secret)
    if check is not None:
        metadata[_CHECK] = check
    return metadata


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum:g}"


def non_negative(value: float) -> str | None:
    # Written so that NaN fails too.
    return None if value >= 0 else "must be zero or positive"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be above zero"


def between_open(low: float, high: float) -> Check:
    return lambda value: None if low < value < high else f"must be above {low:g} and below {high:g}"


def cosine(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be a cosine between 0 and 1"


def false_match_rate(value: float) -> str | None:
    return None if 0 < value < 0.5 else "must be a rate between 0 and 0.5 (e.g. 0.0001)"


RENAMED = {"VOXAUTH_JWKS_LISTEN": "VOXAUTH_HTTP_LISTEN"}
"""Settings that were renamed: the old name is refused with the new one, not as a typo (the
JWKS moved to the HTTP side, which serves more than the JWKS, over TLS)."""


def database_location(value: str | Path) -> str | None:
    """A PostgreSQL URI must not hold a password: the configuration is recorded in the audit
    log, and libpq reads the password from PGPASSFILE (~/.pgpass) or PGPASSWORD instead."""
    if not str(value).startswith(("postgresql://", "postgres://")):
        return None
    uri = urllib.parse.urlsplit(str(value))
    if uri.password is not None or "password" in urllib.parse.parse_qs(uri.query):
        return "must not hold a password: give it in PGPASSFILE (~/.pgpass) or PGPASSWORD"
    return None


class Settings:
    """Base of the configuration dataclasses: checks every field whenever one is made, and
    reads one from the environment."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = hints[spec.name]
            if not _is_instance(value, expected):
                raise _refusal(type(self), spec, value, f"must be {_type_name(expected)}")
            check: Check | None = spec.metadata.get(_CHECK)
            problem = check(value) if check is not None and value is not None else None
            if problem is not None:
                raise _refusal(type(self), spec, value, problem)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Self:
        """These settings from `env` (default: os.environ), defaults where a variable is unset.
        Raises ConfigurationError naming the variable of a bad value, or listing the
        `VOXAUTH_*` names no setting declares (with the known ones)."""
        env = os.environ if env is None else env
        unknown = sorted({name for name in env if name.startswith("VOXAUTH_")} - known_variables())
        renamed = [f"{old} is now {RENAMED[old]}" for old in unknown if old in RENAMED]
        if renamed:
            raise ConfigurationError(f"renamed setting: {'; '.join(renamed)}")
        if unknown:
            raise ConfigurationError(
                f"unknown environment variable{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} (a typo?); the known ones are "
                f"{', '.join(sorted(known_variables()))}"
            )
        return _read(cls, env)


# --- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioLimits(Settings):
    """Bounds on one piece of input audio."""

    max_seconds: float = field(
        default=60.0, metadata=setting("VOXAUTH_MAX_AUDIO_SECONDS", check=non_negative)
    )
    """Longest audio in one request or streamed utterance."""

    budget_mib: int = field(
        default=512, metadata=setting("VOXAUTH_AUDIO_BUDGET_MIB", check=at_least(1))
    )
    """Audio, encoded and decoded, that all requests in progress may hold together; a request
    that would hold more gets RESOURCE_EXHAUSTED at once (server/runtime/audio_budget.py). The
    default holds about 140 minutes of streamed 16 kHz audio (as float32), or 5 of the largest
    uploads (`largest_request_bytes`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget_mib * 2**20 < self.largest_request_bytes:
            raise ConfigurationError(
                f"VOXAUTH_AUDIO_BUDGET_MIB={self.budget_mib} is less than one upload of "
                f"{self.max_seconds:g} s can hold ({math.ceil(self.largest_request_bytes / 2**20)}"
                " MiB): such uploads would always be refused"
            )

    @property
    def max_encoded_bytes(self) -> int:
        """Bytes that `max_seconds` of the bulkiest accepted input can take (48 kHz stereo
        32-bit WAV) plus headroom for headers: larger input is refused before decoding."""
        return int(self.max_seconds * 48_000 * 2 * 4) + 1024 * 1024

    @property
    def largest_request_bytes(self) -> int:
        """The most audio one request can hold: an AddEnrollmentAudio message of
        `max_encoded_bytes` (the message and its bytes), decoded at the highest accepted file
        rate (192 kHz, mono float32), then resampled to 16 kHz."""
        decoded = int(self.max_seconds * 192_000) * 4 + int(self.max_seconds * 16_000) * 4
        return 2 * self.max_encoded_bytes + decoded


@dataclass(frozen=True)
class EnrollmentPolicy(Settings):
    """What enrollment asks for before a voiceprint is built."""

    required_net_speech_seconds: float = field(
        default=20.0, metadata=setting("VOXAUTH_ENROLL_NET_SPEECH_SECONDS", check=non_negative)
    )
    """Net speech (silence excluded) needed to finalize."""

    min_utterance_net_speech_seconds: float = field(
        default=2.0, metadata=setting(check=non_negative)
    )
    """An utterance with less net speech is not kept: too short to embed reliably."""

    max_pending_utterances: int = field(default=32, metadata=setting(check=at_least(1)))
    """Bound on pending utterances per agent, so a runaway client cannot fill the store."""

    consistency_threshold: float = field(
        default=DEFAULT_THRESHOLD, metadata=setting("VOXAUTH_THRESHOLD", check=cosine)
    )
    """An utterance whose cosine to the others' mean is below this is rejected as not the same
    speaker. Set with the verification threshold: an utterance that would not verify against
    the rest of the enrollment does not belong in the voiceprint."""

    passive_net_speech_seconds: float = field(
        default=20.0,
        metadata=setting("VOXAUTH_PASSIVE_ENROLL_NET_SPEECH_SECONDS", check=non_negative),
    )
    """Passive enrollment (enrollment/passive.py): consistent net speech collected from the
    agent's shifts before the voiceprint is built; as much as active enrollment asks."""

    passive_stretch_net_speech_seconds: float = field(
        default=5.0, metadata=setting(check=at_least(2.0))
    )
    """Net speech in each stretch passive enrollment takes from a shift's stream: one
    utterance of the enrollment. Long enough to embed well, short enough that an enrollment
    is made of several stretches, which are checked against each other."""

    passive_min_stretches: int = field(default=2, metadata=setting(check=at_least(2)))
    """Separate stretches of speech a passive enrollment needs at least, so that consistency
    between them is checked (one long stretch could be anybody's)."""

    passive_requires_approval: bool = field(
        default=False, metadata=setting("VOXAUTH_PASSIVE_ENROLL_APPROVAL")
    )
    """1: a passively built voiceprint waits for HR's approval (ReviewVoiceprint) before it
    is active; 0: it is active at once unless the duplicate or watchlist search holds it."""

    duplicate_false_alarm: float = field(
        default=0.01,
        metadata=setting("VOXAUTH_DUPLICATE_FALSE_ALARM", check=between_open(0.0, 1.0)),
    )
    """The chance that a new voiceprint is held as a duplicate of someone it is not, over the
    whole gallery of enrolled agents: each comparison is held to the rate p with
    1 - (1 - p)^N = this (server/scoring/gallery.py)."""

    watchlist_false_alarm: float = field(
        default=0.001,
        metadata=setting("VOXAUTH_WATCHLIST_FALSE_ALARM", check=between_open(0.0, 1.0)),
    )
    """The chance that a check of a voice not on the watchlist raises a watchlist alert, over
    the whole watchlist (as duplicate_false_alarm). Lower: every Verify and login is screened."""

    watchlist_max_days: float = field(default=1095.0, metadata=setting(check=positive))
    """The longest an entry may be kept (its expiry is at most this far off when added)."""


@dataclass(frozen=True)
class VerificationPolicy(Settings):
    """How a score becomes a decision."""

    threshold: float = field(
        default=DEFAULT_THRESHOLD, metadata=setting("VOXAUTH_THRESHOLD", check=cosine)
    )
    """Cosine below which an enrollment utterance is taken for another speaker's.
    Verification decides by ScoringPolicy.target_fmr instead."""

    min_net_speech_seconds: float = field(
        default=3.0, metadata=setting("VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS", check=non_negative)
    )
    """Less net speech than this gives INCONCLUSIVE."""

    min_net_speech_seconds_telephone: float = field(
        default=TELEPHONE_MIN_NET_SPEECH_SECONDS,
        metadata=setting("VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS_TELEPHONE", check=non_negative),
    )
    """The same for a check scored on the telephone channel (8 kHz or G.711 audio, or 16 kHz
    audio with nothing above 4 kHz): Verify, shift logins and checkpoints. Never less than
    min_net_speech_seconds. 6 s: the shortest test length whose telephone false-non-match
    rate at the service's bound was within 10% on the held-out speakers (3 s: 16.2%;
    TELEPHONE_MIN_NET_SPEECH_SECONDS says more). The cost: a telephone agent speaks twice
    as long as a softphone agent before a login decision."""

    def min_net_speech_for(self, telephone: bool) -> float:
        """The net speech a check on this channel needs for a decision. A telephone minimum
        below the general one does not lower it: an operator who raised the general minimum
        keeps it on every channel."""
        if telephone:
            return max(self.min_net_speech_seconds, self.min_net_speech_seconds_telephone)
        return self.min_net_speech_seconds


@dataclass(frozen=True)
class ScoringPolicy(Settings):
    """How a cosine becomes a decision: AS-norm against a cohort, calibration, and a threshold
    set by the false-match rate the operator accepts (see README, "Accuracy")."""

    target_fmr: float = field(
        default=1e-4, metadata=setting("VOXAUTH_TARGET_FMR", check=false_match_rate)
    )
    """False-match rate the threshold is set for; 1 in 10,000 is NIST SP 800-63B's bar for
    biometrics."""

    scoring_dir: Path | None = field(default=None, metadata=setting("VOXAUTH_SCORING_DIR"))
    """Cohort and calibration made by `voxauth calibrate`; None means the ones shipped in
    models/scoring/."""

    min_llr: float = field(default=2.3, metadata=setting("VOXAUTH_MIN_LLR", check=non_negative))
    """The least calibrated LLR (natural log) an ACCEPT needs, whatever the false-match
    threshold: never below 0, so no check is accepted on evidence that favours someone else.
    2.3 (odds of 10 to 1) costs no false non-match on the held-out trials and removes the one
    wideband false match that 0 lets through (README, "Accuracy")."""

    evidence_from_seconds: float = field(
        default=0.0, metadata=setting("VOXAUTH_EVIDENCE_FROM_SECONDS", check=non_negative)
    )
    """0: off. Otherwise a check longer than this needs at least the LLR that a check of this
    length needs at the false-match threshold, so that the LLR a check needs never falls with
    its length. Off by default: the score a check needs already never falls with its length
    (the threshold is one score, the LLR floor asks more score of longer speech), and the
    stricter ordering costs 7 of 111 genuine wideband checks at 3 s (README, "Accuracy")."""

    local_threshold_min_agents: int = field(
        default=32, metadata=setting("VOXAUTH_LOCAL_THRESHOLD_MIN_AGENTS", check=non_negative)
    )
    """From this many enrolled agents on, their cross-comparisons (N (N - 1) per condition)
    set a local false-match threshold, and the stricter of it and the shipped one applies.
    32 agents give 992 comparisons, so the fitted top 1% of the tail rests on about 10
    scores; fewer cannot place a tail. 0 turns the local threshold off."""

    cohort_includes_agents: bool = field(default=False, metadata=setting("VOXAUTH_COHORT_AGENTS"))
    """Also normalise against the enrolled agents' own voiceprints, the claimed agent's left
    out. Off by default: the calibration was measured with the shipped cohort alone."""

    cohort_refresh_seconds: float = field(default=300.0, metadata=setting(check=non_negative))
    """How old the agents' part of the cohort may grow before it is read again."""


def bona_fide_rejection_rate(value: float) -> str | None:
    return None if 0 < value < 0.5 else "must be a rate between 0 and 0.5 (e.g. 0.05)"


def pad_mode(value: str) -> str | None:
    return None if value in PAD_MODES else f"must be one of {', '.join(PAD_MODES)}"


PAD_MODES = ("enforce", "monitor")


@dataclass(frozen=True)
class PresentationAttackPolicy(Settings):
    """Presentation-attack detection (PAD): the countermeasure's operating point and whether
    its decision refuses checks."""

    target_bpcer: float = field(
        default=0.02, metadata=setting("VOXAUTH_PAD_TARGET_BPCER", check=bona_fide_rejection_rate)
    )
    """Share of genuine wideband checks that the countermeasure may refuse: the wideband
    threshold is set from the genuine speech of the calibration split for it."""

    target_bpcer_telephone: float = field(
        default=0.05,
        metadata=setting("VOXAUTH_PAD_TARGET_BPCER_TELEPHONE", check=bona_fide_rejection_rate),
    )
    """The same for telephone checks. Higher than wideband's by default: even with the
    telephone back-end (fitted on calls drawn from varied paths) replays and resyntheses are
    told apart less well through the 4 kHz band, and a lower rate lets more of them through
    (README, "Presentation-attack detection"; server/tools/ATTACKS.md)."""

    def target_for(self, telephone: bool) -> float:
        return self.target_bpcer_telephone if telephone else self.target_bpcer

    mode: str = field(default="enforce", metadata=setting("VOXAUTH_PAD_MODE", check=pad_mode))
    """"enforce": a suspected attack or replay is refused (REJECT). "monitor": scored, reported
    and audited, but refuses nothing (to measure a deployment's genuine speech first)."""

    calibration_path: Path | None = field(default=None, metadata=setting("VOXAUTH_PAD_CALIBRATION"))
    """Made by `voxauth attacks calibrate`; None means models/scoring/pad_calibration.json."""

    backend_path: Path | None = field(default=None, metadata=setting("VOXAUTH_PAD_BACKEND"))
    """The back-end that turns the countermeasure's outputs into the score the thresholds apply
    to, made by `voxauth attacks fit-backend`; None means models/scoring/pad_backend.json. The
    calibration must be made for it (its model id names the back-end's file)."""

    replay_detection: bool = field(default=True, metadata=setting("VOXAUTH_REPLAY_DETECTION"))
    """Compare every check with the agent's enrollment utterances and recent checks, and
    refuse one that repeats a recording (server/verification/replay.py)."""

    replay_similarity: float = field(
        default=0.93, metadata=setting("VOXAUTH_REPLAY_SIMILARITY", check=cosine)
    )
    """Cosine between the embeddings of two recordings at or above which the later one is the
    same recording played again (enrollment's duplicate threshold, measured there)."""

    replay_window_seconds: float = field(
        default=30 * 86_400.0, metadata=setting("VOXAUTH_REPLAY_WINDOW_SECONDS", check=positive)
    )
    """How long a check's fingerprint is kept to recognise it played back."""

    max_recent_checks: int = field(default=200, metadata=setting(check=at_least(1)))
    """Fingerprints kept per agent at most (the oldest go first)."""

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"


@dataclass(frozen=True)
class ShiftPolicy(Settings):
    """Re-verification during a shift: when checkpoints fall, what they need, what locks."""

    mean_checkpoint_interval_seconds: float = field(
        default=600.0, metadata=setting("VOXAUTH_CHECKPOINT_MEAN_SECONDS", check=non_negative)
    )
    """Average time between checkpoints."""

    checkpoint_jitter_seconds: float = field(
        default=480.0, metadata=setting("VOXAUTH_CHECKPOINT_JITTER_SECONDS", check=non_negative)
    )
    """Each interval is the mean plus a uniform random offset within +/- this, drawn from the
    operating system's cryptographic source."""

    min_checkpoint_gap_seconds: float = field(
        default=120.0, metadata=setting("VOXAUTH_CHECKPOINT_MIN_GAP_SECONDS", check=non_negative)
    )
    """No interval is shorter than this."""

    checkpoint_net_speech_seconds: float = field(default=8.0, metadata=setting(check=non_negative))
    """Net speech a checkpoint verifies: the most recent, silence excluded."""

    confirm_net_speech_seconds: float = field(
        default=8.0, metadata=setting("VOXAUTH_CONFIRM_NET_SPEECH_SECONDS", check=non_negative)
    )
    """Net speech a checkpoint verifies when its failure would lock the shift (the ones
    before it failed); the larger of this and checkpoint_net_speech_seconds. Like every
    checkpoint it hears only speech after the previous one's (a decided checkpoint's audio is
    discarded), so a lock rests on two failures on separate speech. Longer is surer for and
    against the agent alike, but slows the lock after a takeover, and the shipped
    calibration (trials of at most 7.6 s) cannot show what it gains: the default is the
    ordinary 8 s (measured: README, "Change of voice")."""

    max_audio_age_seconds: float = field(default=90.0, metadata=setting(check=non_negative))
    """Audio older than this is discarded unused; bounds each shift's buffer (at 16 kHz
    16-bit, 90 s is 2.9 MB)."""

    speech_wait_seconds: float = field(default=120.0, metadata=setting(check=non_negative))
    """How long a due checkpoint waits for enough speech before INSUFFICIENT_SPEECH."""

    speech_recheck_seconds: float = field(default=5.0, metadata=setting(check=non_negative))
    """While waiting, how much new audio arrives between two looks for speech."""

    max_consecutive_failures: int = field(
        default=2, metadata=setting("VOXAUTH_LOCK_AFTER_FAILURES", check=at_least(1))
    )
    """Failed checkpoints in a row that lock the shift."""

    idle_stream_seconds: float = field(default=600.0, metadata=setting(check=non_negative))
    """A shift with no stream attached for this long is dropped from memory (its state stays
    stored; the softphone resumes it by reconnecting)."""

    max_pending_events: int = field(default=64, metadata=setting(check=at_least(1)))
    """Events queued for a stream that does not read them; beyond, the oldest are dropped
    (they are all in the audit log and the shift state)."""

    lease_seconds: float = field(
        default=10.0, metadata=setting("VOXAUTH_SHIFT_LEASE_SECONDS", check=positive)
    )
    """A shift's lease (server/shifts/lease.py), renewed every third of it while its stream
    is attached: a replica that cannot renew it for this long (its store is unreachable)
    closes the stream so the softphone moves to another replica. Failover does not wait for
    it: a softphone that reconnects takes the shift over at once."""

    change_watch: bool = field(default=True, metadata=setting("VOXAUTH_CHANGE_WATCH"))
    """Watch the stream for a change of voice between checkpoints (server/shifts/
    change_watch.py): a suspected change starts a checkpoint at once, and if it fails another
    follows on fresh speech. Off: only the random checkpoints run."""

    change_watch_threshold: float = field(
        default=0.35, metadata=setting("VOXAUTH_CHANGE_WATCH_THRESHOLD", check=cosine)
    )
    """The sensitivity: a stretch of speech whose cosine to the voiceprint and to the speech
    that passed the last checkpoint are both below this is a suspected change. Higher
    notices a change more surely and triggers more checkpoints on the agent's own voice
    (README, "Change of voice"); a trigger only starts a checkpoint, never locks."""

    change_watch_interval_seconds: float = field(
        default=60.0, metadata=setting("VOXAUTH_CHANGE_WATCH_INTERVAL_SECONDS", check=positive)
    )
    """Audio between two looks of the watch: each look embeds one stretch, the cost."""

    change_watch_speech_seconds: float = field(default=3.0, metadata=setting(check=at_least(1)))
    """Speech one look embeds: the newest, from the audio since the previous look."""

    second_voice_window_seconds: float = field(default=90.0, metadata=setting(check=positive))
    """Speech unlike the agent's followed within this by the agent's own is a second voice."""

    second_voice_locks: bool = field(default=False, metadata=setting("VOXAUTH_SECOND_VOICE_LOCKS"))
    """A second voice on the agent's leg locks the shift (by default it is only reported)."""


@dataclass(frozen=True)
class StreamLimits(Settings):
    """How long the server waits on a client stream that sends nothing: an idle stream holds
    a slot (a shift's stream, an upload's buffer) until the client's own deadline, if it set
    one. Past the limit the call ends with DEADLINE_EXCEEDED: the client broke no rule, the
    server stopped waiting, and it may call again (a shift stays resumable)."""

    shift_idle_seconds: float = field(
        default=30.0, metadata=setting("VOXAUTH_SHIFT_STREAM_IDLE_SECONDS", check=positive)
    )
    """A shift audio stream with no message for this long is closed and its shift detached,
    as when the softphone disconnects. A softphone streams 20 ms frames all through a call,
    silence included, so 30 s without any message means its audio has stopped, far beyond
    any network jitter or batching of frames; the keepalive pings only catch a peer that is
    gone, not one that is connected and silent."""

    enrollment_idle_seconds: float = field(
        default=60.0, metadata=setting("VOXAUTH_ENROLLMENT_STREAM_IDLE_SECONDS", check=positive)
    )
    """A StreamEnrollmentAudio upload with no chunk for this long is closed: an upload sends
    a recorded file as fast as the network carries it, so a minute without a chunk is a
    stalled or abandoned client holding buffered audio."""


@dataclass(frozen=True)
class InferenceLimits(Settings):
    """The bounded executor that runs decoding and the model off the event loop."""

    workers: int = field(default=2, metadata=setting("VOXAUTH_WORKERS", check=at_least(1)))
    """Requests worked on at once, one per core."""

    threads: int = field(default=1, metadata=setting("VOXAUTH_THREADS", check=at_least(1)))
    """Intra-op threads of each worker's inference, for OpenVINO and torch alike. On the
    2-core reference machine one thread per worker with two workers embeds the most audio per
    second (see README, "Speed"; `voxauth bench --throughput` measures it on yours)."""

    max_queued: int = field(default=32, metadata=setting("VOXAUTH_MAX_QUEUED", check=at_least(1)))
    """Requests waiting beyond the workers; more get RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class StoreLimits(Settings):
    """The store's own threads, apart from inference (server/runtime/store_pool.py)."""

    workers: int = field(default=4, metadata=setting("VOXAUTH_STORE_WORKERS", check=at_least(1)))
    """Store calls worked on at once. The SQLite store runs one statement at a time on its
    connection; more threads let sealing, done outside its lock, overlap, and a burst of calls
    waits here."""


@dataclass(frozen=True)
class ThrottlePolicy(Settings):
    """Limits on guessing at a voice, as NIST SP 800-63B-4 asks of biometrics: consecutive
    failed verification attempts of one agent delay its next attempt, then disable it."""

    free_failures: int = field(
        default=5, metadata=setting("VOXAUTH_THROTTLE_FREE_FAILURES", check=at_least(1))
    )
    """Consecutive failures allowed without delay."""

    base_delay_seconds: float = field(
        default=30.0, metadata=setting("VOXAUTH_THROTTLE_DELAY_SECONDS", check=positive)
    )
    """Wait after the last free failure; it doubles with each further failure."""

    max_delay_seconds: float = field(
        default=86_400.0, metadata=setting("VOXAUTH_THROTTLE_MAX_DELAY_SECONDS", check=positive)
    )
    """The doubling stops at one day."""

    disable_after_failures: int = field(
        default=50, metadata=setting("VOXAUTH_THROTTLE_DISABLE_AFTER", check=at_least(1))
    )
    """Consecutive failures that disable the agent's biometric verification until an
    administrator re-enables it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_delay_seconds > self.max_delay_seconds:
            raise ConfigurationError(
                "VOXAUTH_THROTTLE_DELAY_SECONDS must be at most VOXAUTH_THROTTLE_MAX_DELAY_SECONDS"
            )
        if self.disable_after_failures <= self.free_failures:
            raise ConfigurationError(
                "VOXAUTH_THROTTLE_DISABLE_AFTER must be more than VOXAUTH_THROTTLE_FREE_FAILURES"
            )


@dataclass(frozen=True)
class RetentionPolicy(Settings):
    """How long biometric data, and what answers retries, is kept."""

    # Zero would erase every voiceprint at the next expiry run.
    voiceprint_ttl_days: float = field(
        default=1095.0, metadata=setting("VOXAUTH_VOICEPRINT_TTL_DAYS", check=positive)
    )
    """A voiceprint no check has scored against for this long is erased: three years."""

    request_id_retention_hours: float = field(
        default=24.0, metadata=setting("VOXAUTH_REQUEST_ID_RETENTION_HOURS", check=positive)
    )
    """How long a request id's completion is kept, so a retry with the id returns the first
    response (server/runtime/requests.py); after it, the id acts again."""

    shift_event_retention_hours: float = field(
        default=1.0, metadata=setting("VOXAUTH_SHIFT_EVENT_RETENTION_HOURS", check=positive)
    )
    """How long the store keeps shift events (sealed, erased with their agent): an MFA
    subscriber resumes after any event this recent (SubscribeShiftEvents' after_event_id),
    and a replica cut off from the store for less catches up on all of them."""


@dataclass(frozen=True)
class TransportConfig(Settings):
    """How callers reach the server and prove who they are."""

    tls_certificate: Path | None = field(default=None, metadata=setting("VOXAUTH_TLS_CERT"))
    """The server's certificate, PEM."""

    tls_private_key: Path | None = field(default=None, metadata=setting("VOXAUTH_TLS_KEY"))
    """Its private key, PEM."""

    client_ca: Path | None = field(default=None, metadata=setting("VOXAUTH_TLS_CLIENT_CA"))
    """The CA that issues client certificates; callers must present one."""

    token_listen_address: str = field(default="", metadata=setting("VOXAUTH_TOKEN_LISTEN"))
    """A second TLS port for callers that cannot do mutual TLS and send a bearer token
    instead; empty for none."""

    tokens_file: Path | None = field(default=None, metadata=setting("VOXAUTH_TOKENS_FILE"))
    """Hashes of the accepted bearer tokens and their roles."""

    insecure_development: bool = False
    """Plain text and every caller with every role: for development on one machine only
    (`voxauth serve --insecure-dev`). Logged loudly."""


@dataclass(frozen=True)
class MfaConfig(Settings):
    """Signed assurances for the MFA provider."""

    audience: str = field(default="mfa", metadata=setting("VOXAUTH_ASSURANCE_AUDIENCE"))
    """The `aud` claim: the MFA provider's identifier."""

    issuer: str = field(default="voxauth", metadata=setting("VOXAUTH_ASSURANCE_ISSUER"))
    """The `iss` claim."""

    token_lifetime_seconds: float = field(
        default=8 * 3600.0,
        metadata=setting("VOXAUTH_ASSURANCE_LIFETIME_SECONDS", check=non_negative),
    )
    """How long an assurance is valid: one shift."""

    key_rotation_days: float = field(
        default=30.0, metadata=setting("VOXAUTH_SIGNING_KEY_ROTATION_DAYS", check=non_negative)
    )
    """Age at which the signing key is replaced."""


LOG_FORMATS = ("auto", "json", "text")


def log_format(value: str) -> str | None:
    return None if value in LOG_FORMATS else f"must be one of {', '.join(LOG_FORMATS)}"


@dataclass(frozen=True)
class LogConfig(Settings):
    """The server's log (server/runtime/log_format.py)."""

    format: str = field(default="auto", metadata=setting("VOXAUTH_LOG_FORMAT", check=log_format))
    """json: one JSON object per line, for a log shipper or SIEM; text: one readable line per
    message, for a terminal; auto: text when stderr is a terminal, else json (so a service
    manager or container gets json without being told)."""

    agent_pseudonyms: bool = field(default=True, metadata=setting("VOXAUTH_LOG_PSEUDONYMS"))
    """Agent ids in the log as keyed pseudonyms that nothing can link back once their key is
    gone (it lives only in memory, and is replaced daily and whenever an agent is erased). 0
    writes agent ids in clear, for debugging: recorded in the audit log like any setting."""


@dataclass(frozen=True)
class HttpConfig(Settings):
    """The HTTP side (server/api/http): the JWKS, /metrics, /healthz and /readyz, and the
    console, over TLS with the gRPC port's server certificate."""

    listen_address: str = field(default="127.0.0.1:8443", metadata=setting("VOXAUTH_HTTP_LISTEN"))
    """host:port of the HTTP side (port 0 picks a free port); empty for none."""

    request_timeout_seconds: float = field(
        default=10.0, metadata=setting("VOXAUTH_HTTP_REQUEST_TIMEOUT_SECONDS", check=positive)
    )
    """A client must send a whole request (head and body) within this long of its first byte,
    or of connecting, or is dropped unanswered: a slow client holds a connection no longer."""


@dataclass(frozen=True)
class ServerConfig(Settings):
    """What `voxauth serve` runs with."""

    listen_address: str = field(default="127.0.0.1:50051", metadata=setting("VOXAUTH_LISTEN"))
    """host:port to listen on; port 0 picks a free port."""

    database_path: str | Path = field(
        default=Path("var/voxauth.db"), metadata=setting("VOXAUTH_DB", check=database_location)
    )
    """The store: the embedded SQLite file, or a postgresql:// URI naming the PostgreSQL
    database several replicas share (server/storage/databases.py)."""

    model_dir: Path | None = field(default=None, metadata=setting("VOXAUTH_MODEL_DIR"))
    """Verified model files; None means models.fetch.default_model_dir()."""

    countermeasure_dir: Path | None = field(
        default=None, metadata=setting("VOXAUTH_COUNTERMEASURE_DIR")
    )
    """Verified countermeasure (AASIST) files; None means
    models.fetch.default_countermeasure_dir()."""

    shutdown_grace_seconds: float = field(default=10.0, metadata=setting(check=non_negative))
    """On SIGTERM, in-flight calls get this long to finish."""

    eval_results_path: Path = field(
        default=Path("var/eval.json"), metadata=setting("VOXAUTH_EVAL_RESULTS")
    )
    """Where `voxauth eval` writes its figures and DET plot's path, for the compliance report
    and the console's compliance page."""

    audio: AudioLimits = field(default_factory=AudioLimits)
    enrollment: EnrollmentPolicy = field(default_factory=EnrollmentPolicy)
    verification: VerificationPolicy = field(default_factory=VerificationPolicy)
    scoring: ScoringPolicy = field(default_factory=ScoringPolicy)
    presentation: PresentationAttackPolicy = field(default_factory=PresentationAttackPolicy)
    inference: InferenceLimits = field(default_factory=InferenceLimits)
    store: StoreLimits = field(default_factory=StoreLimits)
    shifts: ShiftPolicy = field(default_factory=ShiftPolicy)
    streams: StreamLimits = field(default_factory=StreamLimits)
    transport: TransportConfig = field(default_factory=TransportConfig)
    mfa: MfaConfig = field(default_factory=MfaConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)

    def as_json(self) -> str:
        """The effective configuration as JSON. It holds no secrets: keys are KeySettings,
        never part of ServerConfig."""
        return json.dumps(dataclasses.asdict(self), default=_plain, sort_keys=True, indent=2)


# --- keys and clients ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeySettings(Settings):
    """Where the voiceprint encryption keys come from (server/security/crypto.py loads them):
    the current key, and the keys it replaced, which still open what they sealed until it is
    re-sealed (see README, "Key rotation")."""

    key: str | None = field(default=None, repr=False, metadata=setting("VOXAUTH_KEY", secret=True))
    """The current key: base64 of 32 random bytes."""

    key_file: Path | None = field(default=None, metadata=setting("VOXAUTH_KEY_FILE"))
    """A file holding the current key instead (set only one of the two)."""

    previous_keys: str | None = field(
        default=None, repr=False, metadata=setting("VOXAUTH_PREVIOUS_KEYS", secret=True)
    )
    """Previous keys, base64, separated by commas."""

    previous_keys_file: Path | None = field(
        default=None, metadata=setting("VOXAUTH_PREVIOUS_KEYS_FILE")
    )
    """A file holding them instead, separated by commas or line breaks."""


@dataclass(frozen=True)
class ClientSettings(Settings):
    """How the `voxauth` client commands (enroll, verify, status, delete) and `voxauth bench
    load` reach a server; their flags override these."""

    server: str = field(default="localhost:50051", metadata=setting("VOXAUTH_SERVER"))
    """host:port of the server."""

    pki_dir: Path = field(default=Path("var/pki"), metadata=setting("VOXAUTH_PKI_DIR"))
    """Development PKI from `voxauth certs init`: its CA, and a client certificate per role."""

    ca: Path | None = field(default=None, metadata=setting("VOXAUTH_CA"))
    """CA certificate of the server; None: the PKI folder's."""

    certificate: Path | None = field(default=None, metadata=setting("VOXAUTH_CERT"))
    """Client certificate; None: the PKI folder's for the command's role."""

    certificate_key: Path | None = field(default=None, metadata=setting("VOXAUTH_CERT_KEY"))
    """Its private key; None: the PKI folder's for the command's role."""

    token: str | None = field(
        default=None, repr=False, metadata=setting("VOXAUTH_TOKEN", secret=True)
    )
    """Bearer token instead of a client certificate."""

    insecure: bool = field(default=False, metadata=setting("VOXAUTH_INSECURE"))
    """Plain text, to a server run with --insecure-dev."""


SETTINGS_GROUPS: tuple[type[Settings], ...] = (ServerConfig, KeySettings, ClientSettings)
"""Every group of settings the environment can set; together they declare every known
`VOXAUTH_*` variable."""


@functools.cache
def known_variables() -> frozenset[str]:
    """Every `VOXAUTH_*` variable some setting declares."""
    return frozenset(variable.name for group in SETTINGS_GROUPS for variable in _variables(group))


def redacted(settings: Settings) -> dict[str, Any]:
    """`settings` as JSON-ready values, each secret replaced by "<redacted>" (None if unset)."""
    shown: dict[str, Any] = {}
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        variable: Variable | None = spec.metadata.get(_VARIABLE)
        if isinstance(value, Settings):
            shown[spec.name] = redacted(value)
        elif variable is not None and variable.secret:
            shown[spec.name] = None if value is None else "<redacted>"
        else:
            shown[spec.name] = str(value) if isinstance(value, Path) else value
    return shown


# --- reading and checking -----------------------------------------------------------------


def _read(cls: type[_S], env: Mapping[str, str]) -> _S:
    hints = _type_hints(cls)
    values: dict[str, object] = {}
    for spec in fields(cls):
        expected = hints[spec.name]
        if isinstance(expected, type) and issubclass(expected, Settings):
            values[spec.name] = _read(expected, env)
            continue
        variable: Variable | None = spec.metadata.get(_VARIABLE)
        if variable is None or variable.name not in env:
            continue
        value = _parse(env[variable.name], expected, variable)
        if value is not _UNSET:
            values[spec.name] = value
    make: Callable[..., _S] = cls
    return make(**values)


_UNSET = object()


def _parse(raw: str, expected: Any, variable: Variable) -> object:
    """The value of `raw` for a field of type `expected`, or _UNSET for an empty variable."""
    optional = isinstance(expected, types.UnionType)
    kind = (
        next(arg for arg in get_args(expected) if arg is not type(None)) if optional else expected
    )
    if raw == "" and (optional or kind is not str):
        return _UNSET
    quoted = variable.name if variable.secret else f"{variable.name}={raw!r}"
    if kind is str:
        return raw
    if kind is Path:
        return Path(raw)
    if kind is bool:
        if raw not in ("0", "1"):
            raise ConfigurationError(f"{quoted} must be 0 or 1")
        return raw == "1"
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{quoted} is not an integer") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(f"{quoted} is not a number") from None
    raise TypeError(f"no parser for settings of type {expected}")


def _type_hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _variables(cls: type[Settings]) -> list[Variable]:
    found = []
    for spec in fields(cls):
        expected = _type_hints(cls)[spec.name]
        if isinstance(expected, type) and issubclass(expected, Settings):
            found += _variables(expected)
        elif _VARIABLE in spec.metadata:
            found.append(spec.metadata[_VARIABLE])
    return found


def _is_instance(value: object, expected: Any) -> bool:
    if isinstance(expected, types.UnionType):
        return any(_is_instance(value, arg) for arg in get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        # An int is a fine float; a bool is not a number here.
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(expected))
    return "None" if expected is type(None) else f"a {expected.__name__}"


def _refusal(
    cls: type, spec: dataclasses.Field[Any], value: object, problem: str
) -> ConfigurationError:
    """The error for a bad value: names the variable (if any) and the field; quotes the value
    unless it is a secret."""
    variable: Variable | None = spec.metadata.get(_VARIABLE)
    where = f"{cls.__name__}.{spec.name}"
    value = _without_password(value)
    if variable is None:
        return ConfigurationError(f"{where}={value!r}: {problem}")
    if variable.secret:
        return ConfigurationError(f"{variable.name} ({where}): {problem}")
    return ConfigurationError(f"{variable.name}={value!r} ({where}): {problem}")


def _without_password(value: object) -> object:
    """`value`, a URI's password masked (a refused VOXAUTH_DB is quoted in the error)."""
    if not isinstance(value, str) or "://" not in value:
        return value
    uri = urllib.parse.urlsplit(value)
    if uri.password is not None:
        uri = uri._replace(netloc=uri.netloc.replace(f":{uri.password}@", ":***@", 1))
    query = urllib.parse.parse_qsl(uri.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        masked = [(name, "***" if name == "password" else item) for name, item in query]
        uri = uri._replace(query=urllib.parse.urlencode(masked, safe="*"))
    return urllib.parse.urlunsplit(uri)


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot show {type(value).__name__} in the configuration")
