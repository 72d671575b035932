"""`voxauth bench capacity`: what stream ingestion costs one replica, at the default policy.

`voxauth bench shifts` measures checkpoints, at 20 times the default rate. This command
measures the other part of a shift's load: its stream. It starts its own server (a
subprocess on 127.0.0.1 with a temporary key and database, the default checkpoint policy of
a checkpoint every 600 +/- 480 s, at least 120 s apart), enrolls one agent per long recording
in tests/data (LibriSpeech, CC BY 4.0), and grows the number of concurrent shifts level by
level (shifts of a lower level stay open, so each shift logs in once). Each shift streams its
agent's recording, looped, at real time: PCM16LE 16 kHz, `--message-ms` per message (100 ms
by default, as `bench shifts`; a softphone may send single 20 ms frames), each message on an
absolute deadline.

The streams come from several client processes (`--clients`), since one Python process
cannot write thousands of messages a second; they share the host's cores with the server, so
their CPU is measured and reported beside it. The shifts of a level log in as softphones
should (server/tools/login_ramp.py): at most `--logins-in-flight` at a time over all clients,
and a login refused for load (RESOURCE_EXHAUSTED, UNAVAILABLE) retried with the same request
id after an exponential, jittered backoff; each shift streams as soon as its login passes.
That ramp is reported (its time, the logins retried and how often) and not measured: per
level, over a window of `--seconds` that starts once every shift of the level is streaming
and every login of it decided:

- server CPU (utime + stime of the server process, all threads, from /proc/PID/stat) per
  second of wall time, in total and per stream, and the marginal cost per added stream;
- message lateness: how far behind its deadline each message was written (p50, p99, max),
  and the worst lateness at the end of the window, which grows when the server (or the
  client) cannot keep up: a backlog, not jitter;
- the server's resident memory (VmRSS) per shift over the idle server's;
- the checkpoints decided in the window, by trigger, and their latency (decided - due). A
  shift's first checkpoint comes 120 to 1080 s after its login, so a window soon after the
  ramp sees fewer than the steady state (shifts / 600 s): both are printed, with the number
  the schedule leads to expect at the shifts' ages in the window;
- the change watch's looks in the window, by outcome, with those skipped because the
  inference pool was busy, and the checkpoint attempts the busy pool deferred: the server's
  own counters, scraped from its /metrics (plain HTTP on loopback) as the window opens and
  closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb

from server.config import ShiftPolicy
from server.shifts.buffer import MAX_FRAMES_PER_MESSAGE
from server.tools.login_ramp import Attempted, Backoff, RampTally, ramp, with_retries
from server.tools.shift_bench import (
    _SPEECH_DIR,
    FRAME_BYTES,
    RATE,
    Agent,
    BenchServer,
    ShiftTally,
    _describe,
    _free_port,
    _pcm16,
    _raw,
    _start_shift,
    busy_seconds_from_proc_stat,
    cpu_seconds_from_stat,
    enroll_agents,
    nearest_rank,
    recordings,
)

_MAX_SHIFTS = 5000
_LOGIN_CONCURRENCY = 2  # the probe's logins, before any stream runs
_CALL_TIMEOUT = 120.0
_SETTLE_SECONDS = 5.0  # after the ramp: the last streams' first messages, before the window
_TRIGGERS = {
    spb.CHECKPOINT_TRIGGER_SCHEDULED: "scheduled",
    spb.CHECKPOINT_TRIGGER_CHANGE_WATCH: "change watch",
    spb.CHECKPOINT_TRIGGER_FOLLOW_UP: "follow-up",
}
_OUTCOMES = {
    spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED: "passed",
    spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED: "failed",
    spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH: "insufficient",
}
# A level keeps up when no message was written this far behind its deadline at the end of
# the window: a backlog that grows would pass it within a window, jitter stays below.
BACKLOG_LIMIT_SECONDS = 1.0
# ... and when its streams sent this share of the messages real time asks for in the window
# (a stream that stopped, or a client that could not keep up, falls below).
SENT_SHARE_LIMIT = 0.99


# --- pure parts -----------------------------------------------------------------------------


def rss_bytes_from_status(status: str) -> int:
    """VmRSS of a process from its /proc/PID/status text, in bytes."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmRSS line (a kernel thread, or not a /proc/PID/status text)")


def message_chunks(pcm: bytes, frames: int) -> list[bytes]:
    """The recording as whole messages of `frames` 20 ms frames (a shorter tail is dropped,
    so every message carries the same duration and the pacing stays real time)."""
    step = FRAME_BYTES * frames
    return [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]


