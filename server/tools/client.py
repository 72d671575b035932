"""Client side of the HR enrollment workflow: enroll, re-enroll, inspect and erase an agent
on a running voxauth server. Used by `voxauth enroll|status|delete` and importable by HR tools.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

# Chunk size for streamed utterances: well under gRPC's default 4 MiB message limit.
STREAM_CHUNK_BYTES = 256 * 1024

_BY_SUFFIX = {
    ".wav": pb.AUDIO_ENCODING_WAV,
    ".flac": pb.AUDIO_ENCODING_FLAC,
    ".pcm": pb.AUDIO_ENCODING_PCM16LE,
    ".raw": pb.AUDIO_ENCODING_PCM16LE,
    ".ulaw": pb.AUDIO_ENCODING_MULAW,
    ".mulaw": pb.AUDIO_ENCODING_MULAW,
    ".pcmu": pb.AUDIO_ENCODING_MULAW,
    ".alaw": pb.AUDIO_ENCODING_ALAW,
    ".pcma": pb.AUDIO_ENCODING_ALAW,
}


class AudioFileError(ValueError):
    """A local audio file cannot be sent as given."""


@dataclass(frozen=True)
class AudioFile:
    path: Path
    encoding: pb.AudioEncoding.ValueType
    sample_rate_hz: int

    @classmethod
    def from_path(cls, path: Path, sample_rate_hz: int = 0) -> AudioFile:
        """Format from the file name: .wav .flac carry their rate; .ulaw/.alaw are 8 kHz G.711;
        .pcm/.raw are 16-bit little-endian PCM and need the rate given."""
        encoding = _BY_SUFFIX.get(path.suffix.lower())
        if encoding is None:
            raise AudioFileError(
                f"{path}: unknown audio type {path.suffix!r}; use one of {sorted(_BY_SUFFIX)}"
            )
        if not path.is_file():
            raise AudioFileError(f"{path}: no such file")
        if encoding in (pb.AUDIO_ENCODING_MULAW, pb.AUDIO_ENCODING_ALAW) and not sample_rate_hz:
            sample_rate_hz = 8000
        if encoding == pb.AUDIO_ENCODING_PCM16LE and not sample_rate_hz:
            raise AudioFileError(f"{path}: raw PCM needs its sample rate (--rate)")
        return cls(path, encoding, sample_rate_hz)

    def message(self) -> pb.Audio:
        return pb.Audio(
            encoding=self.encoding, sample_rate_hz=self.sample_rate_hz, data=self.path.read_bytes()
        )


class EnrollmentClient:
    def __init__(self, channel: grpc.Channel, timeout_seconds: float = 60.0) -> None:
        self._stub = pb_grpc.EnrollmentServiceStub(channel)
        self._timeout = timeout_seconds

    def create_agent(self, agent_id: str, display_name: str, consent_reference: str) -> pb.Agent:
        agent: pb.Agent = self._stub.CreateAgent(
            pb.CreateAgentRequest(
                agent_id=agent_id,
                display_name=display_name,
                consent_reference=consent_reference,
            ),
            timeout=self._timeout,
        )
        return agent

    def add_utterance(self, agent_id: str, audio: AudioFile) -> pb.AddEnrollmentAudioResponse:
        """Streams the file in chunks, so long recordings need no large messages."""
        response: pb.AddEnrollmentAudioResponse = self._stub.StreamEnrollmentAudio(
            _chunks(agent_id, audio), timeout=self._timeout
        )
        return response

    def status(self, agent_id: str) -> pb.EnrollmentStatus:
        status: pb.EnrollmentStatus = self._stub.GetEnrollmentStatus(
            pb.GetEnrollmentStatusRequest(agent_id=agent_id), timeout=self._timeout
        )
        return status

    def finalize(self, agent_id: str) -> pb.FinalizeEnrollmentResponse:
        response: pb.FinalizeEnrollmentResponse = self._stub.FinalizeEnrollment(
            pb.FinalizeEnrollmentRequest(agent_id=agent_id), timeout=self._timeout
        )
        return response

    def delete(self, agent_id: str) -> None:
        self._stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=self._timeout)


def _chunks(agent_id: str, audio: AudioFile) -> Iterator[pb.EnrollmentAudioChunk]:
    with audio.path.open("rb") as stream:
        yield pb.EnrollmentAudioChunk(
            agent_id=agent_id,
            encoding=audio.encoding,
            sample_rate_hz=audio.sample_rate_hz,
            data=stream.read(STREAM_CHUNK_BYTES),
        )
        while data := stream.read(STREAM_CHUNK_BYTES):
            yield pb.EnrollmentAudioChunk(data=data)
