"""`voxauth bench load`: Verify throughput and latency at given concurrencies, over gRPC.

Against a running server (`--server`, mutual TLS with the `hr` and `softphone` certificates of
`--pki-dir`, or `--insecure` for `serve --insecure-dev`), or one this command starts on
127.0.0.1 with a throwaway key and database (`--spawn`). It enrolls one bench agent per
concurrent caller (verification throttling counts an attempt as failed until it is decided, so
more than five concurrent attempts on one agent would be throttled by design), each from the
first half of a long recording in tests/data (LibriSpeech, CC BY 4.0), repeated until the
server's enrollment requirement is met. Each caller then sends Verify with the last 8 s of its
agent's recording, as WAV, back to back, for `--seconds` or `--requests` per level. Agents it
created are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.api.tls import channel_credentials
from server.config import ClientSettings
from server.errors import ConfigurationError
from server.tools.shift_bench import BenchServer, nearest_rank, parse_levels, recordings

_SPEECH_DIR = Path(__file__).resolve().parents[2] / "tests" / "data"
_RATE = 16_000
VERIFY_SECONDS = 8.0
_CALL_TIMEOUT = 60.0
_MAX_ENROLL_UTTERANCES = 8
_MAX_SECONDS = 600.0
_MAX_REQUESTS = 100_000
# The server this command starts asks for 5 s of enrollment speech, as `bench shifts` does.
_SPAWN_ENVIRONMENT = {"VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "5"}


@dataclass(frozen=True)
class Outcome:
    latency: float
    status: str
    """"OK" or the gRPC status code's name."""


@dataclass(frozen=True)
class LevelReport:
    concurrency: int
    wall_seconds: float
    outcomes: tuple[Outcome, ...]

    @property
    def completed(self) -> int:
        return sum(outcome.status == "OK" for outcome in self.outcomes)

    @property
    def throughput(self) -> float:
        """Successful verifications per second."""
        return self.completed / self.wall_seconds

    @property
    def errors(self) -> Counter[str]:
        return Counter(o.status for o in self.outcomes if o.status != "OK")

    def percentile(self, fraction: float) -> float | None:
        """Nearest-rank latency percentile of the successful calls, in seconds."""
        latencies = [o.latency for o in self.outcomes if o.status == "OK"]
        return nearest_rank(latencies, fraction) if latencies else None


def format_level(report: LevelReport) -> str:
    def ms(fraction: float) -> str:
        value = report.percentile(fraction)
        return f"{'-':>7s}" if value is None else f"{value * 1000:7.0f}"

    errors = ", ".join(f"{code} {n}" for code, n in sorted(report.errors.items())) or "none"
    return (
        f"{report.concurrency:11d} {len(report.outcomes):8d} {report.completed:6d} "
        f"{report.throughput:7.2f} {report.throughput * VERIFY_SECONDS:8.1f}"
        f" {ms(0.5)} {ms(0.95)} {ms(0.99)}  {errors}"
    )


_HEADER = "concurrency requests     ok  req/s  audio-s/s  p50 ms  p95 ms  p99 ms  errors"


def wav_audio(samples: np.ndarray[tuple[int], np.dtype[np.float32]]) -> pb.Audio:
    buffer = io.BytesIO()
    sf.write(buffer, samples, _RATE, format="WAV", subtype="PCM_16")
    return pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=buffer.getvalue())


@dataclass(frozen=True)
class BenchAgent:
    agent_id: str
    verify_audio: pb.Audio
    created: bool


