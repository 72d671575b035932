"""Measures how alike the service finds a recording and its near-copies, against two different
utterances of the same speaker: the figures behind enrollment's duplicate threshold
(enrollment/duplicates.py).

    PYTHONPATH=$PWD:$PWD/proto .venv/bin/python scripts/measure_duplicates.py \
        /work/shared/data/librispeech-train-clean-100

Each file is analysed as enrollment analyses an utterance (decode, Silero VAD, ECAPA on the
detected speech, and the telephone companion). For every file with two halves of at least 2 s
of net speech each, the first half stands for a pending utterance; compared with it are:
the same half again, its copies re-encoded (G.711 u-law WAV at 8 kHz, made by libsndfile,
not by the service), gain-changed (+6 dB, -6 dB), trimmed by 0.5 s at both edges, with white
noise at 30 dB SNR, and all of trim, G.711 and -6 dB at once; and the second half of the same
file (a different utterance of the same speaker, same session and microphone: the hardest
case for telling a copy from a new recording); and, for information, the whole file, which
contains the half. Prints, per comparison, the smallest, the percentiles and the largest
similarity as enrollment computes it (`similarity`), and how many reach the threshold. About
30 minutes for the 251 files on two cores; `--limit` takes fewer.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from enrollment.duplicates import DUPLICATE_SIMILARITY, Fingerprint, similarity
from models.factory import load_speaker_embedder
from models.fetch import default_model_dir
from server.config import AudioLimits, EnrollmentPolicy
from server.pipeline.analysis import AudioInput, VoiceAnalyser
from server.pipeline.decode import AudioEncoding
from server.pipeline.silero import SileroSpeechDetector
from server.pipeline.speech import QualityThresholds

Samples = np.ndarray

_TRIM_SECONDS = 0.5
_NOISE_SNR_DB = 30.0


def _wav(samples: Samples, rate: int = 16_000, subtype: str = "FLOAT") -> AudioInput:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return AudioInput(buffer.getvalue(), AudioEncoding.WAV, 0)


def _g711(samples: Samples) -> AudioInput:
    return _wav(resample_poly(samples, 1, 2).astype(np.float32), 8_000, "ULAW")


def _noisy(samples: Samples, rng: np.random.Generator) -> Samples:
    power = float(np.mean(np.square(samples, dtype=np.float64)))
    noise = rng.normal(0.0, np.sqrt(power / 10 ** (_NOISE_SNR_DB / 10)), len(samples))
    return (samples + noise).astype(np.float32)


def _trimmed(samples: Samples) -> Samples:
    edge = int(_TRIM_SECONDS * 16_000)
    return samples[edge:-edge]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="LibriSpeech-style folder of FLAC files")
    parser.add_argument("--limit", type=int, default=0, help="only the first N files")
    args = parser.parse_args(argv)
    embedder = load_speaker_embedder(default_model_dir())
    analyser = VoiceAnalyser(embedder, SileroSpeechDetector(), QualityThresholds(), AudioLimits())
    min_speech = EnrollmentPolicy().min_utterance_net_speech_seconds
    rng = np.random.default_rng(0)

    def fingerprint(audio: AudioInput) -> Fingerprint | None:
        sample = analyser.analyse(audio, min_net_speech_seconds=min_speech)
        if sample.embedding is None:
            return None
        telephone = analyser.telephone_embedding(sample.quality.speech)
        return Fingerprint(sample.embedding, telephone)

    files = sorted(args.folder.glob("*.flac"))[: args.limit or None]
    scores: dict[str, list[float]] = {}
    skipped = 0
    for number, path in enumerate(files, 1):
        samples, rate = sf.read(path, dtype="float32")
        assert rate == 16_000, path
        first, second = samples[: len(samples) // 2], samples[len(samples) // 2 :]
        pending = fingerprint(_wav(first))
        other = fingerprint(_wav(second))
        if pending is None or other is None:
            skipped += 1
            continue
        copies = {
            "same audio": _wav(first),
            "G.711 u-law": _g711(first),
            "gain +6 dB": _wav(np.clip(first * 2.0, -1.0, 1.0)),
            "gain -6 dB": _wav(first * 0.5),
            "trimmed 0.5 s": _wav(_trimmed(first)),
            "noise 30 dB SNR": _wav(_noisy(first, rng)),
            "trim+G.711-6dB": _g711(_trimmed(first) * 0.5),
            "whole file": _wav(samples),
        }
        for name, audio in copies.items():
            copy = fingerprint(audio)
            if copy is not None:
                scores.setdefault(name, []).append(similarity(copy, pending))
        scores.setdefault("other half (different)", []).append(similarity(other, pending))
        print(f"{number}/{len(files)} {path.name}", file=sys.stderr, flush=True)

    print(f"{len(files)} files, {skipped} without two halves of {min_speech:.0f} s speech")
    threshold = f">={DUPLICATE_SIMILARITY:g}"
    print(
        f"{'comparison':<24} {'n':>4} {'min':>7} {'p1':>7} {'p50':>7} {'p99':>7} {'max':>7}"
        f" {threshold:>7}"
    )
    for name, values in scores.items():
        v = np.array(values)
        p1, p50, p99 = np.percentile(v, [1, 50, 99])
        print(
            f"{name:<24} {len(v):>4} {v.min():>7.4f} {p1:>7.4f} {p50:>7.4f} {p99:>7.4f} "
            f"{v.max():>7.4f} {int((v >= DUPLICATE_SIMILARITY).sum()):>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
