"""Speech detection and the quality figures reported for every piece of audio. The detector
itself (Silero VAD, in torch) is in server/pipeline/silero.py, so this module stays light."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.embedder import Waveform
from server.pipeline.decode import waveform_seconds

Segment = tuple[int, int]
"""A sample range [start, end) of a 16 kHz waveform."""

# The level reported for digital silence, instead of -inf.
_FLOOR_DBFS = -120.0


class QualityIssue(enum.Enum):
    """A problem found in a piece of audio. Values are the API's enum numbers."""

    TOO_LITTLE_SPEECH = 1
    TOO_QUIET = 2
    CLIPPED = 3


class SpeechDetector(Protocol):
    def segments(self, waveform: Waveform) -> list[Segment]:
        """The speech in a 16 kHz waveform, in order, not overlapping. Thread-safe."""


@dataclass(frozen=True)
class QualityThresholds:
    min_speech_level_dbfs: float = -40.0
    max_clipped_fraction: float = 0.001
    # G.711 cannot represent full scale: saturated mu-law decodes to 32124/32768 (0.980) and
    # A-law to 32256/32768 (0.984), and resampling to 16 kHz adds about 1% ripple around such
    # plateaus. 0.97 still counts them, while unclipped speech seldom peaks this high.
    clip_level: float = 0.97


# eq=False: the generated __eq__ would compare the waveforms, which numpy refuses to do.
@dataclass(frozen=True, eq=False)
class SpeechAnalysis:
    """What was measured about a waveform.

    Level and clipping are measured over the detected speech, the part that gets embedded;
    when no speech is detected, over the whole waveform, so a muted microphone still reads
    as too quiet.
    """

    duration_seconds: float
    net_speech_seconds: float
    speech_level_dbfs: float
    """RMS level; -120 for digital silence."""
    clipped_fraction: float
    issues: tuple[QualityIssue, ...]
    speech: Waveform
    """The speech segments, concatenated."""


def analyse(
    waveform: Waveform,
    detector: SpeechDetector,
    thresholds: QualityThresholds,
    *,
    min_net_speech_seconds: float,
) -> SpeechAnalysis:
    """Detects the speech in a 16 kHz waveform and checks its quality."""
    segments = detector.segments(waveform)
    speech = (
        np.concatenate([waveform[start:end] for start, end in segments])
        if segments
        else np.zeros(0, dtype=np.float32)
    )
    measured = speech if len(speech) else waveform
    level = _rms_dbfs(measured)
    clipped = float(np.mean(np.abs(measured) >= thresholds.clip_level)) if len(measured) else 0.0
    net_speech = waveform_seconds(speech)

    issues = []
    if net_speech < min_net_speech_seconds:
        issues.append(QualityIssue.TOO_LITTLE_SPEECH)
    if level < thresholds.min_speech_level_dbfs:
        issues.append(QualityIssue.TOO_QUIET)
    if clipped > thresholds.max_clipped_fraction:
        issues.append(QualityIssue.CLIPPED)
    return SpeechAnalysis(
        duration_seconds=waveform_seconds(waveform),
        net_speech_seconds=net_speech,
        speech_level_dbfs=level,
        clipped_fraction=clipped,
        issues=tuple(issues),
        speech=speech,
    )


def _rms_dbfs(samples: Waveform) -> float:
    mean_square = float(np.mean(np.square(samples, dtype=np.float64))) if len(samples) else 0.0
    return 10 * math.log10(max(mean_square, 10 ** (_FLOOR_DBFS / 10)))