def split_evenly(count: int, parts: int) -> list[int]:
    """`count` shifts over `parts` client processes, the first ones one more when uneven."""
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def marginal(lower: tuple[int, float] | None, upper: tuple[int, float], baseline: float) -> float:
    """Cost per added stream between two levels (shifts, cores); from the idle server's
    `baseline` for the first level."""
    shifts0, cores0 = lower if lower is not None else (0, baseline)
    if upper[0] <= shifts0:
        raise ValueError("levels must increase")
    return (upper[1] - cores0) / (upper[0] - shifts0)


def shifts_by_cpu(cores: float, per_shift_cores: float) -> float:
    """Shifts whose work of `per_shift_cores` (CPU seconds per second per shift) fits in
    `cores`."""
    if per_shift_cores <= 0:
        raise ValueError("a shift's cost must be positive")
    return cores / per_shift_cores


def parse_levels(text: str) -> list[int]:
    """'100,250,500' -> [100, 250, 500]: increasing, without repeats."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
    if not levels or levels[0] < 1 or levels[-1] > _MAX_SHIFTS:
        raise argparse.ArgumentTypeError(f"shift counts must be 1 to {_MAX_SHIFTS}")
    return levels


def _uniform_sum_cdf(x: float, terms: int) -> float:
    """P(U1 + ... + U_terms <= x) for independent uniforms on [0, 1] (Irwin-Hall), in exact
    arithmetic: the alternating sum's terms dwarf the result in floating point."""
    if x <= 0:
        return 0.0
    if x >= terms:
        return 1.0
    exact = Fraction(x)
    total = sum(
        (-1) ** j * math.comb(terms, j) * (exact - j) ** terms for j in range(math.floor(x) + 1)
    )
    return float(total / math.factorial(terms))


_MAX_SCHEDULE_TERMS = 40  # shifts up to 40 shortest intervals old (80 min by default)


def expected_scheduled(
    logged_in_at: Sequence[float], start: float, end: float, policy: ShiftPolicy
) -> float:
    """How many random checkpoints the schedule leads to expect in [start, end] from shifts
    that logged in at `logged_in_at` (one clock): a shift's k-th checkpoint falls at the sum of
    k intervals, each uniform in mean +/- jitter, drawn from its login on. (Each next interval
    is drawn when a checkpoint is decided, so late decisions move the later ones a little; not
    counted.)"""
    shortest = policy.mean_checkpoint_interval_seconds - policy.checkpoint_jitter_seconds
    span = 2 * policy.checkpoint_jitter_seconds
    if shortest < policy.min_checkpoint_gap_seconds or span <= 0:
        raise ValueError("only for a schedule whose minimum gap never shortens the draw")
    if end - min(logged_in_at, default=end) > _MAX_SCHEDULE_TERMS * shortest:
        raise ValueError("shifts too old for the expectation's precision")
    total = 0.0
    for login in logged_in_at:
        for k in range(1, _MAX_SCHEDULE_TERMS + 1):
            if k * shortest > end - login:
                break
            total += _uniform_sum_cdf((end - login - k * shortest) / span, k)
            total -= _uniform_sum_cdf((start - login - k * shortest) / span, k)
    return total


@dataclass(frozen=True)
class CheckpointSeen:
    trigger: str
    latency: float
    """Decided minus due, in seconds (server timestamps)."""


@dataclass(frozen=True)
class CheckpointSummary:
    """A window's checkpoints against the schedule."""

    seen: Counter[str]
    """By trigger."""
    expected_scheduled: float
    steady_scheduled: float
    """What the steady state of the schedule gives in as long a window: shifts / mean."""
    latency_p50: float | None
    latency_max: float | None

    @classmethod
    def of(
        cls, checkpoints: Sequence[CheckpointSeen], expected: float, steady: float
    ) -> CheckpointSummary:
        latencies = [c.latency for c in checkpoints]
        return cls(
            seen=Counter(c.trigger for c in checkpoints),
            expected_scheduled=expected,
            steady_scheduled=steady,
            latency_p50=nearest_rank(latencies, 0.5) if latencies else None,
            latency_max=max(latencies, default=None),
        )


LOOKS_METRIC = "voxauth_change_watch_looks_total"
DEFERRED_METRIC = "voxauth_checkpoint_attempts_deferred_busy_total"
_LOOK_OUTCOMES = ("compared", "too_little_speech", "skipped_busy", "failed")
"""The outcomes of voxauth_change_watch_looks (server/runtime/telemetry.py, LookOutcome)."""


