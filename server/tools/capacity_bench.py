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
their CPU is measured and reported beside it. Per level, over a window of `--seconds` that
starts once every shift of the level is streaming:

- server CPU (utime + stime of the server process, all threads, from /proc/PID/stat) per
  second of wall time, in total and per stream, and the marginal cost per added stream;
- message lateness: how far behind its deadline each message was written (p50, p99, max),
  and the worst lateness at the end of the window, which grows when the server (or the
  client) cannot keep up: a backlog, not jitter;
- the server's resident memory (VmRSS) per shift over the idle server's;
- the checkpoints decided in the window (the default rate gives few) and their latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb

from server.config import ShiftPolicy
from server.shifts.buffer import MAX_FRAMES_PER_MESSAGE
from server.tools.shift_bench import (
    _SPEECH_DIR,
    FRAME_BYTES,
    RATE,
    Agent,
    BenchServer,
    ShiftTally,
    _describe,
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
_LOGIN_CONCURRENCY = 2  # per client process; the server's inference queue bounds a burst
_CALL_TIMEOUT = 120.0
_OUTCOMES = {
    spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED: "passed",
    spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED: "failed",
    spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH: "insufficient",
}
# A level keeps up when no message was written this far behind its deadline at the end of
# the window: a backlog that grows would pass it within a window, jitter stays below.
BACKLOG_LIMIT_SECONDS = 1.0


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


@dataclass(frozen=True)
class Capacity:
    """Shifts one replica carries when each part of a shift's work alone would allow
    `limits[part]` shifts: the parts share the replica's time, so their fractions add up,
    1/N = sum(1/N_part)."""

    limits: dict[str, float]

    @property
    def shifts(self) -> float:
        return 1.0 / sum(1.0 / n for n in self.limits.values())

    @property
    def binding(self) -> str:
        """The part that takes the largest share of the replica."""
        return min(self.limits, key=lambda part: self.limits[part])


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
    latencies: list[float]
    outcomes: Counter[str]
    errors: list[str]


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
                    self.tally.checkpoint(
                        _OUTCOMES[event.kind],
                        event.at.ToNanoseconds() / 1e9,
                        event.scheduled_at.ToNanoseconds() / 1e9,
                    )
                elif event.kind == spb.SHIFT_EVENT_KIND_SHIFT_LOCKED:
                    self.tally.locked = True
        except grpc.aio.AioRpcError as error:
            self._failed(_describe(error))
        else:
            self._failed("the server ended the stream")

    def _failed(self, reason: str) -> None:
        if not self.ending and self.tally.error is None:
            self.tally.error = f"stream: {reason}"


async def _client(conn: Connection, address: str, paths: list[Path], frames: int) -> None:
    agents = [_agent_from(p, frames) for p in paths]
    period = frames * 0.02
    shifts: list[_StreamingShift] = []
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = spb_grpc.ShiftServiceStub(channel)
        while True:
            command, argument = await loop.run_in_executor(None, conn.recv)
            if command == "grow":
                errors: list[str] = []
                gate = asyncio.Semaphore(_LOGIN_CONCURRENCY)
                started = await asyncio.gather(
                    *(_start_shift(stub, agents[a % len(agents)], d, gate) for a, d in argument),
                    return_exceptions=True,
                )
                errors += [
                    f"StartShift: {_describe(e)}" for e in started if isinstance(e, BaseException)
                ]
                ok = [s for s in started if not isinstance(s, BaseException)]
                attached = await asyncio.gather(
                    *(_open_stream(stub, agent, shift_id) for agent, shift_id in ok),
                    return_exceptions=True,
                )
                errors += [
                    f"attach: {_describe(e)}" for e in attached if isinstance(e, BaseException)
                ]
                for shift in attached:
                    if isinstance(shift, BaseException):
                        continue
                    shifts.append(shift)
                    start = loop.time() + random.uniform(0, period)
                    tasks.append(asyncio.create_task(shift.send(start, period)))
                    tasks.append(asyncio.create_task(shift.read()))
                conn.send(errors)
            elif command == "mark":
                for s in shifts:
                    s.lag.reset()
                    s.tally.latencies.clear()
                    s.tally.outcomes.clear()
                    s.sent = 0
                conn.send(None)
            elif command == "report":
                conn.send(
                    ClientReport(
                        lags=[x for s in shifts for x in s.lag.lags],
                        final_lags=[s.lag.last for s in shifts],
                        messages=sum(s.sent for s in shifts),
                        latencies=[x for s in shifts for x in s.tally.latencies],
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


def _client_main(conn: Connection, address: str, paths: list[Path], frames: int) -> None:
    asyncio.run(_client(conn, address, paths, frames))


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
    latency_max: float | None
    errors: list[str]
    load_average: float

    @property
    def keeps_up(self) -> bool:
        return not self.errors and self.final_lag_max <= BACKLOG_LIMIT_SECONDS


class _Clients:
    """The client processes, driven over pipes."""

    def __init__(self, count: int, address: str, paths: list[Path], frames: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
        self._conns: list[Connection] = []
        self.processes = []
        for _ in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=_client_main, args=(child, address, paths, frames), daemon=True
            )
            process.start()
            self._conns.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def ask(self, commands: Sequence[tuple[str, Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        for conn, command in zip(self._conns, commands, strict=True):
            conn.send(command)
        return list(
            await asyncio.gather(*(loop.run_in_executor(None, c.recv) for c in self._conns))
        )

    async def broadcast(self, command: str) -> list[Any]:
        return await self.ask([(command, None)] * len(self._conns))

    def close(self) -> None:
        for process in self.processes:
            process.join(timeout=_CALL_TIMEOUT)
            if process.is_alive():
                process.kill()


async def _level(
    clients: _Clients,
    server: BenchServer,
    current: int,
    count: int,
    seconds: float,
    frames: int,
) -> LevelResult:
    shares = split_evenly(count - current, len(clients.processes))
    commands: list[tuple[str, Any]] = []
    next_index = current
    for share in shares:
        commands.append(
            ("grow", [(i, f"capacity-{i}") for i in range(next_index, next_index + share)])
        )
        next_index += share
    grow_errors = [e for errors in await clients.ask(commands) for e in errors]
    await asyncio.sleep(5.0)  # the last streams' first messages, before the window opens
    await clients.broadcast("mark")
    before = _read(server.process.pid, clients.pids)
    await asyncio.sleep(seconds)
    after = _read(server.process.pid, clients.pids)
    rss = _rss_of(server.process.pid)
    reports: list[ClientReport] = await clients.broadcast("report")
    wall = after.wall - before.wall
    server_cores = (after.server - before.server) / wall
    client_cores = (after.clients - before.clients) / wall
    lags = [x for r in reports for x in r.lags] or [0.0]
    latencies = [x for r in reports for x in r.latencies]
    return LevelResult(
        shifts=count,
        seconds=wall,
        server_cores=server_cores,
        client_cores=client_cores,
        other_cores=(after.host_busy - before.host_busy) / wall - server_cores - client_cores,
        rss_bytes=rss,
        messages=sum(r.messages for r in reports),
        expected_messages=round(count * wall / (frames * 0.02)),
        lag_p50=nearest_rank(lags, 0.5),
        lag_p99=nearest_rank(lags, 0.99),
        lag_max=max(lags),
        final_lag_max=max((x for r in reports for x in r.final_lags), default=0.0),
        outcomes=sum((r.outcomes for r in reports), Counter()),
        latency_max=max(latencies, default=None),
        errors=grow_errors + [e for r in reports for e in r.errors],
        load_average=os.getloadavg()[0],
    )


_HEADER = (
    "shifts  window  server CPU  per stream  marginal  clients  others  load  RSS MB  per shift"
    "  messages  lag p50   p99    max  end lag  checkpoints  cp max s  result"
)


def format_level(result: LevelResult, marginal_cores: float, baseline_rss: int) -> str:
    r = result
    per_shift_mb = (r.rss_bytes - baseline_rss) / r.shifts / 2**20
    checkpoints = sum(r.outcomes.values())
    cp_max = "-" if r.latency_max is None else f"{r.latency_max:.2f}"
    return (
        f"{r.shifts:6d} {r.seconds:6.0f}s {r.server_cores:9.0%}  {r.server_cores / r.shifts:9.3%}"
        f" {marginal_cores:8.3%} {r.client_cores:8.0%} {r.other_cores:6.0%} {r.load_average:5.1f}"
        f" {r.rss_bytes / 2**20:7.0f} {per_shift_mb:8.2f}  {r.messages / r.expected_messages:8.1%}"
        f" {r.lag_p50:7.3f} {r.lag_p99:6.3f} {r.lag_max:6.2f} {r.final_lag_max:7.2f}"
        f" {checkpoints:12d} {cp_max:>9}  {'ok' if r.keeps_up else 'BEHIND'}"
    )


@dataclass(frozen=True)
class Settings:
    levels: list[int]
    seconds: float
    clients: int
    frames: int
    cores: float
    checkpoints_per_second: float
    look_cpu_seconds: float
    look_interval: float


async def _bench(settings: Settings, workdir: Path) -> list[LevelResult]:
    # Some recordings hold under 5 s of consistent speech in their first half (the gates of
    # enrollment/duplicates.py discard stretches): enroll on 3 s, the login minimum.
    # Every shift of an agent logs in with the same recording, which replay detection
    # rightly refuses after the first; the stream path does not use it.
    environment = {"VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "3", "VOXAUTH_REPLAY_DETECTION": "0"}
    server = BenchServer(workdir, environment)
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
        clients = _Clients(settings.clients, server.address, paths, settings.frames)
        await asyncio.sleep(10.0)  # the clients' imports, and the server back to rest
        before = _read(pid, clients.pids)
        await asyncio.sleep(10.0)
        after = _read(pid, clients.pids)
        baseline_cores = (after.server - before.server) / (after.wall - before.wall)
        baseline_rss = _rss_of(pid)
        policy = ShiftPolicy()
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
            "columns    CPU: CPU seconds per second (100% = one core); marginal: per stream added"
            " since the level below;\n           lag: how late messages were written; end lag:"
            " the latest at the window's end (a backlog if it grows)"
        )
        print()
        print(_HEADER, flush=True)
        results: list[LevelResult] = []
        current = 0
        previous: tuple[int, float] | None = None
        for count in settings.levels:
            result = await _level(
                clients, server, current, count, settings.seconds, settings.frames
            )
            current = count
            slope = marginal(previous, (count, result.server_cores), baseline_cores)
            previous = (count, result.server_cores)
            results.append(result)
            print(format_level(result, slope, baseline_rss), flush=True)
            for error in sorted(set(result.errors))[:5]:
                print(f"       error: {error}")
            if not result.keeps_up:
                break
        _print_capacity(settings, results, policy)
        await clients.broadcast("stop")
        return results
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def _print_capacity(
    settings: Settings, results: Sequence[LevelResult], policy: ShiftPolicy
) -> None:
    kept = [r for r in results if r.keeps_up]
    if not kept:
        print("\nno level kept up: no capacity figure")
        return
    top = kept[-1]
    per_stream = top.server_cores / top.shifts
    limits = {
        "ingestion": shifts_by_cpu(settings.cores, per_stream),
        "checkpoints": settings.checkpoints_per_second * policy.mean_checkpoint_interval_seconds,
        "change watch": shifts_by_cpu(
            settings.cores, settings.look_cpu_seconds / settings.look_interval
        ),
    }
    capacity = Capacity(limits)
    print()
    print(
        f"ingestion    {per_stream:.3%} of a core per stream at {top.shifts} streams "
        f"-> {limits['ingestion']:.0f} streams on {settings.cores:g} cores (server alone)"
    )
    print(
        f"checkpoints  {settings.checkpoints_per_second:g} decided on time per second "
        f"(`bench shifts`) x {policy.mean_checkpoint_interval_seconds:g} s per shift "
        f"-> {limits['checkpoints']:.0f} shifts"
    )
    print(
        f"change watch {settings.look_cpu_seconds:g} CPU s per look every "
        f"{settings.look_interval:g} s (an estimate) -> {limits['change watch']:.0f} shifts"
    )
    print(
        f"together     1 / (1/{limits['ingestion']:.0f} + 1/{limits['checkpoints']:.0f} + "
        f"1/{limits['change watch']:.0f}) = {capacity.shifts:.0f} shifts per replica; "
        f"the largest share: {capacity.binding}"
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
        "--cores", type=float, default=2.0, help="cores of the replica the figure is for"
    )
    parser.add_argument(
        "--checkpoints-per-second",
        type=float,
        default=4.7,
        help="checkpoints a second the replica decides on time (`bench shifts`; default 4.7)",
    )
    parser.add_argument(
        "--look-cpu-seconds",
        type=float,
        default=0.040,
        help="CPU seconds of one change-watch look (default 0.040: 3 s embedded, measured on "
        "the change watch's branch)",
    )
    parser.add_argument(
        "--look-interval", type=float, default=60.0, help="seconds between looks (default 60)"
    )
    args = parser.parse_args(argv)
    if args.message_ms % 20 or not 20 <= args.message_ms <= 20 * MAX_FRAMES_PER_MESSAGE:
        parser.error("--message-ms must be a multiple of 20 from 20 to 1000")
    if args.seconds < 10 or args.clients < 1 or args.cores <= 0:
        parser.error("--seconds must be at least 10, --clients and --cores positive")
    if args.checkpoints_per_second <= 0 or args.look_cpu_seconds <= 0 or args.look_interval <= 0:
        parser.error("the checkpoint and look figures must be positive")
    settings = Settings(
        levels=args.shifts,
        seconds=args.seconds,
        clients=args.clients,
        frames=args.message_ms // 20,
        cores=args.cores,
        checkpoints_per_second=args.checkpoints_per_second,
        look_cpu_seconds=args.look_cpu_seconds,
        look_interval=args.look_interval,
    )
    with tempfile.TemporaryDirectory(prefix="voxauth-capacity-") as workdir:
        try:
            asyncio.run(_bench(settings, Path(workdir)))
        except (RuntimeError, grpc.aio.AioRpcError) as error:
            print(f"voxauth bench capacity: {_describe(error)}", file=sys.stderr)
            return 1
    return 0
