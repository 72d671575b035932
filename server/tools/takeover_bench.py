"""`voxauth bench shifts takeover DIR`: how soon a shift locks after someone else takes over the
agent's line, how often the agent's own voice triggers a checkpoint or locks a shift, and what
the change watch costs, at the default checkpoint schedule.

At the default schedule (a checkpoint every 10 +/- 8 min) a run in real time would take days,
so the shifts run in virtual time: the real service in this process (the real speaker model,
speech detection, countermeasure, scoring and store) on a clock that moves only when the
benchmark moves it, one second of audio at a time, and only once every shift's pending work
(the model, the store) is done. The CPU the service spends is real and measured; the times
reported are the shifts' own (virtual) times.

Speech: one recording per speaker of the folder given (e.g. LibriSpeech train-clean-100),
only speakers held apart from the shipped cohort and calibration. Each agent enrolls from the
first half of its recording (split in a pause) and logs in with the second half; its leg of the
call then carries turns of 2-8 s of that second half, read on in order and cut only in its
pauses, with pauses of 2-8 s of line noise between them (the customer speaks on the other
leg). A takeover shift switches, at a random time 2 to 30 minutes into the shift, to another
held-apart speaker's turns. Replay detection is off: looped recordings are replays by
construction.

What one recording per speaker cannot show: every checkpoint of a genuine shift judges the
same few seconds of recorded speech again (the report says how much of it), so its failures
are one trial repeated, not independent ones; a real shift's checkpoints minutes apart judge
different speech. The report counts the speakers, the independent trials, with the shifts.

Speakers of several recordings (e.g. LibriSpeech test-other, about ten utterances each) are
split by recording instead (`split_recordings`): the first recordings in file-name order
enroll the agent at the server's own enrollment minimum, the rest, and only the rest, make
its login and leg, so no checkpoint judges speech the voiceprint was made of.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import math
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from server.app import VoxauthServer
from server.config import (
    EnrollmentPolicy,
    ServerConfig,
    ShiftPolicy,
    TransportConfig,
)
from server.errors import VoxauthError
from server.pipeline.analysis import AudioInput
from server.pipeline.decode import AudioEncoding
from server.runtime.clock import ManualClock
from server.scoring.scorer import ScoringModel
from server.shifts.buffer import ShiftAudioBuffer, StreamFormat
from server.shifts.change_watch import ChangeWatch, CheckpointTrigger
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.shifts.service import ShiftService, ShiftStream
from server.tools.percentiles import nearest_rank

T = TypeVar("T")
RATE = 16_000
_MIN_RECORDING_SECONDS = 12.0
_STEP_SECONDS = 1.0  # one message of 50 frames per shift per step
_NOISE_DBFS = -65.0
_FRAME = 320  # 20 ms
# A pause: within this share of the way from the recording's noise floor (its quietest 5%)
# to its speech (its loudest 5%), in dB: recordings differ in both.
_PAUSE_SHARE = 0.3
_PAUSE_FRAMES = 3


class CountingPool:
    """Wraps a pool the shift service runs its work on, counting the work in flight: virtual
    time may only move once it is done (the model takes real time; the shift must not see it
    as minutes)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.busy = 0
        self.looks = 0
        """Looks of the change watch run (with speech or without)."""

    async def run(self, work: Callable[[], T]) -> T:
        self.busy += 1
        function = getattr(work, "func", work)  # the watch passes a functools.partial
        self.looks += getattr(function, "__qualname__", "") == "ChangeWatch.look"
        try:
            result: T = await self._pool.run(work)
            return result
        finally:
            self.busy -= 1


class CountingEmbedder:
    """The change watch's embedder (the checkpoints use the analyser's), counting its calls."""

    def __init__(self, embedder: SpeakerEmbedder) -> None:
        self._embedder = embedder
        self.calls = 0
        self.model_id = embedder.model_id
        self.sample_rate = embedder.sample_rate
        self.dimension = embedder.dimension
        self.min_samples = embedder.min_samples

    def embed(self, waveform: Waveform) -> Embedding:
        self.calls += 1
        return self._embedder.embed(waveform)


# --- pure parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    p90: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(nearest_rank(values, 0.5), nearest_rank(values, 0.9), max(values))


@dataclass(frozen=True)
class Turn:
    """One turn of a simulated leg: where it lies in the leg and where it came from in the
    speaker's material (seconds)."""

    at: float
    source: float
    seconds: float


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is honest for zero counts and few trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(count: int, trials: int, unit: str) -> str:
    low, high = wilson(count, trials)
    text = f"{count} of {trials} {unit} (95% {low:.1%}-{high:.1%}"
    if count == 0 and trials:
        text += f"; rule of three: under {min(1.0, 3 / trials):.1%}"
    return text + ")"