@dataclass(frozen=True)
class ShiftWork:
    """The server's counts of its shifts' background work: the change watch's looks by
    outcome (compared, too_little_speech, skipped_busy, failed) and the checkpoint attempts
    the busy inference pool deferred."""

    looks: Counter[str]
    checkpoints_deferred_busy: float

    @classmethod
    def parse(cls, exposition: str) -> ShiftWork:
        """From the server's /metrics text. Raises ValueError for a text without these
        counters (a server from before them)."""
        looks: Counter[str] = Counter()
        deferred: float | None = None
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name == LOOKS_METRIC:
                    looks[sample.labels.get("outcome", "")] += int(sample.value)
                elif sample.name == DEFERRED_METRIC:
                    deferred = sample.value
        if not looks or deferred is None:
            raise ValueError(f"the server exports no {LOOKS_METRIC} or {DEFERRED_METRIC}")
        return cls(looks, deferred)

    def since(self, earlier: ShiftWork) -> ShiftWork:
        """What was counted between `earlier` and this reading (counters only grow)."""
        looks = Counter({k: self.looks[k] - earlier.looks[k] for k in self.looks})
        return ShiftWork(looks, self.checkpoints_deferred_busy - earlier.checkpoints_deferred_busy)


def format_shift_work(work: ShiftWork | str) -> str:
    """The window's change-watch looks and the shift work the busy pool refused; or why the
    server's counters could not be read."""
    if isinstance(work, str):
        return f"       change watch: not read from the server's /metrics ({work})"
    looks = work.looks
    made = ", ".join(
        f"{looks[o]} {o.replace('_', ' ')}" for o in _LOOK_OUTCOMES if o != "skipped_busy"
    )
    return (
        f"       change watch: {looks.total()} looks due in the window ({made});"
        f" change-watch looks skipped (busy): {looks['skipped_busy']};"
        f" checkpoint attempts deferred (busy): {work.checkpoints_deferred_busy:.0f}"
    )


def scrape_metrics(url: str, timeout: float = 10.0) -> str:
    """Blocking: the text of a /metrics page (plain HTTP: the bench server is on loopback in
    insecure development mode)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text: str = answer.read().decode()
        return text


async def read_shift_work(url: str) -> ShiftWork | str:
    """The server's shift-work counters now, or why they could not be read: a scrape that
    fails is reported beside the level, never a failed level."""
    try:
        return ShiftWork.parse(await asyncio.to_thread(scrape_metrics, url))
    except (OSError, ValueError) as error:
        return str(error)


def window_shift_work(before: ShiftWork | str, after: ShiftWork | str) -> ShiftWork | str:
    """The counts of a window from its two readings, or why one of them failed."""
    if isinstance(before, str):
        return before
    if isinstance(after, str):
        return after
    return after.since(before)


@dataclass
class LagLog:
    """Lateness of one shift's messages since the last reset."""

    lags: list[float] = field(default_factory=list)
    last: float = 0.0

    def add(self, lag: float) -> None:
        self.lags.append(lag)
        self.last = lag

    def reset(self) -> None:
        self.lags = []


@dataclass(frozen=True)
class ClientReport:
    """What one client process saw in a window (lags in seconds)."""

    lags: list[float]
    final_lags: list[float]
    messages: int
    checkpoints: list[CheckpointSeen]
    outcomes: Counter[str]
    errors: list[str]


@dataclass(frozen=True)
class GrowReport:
    """One client's share of a level's ramp: how its logins went, and when each shift that
    streams logged in (seconds since the epoch)."""

    ramp: RampTally
    logged_in_at: list[float]


@dataclass(frozen=True)
class ClientFailure:
    """A client process that could not do what it was asked (or is gone): its reason."""

    reason: str


# --- the client processes -------------------------------------------------------------------


def _agent_from(path: Path, frames: int) -> Agent:
    """The agent enroll_agents made of `path`, rebuilt in a client process."""
    samples, _ = sf.read(path, dtype="float32")
    samples = np.asarray(samples, dtype=np.float32)
    half = len(samples) // 2
    return Agent(
        f"bench-{path.stem}", _raw(samples[half:]), message_chunks(_pcm16(samples), frames)
    )


class _StreamingShift:
    def __init__(self, shift_id: str, agent: Agent, call: Any, attached_at: float) -> None:
        self.shift_id = shift_id
        self.agent = agent
        self.call = call
        self.tally = ShiftTally(last_event_at=attached_at)
        self.checkpoints: list[CheckpointSeen] = []
        self.lag = LagLog()
        self.ending = False
        self.sent = 0

    async def send(self, start: float, period: float) -> None:
        """Messages on absolute deadlines (start + k * period): a late one does not push the
        later ones back, so the lateness of a message is the backlog behind it."""
        loop = asyncio.get_running_loop()
        chunks = self.agent.stream
        index = random.randrange(len(chunks))  # shifts of one agent at different words
        try:
            for k in itertools.count():
                lateness = loop.time() - (start + k * period)
                if lateness < 0:
                    await asyncio.sleep(-lateness)
                self.lag.add(max(0.0, lateness))
                await self.call.write(spb.ShiftAudio(frames=chunks[index % len(chunks)]))
                index += 1
                self.sent += 1
        except grpc.aio.AioRpcError as error:
            self._failed(_describe(error))
        except asyncio.InvalidStateError:
            self._failed("the server ended the stream")

    async def read(self) -> None:
        try:
            while (event := await self.call.read()) is not grpc.aio.EOF:
                if event.kind in _OUTCOMES:
                    at = event.at.ToNanoseconds() / 1e9
                    due = event.scheduled_at.ToNanoseconds() / 1e9
                    self.tally.checkpoint(_OUTCOMES[event.kind], at, due)
                    trigger = _TRIGGERS.get(event.trigger, "unspecified")
                    self.checkpoints.append(CheckpointSeen(trigger, at - due))
                elif event.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED:
                    self.tally.locked = True
        except grpc.aio.AioRpcError as error:
            self._failed(_describe(error))
        else:
            self._failed("the server ended the stream")

    def _failed(self, reason: str) -> None:
        if not self.ending and self.tally.error is None:
            self.tally.error = f"stream: {reason}"


