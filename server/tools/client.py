"""Client side of the HR enrollment workflow: enroll, re-enroll, inspect and erase an agent
on a running voxauth server. Used by `voxauth enroll|status|delete` and importable by HR tools.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import soundfile as sf
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.pipeline.containers import SNIFF_BYTES, Container, sniff

# Chunk size for streamed utterances: well under gRPC's default 4 MiB message limit.
STREAM_CHUNK_BYTES = 256 * 1024

# Raw audio has no header to recognise it by: only its name says what it is.
_RAW_BY_SUFFIX = {
    ".pcm": pb.AUDIO_ENCODING_PCM16LE,
    ".raw": pb.AUDIO_ENCODING_PCM16LE,
    ".ulaw": pb.AUDIO_ENCODING_MULAW,
    ".mulaw": pb.AUDIO_ENCODING_MULAW,
    ".pcmu": pb.AUDIO_ENCODING_MULAW,
    ".alaw": pb.AUDIO_ENCODING_ALAW,
    ".pcma": pb.AUDIO_ENCODING_ALAW,
}

# Files are recognised by their content, whatever their name.
_BY_CONTAINER = {
    Container.WAV: pb.AUDIO_ENCODING_WAV,
    Container.FLAC: pb.AUDIO_ENCODING_FLAC,
    Container.MP3: pb.AUDIO_ENCODING_MP3,
    Container.OGG_VORBIS: pb.AUDIO_ENCODING_OGG,
    Container.OGG_OPUS: pb.AUDIO_ENCODING_OGG,
}

# The libsndfile formats the server accepts for each file type (WAVEX: WAVE_FORMAT_EXTENSIBLE).
_CONTAINERS = {
    pb.AUDIO_ENCODING_WAV: ("WAV", frozenset({"WAV", "WAVEX"})),
    pb.AUDIO_ENCODING_FLAC: ("FLAC", frozenset({"FLAC"})),
    pb.AUDIO_ENCODING_MP3: ("MP3", frozenset({"MP3"})),
    pb.AUDIO_ENCODING_OGG: ("Ogg", frozenset({"OGG"})),
}

# What libsndfile reports as the length of a file whose header does not state it.
_UNKNOWN_LENGTH = 2**63 - 1


class AudioFileError(ValueError):
    """A local audio file cannot be sent as given."""


@dataclass(frozen=True)
class AudioFile:
    path: Path
    encoding: pb.AudioEncoding.ValueType
    sample_rate_hz: int

    @classmethod
    def from_path(cls, path: Path, sample_rate_hz: int = 0) -> AudioFile:
        """Format from the file's content: WAV, FLAC, MP3 and Ogg (Vorbis, Opus) are known by
        their first bytes and carry their rate, whatever the file is named. Raw audio has no
        header, so only its name tells it: .ulaw/.alaw are 8 kHz G.711; .pcm/.raw are 16-bit
        little-endian PCM and need the rate given."""
        if not path.is_file():
            raise AudioFileError(f"{path}: no such file")
        try:
            with path.open("rb") as stream:
                head = stream.read(SNIFF_BYTES)
        except OSError as error:
            raise AudioFileError(f"{path}: cannot be read ({error.strerror})") from None
        found = sniff(head)
        raw = _RAW_BY_SUFFIX.get(path.suffix.lower())
        # Raw PCM may begin with what looks like an MPEG frame sync; only a signature that
        # cannot occur by chance (RIFF, fLaC, OggS, ID3) overrides a raw file's name.
        weak = found.container is Container.MP3 and not head.startswith(b"ID3")
        if found.container is not None and not (raw is not None and weak):
            return cls(path, _BY_CONTAINER[found.container], 0)
        if raw is None:
            raise AudioFileError(
                f"{path}: {found.description}; send WAV, FLAC, MP3 or Ogg (Vorbis, Opus) files, "
                f"or raw audio named {', '.join(sorted(_RAW_BY_SUFFIX))}"
            )
        if raw in (pb.AUDIO_ENCODING_MULAW, pb.AUDIO_ENCODING_ALAW) and not sample_rate_hz:
            sample_rate_hz = 8000
        if raw == pb.AUDIO_ENCODING_PCM16LE and not sample_rate_hz:
            raise AudioFileError(f"{path}: raw PCM needs its sample rate (--rate)")
        return cls(path, raw, sample_rate_hz)

    def check(self, max_seconds: float) -> float:
        """What can be known of the file without the server: that it can be read, that
        libsndfile reads it as the type its first bytes say, and that it is no longer than
        `max_seconds` (the server's per-request limit). Its length in seconds; raises
        AudioFileError."""
        try:
            with self.path.open("rb") as stream:
                stream.read(1)
        except OSError as error:
            raise AudioFileError(f"{self.path}: cannot be read ({error.strerror})") from None
        container = _CONTAINERS.get(self.encoding)
        if container is None:
            # Raw PCM16 and G.711: the length follows from the size.
            bytes_per_second = (
                2 * self.sample_rate_hz if self.encoding == pb.AUDIO_ENCODING_PCM16LE else 8000
            )
            seconds = self.path.stat().st_size / bytes_per_second
        else:
            kind, formats = container
            try:
                info = sf.info(str(self.path))
            except (sf.LibsndfileError, RuntimeError):
                raise AudioFileError(f"{self.path}: not a readable {kind} file") from None
            if info.format not in formats:
                raise AudioFileError(f"{self.path}: starts as {kind} but holds {info.format} audio")
            # A header without a length (a FLAC written to a pipe): the server says so.
            seconds = 0.0 if info.frames == _UNKNOWN_LENGTH else info.frames / info.samplerate
        if seconds > max_seconds:
            raise AudioFileError(
                f"{self.path}: {seconds:.1f} s long; the server takes at most {max_seconds:g} s "
                "per utterance (VOXAUTH_MAX_AUDIO_SECONDS): cut it into shorter utterances"
            )
        return seconds

    def message(self) -> pb.Audio:
        return pb.Audio(
            encoding=self.encoding, sample_rate_hz=self.sample_rate_hz, data=self.path.read_bytes()
        )


# A lost answer (the server restarted, the network dropped) is retried this many times, after
# these pauses, with the same request id: the server answers a retry with the first call's
# result instead of acting twice.
_RETRY_PAUSES_SECONDS = (0.5, 1.0, 2.0)
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
T = TypeVar("T")


def _with_retries(call: Callable[[str], T], pauses: Sequence[float] = _RETRY_PAUSES_SECONDS) -> T:
    """Runs `call(request_id)`, again with the same id when its answer was lost."""
    request_id = uuid.uuid4().hex
    for pause in (*pauses, None):
        try:
            return call(request_id)
        except grpc.RpcError as error:
            if pause is None or error.code() not in _RETRYABLE:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable: the last attempt returns or raises")


class EnrollmentClient:
    def __init__(self, channel: grpc.Channel, timeout_seconds: float = 60.0) -> None:
        self._stub = pb_grpc.EnrollmentServiceStub(channel)
        self._timeout = timeout_seconds

    def create_agent(self, agent_id: str, display_name: str, consent_reference: str) -> pb.Agent:
        def create(request_id: str) -> pb.Agent:
            agent: pb.Agent = self._stub.CreateAgent(
                pb.CreateAgentRequest(
                    agent_id=agent_id,
                    display_name=display_name,
                    consent_reference=consent_reference,
                    request_id=request_id,
                ),
                timeout=self._timeout,
            )
            return agent

        return _with_retries(create)

    def add_utterance(self, agent_id: str, audio: AudioFile) -> pb.AddEnrollmentAudioResponse:
        """Streams the file in chunks, so long recordings need no large messages."""

        def add(request_id: str) -> pb.AddEnrollmentAudioResponse:
            response: pb.AddEnrollmentAudioResponse = self._stub.StreamEnrollmentAudio(
                _chunks(agent_id, audio, request_id), timeout=self._timeout
            )
            return response

        return _with_retries(add)

    def status(self, agent_id: str) -> pb.EnrollmentStatus:
        status: pb.EnrollmentStatus = self._stub.GetEnrollmentStatus(
            pb.GetEnrollmentStatusRequest(agent_id=agent_id), timeout=self._timeout
        )
        return status

    def finalize(self, agent_id: str) -> pb.FinalizeEnrollmentResponse:
        def finalize(request_id: str) -> pb.FinalizeEnrollmentResponse:
            response: pb.FinalizeEnrollmentResponse = self._stub.FinalizeEnrollment(
                pb.FinalizeEnrollmentRequest(agent_id=agent_id, request_id=request_id),
                timeout=self._timeout,
            )
            return response

        return _with_retries(finalize)

    def list_agents(
        self,
        *,
        states: Sequence[pb.EnrollmentState.ValueType] = (),
        older_than_days: float = 0.0,
        expires_within_days: float = 0.0,
        agent_id_prefix: str = "",
        page_size: int = 0,
    ) -> Iterator[pb.AgentSummary]:
        """Every agent that passes the filters, a page at a time (one call per page)."""
        token = ""
        while True:
            page: pb.ListAgentsResponse = self._stub.ListAgents(
                pb.ListAgentsRequest(
                    page_size=page_size,
                    page_token=token,
                    states=states,
                    voiceprint_older_than_days=older_than_days,
                    voiceprint_expires_within_days=expires_within_days,
                    agent_id_prefix=agent_id_prefix,
                ),
                timeout=self._timeout,
            )
            yield from page.agents
            if not page.next_page_token:
                return
            token = page.next_page_token

    def review(self, agent_id: str, *, approve: bool, reason: str) -> pb.ReviewVoiceprintResponse:
        def review(request_id: str) -> pb.ReviewVoiceprintResponse:
            response: pb.ReviewVoiceprintResponse = self._stub.ReviewVoiceprint(
                pb.ReviewVoiceprintRequest(
                    agent_id=agent_id, approve=approve, reason=reason, request_id=request_id
                ),
                timeout=self._timeout,
            )
            return response

        return _with_retries(review)

    def delete(self, agent_id: str) -> None:
        def delete(request_id: str) -> None:
            self._stub.DeleteAgent(
                pb.DeleteAgentRequest(agent_id=agent_id, request_id=request_id),
                timeout=self._timeout,
            )

        _with_retries(delete)


def _chunks(agent_id: str, audio: AudioFile, request_id: str) -> Iterator[pb.EnrollmentAudioChunk]:
    with audio.path.open("rb") as stream:
        yield pb.EnrollmentAudioChunk(
            agent_id=agent_id,
            request_id=request_id,
            encoding=audio.encoding,
            sample_rate_hz=audio.sample_rate_hz,
            data=stream.read(STREAM_CHUNK_BYTES),
        )
        while data := stream.read(STREAM_CHUNK_BYTES):
            yield pb.EnrollmentAudioChunk(data=data)
