"""Test helpers: real speech from tests/data, and an in-process voxauth server on a free port
reached through a real gRPC channel."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from models.countermeasure import Countermeasure
from models.embedder import SpeakerEmbedder
from server.api.grpc_server import GrpcServer
from server.api.metrics import Metrics
from server.api.readiness import Readiness
from server.api.tls import channel_credentials
from server.app import VoxauthServer
from server.config import (
    EnrollmentPolicy,
    HttpConfig,
    PresentationAttackPolicy,
    ServerConfig,
    StreamLimits,
    TransportConfig,
)
from server.runtime.audio_budget import AudioBudget
from server.runtime.inference import InferencePool
from server.runtime.store_pool import StorePool
from server.security.certificates import DevelopmentPki
from server.security.identity import Role
from server.storage.interface import AuditEvent
from tests.clock import ManualClock
from tests.fakes import FakeCountermeasure

DATA = Path(__file__).parent / "data"
RATE = 16_000

# Speakers in tests/data (see its README): two enrolled voices, two others, one short clip.
SPEAKER_A = "198-126831-0000"
SPEAKER_B = "8770-295462-0000"
OTHER_1 = "229-130880-0000"
OTHER_2 = "3374-298025-0000"
SHORT_CLIP = "1447-130550-0000"

Samples = npt.NDArray[np.float32]
T = TypeVar("T")


def speech(name: str) -> Samples:
    samples, rate = sf.read(DATA / f"{name}.flac", dtype="float32")
    assert rate == RATE
    return np.asarray(samples, dtype=np.float32)


def first_half(name: str) -> Samples:
    samples = speech(name)
    return samples[: len(samples) // 2]


def second_half(name: str) -> Samples:
    samples = speech(name)
    return samples[len(samples) // 2 :]


def split(samples: Samples, parts: int) -> list[Samples]:
    return [np.asarray(p, dtype=np.float32) for p in np.array_split(samples, parts)]


def wav_bytes(samples: Samples, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def wav_audio(samples: Samples) -> pb.Audio:
    return pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=wav_bytes(samples))


KEY = bytes(range(32))


_A_DAY = 86_400.0


def make_config(tmp_path: Path) -> ServerConfig:
    # Each test file holds ~17 s of one speaker, so tests ask for 5 s of enrollment speech
    # instead of the 20 s default.
    # Plain text, every caller with every role: these tests are about speech, not access
    # (tests/test_security.py runs the real server with mutual TLS).
    # Tests move the clock by minutes at a time while a softphone or upload sends nothing, which
    # a real client would not do: streams are not closed for idling (tests of that set it).
    return replace(
        ServerConfig(),
        listen_address="127.0.0.1:0",
        database_path=tmp_path / "voxauth.db",
        enrollment=replace(EnrollmentPolicy(), required_net_speech_seconds=5.0),
        transport=TransportConfig(insecure_development=True),
        http=replace(HttpConfig(), listen_address="127.0.0.1:0"),
        streams=StreamLimits(shift_idle_seconds=_A_DAY, enrollment_idle_seconds=_A_DAY),
        # The tests send the same few recordings again and again, which replay detection
        # would refuse; tests/e2e/test_presentation_e2e.py turns it on.
        presentation=PresentationAttackPolicy(replay_detection=False),
    )


def tls_config(tmp_path: Path, pki: DevelopmentPki) -> ServerConfig:
    """The test configuration behind mutual TLS with the development PKI."""
    return replace(
        make_config(tmp_path),
        transport=TransportConfig(
            tls_certificate=pki.server_certificate,
            tls_private_key=pki.server_key,
            client_ca=pki.ca_certificate,
        ),
    )


def as_role(pki: DevelopmentPki, role: Role) -> grpc.ChannelCredentials:
    """Client credentials of the development PKI's certificate for `role`."""
    return channel_credentials(
        pki.ca_certificate,
        certificate=pki.client_certificate(role.value),
        private_key=pki.client_key(role.value),
    )


def https_context(pki: DevelopmentPki) -> ssl.SSLContext:
    """A client's TLS context trusting the development PKI's CA (the HTTP side's server
    certificate is the gRPC port's)."""
    return ssl.create_default_context(cafile=str(pki.ca_certificate))


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(url: str, context: ssl.SSLContext | None = None, method: str = "GET") -> HttpAnswer:
    """One request with urllib, as an MFA provider or Prometheus would make it; error statuses
    are answers too."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as got:
            return HttpAnswer(got.status, dict(got.headers.items()), got.read())
    except urllib.error.HTTPError as refused:
        return HttpAnswer(refused.code, dict(refused.headers.items()), refused.read())


MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""A scrape: each sample's value by its name and labels."""