def pauses(material: np.ndarray[Any, np.dtype[np.float32]]) -> list[int]:
    """Where a recording may be cut without cutting a word: the middle of each run of at
    least 60 ms near its noise floor (the pauses between a reader's phrases), with the
    recording's start and end."""
    count = len(material) // _FRAME
    cuts = [0]
    if count:
        frames = material[: count * _FRAME].reshape(count, _FRAME)
        level = 10 * np.log10(np.maximum(np.mean(np.square(frames, dtype=np.float64), 1), 1e-12))
        loud, floor = float(np.percentile(level, 95)), float(np.percentile(level, 5))
        quiet = level < floor + _PAUSE_SHARE * (loud - floor)
        run = 0
        for index, silent in enumerate([*quiet.tolist(), False]):
            if silent:
                run += 1
                continue
            if run >= _PAUSE_FRAMES and index - run > 0:
                cuts.append((index - run // 2) * _FRAME)
            run = 0
    return sorted({*cuts, len(material)})


def conversation(
    material: np.ndarray[Any, np.dtype[np.float32]],
    seconds: float,
    rng: np.random.Generator,
    turns: list[Turn] | None = None,
    *,
    spliced: bool = False,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], float]:
    """`seconds` of one speaker's leg of a call: turns of 2-8 s from `material` with 2-8 s
    of line noise between them; and the seconds of turns. Each turn is also added to `turns`
    when given.

    A turn is the recording read on from where the last one stopped, starting and ending in
    a pause between phrases (at the recording's end the next turn starts from its
    beginning): speech as a speaker makes it, only repeated. `spliced`: the first version
    of this benchmark, turns cut at random places and wrapped round the recording's end,
    splices mid-word that no speaker makes (they cost the agent's own checkpoints several
    hundredths of cosine: README, "Change of voice"); kept to compare."""
    total = int(seconds * RATE)
    out = (10 ** (_NOISE_DBFS / 20) * rng.standard_normal(total)).astype(np.float32)
    cuts = pauses(material)
    cursor = cuts[int(rng.integers(0, max(1, len(cuts) - 1)))]
    at = 0
    spoken = 0
    while at < total:
        wanted = int(rng.uniform(2.0, 8.0) * RATE)
        if spliced:
            start = int(rng.integers(0, len(material)))
            piece = np.take(material, np.arange(start, start + wanted), mode="wrap")
        else:
            start = cursor
            stop = next((c for c in cuts if c - start >= wanted), len(material))
            piece = material[start:stop]
            cursor = 0 if stop >= len(material) else stop
        end = min(total, at + len(piece))
        out[at:end] += piece[: end - at]
        spoken += end - at
        if turns is not None:
            turns.append(Turn(at / RATE, start / RATE, (end - at) / RATE))
        at = end + int(rng.uniform(2.0, 8.0) * RATE)
    return out, spoken / RATE


def pcm16(samples: np.ndarray[Any, np.dtype[np.float32]]) -> bytes:
    return bytes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())


@dataclass(frozen=True)
class Decided:
    """One decided checkpoint of a simulated shift, as its event told it."""

    at: float
    trigger: str
    passed: bool
    score: float
    threshold: float
    net_speech_seconds: float
    pad: str
    """The countermeasure's decision ('-' when it did not run)."""
    audio: tuple[float, float]
    """The checkpoint's audio, in seconds of the leg."""


