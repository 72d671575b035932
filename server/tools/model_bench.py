"""`voxauth bench`: how fast the speaker model embeds audio on this host, as a real-time factor,
for plain SpeechBrain and for the service's path side by side in one run; with `--check`, also
what each stage of one whole check costs on the service's path (decode, speech detection,
embedding, PAD, scoring).

Each path runs in a process of its own, so that its thread setting, load time and peak memory
are its own and not the sum of everything measured before it.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from models.countermeasure import Countermeasure
from models.embedder import Embedding, SpeakerEmbedder, Waveform
from models.errors import ModelFilesError
from models.fetch import default_countermeasure_dir, default_model_dir
from server.config import AudioLimits, ScoringPolicy, ServerConfig, VerificationPolicy
from server.errors import ConfigurationError
from server.pipeline.channel import channel_of
from server.pipeline.decode import AudioEncoding, decode_audio
from server.pipeline.speech import QualityThresholds, SpeechDetector, analyse
from server.records import Voiceprint
from server.scoring.scorer import Scorer, ScoringModel

# Real speech shipped with the tests (LibriSpeech, CC BY 4.0).
# server/tools/ -> the source tree's tests/data/ (the bench runs from a checkout).
_DEFAULT_SPEECH = Path(__file__).resolve().parents[2] / "tests" / "data" / "198-126831-0000.flac"
_RATE = 16_000
CHECK_SECONDS = 8.0
"""The length of the check the stage breakdown times: the issue's Verify budget is for 8 s."""


@dataclass(frozen=True)
class BenchReport:
    audio_seconds: float
    runs: int
    warmup_seconds: float
    median_seconds: float
    min_seconds: float

    @property
    def median_rtf(self) -> float:
        """Compute seconds per second of audio; below 1 is faster than real time."""
        return self.median_seconds / self.audio_seconds

    @property
    def min_rtf(self) -> float:
        return self.min_seconds / self.audio_seconds


def embedding_benchmark(
    embedder: SpeakerEmbedder, waveform: Waveform, *, seconds: float, runs: int = 7
) -> BenchReport:
    """Time `runs` embeddings of the first `seconds` of `waveform` after one warm-up run
    (reported apart)."""
    if runs < 1 or seconds <= 0:
        raise ValueError("runs and seconds must be positive")
    samples = int(seconds * embedder.sample_rate)
    if waveform.shape[0] < samples:
        raise ValueError(f"the audio is shorter than {seconds:g} s")
    audio = waveform[:samples]
    warmup = _timed_embed(embedder, audio)
    durations = [_timed_embed(embedder, audio) for _ in range(runs)]
    return BenchReport(
        audio_seconds=samples / embedder.sample_rate,
        runs=runs,
        warmup_seconds=warmup,
        median_seconds=statistics.median(durations),
        min_seconds=min(durations),
    )


@dataclass(frozen=True)
class ThroughputReport:
    callers: int
    calls: int
    audio_seconds: float
    wall_seconds: float

    @property
    def audio_per_second(self) -> float:
        """Seconds of audio embedded per wall-clock second, all callers together."""
        return self.calls * self.audio_seconds / self.wall_seconds


def throughput_benchmark(
    embedder: SpeakerEmbedder, waveform: Waveform, *, callers: int, calls: int = 12
) -> ThroughputReport:
    """Embeds `waveform` `calls` times from `callers` threads at once, as the server's workers
    do, after one warm-up call per caller."""
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(lambda _: embedder.embed(waveform), range(callers)))
        start = time.perf_counter()
        list(pool.map(lambda _: embedder.embed(waveform), range(calls)))
        wall = time.perf_counter() - start
    return ThroughputReport(callers, calls, waveform.shape[0] / embedder.sample_rate, wall)


class Engine(Enum):
    SPEECHBRAIN = "SpeechBrain EncoderClassifier (torch)"
    SERVICE = "voxauth (OpenVINO)"