def parse_metrics(text: str) -> MetricSamples:
    samples: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: MetricSamples, name: str, **labels: str) -> float:
    """The sample's value; 0 for one not (yet) exported, as for a counter never increased."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class RunningServer:
    """A VoxauthServer on its own event loop thread, reached over a real socket."""

    def __init__(
        self,
        config: ServerConfig,
        load_embedder: Callable[[], SpeakerEmbedder],
        key: bytes,
        clock: ManualClock | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        load_countermeasure: Callable[[], Countermeasure] | None = None,
    ) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.clock = clock or ManualClock()
        # Without a countermeasure given, a fake one that takes every voice for a live one.
        self.server = VoxauthServer(
            config,
            key,
            load_embedder=load_embedder,
            load_countermeasure=load_countermeasure or FakeCountermeasure,
            clock=self.clock,
        )
        self.port = self._call(self.server.start())
        target = f"127.0.0.1:{self.port}"
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self.enrollment = pb_grpc.EnrollmentServiceStub(self.channel)
        self.verification = pb_grpc.VerificationServiceStub(self.channel)
        self.shifts = spb_grpc.ShiftServiceStub(self.channel)

    def http_url(self, path: str) -> str:
        """`path` on the HTTP side: https, or http in insecure development mode."""
        scheme = "http" if self.config.transport.insecure_development else "https"
        return f"{scheme}://127.0.0.1:{self.server.http_port}{path}"

    def scrape(self) -> MetricSamples:
        """/metrics as Prometheus reads it (insecure development mode: plain HTTP)."""
        answer = http_get(self.http_url("/metrics"))
        assert answer.status == 200
        return parse_metrics(answer.body.decode())

    def advance(self, seconds: float) -> None:
        """Moves the server's clock on by `seconds`, on the server's loop where its sleepers
        wait, and lets the woken tasks run up to their next wait."""

        async def advance_and_settle() -> None:
            self.clock.advance(seconds)
            for _ in range(5):
                await asyncio.sleep(0)

        self._call(advance_and_settle())

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self._call(self.server.stop(grace=1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def enroll(self, agent_id: str, utterances: list[Samples]) -> pb.FinalizeEnrollmentResponse:
        self.enrollment.CreateAgent(
            pb.CreateAgentRequest(
                agent_id=agent_id, display_name=f"Agent {agent_id}", consent_reference="HR-1"
            )
        )
        for samples in utterances:
            response = self.enrollment.AddEnrollmentAudio(
                pb.AddEnrollmentAudioRequest(agent_id=agent_id, audio=wav_audio(samples))
            )
            assert response.utterance.accepted, response.utterance.rejection_reason
        return self.enrollment.FinalizeEnrollment(pb.FinalizeEnrollmentRequest(agent_id=agent_id))

    def verify(self, agent_id: str, audio: pb.Audio) -> pb.VerifyResponse:
        return self.verification.Verify(pb.VerifyRequest(agent_id=agent_id, audio=audio))


@dataclass
class ApiServer:
    """The gRPC edge alone (GrpcServer: servicers, interceptors, TLS ports), without a domain:
    every call that gets past the edge is UNAVAILABLE, as while the model loads."""

    api: GrpcServer
    clock: ManualClock
    address: str
    """The mutual-TLS port, as localhost:port."""
    token_address: str
    """The TLS port for bearer tokens."""
    audited: list[AuditEvent] = field(default_factory=list)


@contextlib.asynccontextmanager
async def api_server(
    config: ServerConfig, metrics: Metrics | None = None
) -> AsyncIterator[ApiServer]:
    """Runs `config`'s gRPC edge on the current event loop (use `tls_config`, with a
    token_listen_address for the second port), counting calls in `metrics` if given."""
    clock = ManualClock()
    inference, store_pool = InferencePool(config.inference), StorePool(config.store)
    budget = AudioBudget(config.audio.budget_mib * 2**20)
    api = GrpcServer(config, Readiness(), inference, store_pool, clock, budget, metrics)
    audited: list[AuditEvent] = []

    async def audit(event: AuditEvent) -> None:
        audited.append(event)

    await api.start(audit)
    try:
        yield ApiServer(api, clock, f"localhost:{api.port}", f"localhost:{api.token_port}", audited)
    finally:
        await api.stop(0)
        inference.shutdown()
        store_pool.shutdown()