async def prepare_agents(
    enrollment: pb_grpc.EnrollmentServiceAsyncStub, count: int, given: Sequence[str]
) -> list[BenchAgent]:
    """The agents the callers verify against: those given (with the first recording's speech:
    the decision does not matter to the load), else one new bench agent per caller."""
    paths = recordings(_SPEECH_DIR)
    if not paths:
        raise RuntimeError(f"no long recording in {_SPEECH_DIR}")
    speech = [np.asarray(sf.read(path, dtype="float32")[0], dtype=np.float32) for path in paths]
    tails = [wav_audio(s[-int(VERIFY_SECONDS * _RATE) :]) for s in speech]
    if given:
        return [BenchAgent(agent, tails[0], False) for agent in given]
    suffix = os.urandom(3).hex()
    # One agent per voice: a second agent enrolled with a voice already enrolled is held as
    # a duplicate (not enrolled, so its Verify is FAILED_PRECONDITION), which at 16 callers
    # over the 5 voices of tests/data refused most calls. Callers beyond the voices share
    # their agents, at most ceil(count / voices) to one: within throttling's 5 pending.
    enrolled = []
    for index in range(min(count, len(speech))):
        samples = speech[index]
        agent_id = f"bench-load-{suffix}-{index}"
        await enroll(enrollment, agent_id, samples[: len(samples) // 2])
        enrolled.append(BenchAgent(agent_id, tails[index], True))
    return [enrolled[index % len(enrolled)] for index in range(count)]


async def enroll(
    enrollment: pb_grpc.EnrollmentServiceAsyncStub,
    agent_id: str,
    samples: np.ndarray[tuple[int], np.dtype[np.float32]],
) -> None:
    """Enrolls from `samples`, repeated until the server's requirement is met: a benchmark's
    voiceprint only has to exist, and the recordings are shorter than the default 20 s."""
    await enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id=agent_id, display_name=agent_id, consent_reference="BENCH"),
        timeout=_CALL_TIMEOUT,
    )
    audio = wav_audio(samples)
    for _ in range(_MAX_ENROLL_UTTERANCES):
        await enrollment.AddEnrollmentAudio(
            pb.AddEnrollmentAudioRequest(agent_id=agent_id, audio=audio), timeout=_CALL_TIMEOUT
        )
        status = await enrollment.GetEnrollmentStatus(
            pb.GetEnrollmentStatusRequest(agent_id=agent_id), timeout=_CALL_TIMEOUT
        )
        if status.ready_to_finalize:
            break
    await enrollment.FinalizeEnrollment(
        pb.FinalizeEnrollmentRequest(agent_id=agent_id), timeout=_CALL_TIMEOUT
    )