@dataclass(frozen=True)
class _ClientSettings:
    address: str
    paths: list[Path]
    frames: int
    logins_in_flight: int
    backoff: Backoff


async def _client(conn: Connection, settings: _ClientSettings) -> None:
    agents = [_agent_from(p, settings.frames) for p in settings.paths]
    period = settings.frames * 0.02
    shifts: list[_StreamingShift] = []
    tasks: list[asyncio.Task[None]] = []
    logged_in_at: list[float] = []
    loop = asyncio.get_running_loop()
    # One gate for all of this client's logins: its share of the bound on logins in flight.
    gate = asyncio.Semaphore(settings.logins_in_flight)
    async with grpc.aio.insecure_channel(settings.address) as channel:
        stub = spb_grpc.ShiftServiceStub(channel)

        async def join(item: tuple[int, str]) -> Attempted[_StreamingShift]:
            """One softphone: its login, retried while refused for load, then its stream."""
            agent = agents[item[0] % len(agents)]
            # One request id for all attempts: a retry whose first attempt did act is
            # answered, not logged in twice.
            request = spb.StartShiftRequest(
                agent_id=agent.agent_id,
                device_id=item[1],
                login_audio=agent.login,
                request_id=uuid.uuid4().hex,
            )
            login = await with_retries(
                lambda: stub.StartShift(request, timeout=_CALL_TIMEOUT),
                settings.backoff,
                sleep=asyncio.sleep,
                draw=random.random,
                gate=gate,
            )
            response = login.value
            if response.shift.state != spb.SHIFT_STATE_VERIFIED:
                raise RuntimeError(f"login of {agent.agent_id} not verified")
            logged_in = time.time()
            shift = await _open_stream(stub, agent, response.shift.shift_id)
            shifts.append(shift)
            logged_in_at.append(logged_in)
            start = loop.time() + random.uniform(0, period)
            tasks.append(asyncio.create_task(shift.send(start, period)))
            tasks.append(asyncio.create_task(shift.read()))
            return Attempted(shift, login.attempts, login.waited)

        while True:
            command, argument = await loop.run_in_executor(None, conn.recv)
            try:
                if command == "grow":
                    already = len(logged_in_at)
                    outcomes = await ramp(argument, join)
                    conn.send(GrowReport(RampTally.of(outcomes), logged_in_at[already:]))
                elif command == "mark":
                    for s in shifts:
                        s.lag.reset()
                        s.checkpoints.clear()
                        s.tally.outcomes.clear()
                        s.sent = 0
                    conn.send(None)
                elif command == "report":
                    conn.send(
                        ClientReport(
                            lags=[x for s in shifts for x in s.lag.lags],
                            final_lags=[s.lag.last for s in shifts],
                            messages=sum(s.sent for s in shifts),
                            checkpoints=[c for s in shifts for c in s.checkpoints],
                            outcomes=sum((s.tally.outcomes for s in shifts), Counter()),
                            errors=[s.tally.error for s in shifts if s.tally.error is not None],
                        )
                    )
                else:  # stop
                    for s in shifts:
                        s.ending = True
                    await _end_all(stub, shifts)
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    conn.send(None)
                    return
            except Exception as error:  # told to the benchmark, which reports it: never a crash
                conn.send(ClientFailure(f"{command}: {_describe(error)}"))


async def _open_stream(stub: Any, agent: Agent, shift_id: str) -> _StreamingShift:
    """The shift's stream, its header sent and STREAM_ATTACHED received."""
    call = stub.StreamShiftAudio()
    await call.write(
        spb.ShiftAudio(
            header=spb.ShiftAudioHeader(
                shift_id=shift_id, encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=RATE
            )
        )
    )
    attached = await asyncio.wait_for(call.read(), _CALL_TIMEOUT)
    if attached is grpc.aio.EOF or attached.kind != spb.SHIFT_EVENT_KIND_STREAM_ATTACHED:
        raise RuntimeError(f"shift {shift_id}: no STREAM_ATTACHED event")
    return _StreamingShift(shift_id, agent, call, attached.at.ToNanoseconds() / 1e9)