def material_heard(
    turns: Sequence[Turn], audio: tuple[float, float], material_seconds: float
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Which 10 ms of the speaker's material the leg's stretch `audio` carries."""
    bins = max(1, round(material_seconds * 100))
    heard = np.zeros(bins, dtype=np.bool_)
    start, end = audio
    for turn in turns:
        a, b = max(start, turn.at), min(end, turn.at + turn.seconds)
        if b <= a:
            continue
        first = round((turn.source + a - turn.at) * 100)
        heard[np.arange(first, first + round((b - a) * 100)) % bins] = True
    return heard


def shared_material(
    turns: Sequence[Turn], one: tuple[float, float], other: tuple[float, float], seconds: float
) -> float:
    """The fraction of the material in stretch `one` that stretch `other` carries too."""
    a, b = material_heard(turns, one, seconds), material_heard(turns, other, seconds)
    return float(np.sum(a & b) / max(1, np.sum(a)))


@dataclass
class ShiftOutcome:
    """What one simulated shift saw; times in seconds since the shift's stream attached."""

    seconds: float
    speech_seconds: float
    takeover_at: float | None
    checkpoints: dict[str, int] = field(default_factory=dict)
    """By trigger and outcome, e.g. 'CHANGE_WATCH failed'."""
    first_failure_at: float | None = None
    """The first failed checkpoint after the takeover (any failure on a genuine shift)."""
    locked_at: float | None = None
    second_voices: int = 0
    agent: str = ""
    decided: list[Decided] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    """The agent's turns (not the impostor's)."""
    material_seconds: float = 0.0


# --- the simulation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    speaker: str
    enrollment: list[np.ndarray[Any, np.dtype[np.float32]]]
    login: np.ndarray[Any, np.dtype[np.float32]]
    material: np.ndarray[Any, np.dtype[np.float32]]
    enrolled_from: tuple[str, ...] = ()
    """The recordings (file stems) that enrolled it, for a speaker of several recordings."""
    leg_from: tuple[str, ...] = ()
    """The recordings its login and leg of the call are made of (none of the above)."""
    skipped: tuple[str, ...] = ()
    """Recordings before the leg's that enrollment would refuse (quality, countermeasure): in
    neither part."""
    enrollment_net_speech: float = 0.0
    leg_net_speech: float = 0.0


@dataclass(frozen=True)
class LeftOut:
    """A speaker the benchmark does not run, and why."""

    speaker: str
    reason: str


@dataclass(frozen=True)
class Measured:
    """One recording as the server's analyser finds it."""

    net_speech_seconds: float
    usable: bool
    """Enrollment would keep it: embedded, with no quality issue, not taken for an attack."""


# A shift's login verifies about as much speech as a checkpoint.
_LOGIN_NET_SPEECH_SECONDS = 8.0
# A leg needs speech for two checkpoints at least, so a lock's two failures (each hears only
# speech after the one before) can judge different recorded speech.
_LEG_NET_SPEECH_SECONDS = 16.0


def split_recordings(
    speaker: str,
    recordings: Sequence[tuple[str, np.ndarray[Any, np.dtype[np.float32]]]],
    measured: Mapping[str, Measured],
    required: float,
    *,
    leg_minimum: float = _LEG_NET_SPEECH_SECONDS,
    login_seconds: float = _LOGIN_NET_SPEECH_SECONDS,
) -> Voice | LeftOut:
    """A speaker of several recordings (`recordings` in file-name order, `measured` by
    name): its first recordings enroll it, as many as it takes to reach `required` seconds
    of net speech (the server's enrollment minimum; a recording its quality gates or the
    countermeasure would refuse is skipped, in neither part); the rest, and only the rest,
    make its login and its leg of the call, so no checkpoint judges speech the voiceprint
    was made of. Left out when the recordings cannot reach `required`, or leave under
    `leg_minimum` of net speech for the call."""
    enrollment: list[tuple[str, np.ndarray[Any, np.dtype[np.float32]]]] = []
    skipped: list[str] = []
    enrolled = 0.0
    used = 0
    for name, samples in recordings:
        if enrolled >= required:
            break
        used += 1
        if measured[name].usable:
            enrollment.append((name, samples))
            enrolled += measured[name].net_speech_seconds
        else:
            skipped.append(name)
    if enrolled < required:
        return LeftOut(
            speaker,
            f"{enrolled:.1f} s of net speech in its {len(recordings)} recordings that "
            f"enrollment would keep, {required:g} s needed",
        )
    rest = list(recordings[used:])
    left = sum(measured[name].net_speech_seconds for name, _ in rest)
    if left < leg_minimum:
        return LeftOut(
            speaker,
            f"{left:.1f} s of net speech left for the call in {len(rest)} recordings after "
            f"enrollment's {enrolled:.1f} s, {leg_minimum:g} s needed",
        )
    login: list[np.ndarray[Any, np.dtype[np.float32]]] = []
    heard = 0.0
    for name, samples in rest:
        if heard >= login_seconds:
            break
        login.append(samples)
        heard += measured[name].net_speech_seconds
    return Voice(
        speaker,
        [np.ascontiguousarray(samples) for _, samples in enrollment],
        np.concatenate(login).astype(np.float32),
        # Read on in order across the recordings: LibriSpeech's start and end in silence, so
        # their joins are pauses where turns may be cut.
        np.concatenate([samples for _, samples in rest]).astype(np.float32),
        tuple(name for name, _ in enrollment),
        tuple(name for name, _ in rest),
        tuple(skipped),
        enrolled,
        left,
    )


def held_apart_recordings(directory: Path, config: ServerConfig) -> dict[str, list[Path]]:
    """The folder's 16 kHz .flac recordings by speaker (SPEAKER-... file names), in file-name
    order, of the speakers not in the shipped cohort or calibration."""
    from models.manifest import ECAPA_MANIFEST

    scoring = ScoringModel.load(config.scoring, ECAPA_MANIFEST.model_id)
    fitted_on = set(scoring.calibration.provenance.get("speakers", []))
    speakers: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("*.flac")):
        speaker = path.stem.split("-", 1)[0]
        if speaker in fitted_on or sf.info(path).samplerate != RATE:
            continue
        speakers.setdefault(speaker, []).append(path)
    return speakers


