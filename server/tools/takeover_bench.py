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
first half of its recording and logs in with the second half; its leg of the call then carries
turns of 2-8 s taken from that second half, looped, with pauses of 2-8 s of line noise between
them (the customer speaks on the other leg). A takeover shift switches, at a random time 2 to
30 minutes into the shift, to another held-apart speaker's turns. Replay detection is off:
looped recordings are replays by construction.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf

from server.app import VoxauthServer
from server.config import (
    EnrollmentPolicy,
    MfaConfig,
    ServerConfig,
    ShiftPolicy,
    TransportConfig,
)
from server.errors import VoxauthError
from server.pipeline.analysis import AudioInput
from server.pipeline.decode import AudioEncoding
from server.scoring.scorer import ScoringModel
from server.shifts.buffer import StreamFormat
from server.shifts.change_watch import CheckpointTrigger
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.shifts.service import ShiftService, ShiftStream
from server.tools.shift_bench import nearest_rank

T = TypeVar("T")
RATE = 16_000
_MIN_RECORDING_SECONDS = 12.0
_STEP_SECONDS = 1.0  # one message of 50 frames per shift per step
_NOISE_DBFS = -65.0


class VirtualClock:
    """A Clock whose time moves only by `advance` (as the tests' ManualClock)."""

    def __init__(self) -> None:
        self._elapsed = 0.0
        self._start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._elapsed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._elapsed:
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (deadline, wake)
        self._sleepers.append(entry)
        try:
            await wake
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self._elapsed += seconds
        for deadline, wake in list(self._sleepers):
            if deadline <= self._elapsed and not wake.done():
                wake.set_result(None)


