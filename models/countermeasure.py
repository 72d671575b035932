"""The interface every presentation-attack countermeasure sits behind, and how a check longer
than the network's window is covered by windows (numpy only: no model is loaded here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from models.embedder import Waveform

WindowBatch = npt.NDArray[np.float32]
"""Windows of audio, (windows, samples), float32 in [-1, 1]."""


@dataclass(frozen=True)
class CountermeasureEvidence:
    """What one pass of the countermeasure over a check yields."""

    raw_score: float
    """The network's own bona-fide score, uncalibrated (`Countermeasure.score`)."""
    features: npt.NDArray[np.float64]
    """The input of a back-end fitted on the network's outputs (models/pad_backend.py)."""


class Countermeasure(Protocol):
    """Scores how likely audio is a live, genuine voice rather than a presentation attack
    (synthetic, converted or replayed speech)."""

    @property
    def model_id(self) -> str:
        """Identifies the model and its exact weights."""

    @property
    def sample_rate(self) -> int:
        """The rate `score` expects (16 kHz)."""

    @property
    def min_samples(self) -> int:
        """Shortest input `score` accepts; shorter input raises UnusableWaveformError."""

    def score(self, waveform: Waveform) -> float:
        """Bona-fide score of the whole waveform, uncalibrated: higher is more likely genuine.
        Thread-safe; called from worker threads."""

    def evidence(self, waveform: Waveform) -> CountermeasureEvidence:
        """The raw score and the back-end's input, from one pass. Thread-safe."""

    def channel_score(self, evidence: CountermeasureEvidence, channel: str) -> float:
        """The score the channel's threshold applies to ("wideband" or "telephone"): the
        back-end's log-odds where the countermeasure has one, else the raw score."""


def window_starts(samples: int, window: int) -> list[int]:
    """Starts of the fewest windows of `window` samples that cover `samples`, spread evenly
    from the first sample to the last (consecutive windows overlap by less than a window).
    Audio shorter than one window gets one window at 0 (the caller fills it)."""
    if samples <= window:
        return [0]
    count = math.ceil(samples / window)
    last = samples - window
    return [round(index * last / (count - 1)) for index in range(count)]


def windows_of(waveform: Waveform, window: int) -> WindowBatch:
    """The windows of `window_starts`, stacked; audio shorter than one window is repeated
    end to end until it fills it, as the network's authors evaluate short utterances."""
    if len(waveform) < window:
        repeats = math.ceil(window / len(waveform))
        filled: WindowBatch = np.tile(waveform, repeats)[:window][None, :]
        return np.ascontiguousarray(filled, dtype=np.float32)
    batch = np.stack(
        [waveform[start : start + window] for start in window_starts(len(waveform), window)]
    )
    return np.ascontiguousarray(batch, dtype=np.float32)


# --- long pauses --------------------------------------------------------------------------

PAUSE_FRAME = 320
"""20 ms at 16 kHz: the frames whose energy tells a pause."""
LONGEST_PAUSE_SECONDS = 1.0
"""A pause longer than this is shortened to it (its first and last half second kept)."""
# A pause: a frame within this share of the way from the audio's quietest frames (its 5th
# percentile, in dB) to its loudest (95th): recordings differ in both, and a line's hum or
# hiss raises the floor. Below this spread there is no telling pause from speech.
_PAUSE_SHARE = 0.3
_MIN_SPREAD_DB = 10.0
_JOIN = 80
"""5 ms crossfade where a pause's two kept halves meet (no click for the network to read)."""


def judged_id(weights_id: str) -> str:
    """The id of a network's check scores (`Countermeasure.evidence`): its weights' id and
    what is done to the audio before it judges (`judged_audio`), so that a back-end or
    calibration made on audio judged another way is refused."""
    return f"{weights_id}+pauses@{LONGEST_PAUSE_SECONDS:g}s+pcm16"


def on_pcm16_grid(waveform: Waveform) -> Waveform:
    """`waveform` rounded to the nearest 16-bit sample value: unchanged when it came as 16-bit
    PCM (a WAV or FLAC file, or the corpus's items), and given the 16-bit rounding noise those
    carry when it did not (G.711 or Opus decoded and resampled in floating point).

    Why: the back-end's spectral statistics read the check's quietest frames and its highest
    bands, and there a decoded telephone call holds next to nothing (the resampler's stop band,
    some 150 dB down) where every corpus item holds 16-bit rounding noise (about 100 dB down).
    A genuine recording sent as G.711 u-law scored -36.6 against a threshold of -2.36 before
    this, and -1.4 on the 16-bit grid (tests/e2e/test_duplicate_enrollment.py sends it)."""
    grid = np.clip(np.round(waveform.astype(np.float64) * 32768.0), -32768, 32767) / 32768.0
    result: Waveform = grid.astype(np.float32)
    return result


def judged_audio(waveform: Waveform) -> Waveform:
    """What the countermeasure judges of a check: the audio on the 16-bit grid
    (`on_pcm16_grid`), with its long pauses shortened (`shortened_pauses`)."""
    return shortened_pauses(on_pcm16_grid(waveform))


def pause_runs(waveform: Waveform) -> list[tuple[int, int]]:
    """Sample spans (start, end) of the waveform's runs of pause frames, in order."""
    frames = len(waveform) // PAUSE_FRAME
    if frames < 3:
        return []
    framed = waveform[: frames * PAUSE_FRAME].astype(np.float64).reshape(frames, PAUSE_FRAME)
    level = 10 * np.log10(np.mean(framed**2, axis=1) + 1e-12)
    floor, loud = np.percentile(level, [5, 95])
    if loud - floor < _MIN_SPREAD_DB:
        return []
    quiet = level < floor + _PAUSE_SHARE * (loud - floor)
    runs: list[tuple[int, int]] = []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    for start, end in zip(edges[0::2], edges[1::2], strict=True):
        runs.append((int(start) * PAUSE_FRAME, int(end) * PAUSE_FRAME))
    if runs and runs[-1][1] == frames * PAUSE_FRAME:
        # The tail shorter than a frame belongs to a pause that reaches the end.
        runs[-1] = (runs[-1][0], len(waveform))
    return runs


def shortened_pauses(waveform: Waveform, longest: float = LONGEST_PAUSE_SECONDS) -> Waveform:
    """The waveform with every pause longer than `longest` seconds cut to `longest`: the
    first and last half of that kept, joined by a short crossfade. The speech is untouched.

    Why: AASIST, trained on ASVspoof 2019 LA, learnt that long near-silence marks synthetic
    speech (its spoofed utterances carry more of it), so a genuine check with long pauses
    scores spoof-like. The back-end and the thresholds were fitted on read speech whose pauses
    stay under a second; a shift checkpoint's stretch of a call holds the customer's turns as
    pauses of several seconds. Cut to the corpus's form, it is judged as the calibration
    measured (server/tools/ATTACKS.md, "Long pauses")."""
    keep = int(longest * 16_000)
    long_runs = [(start, end) for start, end in pause_runs(waveform) if end - start > keep]
    if not long_runs:
        return waveform
    half = keep // 2
    pieces: list[Waveform] = []
    cursor = 0
    for start, end in long_runs:
        head = waveform[cursor : start + half]
        tail = waveform[end - half : end]
        join = min(_JOIN, half)
        fade = np.linspace(0.0, 1.0, join, dtype=np.float32)
        mixed = head[len(head) - join :] * (1 - fade) + tail[:join] * fade
        pieces += [head[: len(head) - join], mixed.astype(waveform.dtype)]
        cursor = end - half + join
    pieces.append(waveform[cursor:])
    return np.concatenate(pieces)
