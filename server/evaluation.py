"""`voxauth eval DIR`: accuracy of the service's own scoring path on a folder of speakers.

Every file is split in two: the first half enrolls, the second half verifies. A trial pairs a
voiceprint with a test half; it is a target trial when both come from the same speaker and an
impostor trial otherwise. Speakers are told apart by the name of the file's folder when the
folder holds several speakers' subfolders, else by the file name up to the first '-'
(LibriSpeech's SPEAKER-CHAPTER-UTTERANCE).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.embedder import Embedding
from server.audio import AudioEncoding, decode
from server.config import AudioLimits, EnrollmentPolicy, VerificationPolicy
from server.voice import VoiceAnalyser

AUDIO_SUFFIXES = {".flac": AudioEncoding.FLAC, ".wav": AudioEncoding.WAV}

Scores = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Trials:
    target: Scores
    impostor: Scores
    inconclusive_files: list[str]
    """Files whose halves had too little speech to enroll or to verify."""


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    false_match_rate: float
    false_non_match_rate: float
    false_matches: int
    false_non_matches: int


def speaker_of(path: Path, root: Path) -> str:
    if path.parent != root:
        return path.parent.relative_to(root).parts[0]
    return path.stem.split("-", 1)[0]


def collect_trials(
    analyser: VoiceAnalyser,
    files: list[Path],
    root: Path,
    enrollment: EnrollmentPolicy,
    verification: VerificationPolicy,
    limits: AudioLimits,
) -> Trials:
    """Halves with less net speech than the service asks for are left out, as the service would
    refuse them (enrollment) or answer INCONCLUSIVE (verification); set both minimums to 0 to
    score every trial."""
    voiceprints: list[tuple[str, Embedding]] = []
    tests: list[tuple[str, Embedding]] = []
    inconclusive: list[str] = []
    for path in files:
        waveform = decode(
            path.read_bytes(),
            AUDIO_SUFFIXES[path.suffix.lower()],
            0,
            max_seconds=limits.max_seconds,
        )
        half = len(waveform) // 2
        enrolled = analyser.analyse_waveform(
            waveform[:half], min_net_speech_seconds=enrollment.min_utterance_net_speech_seconds
        )
        test = analyser.analyse_waveform(
            waveform[half:], min_net_speech_seconds=verification.min_net_speech_seconds
        )
        if enrolled.embedding is None or test.embedding is None:
            inconclusive.append(path.name)
            continue
        speaker = speaker_of(path, root)
        voiceprints.append((speaker, enrolled.embedding))
        tests.append((speaker, test.embedding))
    if not voiceprints:
        return Trials(np.zeros(0), np.zeros(0), inconclusive)
    enrolled_matrix = np.stack([e for _, e in voiceprints]).astype(np.float64)
    test_matrix = np.stack([e for _, e in tests]).astype(np.float64)
    scores = enrolled_matrix @ test_matrix.T
    same = np.array([[a == b for b, _ in tests] for a, _ in voiceprints])
    return Trials(scores[same], scores[~same], inconclusive)


def equal_error_rate(trials: Trials) -> tuple[float, float]:
    """(EER, threshold): where the false-match and false-non-match rates cross, interpolated
    between the two nearest candidate thresholds."""
    thresholds = np.unique(np.concatenate([trials.target, trials.impostor]))
    fmr = np.array([(trials.impostor >= t).mean() for t in thresholds])
    fnmr = np.array([(trials.target < t).mean() for t in thresholds])
    crossing = int(np.argmin(np.abs(fmr - fnmr)))
    return float((fmr[crossing] + fnmr[crossing]) / 2), float(thresholds[crossing])


def operating_point(trials: Trials, threshold: float) -> OperatingPoint:
    false_matches = int((trials.impostor >= threshold).sum())
    false_non_matches = int((trials.target < threshold).sum())
    return OperatingPoint(
        threshold,
        false_matches / max(len(trials.impostor), 1),
        false_non_matches / max(len(trials.target), 1),
        false_matches,
        false_non_matches,
    )


def threshold_for_fmr(trials: Trials, max_fmr: float) -> float:
    """The lowest threshold whose false-match rate on these trials is at most max_fmr."""
    allowed = int(np.floor(max_fmr * len(trials.impostor)))
    ranked = np.sort(trials.impostor)[::-1]
    if allowed >= len(ranked):
        return float(ranked[-1])
    # Accepting needs score >= threshold, so sit just above the (allowed+1)-th highest impostor.
    return float(np.nextafter(ranked[allowed], np.inf))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxauth eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="folder of speakers' audio (FLAC or WAV)")
    parser.add_argument("--threshold", type=float, help="operating threshold (default: config)")
    parser.add_argument(
        "--target-fmr",
        type=float,
        default=1e-3,
        help="false-match rate for the suggested threshold (default 0.001)",
    )
    parser.add_argument("--model-dir", type=Path, help="verified model files")
    parser.add_argument(
        "--all-trials",
        action="store_true",
        help="score halves with less net speech than the service's minimums too",
    )
    args = parser.parse_args(argv)

    from models.ecapa import EcapaEmbedder
    from models.fetch import default_model_dir
    from server.config import ServerConfig
    from server.speech import QualityThresholds, SileroSpeechDetector

    config = ServerConfig.from_environment()
    enrollment, verification = config.enrollment, config.verification
    if args.all_trials:
        enrollment = replace(enrollment, min_utterance_net_speech_seconds=0.0)
        verification = replace(verification, min_net_speech_seconds=0.0)
    threshold = config.verification.threshold if args.threshold is None else args.threshold
    files = sorted(p for p in args.directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        print(f"voxauth eval: no .flac or .wav files under {args.directory}", file=sys.stderr)
        return 2
    embedder = EcapaEmbedder.load(args.model_dir or config.model_dir or default_model_dir())
    analyser = VoiceAnalyser(embedder, SileroSpeechDetector(), QualityThresholds(), config.audio)
    started = time.perf_counter()
    trials = collect_trials(analyser, files, args.directory, enrollment, verification, config.audio)
    elapsed = time.perf_counter() - started
    if len(trials.target) == 0 or len(trials.impostor) == 0:
        print("voxauth eval: need at least two speakers with enough speech", file=sys.stderr)
        return 2

    eer, eer_threshold = equal_error_rate(trials)
    at_config = operating_point(trials, threshold)
    suggested = operating_point(trials, threshold_for_fmr(trials, args.target_fmr))
    print(f"model: {embedder.model_id}")
    print(
        f"files: {len(files)}, of which {len(trials.inconclusive_files)} left out: a half "
        "had less net speech than the service needs (--all-trials keeps them)"
    )
    print(
        f"trials: {len(trials.target)} target, {len(trials.impostor)} impostor "
        f"(enroll on first halves, verify on second halves; {elapsed:.0f} s)"
    )
    print(f"EER: {eer:.2%} at threshold {eer_threshold:.3f}")
    for name, point in (("configured", at_config), (f"FMR<={args.target_fmr:g}", suggested)):
        print(
            f"at {name} threshold {point.threshold:.3f}: "
            f"FMR {point.false_match_rate:.4%} ({point.false_matches}/{len(trials.impostor)}), "
            f"FNMR {point.false_non_match_rate:.2%} "
            f"({point.false_non_matches}/{len(trials.target)})"
        )
    return 0
