"""The presentation-attack back-end: linear classifiers over AASIST's readout and the check's
long-term spectral statistics, fitted on the project's own attack corpus.

Why a back-end: the raw AASIST checkpoint was trained on ASVspoof 2019 LA, whose attacks are
neural and older statistical synthesis systems at 16 kHz; on this service's audio it separates
replay through a loudspeaker and vocoder resynthesis only roughly (server/tools/ATTACKS.md: EER
about 20%). The readout the network's output layer reads (160 values per window) carries more
than its one logit, and the band-limiting, room and noise of a replay or the flattened harmonics
of a vocoder show in the spectrum's long-term statistics, which cost a few milliseconds. A linear
model on both, fitted per channel on the fit split of `voxauth attacks build` (none of the
speakers the thresholds or the published figures come from), one per kind of attack, turns
them into one score: the lowest log-odds that the check is bona fide.

numpy only, like the rest of models/: the features, the model file and the score. The fitting
is `voxauth attacks fit-backend` (server/tools/pad_backend_fit.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.embedder import Waveform
from models.errors import ModelFilesError

BACKEND_FORMAT = "voxauth-pad-backend/1"
CHANNELS = frozenset({"wideband", "telephone"})
Features = npt.NDArray[np.float64]

_SAMPLE_RATE = 16_000
_FRAME = 512  # 32 ms: fine enough in frequency (31 Hz) to see a loudspeaker's roll-off
_HOP = 160  # 10 ms
_BANDS = 30  # linear bands over 0-8 kHz: LFCC, whose high bands show vocoder artefacts
_CEPSTRA = 20
_SPEECH_RANGE_DB = 30.0
"""Frames within this much of the loud end of the check count as its speech (no VAD needed:
the statistics only need the frames that carry the voice)."""
_QUIET_SHARE = 0.1
"""The quietest tenth of the frames: the background, whose shape tells a room, a microphone's
noise or digital silence apart."""
_EPSILON = 1e-10
_MAX_SECONDS = 20.0
"""The statistics are taken over at most the first 20 s: they are stable long before (the corpus
and a checkpoint are 8 s), and a minute of audio would hold some 100 MB of spectra per call
while the countermeasure's windows still cover all of it."""


def _filter_bank() -> npt.NDArray[np.float64]:
    bins = _FRAME // 2 + 1
    edges = np.linspace(0, bins - 1, _BANDS + 2)
    bank = np.zeros((_BANDS, bins))
    positions = np.arange(bins)
    for band in range(_BANDS):
        low, centre, high = edges[band], edges[band + 1], edges[band + 2]
        rising = (positions - low) / (centre - low)
        falling = (high - positions) / (high - centre)
        bank[band] = np.clip(np.minimum(rising, falling), 0.0, None)
    return bank


def _dct_matrix() -> npt.NDArray[np.float64]:
    n = np.arange(_BANDS)
    k = np.arange(_CEPSTRA)[:, None]
    return np.asarray(np.cos(np.pi * k * (2 * n + 1) / (2 * _BANDS)) * np.sqrt(2.0 / _BANDS))