@dataclass(frozen=True)
class PathSpec:
    engine: Engine
    threads: int | None
    """Intra-op threads; None leaves torch's default (one per core)."""
    throughput: bool = False


@dataclass(frozen=True)
class PathResult:
    spec: PathSpec
    threads: int
    load_seconds: float
    reports: tuple[BenchReport, ...]
    peak_rss_bytes: int
    embedding: Embedding
    """Of the longest input, for the agreement check between paths."""
    throughput: tuple[ThroughputReport, ...]


def measure_path(
    spec: PathSpec, waveform: Waveform, lengths: Sequence[float], runs: int, model_dir: Path
) -> PathResult:
    """Load the path's model and time it on each length; meant for a process of its own."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    embedder: SpeakerEmbedder
    if spec.engine is Engine.SPEECHBRAIN:
        from models.reference import SpeechBrainReference

        embedder = SpeechBrainReference.load(model_dir)
    else:
        from models.ecapa import EcapaEmbedder

        # As the server builds it: one stream per core, each with `threads` threads.
        workers = 2 if spec.throughput else 1
        embedder = EcapaEmbedder.load(model_dir, workers=workers, threads=threads)
    load_seconds = time.perf_counter() - start
    reports = tuple(
        embedding_benchmark(embedder, waveform, seconds=seconds, runs=runs) for seconds in lengths
    )
    throughput: tuple[ThroughputReport, ...] = ()
    if spec.throughput:
        audio = waveform[: int(8 * _RATE)]
        throughput = tuple(throughput_benchmark(embedder, audio, callers=n) for n in (1, 2))
    return PathResult(
        spec=spec,
        threads=threads,
        load_seconds=load_seconds,
        reports=reports,
        # ru_maxrss is in KiB on Linux.
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        embedding=embedder.embed(waveform[: int(max(lengths) * _RATE)]),
        throughput=throughput,
    )


def format_results(results: Sequence[PathResult], runs: int) -> str:
    """The side-by-side table, speed-ups of the service's single-thread path over each
    baseline, and the embeddings' agreement."""
    lengths = [report.audio_seconds for report in results[0].reports]
    header = f"{'path':44s} {'threads':>7s} {'load s':>7s} {'peak MB':>8s}" + "".join(
        f"  RTF {seconds:4.0f} s" for seconds in lengths
    )
    lines = [f"real-time factor = compute s per audio s, median of {runs} runs after a warm-up", ""]
    lines.append(header)
    for result in results:
        lines.append(
            f"{result.spec.engine.value:44s} {result.threads:7d} {result.load_seconds:7.2f} "
            f"{result.peak_rss_bytes / 2**20:8.0f}"
            + "".join(f"  {report.median_rtf:10.4f}" for report in result.reports)
        )
    service = next((r for r in results if r.spec.engine is Engine.SERVICE and r.threads == 1), None)
    if service is not None:
        lines.append("")
        for baseline in results:
            if baseline.spec.engine is not Engine.SPEECHBRAIN:
                continue
            ratios = [
                b.median_rtf / s.median_rtf
                for b, s in zip(baseline.reports, service.reports, strict=True)
            ]
            lines.append(
                f"voxauth (1 thread) vs SpeechBrain ({baseline.threads} thread"
                f"{'s' if baseline.threads > 1 else ''}): "
                + ", ".join(
                    f"{ratio:.1f}x at {seconds:g} s"
                    for ratio, seconds in zip(ratios, lengths, strict=True)
                )
            )
        reference = next(r for r in results if r.spec.engine is Engine.SPEECHBRAIN)
        lines.append(
            f"cosine of voxauth's and SpeechBrain's embedding ({lengths[-1]:g} s): "
            f"{float(service.embedding @ reference.embedding):.5f}"
        )
    for result in results:
        if result.throughput:
            single, both = result.throughput
            lines.append(
                f"throughput, voxauth ({result.threads} thread per call), 8 s calls: "
                f"1 caller {single.audio_per_second:.1f}, 2 callers {both.audio_per_second:.1f} "
                f"s of audio per s ({both.audio_per_second / single.audio_per_second:.2f}x; "
                f"{both.calls} calls each)"
            )
    return "\n".join(lines)