async def _end_all(stub: Any, shifts: Sequence[_StreamingShift]) -> None:
    gate = asyncio.Semaphore(8)

    async def end(shift: _StreamingShift) -> None:
        async with gate:
            await stub.EndShift(spb.EndShiftRequest(shift_id=shift.shift_id), timeout=_CALL_TIMEOUT)

    await asyncio.gather(*(end(s) for s in shifts), return_exceptions=True)


async def _logging_in(channel: grpc.aio.Channel, agents: Sequence[Agent]) -> set[str]:
    """The agents whose login recording verifies: the benchmark measures streams, and a
    recording the countermeasure or the scorer refuses would refuse every shift of its agent."""
    stub = spb_grpc.ShiftServiceStub(channel)
    gate = asyncio.Semaphore(_LOGIN_CONCURRENCY)
    usable = set()
    for agent in agents:
        with contextlib.suppress(RuntimeError):
            _, shift_id = await _start_shift(stub, agent, "capacity-probe", gate)
            await stub.EndShift(spb.EndShiftRequest(shift_id=shift_id), timeout=_CALL_TIMEOUT)
            usable.add(agent.agent_id)
    return usable


def _client_main(conn: Connection, settings: _ClientSettings) -> None:
    asyncio.run(_client(conn, settings))


# --- the server side and one level ----------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    wall: float
    server: float
    clients: float
    host_busy: float