_BANK = _filter_bank()
_DCT = _dct_matrix()
_BAND_EDGES = np.linspace(0, _FRAME // 2, _BANDS + 1).astype(int)
SPECTRAL_DIM = 3 * _CEPSTRA + 5 * _BANDS


def _per_band(values: npt.NDArray[np.float64], *, total: bool = False) -> npt.NDArray[np.float64]:
    """Each band's bins of `values` (frames x bins), averaged (or summed) per frame."""
    reduce = np.sum if total else np.mean
    columns = [
        reduce(values[:, low : high + 1], axis=1) for low, high in itertools.pairwise(_BAND_EDGES)
    ]
    return np.stack(columns, axis=1)


def spectral_features(waveform: Waveform) -> Features:
    """Long-term statistics of the check's spectrum, SPECTRAL_DIM values, none of which moves
    with the level but the first:

    - over the speech frames, the mean and spread of the linear-frequency cepstrum and the
      mean size of its frame-to-frame change (the voice's envelope and its movement);
    - the speech frames' and the quietest frames' average log spectrum, each relative to its
      own mean over the bands (a loudspeaker's band limits; a room's, a microphone's noise or
      digital silence in the background);
    - per band, over the speech frames: the flatness of the bins within the band (harmonics
      against noise: vocoders rebuild the fine structure from a model of it), the spread of
      the band's energy over time (its modulation), and the mean phase step between adjacent
      bins (a group-delay measure: resynthesis replaces the phase)."""
    samples = np.asarray(waveform[: int(_MAX_SECONDS * _SAMPLE_RATE)], dtype=np.float64)
    if len(samples) < _FRAME:
        samples = np.pad(samples, (0, _FRAME - len(samples)))
    count = 1 + (len(samples) - _FRAME) // _HOP
    frames = np.lib.stride_tricks.as_strided(
        samples, (count, _FRAME), (samples.strides[0] * _HOP, samples.strides[0])
    )
    spectrum = np.fft.rfft(frames * np.hanning(_FRAME), axis=1)
    power = np.abs(spectrum) ** 2
    bands = np.log10(power @ _BANK.T + _EPSILON) * 10.0  # dB per band
    energy = 10.0 * np.log10(power.sum(axis=1) + _EPSILON)
    loud = energy >= np.percentile(energy, 95) - _SPEECH_RANGE_DB
    quiet = energy <= np.percentile(energy, 100 * _QUIET_SHARE)
    cepstra = bands @ _DCT.T / 10.0
    speech = cepstra[loud]
    change = np.abs(np.diff(speech, axis=0)).mean(axis=0) if len(speech) > 1 else np.zeros(_CEPSTRA)
    speech_spectrum = bands[loud].mean(axis=0)
    quiet_spectrum = bands[quiet].mean(axis=0)
    loud_power = power[loud] + _EPSILON
    log_power = np.log(loud_power)
    # log(geometric mean / arithmetic mean) of the band's bins: 0 for flat noise, below for
    # harmonics.
    flatness = (_per_band(log_power) - np.log(_per_band(loud_power))).mean(axis=0)
    modulation = np.log(_per_band(loud_power, total=True)).std(axis=0)
    phase_step = np.abs(np.angle(np.exp(1j * np.diff(np.angle(spectrum[loud]), axis=1))))
    phase_step = np.concatenate([phase_step, phase_step[:, -1:]], axis=1)
    group_delay = _per_band(phase_step).mean(axis=0)
    return np.concatenate(
        [
            speech.mean(axis=0),
            speech.std(axis=0),
            change,
            (speech_spectrum - speech_spectrum.mean()) / 10.0,
            (quiet_spectrum - quiet_spectrum.mean()) / 10.0,
            flatness,
            modulation,
            group_delay,
        ]
    )


def check_features(readouts: npt.NDArray[np.float32], waveform: Waveform) -> Features:
    """The back-end's input: the mean of the windows' AASIST readouts, then the spectral
    statistics of the whole check."""
    return np.concatenate([readouts.astype(np.float64).mean(axis=0), spectral_features(waveform)])


@dataclass(frozen=True)
class LinearModel:
    """log-odds(bona fide) = weights . (features - mean) / scale + bias."""

    mean: Features
    scale: Features
    weights: Features
    bias: float

    def score(self, features: Features) -> float:
        return float(self.weights @ ((features - self.mean) / self.scale) + self.bias)

    def as_json(self) -> dict[str, Any]:
        return {
            "mean": [round(float(v), 6) for v in self.mean],
            "scale": [round(float(v), 6) for v in self.scale],
            "weights": [round(float(v), 6) for v in self.weights],
            "bias": round(self.bias, 6),
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], dim: int) -> LinearModel:
        arrays = [np.asarray(entry[key], dtype=np.float64) for key in ("mean", "scale", "weights")]
        if any(a.shape != (dim,) for a in arrays) or not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"expected {dim} finite values per vector")
        if (arrays[1] <= 0).any():
            raise ValueError("scale must be positive")
        return cls(arrays[0], arrays[1], arrays[2], float(entry["bias"]))


@dataclass(frozen=True)
class PadBackEnd:
    """Per channel ("wideband", "telephone", or one of them: the other then keeps the network's
    raw score), one linear model per kind of attack, each
    fitted to tell bona fide from that kind; a check's score is the lowest of them. One line
    cannot fence genuine speech off from replays, vocoders and synthesis at once (their
    differences lie in different features); the lowest of one line per kind can, and a new
    kind of attack has to pass every line."""

    countermeasure_id: str
    models: Mapping[str, Mapping[str, LinearModel]]
    """channel -> attack kind -> model."""
    digest: str
    """SHA-256 of the file, so that a calibration names exactly the back-end it was made for."""

    @property
    def model_id(self) -> str:
        return backend_model_id(self.countermeasure_id, self.digest)

    def scores(self, channel: str, features: Features) -> dict[str, float]:
        """Each attack kind's log-odds of bona fide against it."""
        return {kind: model.score(features) for kind, model in self.models[channel].items()}

    def score(self, channel: str, features: Features, raw_score: float) -> float:
        """The lowest of the kinds' scores; `raw_score` (the network's own) on a channel this
        back-end has no models for."""
        if channel not in self.models:
            return raw_score
        return min(self.scores(channel, features).values())

    @classmethod
    def load(cls, path: Path, countermeasure_id: str, dim: int) -> PadBackEnd:
        """Raises ModelFilesError when the file is missing, malformed, or fitted on another
        countermeasure's readout."""
        try:
            raw = path.read_bytes()
            document: dict[str, Any] = json.loads(raw)
        except (OSError, ValueError) as error:
            raise ModelFilesError(
                f"cannot read the PAD back-end {path}: {error} (make it with `voxauth attacks "
                f"fit-backend`)"
            ) from error
        if document.get("format") != BACKEND_FORMAT:
            raise ModelFilesError(f"{path} is not a PAD back-end ({BACKEND_FORMAT})")
        if document.get("countermeasure_id") != countermeasure_id:
            raise ModelFilesError(
                f"the PAD back-end {path} was fitted on {document.get('countermeasure_id')}, "
                f"not {countermeasure_id}"
            )
        try:
            models = {
                channel: {kind: LinearModel.from_json(model, dim) for kind, model in entry.items()}
                for channel, entry in document["channels"].items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ModelFilesError(f"{path}: malformed back-end ({error})") from error
        if not models or not set(models) <= CHANNELS or not all(models.values()):
            raise ModelFilesError(
                f"{path}: needs models for wideband, telephone or both, and nothing else"
            )
        return cls(countermeasure_id, models, hashlib.sha256(raw).hexdigest())


def backend_model_id(countermeasure_id: str, digest: str) -> str:
    """The id of the countermeasure's scores through the back-end whose file has `digest`."""
    return f"{countermeasure_id}+pad-backend@{digest[:12]}"


def default_backend_path() -> Path:
    return Path(__file__).resolve().parent / "scoring" / "pad_backend.json"