class Stage(Enum):
    DECODE = "decode (WAV bytes -> 16 kHz float)"
    SPEECH = "speech detection (Silero)"
    EMBEDDING = "embedding (OpenVINO ECAPA)"
    PAD = "PAD (AASIST countermeasure)"
    SCORING = "scoring (AS-norm, calibration)"


@dataclass(frozen=True)
class CheckBreakdown:
    audio_seconds: float
    net_speech_seconds: float
    runs: int
    medians: dict[Stage, float]
    """Median seconds of each stage, every stage on the caller's thread one after another."""

    @property
    def total_seconds(self) -> float:
        """The stages' sum: the service runs PAD beside speech detection and the embedding,
        so a check's wall time is less on a host with a core to spare."""
        return sum(self.medians.values())

    @property
    def pad_per_embedding(self) -> float:
        """PAD's cost as a share of the embedding's; the issue's target is at most 0.5."""
        return self.medians[Stage.PAD] / self.medians[Stage.EMBEDDING]


def check_breakdown(
    embedder: SpeakerEmbedder,
    countermeasure: Countermeasure,
    detector: SpeechDetector,
    scoring: ScoringPolicy,
    check: bytes,
    enrollment: Waveform,
    *,
    runs: int,
) -> CheckBreakdown:
    """Times each stage of a check of `check` (a 16 kHz WAV) as the service runs it, `runs`
    times after a warm-up, against a voiceprint made from `enrollment` (other speech of the
    same voice, so the scoring takes the path of a genuine check)."""
    if runs < 1:
        raise ValueError("runs must be positive")
    thresholds = QualityThresholds()
    limits = AudioLimits()
    min_speech = VerificationPolicy().min_net_speech_seconds
    enrolled = analyse(enrollment, detector, thresholds, min_net_speech_seconds=0.0)
    voiceprint = Voiceprint(
        agent_id="bench",
        model_id=embedder.model_id,
        embedding=embedder.embed(enrolled.speech),
        created_at=datetime.now(UTC),
        utterance_count=1,
        net_speech_seconds=enrolled.net_speech_seconds,
    )
    scorer = Scorer(ScoringModel.load(scoring, embedder.model_id), scoring, voiceprints=list)
    audio_seconds = (
        len(decode_audio(check, AudioEncoding.WAV, _RATE, max_seconds=limits.max_seconds).waveform)
        / _RATE
    )
    durations: dict[Stage, list[float]] = {stage: [] for stage in Stage}
    net_speech = 0.0
    for run in range(runs + 1):
        timings, net_speech = _timed_check(
            embedder, countermeasure, detector, scorer, voiceprint, check, limits, min_speech
        )
        if run:  # the first is the warm-up
            for stage, seconds in timings.items():
                durations[stage].append(seconds)
    return CheckBreakdown(
        audio_seconds=audio_seconds,
        net_speech_seconds=net_speech,
        runs=runs,
        medians={stage: statistics.median(seconds) for stage, seconds in durations.items()},
    )


