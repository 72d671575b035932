"""The path every piece of audio takes before a decision: decode, find the speech, measure its
quality, embed it. Enrollment and verification both go through `VoiceAnalyser.analyse`, so
they see exactly the same speech the same way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from dataclasses import dataclass

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from models.errors import UnusableWaveformError
from server.config import AudioLimits
from server.errors import InvalidAudioError
from server.pipeline.channel import Channel, channel_of
from server.pipeline.decode import (
    TARGET_RATE,
    AudioEncoding,
    AudioStream,
    decode_audio,
    telephone_channel,
)
from server.pipeline.presentation import PresentationAssessment, PresentationAttackDetector
from server.pipeline.speech import (
    QualityIssue,
    QualityThresholds,
    SpeechAnalysis,
    SpeechDetector,
    analyse,
)
from server.runtime.telemetry import NO_TELEMETRY, Model, Telemetry


@dataclass(frozen=True)
class AudioInput:
    """Encoded audio as a client sent it, with its declared format."""

    data: bytes
    encoding: AudioEncoding
    sample_rate_hz: int


ReceivedAudio = AudioInput | AudioStream
"""Audio as a request brought it: whole, or streamed and partly decoded already."""


@dataclass(frozen=True)
class VoiceSample:
    quality: SpeechAnalysis
    embedding: Embedding | None
    """None when there was too little speech to embed: such a sample decides nothing."""
    channel: Channel = Channel.WIDEBAND
    """The band the speech came in: telephone checks are scored against the companion."""
    presentation: PresentationAssessment | None = None
    """The presentation-attack check of the audio; None when the server runs no PAD."""


class VoiceAnalyser:
    def __init__(
        self,
        embedder: SpeakerEmbedder,
        detector: SpeechDetector,
        thresholds: QualityThresholds,
        limits: AudioLimits,
        presentation: PresentationAttackDetector | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self.embedder = embedder
        self.presentation = presentation
        self._telemetry = telemetry
        self._detector = detector
        self._thresholds = thresholds
        self._limits = limits

    def analyse(
        self,
        audio: ReceivedAudio,
        *,
        min_net_speech_seconds: float,
        min_telephone_net_speech_seconds: float | None = None,
    ) -> VoiceSample:
        """Blocking (decoding, VAD and the model): call from a worker thread. Speech that
        comes over the telephone channel needs `min_telephone_net_speech_seconds` (None: as
        much as any other) to be embedded; with less, the sample reads TOO_LITTLE_SPEECH and
        decides nothing."""
        decoded = (
            audio.finish()
            if isinstance(audio, AudioStream)
            else decode_audio(
                audio.data,
                audio.encoding,
                audio.sample_rate_hz,
                max_seconds=self._limits.max_seconds,
            )
        )
        return self.analyse_waveform(
            decoded.waveform,
            min_net_speech_seconds=min_net_speech_seconds,
            min_telephone_net_speech_seconds=min_telephone_net_speech_seconds,
            source_rate_hz=decoded.source_rate_hz,
        )

    def analyse_waveform(
        self,
        waveform: Waveform,
        *,
        min_net_speech_seconds: float,
        min_telephone_net_speech_seconds: float | None = None,
        source_rate_hz: int = TARGET_RATE,
    ) -> VoiceSample:
        """The same as `analyse` for audio already decoded to 16 kHz mono; `source_rate_hz`
        is the rate it came at (the speech's bandwidth tells telephone audio in any case)."""
        return self._sample(
            waveform,
            self._detector,
            _Minimums(min_net_speech_seconds, min_telephone_net_speech_seconds),
            source_rate_hz,
        )

    def analyse_speech(
        self, speech: Waveform, *, source_rate_hz: int, stretch: Waveform | None = None
    ) -> VoiceSample:
        """For speech the detector has already cut out (a shift's checkpoint): measured and
        embedded as it is, without detecting speech in it a second time. `stretch` is the
        audio as it arrived that holds the speech, pauses included: what the countermeasure
        judges (it was calibrated on such audio); without it, the speech itself."""
        return self._sample(
            speech,
            _ALL_SPEECH,
            _Minimums(0.0, None),
            source_rate_hz,
            as_arrived=speech if stretch is None else stretch,
        )

    def _sample(
        self,
        waveform: Waveform,
        detector: SpeechDetector,
        minimums: _Minimums,
        source_rate_hz: int,
        *,
        as_arrived: Waveform | None = None,
    ) -> VoiceSample:
        # The countermeasure runs on its own thread meanwhile: a check costs the longer of
        # the two models, not their sum.
        pending = (
            None
            if self.presentation is None
            else self.presentation.submit(waveform if as_arrived is None else as_arrived)
        )
        try:
            sample = self._speaker_sample(waveform, detector, minimums, source_rate_hz)
        except BaseException:
            if pending is not None:
                concurrent.futures.wait([pending])
            raise
        if self.presentation is None or pending is None:
            return sample
        try:
            evidence = pending.result()
        except UnusableWaveformError as error:
            raise InvalidAudioError(error.message, field="audio") from error
        return dataclasses.replace(
            sample, presentation=self.presentation.assess(evidence, sample.channel)
        )

    def _speaker_sample(
        self,
        waveform: Waveform,
        detector: SpeechDetector,
        minimums: _Minimums,
        source_rate_hz: int,
    ) -> VoiceSample:
        quality = analyse(
            waveform,
            detector,
            self._thresholds,
            min_net_speech_seconds=minimums.general,
        )
        too_short = len(quality.speech) < self.embedder.min_samples
        # The channel is known only once the speech is found (16 kHz audio may carry a call).
        channel = channel_of(source_rate_hz, quality.speech)
        needed = minimums.of(channel)
        if (
            quality.net_speech_seconds < needed
            and QualityIssue.TOO_LITTLE_SPEECH not in quality.issues
        ):
            quality = dataclasses.replace(
                quality, issues=(QualityIssue.TOO_LITTLE_SPEECH, *quality.issues)
            )
        if too_short or quality.net_speech_seconds < needed:
            return VoiceSample(quality=quality, embedding=None, channel=channel)
        # Only the detected speech is embedded: pauses carry no voice and dilute the embedding.
        return VoiceSample(quality=quality, embedding=self._embed(quality.speech), channel=channel)

    def telephone_embedding(self, speech: Waveform) -> Embedding:
        """The embedding of `speech` as it would sound over a G.711 call: what a companion
        voiceprint is made of, from the enrollment speech itself (audio is never stored)."""
        return self._embed(telephone_channel(speech))

    def _embed(self, speech: Waveform) -> Embedding:
        # models/ raises its own errors; to the caller, a waveform it cannot take is bad audio.
        started = time.monotonic()
        try:
            embedding = self.embedder.embed(speech)
        except UnusableWaveformError as error:
            raise InvalidAudioError(error.message, field="audio") from error
        self._telemetry.model_ran(Model.SPEAKER, time.monotonic() - started)
        return embedding

    @property
    def model_id(self) -> str:
        return self.embedder.model_id


@dataclass(frozen=True)
class _Minimums:
    """The net speech a sample needs to be embedded: `general`, and on the telephone channel
    `telephone` (None: as much as `general`)."""

    general: float
    telephone: float | None

    def of(self, channel: Channel) -> float:
        if channel is Channel.TELEPHONE and self.telephone is not None:
            return self.telephone
        return self.general


class _AllSpeech:
    """A SpeechDetector for audio that is speech from end to end."""

    def segments(self, waveform: Waveform) -> list[tuple[int, int]]:
        return [(0, len(waveform))] if len(waveform) else []


_ALL_SPEECH = _AllSpeech()
