"""`voxauth bench shifts`: how many concurrent shifts one server keeps checkpoints on time for.

The command starts its own server (a subprocess on 127.0.0.1, with a temporary key and
database), enrolls one agent per long recording in tests/data (LibriSpeech, CC BY 4.0), and
then, for each level N, starts N shifts and streams each one its agent's speech, looped, at
real time: PCM16LE at 16 kHz, 100 ms per message, paced by the wall clock. Every checkpoint
event gives the latency of its decision, `at - scheduled_at` (both server timestamps, one
clock). By default checkpoints come every 30 +/- 15 s instead of the production 600 +/- 480 s,
so that a level yields enough of them in two minutes.

A level passes when every checkpoint it saw was decided within the limit (2 s) of its
scheduled time (the maximum, hence the p99 too), no shift's checkpoint was still undecided
the limit past the latest time it could have been due, and nothing failed (logins, streams).
Levels run in increasing order and stop at the first that fails.

`voxauth bench shifts takeover DIR` (server/tools/takeover_bench.py) is another benchmark:
how soon a takeover of the agent's line locks the shift at the default schedule, in virtual
time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.config import ShiftPolicy

# Re-exported: load_bench and the tests import it from here.
from server.tools.percentiles import nearest_rank as nearest_rank

_SPEECH_DIR = Path(__file__).resolve().parents[2] / "tests" / "data"
# Long enough for an enrollment half and a login half of at least 3 s of speech each.
_MIN_RECORDING_SECONDS = 12.0
RATE = 16_000
FRAME_BYTES = 640  # 20 ms of PCM16LE at 16 kHz
MESSAGE_FRAMES = 5  # 100 ms per message, as a softphone would send
MESSAGE_SECONDS = MESSAGE_FRAMES * 0.02
# The benchmark's recordings hold ~17 s of speech each; the server's 20 s default could
# never be met by one recording's first half.
ENROLL_NET_SPEECH_SECONDS = 5.0
# Logins run this many at a time: the server's inference queue would refuse a burst of them.
_LOGIN_CONCURRENCY = 2
_CALL_TIMEOUT = 60.0
_SERVER_START_TIMEOUT = 300.0
_SERVER_STOP_TIMEOUT = 30.0
_MAX_SHIFTS = 500
_OUTCOMES = {
    spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED: "passed",
    spb.SHIFT_EVENT_KIND_CHECKPOINT_FAILED: "failed",
    spb.SHIFT_EVENT_KIND_INSUFFICIENT_SPEECH: "insufficient",
}


# --- pure parts: statistics, pacing, the rule ----------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats | None:
        if not values:
            return None
        return cls(nearest_rank(values, 0.5), nearest_rank(values, 0.99), max(values))


class Pacer:
    """Message times on absolute deadlines (start + k * period): a message sent late does not
    push the later ones back, so a stream keeps real time on average whatever the jitter."""

    def __init__(self, start: float, period: float) -> None:
        self._start = start
        self._period = period
        self._sent = 0
        self.max_lag = 0.0
        """The furthest behind its deadline a message was sent, in seconds."""

    def wait(self, now: float) -> float:
        """Seconds to wait before sending the next message: 0 when it is already late."""
        deadline = self._start + self._sent * self._period
        self._sent += 1
        self.max_lag = max(self.max_lag, now - deadline)
        return max(0.0, deadline - now)


def message_chunks(pcm: bytes) -> list[bytes]:
    """The recording as whole 100 ms messages; a shorter tail is dropped so that every
    message carries the same duration and the pacing stays real time."""
    step = FRAME_BYTES * MESSAGE_FRAMES
    return [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]


def cpu_seconds_from_stat(stat: str, ticks_per_second: int) -> float:
    """utime + stime of one process from its /proc/PID/stat line, in seconds (all threads)."""
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / ticks_per_second


def busy_seconds_from_proc_stat(proc_stat: str, ticks_per_second: int) -> float:
    """All cores' busy time from /proc/stat (everything but idle and I/O wait), in seconds."""
    values = [int(v) for v in proc_stat.splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / ticks_per_second


@dataclass
class ShiftTally:
    """What one shift's stream saw. Times are server timestamps in seconds since the epoch."""

    last_event_at: float
    """The stream's attach, then each checkpoint: the next checkpoint is due after it."""
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    locked: bool = False
    error: str | None = None
    max_send_lag: float = 0.0

    def checkpoint(self, outcome: str, at: float, scheduled_at: float) -> None:
        self.latencies.append(at - scheduled_at)
        self.outcomes[outcome] += 1
        self.last_event_at = at

    def overdue(self, now: float, max_interval: float, limit: float) -> bool:
        """A checkpoint is due at the latest `max_interval` after the last event; still no
        decision `limit` after that means one is late beyond the limit. A locked shift has no
        more checkpoints."""
        return not self.locked and now - self.last_event_at > max_interval + limit


@dataclass(frozen=True)
class CpuReading:
    wall: float
    server: float
    client: float
    host_busy: float


@dataclass(frozen=True)
class LevelResult:
    shifts: int
    seconds: float
    outcomes: Counter[str]
    latency: LatencyStats | None
    overdue: int
    errors: list[str]
    server_cores: float
    """Server CPU seconds per wall second: 1.0 is one core fully busy."""
    client_cores: float
    other_cores: float
    """Everything else on the host (other users' work included) in the same window."""
    max_send_lag: float

    def passes(self, limit: float) -> bool:
        return (
            not self.errors
            and self.latency is not None
            and self.latency.max <= limit
            and self.overdue == 0
        )


def largest_passing(results: Sequence[LevelResult], limit: float) -> int | None:
    """The largest N that passed with every smaller level measured also passing."""
    largest = None
    for result in sorted(results, key=lambda r: r.shifts):
        if not result.passes(limit):
            break
        largest = result.shifts
    return largest


def parse_levels(text: str) -> list[int]:
    """'10,20,40' -> [10, 20, 40]: the levels in increasing order, without repeats."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
    if not levels or levels[0] < 1 or levels[-1] > _MAX_SHIFTS:
        raise argparse.ArgumentTypeError(f"shift counts must be 1 to {_MAX_SHIFTS}")
    return levels


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    levels: list[int]
    seconds: float
    limit: float
    checkpoint_mean: float
    checkpoint_jitter: float
    checkpoint_min_gap: float

    @property
    def max_interval(self) -> float:
        """The longest a shift waits for its next checkpoint (see CheckpointSchedule)."""
        return max(self.checkpoint_min_gap, self.checkpoint_mean + self.checkpoint_jitter)

    def server_environment(self) -> dict[str, str]:
        return {
            "VOXAUTH_CHECKPOINT_MEAN_SECONDS": f"{self.checkpoint_mean:g}",
            "VOXAUTH_CHECKPOINT_JITTER_SECONDS": f"{self.checkpoint_jitter:g}",
            "VOXAUTH_CHECKPOINT_MIN_GAP_SECONDS": f"{self.checkpoint_min_gap:g}",
            "VOXAUTH_ENROLL_NET_SPEECH_SECONDS": f"{ENROLL_NET_SPEECH_SECONDS:g}",
        }


# --- the server under test ------------------------------------------------------------------


class BenchServer:
    """`voxauth serve` in a subprocess with a throwaway key and database."""

    def __init__(self, workdir: Path, environment: Mapping[str, str]) -> None:
        self.port = _free_port()
        self.log_path = workdir / "server.log"
        # The caller's VOXAUTH_* settings (workers, threads, scoring...) apply, except those
        # that would point the server at a real key, database or address.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("VOXAUTH_KEY_FILE", "VOXAUTH_LISTEN", "VOXAUTH_DB")
        }
        env["VOXAUTH_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
        env["VOXAUTH_HTTP_LISTEN"] = ""
        env.update(environment)
        self.settings = sorted(
            f"{k}={v}" for k, v in env.items() if k.startswith("VOXAUTH_") and k != "VOXAUTH_KEY"
        )
        command = [sys.executable, "-m", "server.tools.cli", "serve"]
        command += ["--listen", f"127.0.0.1:{self.port}", "--db", str(workdir / "bench.db")]
        # Loopback only, and the measurement is of checkpoints, not of TLS.
        command += ["--insecure-dev"]
        with self.log_path.open("wb") as log:
            # A session of its own: Ctrl-C reaches the benchmark, which then stops the server
            # in order instead of both dying at once.
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_until_serving(self, channel: grpc.aio.Channel) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + _SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the server was not serving after {_SERVER_START_TIMEOUT:.0f} s")

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        return cpu_seconds_from_stat(stat, os.sysconf("SC_CLK_TCK"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _read_cpu(server: BenchServer) -> CpuReading:
    ticks = os.sysconf("SC_CLK_TCK")
    return CpuReading(
        wall=time.monotonic(),
        server=server.cpu_seconds(),
        client=time.process_time(),
        host_busy=busy_seconds_from_proc_stat(Path("/proc/stat").read_text(), ticks),
    )


# --- agents and speech ----------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    agent_id: str
    login: pb.Audio
    stream: list[bytes]
    """The whole recording as 100 ms messages, streamed in a loop."""


def _pcm16(samples: np.ndarray[Any, np.dtype[np.float32]]) -> bytes:
    return bytes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())


def _raw(samples: np.ndarray[Any, np.dtype[np.float32]]) -> pb.Audio:
    return pb.Audio(encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=RATE, data=_pcm16(samples))


def recordings(directory: Path) -> list[Path]:
    paths = []
    for path in sorted(directory.glob("*.flac")):
        info = sf.info(path)
        if info.samplerate == RATE and info.duration >= _MIN_RECORDING_SECONDS:
            paths.append(path)
    return paths


async def enroll_agents(channel: grpc.aio.Channel, paths: Sequence[Path]) -> list[Agent]:
    """One agent per recording: its first half (in two utterances) enrolls, its second half is
    the login, and the whole of it is what the shift streams."""
    enrollment = pb_grpc.EnrollmentServiceStub(channel)
    agents = []
    for path in paths:
        samples, _ = sf.read(path, dtype="float32")
        samples = np.asarray(samples, dtype=np.float32)
        agent_id = f"bench-{path.stem}"
        half = len(samples) // 2
        await enrollment.CreateAgent(
            pb.CreateAgentRequest(
                agent_id=agent_id, display_name=path.stem, consent_reference="BENCH"
            ),
            timeout=_CALL_TIMEOUT,
        )
        for part in np.array_split(samples[:half], 2):
            await enrollment.AddEnrollmentAudio(
                pb.AddEnrollmentAudioRequest(agent_id=agent_id, audio=_raw(part)),
                timeout=_CALL_TIMEOUT,
            )
        await enrollment.FinalizeEnrollment(
            pb.FinalizeEnrollmentRequest(agent_id=agent_id), timeout=_CALL_TIMEOUT
        )
        agents.append(Agent(agent_id, _raw(samples[half:]), message_chunks(_pcm16(samples))))
    return agents


# --- one level ------------------------------------------------------------------------------


class BenchShift:
    """One softphone: a shift, its stream, the audio it sends and the events it reads."""

    def __init__(self, shift_id: str, agent: Agent, call: Any, attached_at: float) -> None:
        self.shift_id = shift_id
        self._agent = agent
        self._call = call
        self.tally = ShiftTally(last_event_at=attached_at)
        self.ending = False

    async def send(self, start: float, messages: int) -> None:
        pacer = Pacer(start, MESSAGE_SECONDS)
        loop = asyncio.get_running_loop()
        chunks = self._agent.stream
        try:
            for index in range(messages):
                wait = pacer.wait(loop.time())
                if wait:
                    await asyncio.sleep(wait)
                await self._call.write(spb.ShiftAudio(frames=chunks[index % len(chunks)]))
        except grpc.aio.AioRpcError as error:
            self._failed(_describe(error))
        except asyncio.InvalidStateError:
            self._failed("the server ended the stream")
        finally:
            self.tally.max_send_lag = pacer.max_lag

    async def read(self) -> None:
        try:
            while (event := await self._call.read()) is not grpc.aio.EOF:
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
        # Ending the shift closes its stream; only a failure before that counts.
        if not self.ending and self.tally.error is None:
            self.tally.error = f"stream: {reason}"

    def cancel(self) -> None:
        self._call.cancel()


async def _start_shift(
    stub: Any, agent: Agent, device_id: str, gate: asyncio.Semaphore
) -> tuple[Agent, str]:
    async with gate:
        response = await stub.StartShift(
            spb.StartShiftRequest(
                agent_id=agent.agent_id, device_id=device_id, login_audio=agent.login
            ),
            timeout=_CALL_TIMEOUT,
        )
    if response.shift.state != spb.SHIFT_STATE_VERIFIED:
        raise RuntimeError(f"login of {agent.agent_id} not verified: {response.verification}")
    return agent, response.shift.shift_id


async def _attach(stub: Any, agent: Agent, shift_id: str) -> BenchShift:
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
    return BenchShift(shift_id, agent, call, attached.at.ToNanoseconds() / 1e9)


async def run_level(
    channel: grpc.aio.Channel,
    server: BenchServer,
    agents: Sequence[Agent],
    count: int,
    settings: BenchSettings,
) -> LevelResult:
    stub = spb_grpc.ShiftServiceStub(channel)
    errors: list[str] = []
    gate = asyncio.Semaphore(_LOGIN_CONCURRENCY)
    started = await asyncio.gather(
        *(
            _start_shift(stub, agents[i % len(agents)], f"bench-{count}-{i}", gate)
            for i in range(count)
        ),
        return_exceptions=True,
    )
    logged_in = [s for s in started if not isinstance(s, BaseException)]
    errors += [f"StartShift: {_describe(e)}" for e in started if isinstance(e, BaseException)]
    attached = await asyncio.gather(
        *(_attach(stub, agent, shift_id) for agent, shift_id in logged_in),
        return_exceptions=True,
    )
    shifts = [s for s in attached if isinstance(s, BenchShift)]
    errors += [f"attach: {_describe(e)}" for e in attached if isinstance(e, BaseException)]

    loop = asyncio.get_running_loop()
    start = loop.time()
    before = _read_cpu(server)
    messages = int(settings.seconds / MESSAGE_SECONDS)
    # Each softphone sends at its own phase of the 100 ms period, as independent phones
    # would, rather than all in the same instant.
    senders = [
        asyncio.create_task(s.send(start + MESSAGE_SECONDS * i / len(shifts), messages))
        for i, s in enumerate(shifts)
    ]
    readers = [asyncio.create_task(s.read()) for s in shifts]
    await asyncio.sleep(max(0.0, start + settings.seconds - loop.time()))
    after = _read_cpu(server)
    now = time.time()
    for sender in senders:
        sender.cancel()
    await asyncio.gather(*senders, return_exceptions=True)

    for s in shifts:
        s.ending = True
    await _end_shifts(stub, shifts)
    if readers:
        await asyncio.wait(readers, timeout=_CALL_TIMEOUT)
    for s in shifts:
        s.cancel()
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    tallies = [s.tally for s in shifts]
    errors += [t.error for t in tallies if t.error is not None]
    wall = after.wall - before.wall
    server_cores = (after.server - before.server) / wall
    client_cores = (after.client - before.client) / wall
    return LevelResult(
        shifts=count,
        seconds=wall,
        outcomes=sum((t.outcomes for t in tallies), Counter()),
        latency=LatencyStats.of([x for t in tallies for x in t.latencies]),
        overdue=sum(t.overdue(now, settings.max_interval, settings.limit) for t in tallies),
        errors=errors,
        server_cores=server_cores,
        client_cores=client_cores,
        other_cores=(after.host_busy - before.host_busy) / wall - server_cores - client_cores,
        max_send_lag=max((t.max_send_lag for t in tallies), default=0.0),
    )


async def _end_shifts(stub: Any, shifts: Sequence[BenchShift]) -> None:
    """Ends every shift so that its checkpoints stop before the next level starts."""
    gate = asyncio.Semaphore(8)

    async def end(shift: BenchShift) -> None:
        async with gate:
            await stub.EndShift(spb.EndShiftRequest(shift_id=shift.shift_id), timeout=_CALL_TIMEOUT)

    await asyncio.gather(*(end(s) for s in shifts), return_exceptions=True)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


# --- report ---------------------------------------------------------------------------------

_HEADER = (
    "shifts  window  checkpoints  pass  fail  insuff   p50 s   p99 s   max s  overdue"
    "  server CPU (machine)  client  others  send lag  result"
)


def format_level(result: LevelResult, limit: float, cores: int) -> str:
    o = result.outcomes
    checkpoints = sum(o.values())
    if result.latency is None:
        latency = f"{'-':>7} {'-':>7} {'-':>7}"
    else:
        lat = result.latency
        latency = f"{lat.p50:7.3f} {lat.p99:7.3f} {lat.max:7.3f}"
    return (
        f"{result.shifts:6d} {result.seconds:6.0f}s {checkpoints:12d} {o['passed']:5d} "
        f"{o['failed']:5d} {o['insufficient']:7d} {latency} {result.overdue:8d}"
        f"  {result.server_cores:6.0%} core ({result.server_cores / cores:4.0%})"
        f" {result.client_cores:6.0%}  {result.other_cores:6.0%}  {result.max_send_lag:6.2f} s"
        f"  {'ok' if result.passes(limit) else 'FAIL'}"
    )


def _print_preamble(settings: BenchSettings, server: BenchServer, agents: Sequence[Agent]) -> None:
    s = settings
    production = ShiftPolicy()
    print("voxauth bench shifts: concurrent shifts streaming real speech at real time")
    print(f"server     {server.address}, started by this command")
    print(f"host       {os.cpu_count()} cores; server settings: {' '.join(server.settings)}")
    print(
        f"speech     {len(agents)} agents ({', '.join(a.agent_id for a in agents)}) from "
        f"{_SPEECH_DIR} (LibriSpeech, CC BY 4.0),\n"
        f"           each shift its agent's recording looped, PCM16LE 16 kHz, "
        f"{MESSAGE_FRAMES} frames ({MESSAGE_SECONDS * 1000:.0f} ms) per message at real time"
    )
    print(
        f"schedule   a checkpoint every {s.checkpoint_mean:g} s +/- {s.checkpoint_jitter:g} s "
        f"(at least {s.checkpoint_min_gap:g} s apart): "
        f"{production.mean_checkpoint_interval_seconds / s.checkpoint_mean:g}x the checkpoints "
        f"per shift of the default {production.mean_checkpoint_interval_seconds:g} s;\n"
        f"           each analyses the audio since the previous one, at most "
        f"{production.max_audio_age_seconds:g} s (with the defaults, always that)"
    )
    print(
        f"rule       a level passes when every checkpoint was decided within {s.limit:g} s of its "
        f"scheduled time (max latency, so p99 too),\n"
        f"           no shift's checkpoint was undecided {s.limit:g} s past its latest due time "
        f"(overdue), and no login or stream failed"
    )
    print(
        "columns    latency = event.at - event.scheduled_at; CPU = CPU seconds per second "
        "(100% = one core); others = the rest of the host"
    )
    print()
    print(_HEADER, flush=True)


async def _bench(settings: BenchSettings, workdir: Path) -> list[LevelResult]:
    server = BenchServer(workdir, settings.server_environment())
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await server.wait_until_serving(channel)
            agents = await enroll_agents(channel, recordings(_SPEECH_DIR))
            if not agents:
                raise RuntimeError(f"no recording of {_MIN_RECORDING_SECONDS:g} s in {_SPEECH_DIR}")
            _print_preamble(settings, server, agents)
            results: list[LevelResult] = []
            cores = os.cpu_count() or 1
            for count in settings.levels:
                result = await run_level(channel, server, agents, count, settings)
                results.append(result)
                print(format_level(result, settings.limit, cores), flush=True)
                for error in sorted(set(result.errors))[:5]:
                    print(f"       error: {error}")
                if not result.passes(settings.limit):
                    break  # Higher levels would only fail harder; the run stays bounded.
            return results
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "takeover":
        from server.tools.takeover_bench import main as takeover_main

        return takeover_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="voxauth bench shifts",
        description="The largest number of concurrent shifts whose checkpoints stay on time.",
    )
    parser.add_argument(
        "--shifts",
        type=parse_levels,
        default=parse_levels("5,10,20,40,80"),
        metavar="N[,N...]",
        help="concurrent shifts per level, run in increasing order (default 5,10,20,40,80)",
    )
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="streaming time per level (default 120)"
    )
    parser.add_argument(
        "--limit", type=float, default=2.0, help="allowed checkpoint latency, s (default 2)"
    )
    parser.add_argument(
        "--checkpoint-mean",
        type=float,
        default=30.0,
        help="mean checkpoint interval, s (default 30)",
    )
    parser.add_argument(
        "--checkpoint-jitter",
        type=float,
        default=15.0,
        help="interval jitter (+/-), s (default 15)",
    )
    parser.add_argument(
        "--checkpoint-min-gap",
        type=float,
        default=10.0,
        help="shortest checkpoint interval, s (default 10)",
    )
    args = parser.parse_args(argv)
    settings = BenchSettings(
        levels=args.shifts,
        seconds=args.seconds,
        limit=args.limit,
        checkpoint_mean=args.checkpoint_mean,
        checkpoint_jitter=args.checkpoint_jitter,
        checkpoint_min_gap=args.checkpoint_min_gap,
    )
    if settings.checkpoint_mean <= 0 or settings.limit <= 0:
        parser.error("--checkpoint-mean and --limit must be positive")
    if settings.seconds < settings.max_interval + settings.limit:
        # Shorter, and a shift might see no checkpoint without that being a fault.
        parser.error(
            f"--seconds must be at least {settings.max_interval + settings.limit:g} "
            "(the longest checkpoint interval plus the limit)"
        )
    with tempfile.TemporaryDirectory(prefix="voxauth-bench-") as workdir:
        try:
            results = asyncio.run(_bench(settings, Path(workdir)))
        except (RuntimeError, grpc.aio.AioRpcError) as error:
            print(f"voxauth bench shifts: {_describe(error)}", file=sys.stderr)
            return 1
    largest = largest_passing(results, settings.limit)
    print()
    if largest is None:
        print(f"no level kept every checkpoint within {settings.limit:g} s")
    elif largest == settings.levels[-1]:
        print(f"largest N within {settings.limit:g} s: at least {largest} (the highest level run)")
    else:
        print(f"largest N within {settings.limit:g} s: {largest} (of the levels run)")
    return 0
