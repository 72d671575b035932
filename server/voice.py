"""The path every piece of audio takes before a decision: decode, find the speech, measure its
quality, embed it. Enrollment and verification both go through `VoiceAnalyser.analyse`, so
they see exactly the same speech the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from server.audio import AudioEncoding, decode
from server.config import AudioLimits
from server.speech import QualityThresholds, SpeechAnalysis, SpeechDetector, analyse


@dataclass(frozen=True)
class AudioInput:
    """Encoded audio as a client sent it, with its declared format."""

    data: bytes
    encoding: AudioEncoding
    sample_rate_hz: int


@dataclass(frozen=True)
class VoiceSample:
    quality: SpeechAnalysis
    embedding: Embedding | None
    """None when there was too little speech to embed: such a sample decides nothing."""


class VoiceAnalyser:
    def __init__(
        self,
        embedder: SpeakerEmbedder,
        detector: SpeechDetector,
        thresholds: QualityThresholds,
        limits: AudioLimits,
    ) -> None:
        self.embedder = embedder
        self._detector = detector
        self._thresholds = thresholds
        self._limits = limits

    def analyse(self, audio: AudioInput, *, min_net_speech_seconds: float) -> VoiceSample:
        """Blocking (decoding, VAD and the model): call from a worker thread."""
        waveform = decode(
            audio.data, audio.encoding, audio.sample_rate_hz, max_seconds=self._limits.max_seconds
        )
        return self.analyse_waveform(waveform, min_net_speech_seconds=min_net_speech_seconds)

    def analyse_waveform(self, waveform: Waveform, *, min_net_speech_seconds: float) -> VoiceSample:
        """The same as `analyse` for audio already decoded to 16 kHz mono."""
        quality = analyse(
            waveform,
            self._detector,
            self._thresholds,
            min_net_speech_seconds=min_net_speech_seconds,
        )
        too_short = len(quality.speech) < self.embedder.min_samples
        if too_short or quality.net_speech_seconds < min_net_speech_seconds:
            return VoiceSample(quality=quality, embedding=None)
        # Only the detected speech is embedded: pauses carry no voice and dilute the embedding.
        return VoiceSample(quality=quality, embedding=self.embedder.embed(quality.speech))

    @property
    def model_id(self) -> str:
        return self.embedder.model_id
