"""The channel a voice came over: wideband (softphone, 16 kHz and up) or telephone band
(8 kHz G.711 from desk phones and the telephone network). The speaker model sees the two
differently, so each has its own voiceprint, cohort and calibration (see README, "Accuracy").
"""

from __future__ import annotations

import enum

import numpy as np

from models.embedder import Waveform
from server.pipeline.decode import G711_RATE, TARGET_RATE


class Channel(enum.Enum):
    WIDEBAND = "wideband"
    TELEPHONE = "telephone"


# Telephone speech upsampled to 16 kHz keeps nothing above 4 kHz (the resampler's stop band is
# > 100 dB down), while wideband speech keeps 1-10% of its energy there; 1e-4 (-40 dB) sits
# far from both.
_TELEPHONE_HIGH_BAND_FRACTION = 1e-4
_BAND_EDGE_HZ = 3900.0


def high_band_fraction(speech: Waveform) -> float:
    """Share of the speech's energy above the telephone band edge."""
    if len(speech) == 0:
        return 0.0
    power = np.abs(np.fft.rfft(speech.astype(np.float64))) ** 2
    frequencies = np.fft.rfftfreq(len(speech), d=1.0 / TARGET_RATE)
    total = float(power.sum())
    return float(power[frequencies > _BAND_EDGE_HZ].sum()) / total if total > 0 else 0.0


def channel_of(source_rate_hz: int, speech: Waveform) -> Channel:
    """Telephone when the audio came at 8 kHz, or when it came at a higher rate but carries no
    energy above the telephone band (a call recorded or relayed at 16 kHz)."""
    if source_rate_hz <= G711_RATE:
        return Channel.TELEPHONE
    if len(speech) and high_band_fraction(speech) < _TELEPHONE_HIGH_BAND_FRACTION:
        return Channel.TELEPHONE
    return Channel.WIDEBAND