def _timed_check(
    embedder: SpeakerEmbedder,
    countermeasure: Countermeasure,
    detector: SpeechDetector,
    scorer: Scorer,
    voiceprint: Voiceprint,
    check: bytes,
    limits: AudioLimits,
    min_speech: float,
) -> tuple[dict[Stage, float], float]:
    """One check, stage by stage: the seconds of each and the check's net speech."""
    clock = time.perf_counter
    start = clock()
    decoded = decode_audio(check, AudioEncoding.WAV, _RATE, max_seconds=limits.max_seconds)
    decoded_at = clock()
    quality = analyse(
        decoded.waveform, detector, QualityThresholds(), min_net_speech_seconds=min_speech
    )
    detected_at = clock()
    embedding = embedder.embed(quality.speech)
    embedded_at = clock()
    # As the service does: the countermeasure judges the audio as it arrived, pauses included,
    # and its back-end scores the evidence for the check's channel.
    evidence = countermeasure.evidence(decoded.waveform)
    channel = channel_of(decoded.source_rate_hz, quality.speech)
    countermeasure.channel_score(evidence, channel.value)
    judged_at = clock()
    scorer.score(voiceprint, embedding, quality.net_speech_seconds, channel)
    scored_at = clock()
    timings = {
        Stage.DECODE: decoded_at - start,
        Stage.SPEECH: detected_at - decoded_at,
        Stage.EMBEDDING: embedded_at - detected_at,
        Stage.PAD: judged_at - embedded_at,
        Stage.SCORING: scored_at - judged_at,
    }
    return timings, quality.net_speech_seconds


def wav_bytes(waveform: Waveform) -> bytes:
    """`waveform` as a 16-bit 16 kHz WAV file, as a client would send it."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, waveform, _RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def measure_check(
    waveform: Waveform, runs: int, model_dir: Path, countermeasure_dir: Path
) -> CheckBreakdown:
    """The stage breakdown on the service's models with one thread each, as the server loads
    them; meant for a process of its own. The check is the first CHECK_SECONDS of `waveform`,
    the voiceprint is made of what follows."""
    torch.set_num_threads(1)
    from models.factory import load_countermeasure, load_speaker_embedder
    from server.pipeline.silero import SileroSpeechDetector

    check = int(CHECK_SECONDS * _RATE)
    if len(waveform) < check + 3 * _RATE:
        raise ValueError(f"--check needs at least {CHECK_SECONDS + 3:g} s of audio")
    return check_breakdown(
        load_speaker_embedder(model_dir, threads=1),
        load_countermeasure(countermeasure_dir, threads=1),
        SileroSpeechDetector(),
        ScoringPolicy(),
        wav_bytes(waveform[:check]),
        waveform[check:],
        runs=runs,
    )


def format_breakdown(breakdown: CheckBreakdown, speechbrain_seconds: float | None) -> str:
    """The stages of one check beside plain SpeechBrain's embedding of the same audio."""
    lines = [
        f"one {breakdown.audio_seconds:g} s check ({breakdown.net_speech_seconds:.1f} s of "
        f"speech) on the service's path, 1 thread, median of {breakdown.runs} runs "
        "after a warm-up",
        "",
        f"{'stage':44s} {'ms':>8s}",
    ]
    lines.extend(
        f"{stage.value:44s} {seconds * 1000:8.1f}" for stage, seconds in breakdown.medians.items()
    )
    lines.append(f"{'whole check (sum of the stages)':44s} {breakdown.total_seconds * 1000:8.1f}")
    if speechbrain_seconds is not None:
        label = "plain SpeechBrain embedding (torch, 1 thread)"
        lines.append(f"{label:44s} {speechbrain_seconds * 1000:8.1f}")
    lines.extend(
        [
            "",
            f"PAD / embedding: {breakdown.pad_per_embedding:.2f} (target: at most 0.50)",
        ]
    )
    if speechbrain_seconds is not None:
        lines.append(
            f"whole check / plain SpeechBrain embedding: "
            f"{breakdown.total_seconds / speechbrain_seconds:.2f}"
        )
    return "\n".join(lines)


def parse_lengths(text: str) -> list[float]:
    """'3,8,20' -> [3.0, 8.0, 20.0]"""
    try:
        lengths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of seconds") from None
    if not lengths or min(lengths) <= 0 or max(lengths) > 60:
        raise argparse.ArgumentTypeError("lengths must be between 0 and 60 s")
    return lengths