async def run_level(
    verification: pb_grpc.VerificationServiceAsyncStub,
    agents: Sequence[BenchAgent],
    concurrency: int,
    *,
    seconds: float | None,
    requests: int | None,
) -> LevelReport:
    """`concurrency` callers sending Verify back to back until the time or the count is used
    up; caller i verifies agent i (modulo the agents)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + (seconds if seconds is not None else _MAX_SECONDS)
    budget = requests if requests is not None else _MAX_REQUESTS
    outcomes: list[Outcome] = []

    async def caller(index: int) -> None:
        nonlocal budget
        agent = agents[index % len(agents)]
        request = pb.VerifyRequest(agent_id=agent.agent_id, audio=agent.verify_audio)
        while budget > 0 and loop.time() < deadline:
            budget -= 1
            sent = loop.time()
            try:
                await verification.Verify(request, timeout=_CALL_TIMEOUT)
                status = "OK"
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            outcomes.append(Outcome(loop.time() - sent, status))

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return LevelReport(concurrency, loop.time() - start, tuple(outcomes))


async def _delete(
    enrollment: pb_grpc.EnrollmentServiceAsyncStub, agents: Sequence[BenchAgent]
) -> None:
    # Callers may share an agent: each is deleted once.
    for agent in {agent.agent_id: agent for agent in agents}.values():
        if agent.created:
            await enrollment.DeleteAgent(
                pb.DeleteAgentRequest(agent_id=agent.agent_id), timeout=_CALL_TIMEOUT
            )


def _channel(args: argparse.Namespace, address: str, role: str) -> grpc.aio.Channel:
    if args.insecure or args.spawn:
        return grpc.aio.insecure_channel(address)
    pki: Path = args.pki_dir
    credentials = channel_credentials(
        pki / "ca.crt",
        certificate=pki / "clients" / f"{role}.crt",
        private_key=pki / "clients" / f"{role}.key",
    )
    return grpc.aio.secure_channel(address, credentials)


async def _bench(args: argparse.Namespace, address: str, server: BenchServer | None) -> None:
    async with (
        _channel(args, address, "hr") as hr,
        _channel(args, address, "softphone") as softphone,
    ):
        if server is not None:
            await server.wait_until_serving(softphone)
        enrollment = pb_grpc.EnrollmentServiceStub(hr)
        verification = pb_grpc.VerificationServiceStub(softphone)
        agents = await prepare_agents(enrollment, max(args.concurrency), args.agents)
        try:
            # One call per agent first, so that no level pays for a cold start.
            await run_level(verification, agents, len(agents), seconds=None, requests=len(agents))
            limit = f"{args.seconds:g} s" if args.requests is None else f"{args.requests} calls"
            print(
                f"voxauth bench load: Verify of {VERIFY_SECONDS:g} s WAV speech against "
                f"{address}{' (started by this command)' if server else ''},\n"
                f"{len(agents)} agents, callers back to back, {limit} per level; "
                "latencies of successful calls, nearest rank"
            )
            if server is not None:
                print(f"server settings: {' '.join(server.settings) or 'defaults'}")
            print(_HEADER, flush=True)
            for concurrency in args.concurrency:
                report = await run_level(
                    verification,
                    agents,
                    concurrency,
                    seconds=args.seconds if args.requests is None else None,
                    requests=args.requests,
                )
                print(format_level(report), flush=True)
        finally:
            await _delete(enrollment, agents)


def main(argv: list[str] | None = None) -> int:
    try:
        client = ClientSettings.from_environment()
    except ConfigurationError as error:
        print(f"voxauth bench load: {error.message}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="voxauth bench load",
        description="Verify throughput and p50/p95/p99 latency at given concurrencies.",
    )
    parser.add_argument(
        "--server",
        default=client.server,
        help="a running server (default localhost:50051, VOXAUTH_SERVER)",
    )
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="start a server on 127.0.0.1 for the run (with this shell's VOXAUTH_* settings)",
    )
    parser.add_argument(
        "--pki-dir",
        type=Path,
        default=client.pki_dir,
        help="CA and the `hr` and `softphone` client certificates (default var/pki)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain text, to a server run with --insecure-dev"
    )
    parser.add_argument(
        "--concurrency",
        type=parse_levels,
        default=parse_levels("1,2,16"),
        metavar="N[,N...]",
        help="concurrent callers per level (default 1,2,16)",
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="duration of each level (default 30)"
    )
    parser.add_argument("--requests", type=int, help="calls per level instead of a duration")
    parser.add_argument(
        "--agents",
        type=lambda text: [a for a in text.split(",") if a],
        default=[],
        metavar="ID[,ID...]",
        help="verify against these enrolled agents instead of enrolling bench agents",
    )
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= _MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {_MAX_SECONDS:g}]")
    if args.requests is not None and not 0 < args.requests <= _MAX_REQUESTS:
        parser.error(f"--requests must be 1 to {_MAX_REQUESTS}")
    try:
        if not args.spawn:
            asyncio.run(_bench(args, args.server, None))
            return 0
        with tempfile.TemporaryDirectory(prefix="voxauth-bench-load-") as workdir:
            server = BenchServer(Path(workdir), _SPAWN_ENVIRONMENT)
            try:
                asyncio.run(_bench(args, server.address, server))
            finally:
                server.stop()
    except (RuntimeError, grpc.aio.AioRpcError) as error:
        detail = (
            f"{error.code().name}: {error.details()}"
            if isinstance(error, grpc.aio.AioRpcError)
            else str(error)
        )
        print(f"voxauth bench load: {detail}", file=sys.stderr)
        return 1
    return 0