class CountingPool:
    """Wraps a pool the shift service runs its work on, counting the work in flight: virtual
    time may only move once it is done (the model takes real time; the shift must not see it
    as minutes)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.busy = 0

    async def run(self, work: Callable[[], T]) -> T:
        self.busy += 1
        try:
            result: T = await self._pool.run(work)
            return result
        finally:
            self.busy -= 1


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


def conversation(
    material: np.ndarray[Any, np.dtype[np.float32]], seconds: float, rng: np.random.Generator
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], float]:
    """`seconds` of one speaker's leg of a call: turns of 2-8 s cut from `material` (looped,
    from random places) with 2-8 s of line noise between them; and the seconds of turns."""
    total = int(seconds * RATE)
    out = (10 ** (_NOISE_DBFS / 20) * rng.standard_normal(total)).astype(np.float32)
    at = 0
    spoken = 0
    while at < total:
        turn = int(rng.uniform(2.0, 8.0) * RATE)
        start = int(rng.integers(0, len(material)))
        piece = np.take(material, np.arange(start, start + turn), mode="wrap")
        end = min(total, at + turn)
        out[at:end] += piece[: end - at]
        spoken += end - at
        at = end + int(rng.uniform(2.0, 8.0) * RATE)
    return out, spoken / RATE


def pcm16(samples: np.ndarray[Any, np.dtype[np.float32]]) -> bytes:
    return bytes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())


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


# --- the simulation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    speaker: str
    enrollment: list[np.ndarray[Any, np.dtype[np.float32]]]
    login: np.ndarray[Any, np.dtype[np.float32]]
    material: np.ndarray[Any, np.dtype[np.float32]]


def held_apart_voices(directory: Path, config: ServerConfig) -> list[Voice]:
    """One voice per speaker not in the shipped cohort or calibration, whose recording is long
    enough to enroll and log in from."""
    from models.manifest import ECAPA_MANIFEST

    scoring = ScoringModel.load(config.scoring, ECAPA_MANIFEST.model_id)
    fitted_on = set(scoring.calibration.provenance.get("speakers", []))
    voices = []
    for path in sorted(directory.glob("*.flac")):
        speaker = path.stem.split("-", 1)[0]
        info = sf.info(path)
        if (
            speaker in fitted_on
            or info.samplerate != RATE
            or info.duration < _MIN_RECORDING_SECONDS
        ):
            continue
        samples = np.asarray(sf.read(path, dtype="float32")[0], dtype=np.float32)
        half = len(samples) // 2
        voices.append(
            Voice(
                speaker,
                [np.ascontiguousarray(p) for p in np.array_split(samples[:half], 2)],
                samples[half:],
                samples[half:],
            )
        )
    return voices


class Simulation:
    def __init__(self, server: VoxauthServer, clock: VirtualClock) -> None:
        self._server = server
        self._clock = clock
        services = server.services
        assert services is not None
        self._services = services
        self.shifts: ShiftService = services.shifts
        # Virtual time moves only once the model's and the store's work is done.
        self._inference = CountingPool(self.shifts.pool)
        self.shifts.pool = self._inference  # type: ignore[assignment]
        self._store = CountingPool(self.shifts._store_pool)
        self.shifts._store_pool = self._store  # type: ignore[assignment]
        self._enrolled: set[str] = set()

    def enroll(self, voice: Voice) -> bool:
        """Enrolls the voice as an agent; False when its half recording is too little."""
        agent_id = f"bench-{voice.speaker}"
        enrollment = self._services.enrollment
        enrollment.create_agent(agent_id, voice.speaker, "BENCH")
        for part in voice.enrollment:
            enrollment.add_utterance(agent_id, _audio(part))
        try:
            enrollment.finalize(agent_id)
        except VoxauthError:
            return False
        self._enrolled.add(agent_id)
        return True

    async def settle(self) -> None:
        """Lets every woken task run until all are waiting for time or audio again."""
        quiet = 0
        while quiet < 3:
            await asyncio.sleep(0)
            if self._inference.busy or self._store.busy:
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
            if login.verification.decision.value != "ACCEPT":
                continue  # The login check itself is not what this measures.
            stream = await self.shifts.attach(
                login.shift.shift_id, StreamFormat(AudioEncoding.PCM16LE, RATE)
            )
            leg, spoken = conversation(agent.material, seconds, rng)
            if impostor is not None:
                cut = int(takeover_at * RATE)
                leg[cut:] = conversation(impostor.material, seconds - takeover_at, rng)[0][
                    : len(leg) - cut
                ]
            runs.append(
                _Run(
                    login.shift.shift_id,
                    stream,
                    pcm16(leg),
                    ShiftOutcome(
                        seconds,
                        spoken,
                        takeover_at if impostor is not None else None,
                    ),
                )
            )
        started = self._clock.monotonic()
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
        elif event.kind is ShiftEventKind.INSUFFICIENT_SPEECH:
            trigger = (event.trigger or CheckpointTrigger.SCHEDULED).value
            key = f"{trigger} insufficient"
            o.checkpoints[key] = o.checkpoints.get(key, 0) + 1
        elif event.kind is ShiftEventKind.SHIFT_LOCKED and o.locked_at is None:
            o.locked_at = now
        elif event.kind is ShiftEventKind.SECOND_VOICE:
            o.second_voices += 1


def _audio(samples: np.ndarray[Any, np.dtype[np.float32]]) -> AudioInput:
    return AudioInput(pcm16(samples), AudioEncoding.PCM16LE, RATE)


# --- the benchmark --------------------------------------------------------------------------


def bench_config(workdir: Path, watch: bool, threshold: float | None) -> ServerConfig:
    base = ServerConfig.from_environment()
    shifts = replace(base.shifts, change_watch=watch)
    if threshold is not None:
        shifts = replace(shifts, change_watch_threshold=threshold)
    return replace(
        base,
        listen_address="127.0.0.1:0",
        database_path=workdir / f"bench-{watch}.db",
        # One recording per speaker: its first half (~6-8 s) must make the voiceprint.
        enrollment=replace(EnrollmentPolicy(), required_net_speech_seconds=5.0),
        transport=TransportConfig(insecure_development=True),
        mfa=replace(MfaConfig(), jwks_listen_address=""),
        presentation=replace(base.presentation, replay_detection=False),
        shifts=shifts,
    )


async def _run(
    config: ServerConfig, plans: list[tuple[Voice, Voice | None, float, float]], args: Any
) -> tuple[list[ShiftOutcome], float]:
    clock = VirtualClock()
    # A database and a key of its own for each run.
    database = config.database_path.with_name(f"{secrets.token_hex(4)}.db")
    server = VoxauthServer(
        replace(config, database_path=database), secrets.token_bytes(32), clock=clock
    )
    await server.start()
    try:
        simulation = Simulation(server, clock)
        enrolled = {
            speaker
            for speaker, voice in {p[0].speaker: p[0] for p in plans}.items()
            if simulation.enroll(voice)
        }
        plans = [p for p in plans if p[0].speaker in enrolled]
        outcomes: list[ShiftOutcome] = []
        cpu = 0.0
        for start in range(0, len(plans), args.concurrency):
            batch = plans[start : start + args.concurrency]
            before = time.process_time()
            outcomes += await simulation.run_batch(batch, args.seed + start)
            cpu += time.process_time() - before
            print(f"  ... {len(outcomes)} shifts", file=sys.stderr, flush=True)
        return outcomes, cpu
    finally:
        await server.stop(grace=0)


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
    takeover: list[ShiftOutcome],
    genuine: list[ShiftOutcome],
    cpu_watch: float,
    cpu_plain: float,
    baseline: list[ShiftOutcome],
) -> None:
    locked = [o for o in takeover if o.locked_at is not None and o.takeover_at is not None]
    to_lock = [o.locked_at - o.takeover_at for o in locked]  # type: ignore[operator]
    to_fail = [
        o.first_failure_at - o.takeover_at
        for o in takeover
        if o.first_failure_at is not None and o.takeover_at is not None
    ]
    print(f"takeover shifts: {len(takeover)} (takeover 2-30 min in, then 20 min of the impostor)")
    print(f"  takeover -> first failed checkpoint: {_fmt(Spread.of(to_fail))} ({len(to_fail)})")
    print(f"  takeover -> lock: {_fmt(Spread.of(to_lock))}; locked {len(locked)}/{len(takeover)}")
    hours = sum(o.seconds for o in genuine) / 3600
    triggers = sum(
        n for o in genuine for k, n in o.checkpoints.items() if k.startswith("CHANGE_WATCH")
    )
    follow = sum(n for o in genuine for k, n in o.checkpoints.items() if k.startswith("FOLLOW_UP"))
    failures = sum(n for o in genuine for k, n in o.checkpoints.items() if k.endswith("failed"))
    locks = sum(o.locked_at is not None for o in genuine)
    seconds_voices = sum(o.second_voices for o in genuine)
    print(f"genuine shifts: {len(genuine)}, {hours:.1f} shift-hours")
    print(
        f"  false triggers {triggers} ({triggers / hours:.2f} per shift-hour), follow-ups "
        f"{follow}, failed checkpoints {failures}, false locks {locks} "
        f"({locks / hours:.3f} per shift-hour), second-voice events {seconds_voices} "
        f"({seconds_voices / hours:.2f} per shift-hour)"
    )
    counts: dict[str, int] = {}
    for o in genuine:
        for k, n in o.checkpoints.items():
            counts[k] = counts.get(k, 0) + n
    print(f"  checkpoints: {dict(sorted(counts.items()))}")
    speech_minutes = sum(o.speech_seconds for o in genuine) / 60
    if cpu_plain > 0:
        added = (cpu_watch - cpu_plain) / len(genuine)
        per_hour = added / (sum(o.seconds for o in genuine) / len(genuine) / 3600)
        per_speech_minute = (cpu_watch - cpu_plain) / speech_minutes
        total_per_second = cpu_watch / sum(o.seconds for o in genuine)
        print(
            f"CPU on the genuine shifts: {cpu_watch:.1f} s with the watch, {cpu_plain:.1f} s "
            f"without; added {per_hour:.2f} s per shift-hour, {per_speech_minute * 1000:.0f} ms "
            f"per shift-minute of speech ({speech_minutes / hours:.0f} min of speech per "
            "shift-hour)"
        )
        added_cores = per_hour / 3600
        print(
            f"  implied per 2-core replica: the watch alone {2 / added_cores:.0f} shifts; "
            f"checkpoints and watch together {2 / total_per_second:.0f} shifts "
            "(stream ingestion not included)"
        )
    if baseline:
        base_locked = [o for o in baseline if o.locked_at is not None]
        base_lock = [o.locked_at - o.takeover_at for o in base_locked]  # type: ignore[operator]
        print(
            f"without the watch: takeover -> lock {_fmt(Spread.of(base_lock))}; locked "
            f"{len(base_locked)}/{len(baseline)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth bench shifts takeover",
        description="Time from a takeover of the agent's line to the lock, false triggers and "
        "locks on the agent's own voice, and the change watch's CPU, at the default schedule.",
    )
    parser.add_argument("directory", type=Path, help="folder of .flac recordings, one speaker each")
    parser.add_argument("--takeovers", type=int, default=40, help="takeover shifts (default 40)")
    parser.add_argument("--genuine", type=int, default=20, help="genuine shifts (default 20)")
    parser.add_argument("--hours", type=float, default=1.0, help="genuine shift length, h")
    parser.add_argument(
        "--baseline", type=int, default=0, help="takeover shifts also run without the watch"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="shifts run side by side")
    parser.add_argument("--threshold", type=float, help="VOXAUTH_CHANGE_WATCH_THRESHOLD")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a folder")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voxauth-takeover-") as tmp:
        workdir = Path(tmp)
        config = bench_config(workdir, True, args.threshold)
        voices = held_apart_voices(args.directory, config)
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
            f"{ShiftPolicy().checkpoint_jitter_seconds:g} s, watch threshold "
            f"{config.shifts.change_watch_threshold:g}, every "
            f"{config.shifts.change_watch_interval_seconds:g} s"
        )
        takeover, _ = asyncio.run(_run(config, takeover_plans, args))
        genuine, cpu_watch = asyncio.run(_run(config, list(genuine_plans), args))
        plain = bench_config(workdir, False, args.threshold)
        _, cpu_plain = asyncio.run(_run(plain, list(genuine_plans), args))
        baseline: list[ShiftOutcome] = []
        if args.baseline:
            # Without the watch a lock takes two random checkpoints: give it 40 minutes.
            longer = [(a, i, t, t + 2400.0) for a, i, t, _ in takeover_plans[: args.baseline]]
            baseline, _ = asyncio.run(_run(plain, longer, args))
    report(takeover, genuine, cpu_watch, cpu_plain, baseline)
    print(f"ran {time.monotonic() - started:.0f} s wall")
    return 0