def _timed_embed(embedder: SpeakerEmbedder, audio: Waveform) -> float:
    start = time.perf_counter()
    embedder.embed(audio)
    return time.perf_counter() - start


def _speech(path: Path, seconds: float) -> Waveform:
    """The recording, repeated when it is shorter than `seconds`."""
    import soundfile as sf

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != _RATE:
        raise ValueError(f"{path} is {rate} Hz; give 16 kHz audio")
    speech = samples.mean(axis=1).astype(np.float32)
    waveform: Waveform = np.tile(speech, int(np.ceil(seconds * _RATE / len(speech))))
    return waveform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth bench",
        description="Embedding speed of plain SpeechBrain and of the service, side by side. "
        "`voxauth bench shifts` and `voxauth bench load` measure a whole server.",
    )
    parser.add_argument(
        "--seconds",
        type=parse_lengths,
        default=parse_lengths("3,8,20"),
        metavar="S[,S...]",
        help="audio lengths (default 3,8,20)",
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs after a warm-up")
    parser.add_argument(
        "--audio", type=Path, default=_DEFAULT_SPEECH, help="16 kHz speech file (FLAC or WAV)"
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument(
        "--countermeasure-dir", type=Path, default=None, help="AASIST's files (for --check)"
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="also measure the service's throughput with 1 and 2 concurrent callers",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"also time each stage of one whole {CHECK_SECONDS:g} s check (decode, speech "
        "detection, embedding, PAD, scoring), the voiceprint made from the rest of the file",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be positive")
    try:
        waveform = _speech(args.audio, max(args.seconds))
    except (OSError, RuntimeError, ValueError) as error:
        print(f"voxauth bench: {error}", file=sys.stderr)
        return 2
    specs = [
        PathSpec(Engine.SPEECHBRAIN, None),
        PathSpec(Engine.SPEECHBRAIN, 1),
        PathSpec(Engine.SERVICE, 1),
        PathSpec(Engine.SERVICE, 2),
    ]
    if args.throughput:
        specs.append(PathSpec(Engine.SERVICE, 1, throughput=True))
    try:
        configured = ServerConfig.from_environment()
    except ConfigurationError as error:
        print(f"voxauth bench: {error.message}", file=sys.stderr)
        return 2
    model_dir = args.model_dir or configured.model_dir or default_model_dir()
    countermeasure_dir = (
        args.countermeasure_dir or configured.countermeasure_dir or default_countermeasure_dir()
    )
    print(f"audio: {args.audio} (looped when shorter than {max(args.seconds):g} s)")
    results = []
    for spec in specs:
        # A fresh process per path: its own threads, load and peak memory.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            result = child.submit(
                measure_path, spec, waveform, args.seconds, args.runs, model_dir
            ).result()
        results.append(result)
    print(format_results(results, args.runs))
    if args.check:
        try:
            # The file as it is, not looped: the voiceprint must not hear the check again.
            recording = _speech(args.audio, CHECK_SECONDS)
        except (OSError, RuntimeError, ValueError) as error:
            print(f"voxauth bench: {error}", file=sys.stderr)
            return 2
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            pending = child.submit(
                measure_check, recording, args.runs, model_dir, countermeasure_dir
            )
            try:
                breakdown = pending.result()
            except (ModelFilesError, ValueError) as error:
                print(f"voxauth bench: {error}", file=sys.stderr)
                return 2
        print()
        print(format_breakdown(breakdown, _speechbrain_check_seconds(results)))
    return 0


def _speechbrain_check_seconds(results: Sequence[PathResult]) -> float | None:
    """Plain SpeechBrain's median embedding of the check's audio with 1 thread, when the
    lengths measured include the check's."""
    for result in results:
        if result.spec.engine is Engine.SPEECHBRAIN and result.threads == 1:
            for report in result.reports:
                if abs(report.audio_seconds - CHECK_SECONDS) < 1e-6:
                    return report.median_seconds
    return None