def _cpu_of(pid: int) -> float:
    return cpu_seconds_from_stat(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def _rss_of(pid: int) -> int:
    return rss_bytes_from_status(Path(f"/proc/{pid}/status").read_text())


def _read(server_pid: int, client_pids: Sequence[int]) -> Reading:
    return Reading(
        wall=time.monotonic(),
        server=_cpu_of(server_pid),
        clients=sum(_cpu_of(pid) for pid in client_pids),
        host_busy=busy_seconds_from_proc_stat(
            Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK")
        ),
    )


@dataclass(frozen=True)
class LevelResult:
    shifts: int
    seconds: float
    server_cores: float
    client_cores: float
    other_cores: float
    rss_bytes: int
    messages: int
    expected_messages: int
    lag_p50: float
    lag_p99: float
    lag_max: float
    final_lag_max: float
    outcomes: Counter[str]
    checkpoints: CheckpointSummary
    ramp: RampTally
    ramp_seconds: float
    errors: list[str]
    load_average: float
    shift_work: ShiftWork | str = "not read"
    """The window's change-watch looks and busy refusals, or why they could not be read."""

    @property
    def sent_share(self) -> float:
        return self.messages / self.expected_messages if self.expected_messages else 1.0

    @property
    def keeps_up(self) -> bool:
        """Every shift of the level streaming (every login passed, no stream failed), every
        message sent, none left behind at the window's end."""
        return (
            not self.errors
            and self.final_lag_max <= BACKLOG_LIMIT_SECONDS
            and self.sent_share >= SENT_SHARE_LIMIT
        )


class _Clients:
    """The client processes, driven over pipes. A client that fails a command, or is gone,
    answers with a ClientFailure instead of stopping the benchmark."""

    def __init__(self, count: int, settings: _ClientSettings) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
        self._conns: list[Connection] = []
        self.processes = []
        for _ in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=_client_main, args=(child, settings), daemon=True)
            process.start()
            self._conns.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None and p.is_alive()]

    async def ask(self, commands: Sequence[tuple[str, Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()

        def exchange(index: int, command: tuple[str, Any]) -> Any:
            process = self.processes[index]
            try:
                self._conns[index].send(command)
                return self._conns[index].recv()
            except (EOFError, OSError):
                process.join(timeout=1.0)
                return ClientFailure(f"client process {index} exited ({process.exitcode})")

        return list(
            await asyncio.gather(
                *(
                    loop.run_in_executor(None, exchange, i, command)
                    for i, command in enumerate(commands)
                )
            )
        )

    async def broadcast(self, command: str) -> list[Any]:
        return await self.ask([(command, None)] * len(self._conns))

    def close(self) -> None:
        for process in self.processes:
            process.join(timeout=_CALL_TIMEOUT)
            if process.is_alive():
                process.kill()


def _failures(replies: Sequence[Any]) -> list[str]:
    return [r.reason for r in replies if isinstance(r, ClientFailure)]


@dataclass
class _Run:
    """What the levels so far leave to the next: the shifts open and when each logged in."""

    shifts: int = 0
    logged_in_at: list[float] = field(default_factory=list)


async def _level(
    clients: _Clients,
    server: BenchServer,
    run: _Run,
    count: int,
    settings: Settings,
    metrics_url: str,
) -> LevelResult:
    shares = split_evenly(count - run.shifts, len(clients.processes))
    commands: list[tuple[str, Any]] = []
    next_index = run.shifts
    for share in shares:
        commands.append(
            ("grow", [(i, f"capacity-{i}") for i in range(next_index, next_index + share)])
        )
        next_index += share
    ramp_started = time.monotonic()
    grown = await clients.ask(commands)
    ramp_seconds = time.monotonic() - ramp_started
    ramps = [g for g in grown if isinstance(g, GrowReport)]
    tally = RampTally.merged([g.ramp for g in ramps])
    run.shifts = count
    run.logged_in_at += [t for g in ramps for t in g.logged_in_at]
    errors = _failures(grown) + [f"login: {f}" for f in tally.failures]
    await asyncio.sleep(_SETTLE_SECONDS)
    errors += _failures(await clients.broadcast("mark"))
    # Scraped outside the CPU readings, so the scrapes' own work is not in the window's.
    work_before = await read_shift_work(metrics_url)
    opened = time.time()
    before = _read(server.process.pid, clients.pids)
    await asyncio.sleep(settings.seconds)
    after = _read(server.process.pid, clients.pids)
    closed = time.time()
    work_after = await read_shift_work(metrics_url)
    rss = _rss_of(server.process.pid)
    replies = await clients.broadcast("report")
    errors += _failures(replies)
    reports = [r for r in replies if isinstance(r, ClientReport)]
    wall = after.wall - before.wall
    server_cores = (after.server - before.server) / wall
    client_cores = (after.clients - before.clients) / wall
    lags = [x for r in reports for x in r.lags] or [0.0]
    policy = ShiftPolicy()
    return LevelResult(
        shifts=count,
        seconds=wall,
        server_cores=server_cores,
        client_cores=client_cores,
        other_cores=(after.host_busy - before.host_busy) / wall - server_cores - client_cores,
        rss_bytes=rss,
        messages=sum(r.messages for r in reports),
        expected_messages=round(count * wall / (settings.frames * 0.02)),
        lag_p50=nearest_rank(lags, 0.5),
        lag_p99=nearest_rank(lags, 0.99),
        lag_max=max(lags),
        final_lag_max=max((x for r in reports for x in r.final_lags), default=0.0),
        outcomes=sum((r.outcomes for r in reports), Counter()),
        checkpoints=CheckpointSummary.of(
            [c for r in reports for c in r.checkpoints],
            expected_scheduled(run.logged_in_at, opened, closed, policy),
            count * (closed - opened) / policy.mean_checkpoint_interval_seconds,
        ),
        ramp=tally,
        ramp_seconds=ramp_seconds,
        errors=errors + [e for r in reports for e in r.errors],
        load_average=os.getloadavg()[0],
        shift_work=window_shift_work(work_before, work_after),
    )


_HEADER = (
    "shifts  window  server CPU  per stream  marginal  clients  per stream  others  load"
    "  RSS MB  per shift  messages  lag p50   p99    max  end lag  result"
)


def format_level(result: LevelResult, marginal_cores: float, baseline_rss: int) -> str:
    r = result
    per_shift_mb = (r.rss_bytes - baseline_rss) / r.shifts / 2**20
    return (
        f"{r.shifts:6d} {r.seconds:6.0f}s {r.server_cores:9.0%}  {r.server_cores / r.shifts:9.3%}"
        f" {marginal_cores:8.3%} {r.client_cores:8.0%}  {r.client_cores / r.shifts:9.3%}"
        f" {r.other_cores:6.0%} {r.load_average:5.1f} {r.rss_bytes / 2**20:7.0f}"
        f" {per_shift_mb:10.2f}  {r.sent_share:8.1%} {r.lag_p50:7.3f} {r.lag_p99:6.3f}"
        f" {r.lag_max:6.2f} {r.final_lag_max:7.2f}  {'ok' if r.keeps_up else 'BEHIND'}"
    )


def format_ramp(ramp: RampTally, seconds: float, in_flight: int) -> str:
    """How the level's logins went, before its window."""
    retried = (
        f"{ramp.retried} retried ({ramp.retries} retries, at most {ramp.most_attempts} "
        f"attempts, {ramp.waited:.0f} s of backoff in all)"
    )
    return (
        f"       ramp: {ramp.logins} logins in {seconds:.0f} s, at most {in_flight} in flight: "
        f"{ramp.succeeded} passed, {retried}, {len(ramp.failures)} failed"
    )


def format_checkpoints(summary: CheckpointSummary, seconds: float) -> str:
    """The window's checkpoints against the schedule's expectation and its steady state."""
    c = summary
    scheduled = c.seen["scheduled"]
    others = ", ".join(
        f"{n} {trigger}" for trigger, n in sorted(c.seen.items()) if n and trigger != "scheduled"
    )
    latency = (
        "none decided"
        if c.latency_max is None
        else f"latency p50 {c.latency_p50:.2f} s, max {c.latency_max:.2f} s"
    )
    return (
        f"       checkpoints: {scheduled} scheduled in the window ({scheduled / seconds:.2f}/s;"
        f" the schedule expects {c.expected_scheduled:.1f} at these shifts' ages, the steady"
        f" state {c.steady_scheduled:.1f}, {c.steady_scheduled / seconds:.2f}/s)"
        f"{', ' + others if others else ''}; {latency}"
    )


@dataclass(frozen=True)
class Settings:
    levels: list[int]
    seconds: float
    clients: int
    frames: int
    cores: float
    logins_in_flight: int
    check_cpu_seconds: float


def server_environment(http_port: int) -> dict[str, str]:
    """The bench server's settings beside BenchServer's own."""
    return {
        # Some recordings hold under 5 s of consistent speech in their first half (the gates
        # of enrollment/duplicates.py discard stretches): enroll on 3 s, the login minimum.
        "VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "3",
        # Every shift of an agent logs in with the same recording, which replay detection
        # rightly refuses after the first; the stream path does not use it.
        "VOXAUTH_REPLAY_DETECTION": "0",
        # The HTTP side for /metrics (the change watch's counters): on loopback, plain HTTP
        # in insecure development mode as the gRPC port is.
        "VOXAUTH_HTTP_LISTEN": f"127.0.0.1:{http_port}",
    }


async def _bench(settings: Settings, workdir: Path) -> list[LevelResult]:
    http_port = _free_port()
    server = BenchServer(workdir, server_environment(http_port))
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    clients: _Clients | None = None
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await server.wait_until_serving(channel)
            paths = recordings(_SPEECH_DIR)
            agents = await enroll_agents(channel, paths)
            usable = await _logging_in(channel, agents)
            paths = [p for p, a in zip(paths, agents, strict=True) if a.agent_id in usable]
            agents = [a for a in agents if a.agent_id in usable]
            if not agents:
                raise RuntimeError(f"no long enough recording in {_SPEECH_DIR}")
        pid = server.process.pid
        clients = _Clients(
            settings.clients,
            _ClientSettings(
                server.address,
                paths,
                settings.frames,
                # The bound over all clients, split between them (each at least one).
                max(1, settings.logins_in_flight // settings.clients),
                Backoff(),
            ),
        )
        in_flight = max(1, settings.logins_in_flight // settings.clients) * settings.clients
        await asyncio.sleep(10.0)  # the clients' imports, and the server back to rest
        before = _read(pid, clients.pids)
        await asyncio.sleep(10.0)
        after = _read(pid, clients.pids)
        baseline_cores = (after.server - before.server) / (after.wall - before.wall)
        baseline_rss = _rss_of(pid)
        policy = ShiftPolicy()
        backoff = Backoff()
        print("voxauth bench capacity: concurrent shift streams at real time, default policy")
        print(f"server     {server.address}; {' '.join(server.settings)}")
        print(
            f"policy     a checkpoint every {policy.mean_checkpoint_interval_seconds:g} +/- "
            f"{policy.checkpoint_jitter_seconds:g} s (at least "
            f"{policy.min_checkpoint_gap_seconds:g} s apart), {policy.max_audio_age_seconds:g} s "
            f"of audio buffered per shift"
        )
        print(
            f"speech     {len(agents)} agents whose login verifies, from {_SPEECH_DIR}"
            f" (LibriSpeech, CC BY 4.0), looped,"
            f" PCM16LE 16 kHz, {settings.frames} frames ({settings.frames * 20} ms) per message"
        )
        print(
            f"host       {os.cpu_count()} cores, {settings.clients} client processes; idle server "
            f"{baseline_cores:.1%} of a core, {baseline_rss / 2**20:.0f} MB RSS"
        )
        print(
            f"logins     at most {in_flight} in flight; refused for load, retried with the same"
            f" request id after {backoff.first:g} s doubling to {backoff.cap:g} s (equal"
            f" jitter, never before the server's RetryInfo), {backoff.attempts} attempts at most"
        )
        print(
            "columns    CPU: CPU seconds per second (100% = one core); marginal: per stream added"
            " since the level below;\n           lag: how late messages were written; end lag:"
            " the latest at the window's end (a backlog if it grows); the window opens"
            f" {_SETTLE_SECONDS:g} s after the ramp;\n           change watch: the server's"
            " counters (its /metrics) over the window"
        )
        print()
        print(_HEADER, flush=True)
        results: list[LevelResult] = []
        run = _Run()
        previous: tuple[int, float] | None = None
        for count in settings.levels:
            result = await _level(clients, server, run, count, settings, metrics_url)
            slope = marginal(previous, (count, result.server_cores), baseline_cores)
            previous = (count, result.server_cores)
            results.append(result)
            print(format_level(result, slope, baseline_rss))
            print(format_ramp(result.ramp, result.ramp_seconds, in_flight))
            print(format_checkpoints(result.checkpoints, result.seconds))
            print(format_shift_work(result.shift_work))
            for error, times in Counter(result.errors).most_common(5):
                print(f"       error ({times}x): {error}")
            print(flush=True)
            if not result.keeps_up:
                break
        _print_steady_state(settings, results, policy)
        await clients.broadcast("stop")
        return results
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def steady_state_cores(result: LevelResult, check_cpu_seconds: float, seconds: float) -> float:
    """The level's server CPU with the schedule's steady rate of random checkpoints instead of
    the window's: the window's cores plus the missing checkpoints' CPU. (The change watch's
    looks already run at their steady rate: one a minute of audio, from a stream's first
    minute on.)"""
    missing = result.checkpoints.steady_scheduled - result.checkpoints.seen["scheduled"]
    return result.server_cores + missing * check_cpu_seconds / seconds


def _print_steady_state(
    settings: Settings, results: Sequence[LevelResult], policy: ShiftPolicy
) -> None:
    kept = [r for r in results if r.keeps_up]
    if not kept:
        print("no level kept up: no capacity figure")
        return
    top = kept[-1]
    steady = steady_state_cores(top, settings.check_cpu_seconds, top.seconds)
    work = top.shift_work
    skipped = (
        f" (change-watch looks skipped, busy: {work.looks['skipped_busy']})"
        if isinstance(work, ShiftWork)
        else ""
    )
    print(
        f"measured     {top.shifts} shifts kept up: the server used {top.server_cores:.0%} of a"
        f" core ({top.server_cores / top.shifts:.3%} per shift), streams, looks{skipped} and"
        f" the {top.checkpoints.seen.total()} checkpoints of its window together"
    )
    print(
        f"steady state {steady:.0%} of a core with {policy.mean_checkpoint_interval_seconds:g}"
        f" s between a shift's checkpoints (an estimate: the window's checkpoints"
        f" {top.checkpoints.seen['scheduled']} scheduled for"
        f" {top.checkpoints.steady_scheduled:.0f} at the steady rate, each further one at"
        f" {settings.check_cpu_seconds:g} s of CPU) -> about"
        f" {shifts_by_cpu(settings.cores, steady / top.shifts):.0f} shifts on"
        f" {settings.cores:g} cores, server alone"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth bench capacity",
        description="What concurrent real-time shift streams cost one replica.",
    )
    parser.add_argument(
        "--shifts",
        type=parse_levels,
        default=parse_levels("100,250,500,1000"),
        metavar="N[,N...]",
        help="concurrent shifts per level, growing (default 100,250,500,1000)",
    )
    parser.add_argument(
        "--seconds", type=float, default=90.0, help="measured window per level (default 90)"
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="client processes sending (default 4)"
    )
    parser.add_argument(
        "--message-ms",
        type=int,
        default=100,
        help="audio per message, a multiple of 20 up to 1000 (default 100; a softphone may "
        "send 20, the server takes up to 1000)",
    )
    parser.add_argument(
        "--logins-in-flight",
        type=int,
        default=6,
        help="logins in flight at once over all clients, during a level's ramp (default 6)",
    )
    parser.add_argument(
        "--cores", type=float, default=2.0, help="cores of the replica the figure is for"
    )
    parser.add_argument(
        "--check-cpu-seconds",
        type=float,
        default=0.40,
        help="CPU seconds of one checkpoint, for the steady-state estimate (default 0.40, "
        "README 'Speed')",
    )
    args = parser.parse_args(argv)
    if args.message_ms % 20 or not 20 <= args.message_ms <= 20 * MAX_FRAMES_PER_MESSAGE:
        parser.error("--message-ms must be a multiple of 20 from 20 to 1000")
    if args.seconds < 10 or args.clients < 1 or args.cores <= 0 or args.logins_in_flight < 1:
        parser.error(
            "--seconds must be at least 10; --clients, --logins-in-flight, --cores positive"
        )
    if args.check_cpu_seconds <= 0:
        parser.error("--check-cpu-seconds must be positive")
    settings = Settings(
        levels=args.shifts,
        seconds=args.seconds,
        clients=args.clients,
        frames=args.message_ms // 20,
        cores=args.cores,
        logins_in_flight=args.logins_in_flight,
        check_cpu_seconds=args.check_cpu_seconds,
    )
    with tempfile.TemporaryDirectory(prefix="voxauth-capacity-") as workdir:
        try:
            asyncio.run(_bench(settings, Path(workdir)))
        except (RuntimeError, grpc.aio.AioRpcError) as error:
            print(f"voxauth bench capacity: {_describe(error)}", file=sys.stderr)
            return 1
    return 0