def one_recording_voice(path: Path) -> Voice | LeftOut:
    """A speaker of one recording: the first half (split in the pause nearest the middle, not
    mid-word) enrolls, the second half logs in and makes the leg."""
    speaker = path.stem.split("-", 1)[0]
    if sf.info(path).duration < _MIN_RECORDING_SECONDS:
        return LeftOut(speaker, f"one recording under {_MIN_RECORDING_SECONDS:g} s")
    samples = np.asarray(sf.read(path, dtype="float32")[0], dtype=np.float32)
    inner = pauses(samples)[1:-1] or [len(samples) // 2]
    half = min(inner, key=lambda cut: abs(cut - len(samples) // 2))
    return Voice(
        speaker,
        [np.ascontiguousarray(samples[:half])],
        samples[half:],
        samples[half:],
        (path.stem,),
        (path.stem,),
    )


def held_apart_voices(
    speakers: Mapping[str, Sequence[Path]],
    several: bool,
    measure: Callable[[Sequence[np.ndarray[Any, np.dtype[np.float32]]]], list[Measured]],
    required: float,
) -> tuple[list[Voice], list[LeftOut]]:
    """The voices to run and the speakers left out. `several`: the folder holds speakers of
    several recordings; they are split by recording (`split_recordings`, `measure` giving the
    server's view of each) and speakers of one recording are left out, as a run enrolls all
    its agents at one minimum. Otherwise every speaker's one recording is split in half."""
    read: dict[Path, np.ndarray[Any, np.dtype[np.float32]]] = {}
    if several:
        read = {
            path: np.asarray(sf.read(path, dtype="float32")[0], dtype=np.float32)
            for paths in speakers.values()
            if len(paths) > 1
            for path in paths
        }
    # One measurement of them all: it starts the service's models once.
    found = dict(zip(read, measure(list(read.values())), strict=True)) if read else {}
    voices: list[Voice] = []
    left_out: list[LeftOut] = []
    for speaker, paths in speakers.items():
        voice: Voice | LeftOut
        if not several:
            voice = one_recording_voice(paths[0])
        elif len(paths) == 1:
            voice = LeftOut(
                speaker,
                "one recording, in a folder of speakers of several: those enroll at the "
                "server's minimum, which a half recording cannot meet",
            )
        else:
            voice = split_recordings(
                speaker,
                [(path.stem, read[path]) for path in paths],
                {path.stem: found[path] for path in paths},
                required,
            )
        if isinstance(voice, Voice):
            voices.append(voice)
        else:
            left_out.append(voice)
    return voices, left_out


class Simulation:
    def __init__(self, server: VoxauthServer, clock: ManualClock) -> None:
        self._server = server
        self._clock = clock
        services = server.services
        assert services is not None
        self._services = services
        self.shifts: ShiftService = services.shifts
        # Virtual time moves only once the model's and the store's work is done.
        self.inference = CountingPool(self.shifts.pool)
        self.shifts.pool = self.inference  # type: ignore[assignment]
        self._store = CountingPool(self.shifts._store_pool)
        self.shifts._store_pool = self._store  # type: ignore[assignment]
        self.watch_embedder = CountingEmbedder(self.shifts.embedder)
        self.shifts.embedder = self.watch_embedder
        self.logins_refused = 0
        self.not_enrolled: dict[str, str] = {}
        """Why a voice was not enrolled, by speaker."""
        self._enrolled: set[str] = set()
        self.spliced = False
        """Legs of turns cut at random places (`conversation`'s `spliced`)."""

    def enroll(self, voice: Voice) -> bool:
        """Enrolls the voice as an agent; False when its half recording is too little, or its
        voiceprint was held as a duplicate of another."""
        agent_id = f"bench-{voice.speaker}"
        enrollment = self._services.enrollment
        enrollment.create_agent(agent_id, voice.speaker, "BENCH")
        refused = []
        for part in voice.enrollment:
            added = enrollment.add_utterance(agent_id, _audio(part))
            if added.record is None:
                refused.append(f"utterance refused: {added.rejection_reason}")
        try:
            outcome = enrollment.finalize(agent_id)
        except VoxauthError as error:
            self.not_enrolled[voice.speaker] = "; ".join([*refused, error.message])
            return False
        if outcome.held is not None:
            # Held for HR's review (it matched another agent): no active voiceprint.
            self.not_enrolled[voice.speaker] = (
                f"held for review ({outcome.held.reason.value}, "
                f"{outcome.held.matched_agent_id or outcome.held.matched_entry_id})"
            )
            return False
        self._enrolled.add(agent_id)
        return True

    async def settle(self) -> None:
        """Lets every woken task run until all are waiting for time or audio again."""
        quiet = 0
        while quiet < 3:
            await asyncio.sleep(0)
            if self.inference.busy or self._store.busy:
                quiet = 0
                await asyncio.sleep(0.0005)
            else:
                quiet += 1

    async def run_batch(
        self,
        plans: Sequence[tuple[Voice, Voice | None, float, float]],
        seed: int,
    ) -> list[ShiftOutcome]:
        """Runs shifts side by side: (agent, impostor or None, takeover time, length)."""
        rng = np.random.default_rng(seed)
        runs = []
        for index, (agent, impostor, takeover_at, seconds) in enumerate(plans):
            agent_id = f"bench-{agent.speaker}"
            login = await self.shifts.start(agent_id, f"bench-{index}", _audio(agent.login))
            if login.verification is None or login.verification.decision.value != "ACCEPT":
                self.logins_refused += 1
                continue  # The login check itself is not what this measures.
            stream = await self.shifts.attach(
                login.shift.shift_id, StreamFormat(AudioEncoding.PCM16LE, RATE)
            )
            turns: list[Turn] = []
            leg, spoken = conversation(agent.material, seconds, rng, turns, spliced=self.spliced)
            if impostor is not None:
                cut = int(takeover_at * RATE)
                other, _ = conversation(
                    impostor.material, (len(leg) - cut) / RATE + 1, rng, spliced=self.spliced
                )
                leg[cut:] = other[: len(leg) - cut]
            runs.append(
                _Run(
                    login.shift.shift_id,
                    stream,
                    pcm16(leg),
                    ShiftOutcome(
                        seconds,
                        spoken,
                        takeover_at if impostor is not None else None,
                        agent=agent.speaker,
                        turns=turns,
                        material_seconds=len(agent.material) / RATE,
                    ),
                )
            )
        started = self._clock.monotonic()
        origin = self.shifts.wall_time(started)
        for run in runs:
            run.origin = origin
        step = int(_STEP_SECONDS * RATE) * 2
        longest = max((len(r.pcm) for r in runs), default=0)
        for offset in range(0, longest, step):
            for run in runs:
                if not run.done and offset + step <= len(run.pcm):
                    run.stream.push(run.pcm[offset : offset + step])
            self._clock.advance(_STEP_SECONDS)
            await self.settle()
            now = self._clock.monotonic() - started
            for run in runs:
                run.drain(now)
                if not run.done and (
                    run.outcome.locked_at is not None or offset + step >= len(run.pcm)
                ):
                    run.done = True
                    await self.shifts.end(run.shift_id)
            if all(r.done for r in runs):
                break
        for run in runs:
            if not run.done:
                await self.shifts.end(run.shift_id)
        return [r.outcome for r in runs]


@dataclass
class _Run:
    shift_id: str
    stream: ShiftStream
    pcm: bytes
    outcome: ShiftOutcome
    done: bool = False
    origin: datetime | None = None
    """The wall time of the leg's start: audio pushed at step k arrives at origin + k and
    holds the leg's second k (its block starts one step earlier)."""

    def drain(self, now: float) -> None:
        # Read without awaiting: the benchmark looks once per virtual second, all shifts in
        # turn, rather than running a reader task per shift.
        while self.stream._events:
            item = self.stream._events.popleft()
            if isinstance(item, ShiftEvent):
                self._event(item, now)

    def _event(self, event: ShiftEvent, now: float) -> None:
        o = self.outcome
        after = o.takeover_at is None or now >= o.takeover_at
        if event.kind in (ShiftEventKind.CHECKPOINT_PASSED, ShiftEventKind.CHECKPOINT_FAILED):
            failed = event.kind is ShiftEventKind.CHECKPOINT_FAILED
            trigger = (event.trigger or CheckpointTrigger.SCHEDULED).value
            key = f"{trigger} {'failed' if failed else 'passed'}"
            o.checkpoints[key] = o.checkpoints.get(key, 0) + 1
            if failed and after and o.first_failure_at is None:
                o.first_failure_at = now
            o.decided.append(
                Decided(
                    now,
                    trigger,
                    not failed,
                    event.score,
                    event.threshold,
                    event.net_speech_seconds,
                    event.presentation.decision.value if event.presentation else "-",
                    (self._leg_seconds(event.audio_start), self._leg_seconds(event.audio_end)),
                )
            )
        elif event.kind is ShiftEventKind.INSUFFICIENT_SPEECH:
            trigger = (event.trigger or CheckpointTrigger.SCHEDULED).value
            key = f"{trigger} insufficient"
            o.checkpoints[key] = o.checkpoints.get(key, 0) + 1
        elif event.kind is ShiftEventKind.SHIFT_LOCKED and o.locked_at is None:
            o.locked_at = now
        elif event.kind is ShiftEventKind.SECOND_VOICE:
            o.second_voices += 1

    def _leg_seconds(self, at: datetime | None) -> float:
        if at is None or self.origin is None:
            return 0.0
        return (at - self.origin).total_seconds() + _STEP_SECONDS


def _audio(samples: np.ndarray[Any, np.dtype[np.float32]]) -> AudioInput:
    return AudioInput(pcm16(samples), AudioEncoding.PCM16LE, RATE)


# --- the benchmark --------------------------------------------------------------------------


def bench_config(
    workdir: Path, watch: bool, threshold: float | None, *, one_recording: bool = True
) -> ServerConfig:
    """`one_recording`: every speaker has one recording, half of which enrolls it: the
    enrollment minimum is lowered to what a half holds. Speakers of several recordings enroll
    at the server's own minimum."""
    base = ServerConfig.from_environment()
    shifts = replace(base.shifts, change_watch=watch)
    if threshold is not None:
        shifts = replace(shifts, change_watch_threshold=threshold)
    return replace(
        base,
        listen_address="127.0.0.1:0",
        database_path=workdir / f"bench-{watch}.db",
        # One recording per speaker: its first half (6-8 s, 4-7 s of speech) makes the voiceprint.
        enrollment=replace(EnrollmentPolicy(), required_net_speech_seconds=4.0)
        if one_recording
        else base.enrollment,
        transport=TransportConfig(insecure_development=True),
        http=replace(base.http, listen_address=""),
        presentation=replace(base.presentation, replay_detection=False),
        shifts=shifts,
    )


@dataclass
class RunResult:
    outcomes: list[ShiftOutcome]
    cpu_seconds: float
    """The process's CPU over the shifts (the service's and the simulation's own)."""
    looks: int
    embeddings: int
    """Looks of the change watch, and those that ran the speaker model."""
    agents: int
    not_enrolled: int
    logins_refused: int
    not_enrolled_why: dict[str, str] = field(default_factory=dict)
    look_cpu: tuple[float, float] | None = None
    """CPU seconds of one look with speech and of one without, measured alone."""


async def _run(
    config: ServerConfig,
    plans: list[tuple[Voice, Voice | None, float, float]],
    args: Any,
    *,
    measure_look: bool = False,
) -> RunResult:
    async with _bench_server(config) as (server, clock):
        simulation = Simulation(server, clock)
        simulation.spliced = args.spliced_turns
        voices = {p[0].speaker: p[0] for p in plans}
        enrolled = {speaker for speaker, voice in voices.items() if simulation.enroll(voice)}
        plans = [p for p in plans if p[0].speaker in enrolled]
        outcomes: list[ShiftOutcome] = []
        cpu = 0.0
        # One shift per agent at a time: with fewer speakers than shifts side by side, fewer.
        side_by_side = max(1, min(args.concurrency, len({p[0].speaker for p in plans})))
        for start in range(0, len(plans), side_by_side):
            batch = plans[start : start + side_by_side]
            before = time.process_time()
            outcomes += await simulation.run_batch(batch, args.seed + start)
            cpu += time.process_time() - before
            print(f"  ... {len(outcomes)} shifts", file=sys.stderr, flush=True)
        result = RunResult(
            outcomes,
            cpu,
            simulation.inference.looks,
            simulation.watch_embedder.calls,
            len(enrolled),
            len(voices) - len(enrolled),
            simulation.logins_refused,
            dict(simulation.not_enrolled),
        )
        if measure_look and plans:
            result.look_cpu = look_cost(simulation, plans[0][0], np.random.default_rng(args.seed))
        return result


@contextlib.asynccontextmanager
async def _bench_server(config: ServerConfig) -> AsyncIterator[tuple[VoxauthServer, ManualClock]]:
    """A started server on a virtual clock, with a database and a key of its own."""
    clock = ManualClock(datetime(2026, 12, 1, 8, 0, tzinfo=UTC))
    database = Path(config.database_path).with_name(f"{secrets.token_hex(4)}.db")
    server = VoxauthServer(
        replace(config, database_path=database), secrets.token_bytes(32), clock=clock
    )
    await server.start()
    try:
        yield server, clock
    finally:
        await server.stop(grace=0)


async def _measure(
    config: ServerConfig, recordings: Sequence[np.ndarray[Any, np.dtype[np.float32]]]
) -> list[Measured]:
    """Each recording's net speech as the service's analyser (its speech detector) finds it,
    and whether enrollment's quality gates would keep it."""
    async with _bench_server(config) as (server, _):
        assert server.services is not None
        analyser = server.services.shifts._analyser
        least = config.enrollment.min_utterance_net_speech_seconds
        found = []
        for samples in recordings:
            sample = analyser.analyse(_audio(samples), min_net_speech_seconds=least)
            quality = sample.quality
            pad = sample.presentation
            found.append(
                Measured(
                    quality.net_speech_seconds,
                    sample.embedding is not None
                    and not quality.issues
                    and quality.net_speech_seconds >= least
                    # Enrollment refuses what the countermeasure takes for an attack.
                    and not (pad is not None and pad.enforced and pad.decision.suspected),
                )
            )
        return found


def look_cost(
    simulation: Simulation, voice: Voice, rng: np.random.Generator, repeats: int = 30
) -> tuple[float, float]:
    """CPU seconds of one look as the service makes it (the voiceprint read, decoding, the
    level screen, the model), with nothing else running: on 60 s of the agent's conversation,
    and on 60 s of line noise (a look that finds no speech)."""
    shifts = simulation.shifts
    embedder = simulation.watch_embedder
    agent_id = f"bench-{voice.speaker}"

    def cost(samples: np.ndarray[Any, np.dtype[np.float32]]) -> float:
        buffer = ShiftAudioBuffer(StreamFormat(AudioEncoding.PCM16LE, RATE), 90.0)
        data = pcm16(samples)
        step = RATE * 2
        for at, offset in enumerate(range(0, len(data) - step + 1, step)):
            buffer.append(data[offset : offset + step], float(at + 1))
        before = time.process_time()
        for _ in range(repeats):
            ChangeWatch(shifts.policy, embedder).look(
                buffer, functools.partial(shifts.voiceprint_of, agent_id)
            )
        return (time.process_time() - before) / repeats

    speech, _ = conversation(voice.material, 60.0, rng)
    noise = (10 ** (_NOISE_DBFS / 20) * rng.standard_normal(60 * RATE)).astype(np.float32)
    return cost(speech), cost(noise)


def _plans(
    voices: list[Voice], rng: np.random.Generator, takeovers: int, genuine: int, hours: float
) -> tuple[list[tuple[Voice, Voice | None, float, float]], list[tuple[Voice, None, float, float]]]:
    takeover_plans: list[tuple[Voice, Voice | None, float, float]] = []
    for i in range(takeovers):
        agent = voices[i % len(voices)]
        others = [v for v in voices if v.speaker != agent.speaker]
        impostor = others[int(rng.integers(0, len(others)))]
        at = float(rng.uniform(120.0, 1800.0))
        takeover_plans.append((agent, impostor, at, at + 1200.0))
    genuine_plans: list[tuple[Voice, None, float, float]] = [
        (voices[(takeovers + i) % len(voices)], None, 0.0, hours * 3600) for i in range(genuine)
    ]
    return takeover_plans, genuine_plans


def _fmt(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    return f"median {spread.median:.0f} s, p90 {spread.p90:.0f} s, max {spread.max:.0f} s"


def report(
    takeover: RunResult, genuine: RunResult, baseline: RunResult | None, *, several: bool = False
) -> None:
    for name, run in (("takeover", takeover), ("genuine", genuine)):
        print(
            f"{name} run: {run.agents} agents enrolled ({run.not_enrolled} recordings too short "
            f"for a voiceprint or held as another's duplicate), {run.logins_refused} logins "
            "refused (those shifts not run)"
        )
        for speaker, why in sorted(run.not_enrolled_why.items()):
            print(f"  {speaker} not enrolled: {why}")
    shifts = takeover.outcomes
    locked = [o for o in shifts if o.locked_at is not None and o.takeover_at is not None]
    to_lock = [o.locked_at - o.takeover_at for o in locked]  # type: ignore[operator]
    to_fail = [
        o.first_failure_at - o.takeover_at
        for o in shifts
        if o.first_failure_at is not None and o.takeover_at is not None
    ]
    print(f"takeover shifts: {len(shifts)} (a takeover 2-30 min in, then 20 min of the impostor)")
    print(f"  takeover -> first failed checkpoint: {_fmt(Spread.of(to_fail))} ({len(to_fail)})")
    print(f"  takeover -> lock: {_fmt(Spread.of(to_lock))}; locked {len(locked)}/{len(shifts)}")
    print(f"  takeovers locked: {_interval(len(locked), len(shifts), 'shifts')}")
    within = sum(t < 120 for t in to_lock)
    print(f"  locked within 2 min of the takeover: {_interval(within, len(shifts), 'shifts')}")
    print(f"  checkpoints: {_counts(shifts)}")
    if baseline is not None:
        base = [o for o in baseline.outcomes if o.locked_at is not None]
        base_lock = [o.locked_at - o.takeover_at for o in base]  # type: ignore[operator]
        print(
            f"  the same without the watch: takeover -> lock {_fmt(Spread.of(base_lock))}; "
            f"locked {len(base)}/{len(baseline.outcomes)} within 40 min"
        )
    calm = genuine.outcomes
    seconds = sum(o.seconds for o in calm)
    hours = seconds / 3600
    counts = _counts(calm)
    triggers = sum(n for k, n in counts.items() if k.startswith("CHANGE_WATCH"))
    failures = sum(n for k, n in counts.items() if k.endswith("failed"))
    locks = sum(o.locked_at is not None for o in calm)
    voices = sum(o.second_voices for o in calm)
    print(f"genuine shifts: {len(calm)}, {hours:.1f} shift-hours, no takeover")
    print(
        f"  false triggers {triggers} ({triggers / hours:.2f} per shift-hour); failed "
        f"checkpoints {failures}; false locks {locks} ({locks / hours:.3f} per shift-hour); "
        f"second-voice events {voices} ({voices / hours:.2f} per shift-hour)"
    )
    print(f"  checkpoints: {counts}")
    print(f"  shifts with a false lock: {_interval(locks, len(calm), 'shifts')}")
    triggered = sum(_triggered(o) for o in calm)
    print(f"  shifts with a false trigger: {_interval(triggered, len(calm), 'shifts')}")
    decided = sum(len(o.decided) for o in calm)
    print(f"  failed checkpoints: {_interval(failures, decided, 'decided')}")
    speakers = {o.agent for o in calm}
    failing = {o.agent for o in calm if any(not d.passed for d in o.decided)}
    kind = (
        "several recordings each, the leg's apart from the enrollment's"
        if several
        else "one recording each, the independent trials"
    )
    print(
        f"  speakers ({kind}): {len(speakers)}; with a "
        f"failed checkpoint: {_interval(len(failing), len(speakers), 'speakers')}"
    )
    shared = [
        shared_material(o.turns, b.audio, a.audio, o.material_seconds)
        for o in calm
        for a, b in itertools.pairwise(o.decided)
    ]
    if shared:
        print(
            f"  consecutive checkpoints of a shift judged the same recorded speech: "
            f"median {nearest_rank(shared, 0.5):.0%} of it (min {min(shared):.0%}, "
            f"{len(shared)} pairs): their failures are not independent trials"
        )
    for line in explain_locks(calm):
        print(line)
    speech_minutes = sum(o.speech_seconds for o in calm) / 60
    print(
        f"  the watch: {genuine.looks} looks, {genuine.embeddings} with speech enough to embed "
        f"({genuine.embeddings / hours:.0f} per shift-hour; {speech_minutes / hours:.0f} min of "
        "speech per shift-hour)"
    )
    if genuine.look_cpu is not None and genuine.looks:
        with_speech, without = genuine.look_cpu
        empty = genuine.looks - genuine.embeddings
        added = (genuine.embeddings * with_speech + empty * without) / hours
        print(
            f"  CPU of one look, measured alone: {with_speech * 1000:.1f} ms with speech, "
            f"{without * 1000:.1f} ms without"
        )
        print(
            f"  added CPU per shift: {added:.2f} s per shift-hour, "
            f"{added * hours / speech_minutes * 1000:.0f} ms per shift-minute of speech; "
            f"the watch alone would fill a 2-core replica at {2 * 3600 / added:.0f} shifts"
        )
    total = genuine.cpu_seconds / hours
    print(
        f"  all CPU of the genuine run (checkpoints, watch, the store and the simulation itself):"
        f" {total:.1f} s per shift-hour, i.e. {2 * 3600 / total:.0f} shifts per 2-core replica "
        "(stream ingestion over gRPC not included)"
    )


def _triggered(outcome: ShiftOutcome) -> bool:
    return any(k.startswith("CHANGE_WATCH") for k in outcome.checkpoints)


def explain_locks(outcomes: Sequence[ShiftOutcome]) -> list[str]:
    """For each locked genuine shift: its agent, every decided checkpoint (trigger, score
    against threshold, net speech, the countermeasure's decision, the leg's seconds it
    judged) and how much of the same recorded material the two failures that locked it
    judged (looped material scored twice makes the failures one trial, not two)."""
    lines = []
    for o in outcomes:
        if o.locked_at is None or o.takeover_at is not None:
            continue
        lines.append(
            f"  false lock: agent {o.agent} at {o.locked_at:.0f} s "
            f"(material {o.material_seconds:.1f} s, looped)"
        )
        for d in o.decided:
            lines.append(
                f"    {d.at:6.0f} s {d.trigger:<12} {'passed' if d.passed else 'FAILED'} "
                f"score {d.score:.3f} vs {d.threshold:.3f}, {d.net_speech_seconds:.1f} s net, "
                f"PAD {d.pad}, audio {d.audio[0]:.0f}-{d.audio[1]:.0f} s"
            )
        failed = [d for d in o.decided if not d.passed][-2:]
        if len(failed) == 2:
            shared = shared_material(o.turns, failed[1].audio, failed[0].audio, o.material_seconds)
            lines.append(
                f"    the locking failure judged {shared:.0%} of the material the one "
                "before it judged"
            )
    return lines


def _counts(outcomes: Sequence[ShiftOutcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        for k, n in o.checkpoints.items():
            counts[k] = counts.get(k, 0) + n
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth bench shifts takeover",
        description="Time from a takeover of the agent's line to the lock, false triggers and "
        "locks on the agent's own voice, and the change watch's CPU, at the default schedule.",
    )
    parser.add_argument(
        "directory",
        type=Path,
        help="folder of 16 kHz .flac recordings named SPEAKER-..., e.g. LibriSpeech's. With one "
        "recording per speaker, its first half enrolls (the enrollment minimum lowered to 4 s "
        "of net speech) and its second half makes the leg. When speakers have several, each "
        "enrolls from its first recordings in file-name order until the server's own minimum "
        "of net speech is met, and its login and leg are made of the remaining recordings "
        "only (speakers of one recording, or with too little speech, are then left out, "
        "with the reason printed)",
    )
    parser.add_argument("--takeovers", type=int, default=40, help="takeover shifts (default 40)")
    parser.add_argument("--genuine", type=int, default=20, help="genuine shifts (default 20)")
    parser.add_argument("--hours", type=float, default=1.0, help="genuine shift length, h")
    parser.add_argument(
        "--baseline", type=int, default=0, help="takeover shifts also run without the watch"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="shifts run side by side")
    parser.add_argument("--threshold", type=float, help="VOXAUTH_CHANGE_WATCH_THRESHOLD")
    parser.add_argument(
        "--no-watch", action="store_true", help="run every shift without the change watch"
    )
    parser.add_argument(
        "--genuine-only",
        action="store_true",
        help="draw the same shifts, run only the genuine ones (e.g. to compare --no-watch)",
    )
    parser.add_argument(
        "--spliced-turns",
        action="store_true",
        help="cut turns at random places of the recording, as the first version did",
    )
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a folder")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voxauth-takeover-") as tmp:
        workdir = Path(tmp)
        config = bench_config(workdir, not args.no_watch, args.threshold)
        speakers = held_apart_recordings(args.directory, config)
        several = any(len(paths) > 1 for paths in speakers.values())
        config = bench_config(workdir, not args.no_watch, args.threshold, one_recording=not several)

        def measure(
            recordings: Sequence[np.ndarray[Any, np.dtype[np.float32]]],
        ) -> list[Measured]:
            return asyncio.run(_measure(config, recordings))

        voices, left_out = held_apart_voices(
            speakers, several, measure, config.enrollment.required_net_speech_seconds
        )
        for voice in voices:
            if several:
                print(
                    f"  {voice.speaker}: enrolls from {len(voice.enrolled_from)} recordings "
                    f"({voice.enrollment_net_speech:.1f} s net speech; {voice.enrolled_from[0]}"
                    f"..{voice.enrolled_from[-1]}), the leg from {len(voice.leg_from)} "
                    f"({voice.leg_net_speech:.1f} s; {voice.leg_from[0]}..{voice.leg_from[-1]})"
                    + (f", skipped {', '.join(voice.skipped)}" if voice.skipped else "")
                )
        # Grouped by reason: a folder of one recording per speaker leaves out many short ones.
        reasons: dict[str, list[str]] = {}
        for out in left_out:
            reasons.setdefault(out.reason, []).append(out.speaker)
        for reason, who in reasons.items():
            print(f"  {', '.join(who)} left out: {reason}")
        if len(voices) < 2:
            print("voxauth bench shifts takeover: fewer than 2 usable speakers", file=sys.stderr)
            return 2
        rng = np.random.default_rng(args.seed)
        takeover_plans, genuine_plans = _plans(
            voices, rng, args.takeovers, args.genuine, args.hours
        )
        print(
            f"{len(voices)} held-apart speakers from {args.directory}; policy "
            f"{ShiftPolicy().mean_checkpoint_interval_seconds:g} +/- "
            f"{ShiftPolicy().checkpoint_jitter_seconds:g} s, "
            + (
                "watch off"
                if args.no_watch
                else f"watch threshold {config.shifts.change_watch_threshold:g}, every "
                f"{config.shifts.change_watch_interval_seconds:g} s"
            )
        )
        if args.genuine_only:
            takeover_plans = []
        takeover = asyncio.run(_run(config, takeover_plans, args))
        genuine = asyncio.run(_run(config, list(genuine_plans), args, measure_look=True))
        baseline = None
        if args.baseline:
            plain = bench_config(workdir, False, args.threshold)
            # Without the watch a lock takes two random checkpoints: give it 40 minutes.
            longer = [(a, i, t, t + 2400.0) for a, i, t, _ in takeover_plans[: args.baseline]]
            baseline = asyncio.run(_run(plain, longer, args))
    report(takeover, genuine, baseline, several=several)
    print(f"ran {time.monotonic() - started:.0f} s wall")
    return 0
