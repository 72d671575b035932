"""Memory under concurrent large uploads (issue 10, item 3): forty StreamEnrollmentAudio calls at
once, of 20 MB each and then of just under the length limit, against a `voxauth serve` process
of its own, so that the resident memory measured is the server's alone.

The assertion is on the server's peak resident set (VmHWM), never on time: how fast the calls
go does not matter, only how much they hold at once. The uploads just under the limit are
silence: decoded, resampled where needed and searched for speech like any upload, but never
embedded, so the figure is the uploads' and not the speaker model's working memory (which
depends on the number of workers and the longest utterance, not on the number of calls).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from tests.support import SPEAKER_A, speech

STREAMS = 40
CHUNK_BYTES = 256 * 1024  # as `voxauth enroll` streams files
PEAK_LIMIT_BYTES = 2_500_000_000
OVERSIZED_BYTES = 20_000_000  # 625 s of 16 kHz PCM16: ten times the 60 s limit
JUST_UNDER_SECONDS = 59.0


class ServeProcess:
    """`voxauth serve --insecure-dev` in a subprocess, on a free port, until closed."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        self.target = f"127.0.0.1:{port}"
        self._log = (tmp_path / "serve.log").open("w")
        command = [sys.executable, "-m", "server.tools.cli", "serve", "--insecure-dev"]
        self.process = subprocess.Popen(
            [*command, "--listen", self.target, "--db", str(tmp_path / "voxauth.db")],
            env={**env, "VOXAUTH_HTTP_LISTEN": ""},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._log_path = tmp_path / "serve.log"

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self._log_path.read_text()
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.5)
        raise AssertionError(f"the server did not start:\n{self._log_path.read_text()}")

    def status_kib(self, field: str) -> int:
        """A memory figure of /proc/PID/status (VmRSS, VmHWM), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak(self) -> None:
        """Peak RSS from now on (Linux: writing 5 to clear_refs resets VmHWM to VmRSS)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self._log.close()


@contextlib.contextmanager
def served(tmp_path: Path, env: dict[str, str]) -> Iterator[ServeProcess]:
    server = ServeProcess(tmp_path, env)
    try:
        server.wait_until_serving()
        yield server
    finally:
        server.close()


def pcm16_speech(seconds: float) -> bytes:
    """Real speech, repeated to `seconds`, as 16 kHz PCM16LE."""
    samples = speech(SPEAKER_A)
    repeated = np.resize(samples, int(seconds * 16_000))
    return (np.clip(repeated, -1, 1) * 32767).astype("<i2").tobytes()


def _chunks(agent_id: str, data: bytes) -> Iterator[pb.EnrollmentAudioChunk]:
    yield pb.EnrollmentAudioChunk(
        agent_id=agent_id,
        encoding=pb.AUDIO_ENCODING_PCM16LE,
        sample_rate_hz=16_000,
        data=data[:CHUNK_BYTES],
    )
    for start in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
        yield pb.EnrollmentAudioChunk(data=data[start : start + CHUNK_BYTES])


def upload_at_once(target: str, agents: list[str], data: bytes) -> list[grpc.StatusCode]:
    """Streams `data` for every agent at the same time, as `voxauth enroll` does (the
    blocking client: it reports the server's status when the server ends a call before the
    client is done sending); the status each call ended with."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)

        def upload(agent_id: str) -> grpc.StatusCode:
            try:
                stub.StreamEnrollmentAudio(_chunks(agent_id, data), timeout=600)
            except grpc.RpcError as error:
                assert isinstance(error, grpc.Call)
                return error.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(len(agents)) as pool:
            return list(pool.map(upload, agents))


def test_forty_concurrent_large_uploads_keep_the_server_below_2_5_gb(
    tmp_path: Path, key_env: dict[str, str]
) -> None:
    agents = [f"upload-{n}" for n in range(STREAMS)]
    with served(tmp_path, key_env) as server:
        with grpc.insecure_channel(server.target) as channel:
            enrollment = pb_grpc.EnrollmentServiceStub(channel)
            for agent_id in agents:
                enrollment.CreateAgent(
                    pb.CreateAgentRequest(
                        agent_id=agent_id, display_name=agent_id, consent_reference="HR-1"
                    )
                )
        idle = server.status_kib("VmRSS") * 1024
        server.reset_peak()

        oversized = pcm16_speech(OVERSIZED_BYTES / 32_000)
        refused = upload_at_once(server.target, agents, oversized)
        # Each is cut off by the 60 s limit as it arrives (or by the budget), never buffered.
        assert set(refused) <= {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }
        assert grpc.StatusCode.INVALID_ARGUMENT in refused

        silence = bytes(int(JUST_UNDER_SECONDS * 16_000) * 2)
        just_under = upload_at_once(server.target, agents, silence)
        # Decoded and analysed, up to the inference queue's bound; the rest are told to retry.
        assert set(just_under) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert just_under.count(grpc.StatusCode.OK) >= 2

        peak, after = server.status_kib("VmHWM") * 1024, server.status_kib("VmRSS") * 1024
        report = (
            f"server RSS: {idle / 1e9:.2f} GB idle, peak {peak / 1e9:.2f} GB under {STREAMS} "
            f"concurrent uploads, {after / 1e9:.2f} GB after"
        )
        print(report)
    assert peak < PEAK_LIMIT_BYTES, report
