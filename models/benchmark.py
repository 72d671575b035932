"""How fast the speaker model embeds audio on this host, as a real-time factor."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.ecapa import EcapaEmbedder
from models.embedder import SpeakerEmbedder, Waveform
from models.fetch import default_model_dir

# Real speech shipped with the tests (LibriSpeech, CC BY 4.0): used when present.
_DEFAULT_SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "198-126831-0000.flac"


@dataclass(frozen=True)
class BenchReport:
    model_id: str
    audio_seconds: float
    audio_source: str  # "speech" or "synthetic"
    threads: int  # torch intra-op threads during the runs
    runs: int
    warmup_seconds: float
    median_seconds: float
    min_seconds: float
    load_seconds: float | None  # None when the caller loaded the model untimed

    @property
    def median_rtf(self) -> float:
        """Compute seconds per second of audio; below 1 is faster than real time."""
        return self.median_seconds / self.audio_seconds

    @property
    def min_rtf(self) -> float:
        return self.min_seconds / self.audio_seconds


def timed_load(model_dir: Path) -> tuple[EcapaEmbedder, float]:
    """Load (verify + build) the ECAPA model, with the seconds it took."""
    start = time.perf_counter()
    embedder = EcapaEmbedder.load(model_dir)
    return embedder, time.perf_counter() - start


def embedding_benchmark(
    embedder: SpeakerEmbedder,
    *,
    seconds: float = 10.0,
    runs: int = 7,
    threads: int = 1,
    waveform: Waveform | None = None,
    load_seconds: float | None = None,
) -> BenchReport:
    """Time `runs` embeddings of `seconds` of audio after one warm-up run (reported apart).

    Uses the first `seconds` of `waveform` (real speech) when given, else a synthetic signal;
    the model's cost depends on length, not content, but real speech rules out surprises.
    """
    if runs < 1 or seconds <= 0 or threads < 1:
        raise ValueError("runs, seconds and threads must be positive")
    samples = int(seconds * embedder.sample_rate)
    if waveform is None:
        audio, source = _synthetic_speechlike(samples, embedder.sample_rate), "synthetic"
    else:
        audio, source = waveform[:samples], "speech"

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        warmup = _timed_embed(embedder, audio)
        durations = [_timed_embed(embedder, audio) for _ in range(runs)]
    finally:
        torch.set_num_threads(previous_threads)

    return BenchReport(
        model_id=embedder.model_id,
        audio_seconds=audio.shape[0] / embedder.sample_rate,
        audio_source=source,
        threads=threads,
        runs=runs,
        warmup_seconds=warmup,
        median_seconds=statistics.median(durations),
        min_seconds=min(durations),
        load_seconds=load_seconds,
    )


@dataclass(frozen=True)
class ThroughputReport:
    threads: int
    workers: int
    calls: int
    audio_seconds: float
    wall_seconds: float

    @property
    def audio_per_second(self) -> float:
        """Seconds of audio embedded per wall-clock second, all workers together."""
        return self.calls * self.audio_seconds / self.wall_seconds

    @property
    def seconds_per_call(self) -> float:
        """Mean latency of one call while all workers are busy."""
        return self.wall_seconds * self.workers / self.calls


def throughput_benchmark(
    embedder: SpeakerEmbedder,
    waveform: Waveform,
    *,
    threads: int,
    workers: int,
    calls: int = 12,
) -> ThroughputReport:
    """Embeds `waveform` `calls` times from `workers` threads at once, as the server's pool
    does, after one warm-up call per worker."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda _: embedder.embed(waveform), range(workers)))
            start = time.perf_counter()
            list(pool.map(lambda _: embedder.embed(waveform), range(calls)))
            wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    return ThroughputReport(threads, workers, calls, waveform.shape[0] / embedder.sample_rate, wall)


def format_report(report: BenchReport) -> str:
    load = "not measured" if report.load_seconds is None else f"{report.load_seconds:.2f} s"
    return "\n".join(
        [
            f"model    {report.model_id}",
            f"load     {load} (verify weights + build network)",
            f"input    {report.audio_seconds:.1f} s of {report.audio_source} audio",
            f"threads  {report.threads} (torch intra-op)",
            f"warm-up  {report.warmup_seconds:.3f} s",
            f"runs     {report.runs}: median {report.median_seconds:.3f} s"
            f" (RTF {report.median_rtf:.4f}), min {report.min_seconds:.3f} s"
            f" (RTF {report.min_rtf:.4f})",
        ]
    )


def _timed_embed(embedder: SpeakerEmbedder, audio: Waveform) -> float:
    start = time.perf_counter()
    embedder.embed(audio)
    return time.perf_counter() - start


def _synthetic_speechlike(samples: int, sample_rate: int) -> Waveform:
    """A voiced-sounding signal: harmonics of a wandering pitch, syllable-rate bursts, noise."""
    rng = np.random.default_rng(0)
    t = np.arange(samples) / sample_rate
    pitch = 120.0 + 20.0 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 11))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t))
    signal = 0.1 * syllables * voiced + 0.005 * rng.standard_normal(samples)
    return signal.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth bench", description="Embedding speed as a real-time factor."
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--audio", type=Path, default=_DEFAULT_SPEECH, help="16 kHz speech file (FLAC or WAV)"
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="also measure concurrent throughput for 1-2 threads x 1-2 workers",
    )
    args = parser.parse_args(argv)

    waveform: Waveform | None = None
    if args.audio.is_file():
        import soundfile as sf

        samples, rate = sf.read(args.audio, dtype="float32", always_2d=True)
        if rate != 16_000:
            print(f"voxauth bench: {args.audio} is {rate} Hz; give 16 kHz audio", file=sys.stderr)
            return 2
        speech = samples.mean(axis=1).astype(np.float32)
        # Repeat the recording if it is shorter than the length asked for.
        repeats = int(np.ceil(args.seconds * rate / len(speech)))
        waveform = np.tile(speech, repeats)
    embedder, load_seconds = timed_load(args.model_dir or default_model_dir())
    report = embedding_benchmark(
        embedder,
        seconds=args.seconds,
        runs=args.runs,
        threads=args.threads,
        waveform=waveform,
        load_seconds=load_seconds,
    )
    print(format_report(report))
    if args.throughput:
        audio = waveform[: int(args.seconds * 16_000)] if waveform is not None else None
        if audio is None:
            audio = _synthetic_speechlike(int(args.seconds * 16_000), 16_000)
        print("concurrent throughput (threads = torch intra-op threads, workers = callers):")
        for threads, workers in ((1, 1), (1, 2), (2, 1), (2, 2)):
            load = throughput_benchmark(embedder, audio, threads=threads, workers=workers)
            print(
                f"  threads {threads} workers {workers}: {load.audio_per_second:5.1f} s of "
                f"audio per s, {load.seconds_per_call:.3f} s per call ({load.calls} calls)"
            )
    return 0
