"""voxauth eval passive: how much talk time passive enrollment needs, measured with the
service's own collection (enrollment/passive.py) on a folder of speakers' recordings.

Each recording is streamed as a softphone streams a shift (PCM16 at 16 kHz, 20 ms frames);
every `speech_recheck_seconds` of audio the shift's buffer is searched for a stretch of
`passive_stretch_net_speech_seconds` of net speech (as the service does), which goes through
the quality gates, the real countermeasure and the copy check, into a store of its own. The
talk time is the audio streamed until the enrollment completes. Recordings of the shared set
hold at most 17 s, so besides the configured amount (default 20 s, which none reaches) the
enrollment is run for smaller amounts, and the talk time per second of collected speech is
printed to scale from.

    voxauth eval passive ../shared/data/librispeech-train-clean-100 --needed 8 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from enrollment.passive import PassiveEnrollment
from enrollment.service import EnrollmentService
from server.config import EnrollmentPolicy, ShiftPolicy
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.decode import TARGET_RATE, AudioEncoding, decode
from server.pipeline.speech import SpeechDetector
from server.shifts.buffer import ShiftAudioBuffer, StreamFormat
from server.shifts.passive import longest_stretch
from server.storage.interface import Store
from server.tools.corpus import AUDIO_SUFFIXES, Recording, recordings

_FRAME = 320  # 20 ms at 16 kHz
_MESSAGE = 2 * _FRAME * 50


@dataclass(frozen=True)
class Collected:
    speaker: str
    streamed_seconds: float
    """Audio streamed until the enrollment completed, or the whole recording."""
    collected_seconds: float
    """Net speech of the accepted stretches then."""
    accepted: int
    refused: int
    completed: bool


def stream_recording(
    recording: Recording,
    passive: PassiveEnrollment,
    detector: SpeechDetector,
    shifts: ShiftPolicy,
    agent_id: str,
) -> Collected:
    waveform = decode(
        recording.path.read_bytes(),
        AUDIO_SUFFIXES[recording.path.suffix.lower()],
        0,
        max_seconds=1e9,
    )
    pcm = (np.clip(waveform, -1, 1) * 32767).astype("<i2").tobytes()
    buffer = ShiftAudioBuffer(
        StreamFormat.declared(AudioEncoding.PCM16LE, TARGET_RATE), shifts.max_audio_age_seconds
    )
    step = 2 * _FRAME * round(shifts.speech_recheck_seconds * TARGET_RATE / _FRAME)
    whole = len(pcm) - len(pcm) % (2 * _FRAME)
    accepted = refused = 0
    collected = 0.0
    previous = sent = 0
    # Looks every `step` of audio, and once more at the end of the recording.
    for sent in [*range(step, whole, step), whole]:
        # Clock time in audio seconds: the buffer ages audio by it. At most 50 frames per
        # message, as a softphone sends them.
        for start in range(previous, sent, _MESSAGE):
            buffer.append(pcm[start : min(start + _MESSAGE, sent)], start / 2 / TARGET_RATE)
        previous = sent
        recent = longest_stretch(
            buffer, detector, passive.policy.passive_stretch_net_speech_seconds
        )
        if recent is None:
            continue
        buffer.clear()
        outcome = passive.collect(agent_id, "eval", recent.speech, recent.stretch, TARGET_RATE)
        if outcome is None:
            break
        accepted += outcome.utterance.record is not None
        refused += outcome.utterance.record is None
        collected = outcome.collected_seconds
        if outcome.finalized is not None:
            return Collected(
                recording.speaker, sent / 2 / TARGET_RATE, collected, accepted, refused, True
            )
    return Collected(recording.speaker, sent / 2 / TARGET_RATE, collected, accepted, refused, False)


def run(
    files: list[Recording],
    store: Store,
    analyser: VoiceAnalyser,
    detector: SpeechDetector,
    policy: EnrollmentPolicy,
    needed: float,
) -> list[Collected]:
    policy = replace(policy, passive_net_speech_seconds=needed)
    now = lambda: datetime.now(UTC)  # noqa: E731
    enrollment = EnrollmentService(store, analyser, policy, now)
    passive = PassiveEnrollment(store, enrollment, analyser, policy)
    results = []
    for number, recording in enumerate(files):
        agent_id = f"eval-{needed:g}-{number}"
        enrollment.create_agent(agent_id, recording.speaker, "EVAL", passive=True)
        results.append(stream_recording(recording, passive, detector, ShiftPolicy(), agent_id))
    return results


def summary(results: list[Collected], needed: float) -> str:
    done = [r for r in results if r.completed]
    stretches = sum(r.accepted + r.refused for r in results)
    refused = sum(r.refused for r in results)
    line = (
        f"{needed:g} s needed: {len(done)}/{len(results)} recordings enrolled; "
        f"stretches {stretches}, refused {refused}"
    )
    if done:
        talk = sorted(r.streamed_seconds for r in done)
        line += (
            f"; talk time median {statistics.median(talk):.1f} s, "
            f"90th percentile {talk[int(0.9 * (len(talk) - 1))]:.1f} s, max {talk[-1]:.1f} s"
        )
    rates = [r.streamed_seconds / r.collected_seconds for r in results if r.collected_seconds]
    if rates:
        line += (
            f"; talk time per collected second median {statistics.median(rates):.2f} "
            f"(so 20 s needs about {20 * statistics.median(rates):.0f} s of talk)"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth eval passive", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", type=Path, help="folder of speakers' audio (FLAC or WAV)")
    parser.add_argument(
        "--needed",
        type=float,
        nargs="+",
        help="net speech the enrollment needs (default: the configured amount, and 8 and 12)",
    )
    parser.add_argument("--limit", type=int, help="at most this many recordings")
    parser.add_argument("--model-dir", type=Path, help="verified model files")
    args = parser.parse_args(argv)

    from models.factory import load_countermeasure, load_speaker_embedder
    from models.fetch import default_countermeasure_dir, default_model_dir
    from server.config import ServerConfig
    from server.pipeline.presentation import (
        PadCalibration,
        PresentationAttackDetector,
        default_pad_calibration_path,
    )
    from server.pipeline.silero import SileroSpeechDetector
    from server.pipeline.speech import QualityThresholds
    from server.security.crypto import VoiceprintCipher
    from server.storage.sqlite import open_store

    config = ServerConfig.from_environment()
    files = recordings(args.directory)[: args.limit]
    if not files:
        print(f"voxauth eval passive: no audio files under {args.directory}", file=sys.stderr)
        return 2
    needed = args.needed or [config.enrollment.passive_net_speech_seconds, 8.0, 12.0]
    embedder = load_speaker_embedder(args.model_dir or config.model_dir or default_model_dir())
    countermeasure = load_countermeasure(config.countermeasure_dir or default_countermeasure_dir())
    policy = config.presentation
    presentation = PresentationAttackDetector(
        countermeasure,
        PadCalibration.load(
            policy.calibration_path or default_pad_calibration_path(), countermeasure.model_id
        ),
        policy,
    )
    detector = SileroSpeechDetector()
    analyser = VoiceAnalyser(embedder, detector, QualityThresholds(), config.audio, presentation)
    started = time.perf_counter()
    print(f"model: {embedder.model_id}; countermeasure {countermeasure.model_id}")
    print(
        f"recordings: {len(files)}, {sum(r.path.stat().st_size for r in files) // 1024} KiB; "
        f"stretches of {config.enrollment.passive_stretch_net_speech_seconds:g} s net speech, "
        f"at least {config.enrollment.passive_min_stretches} of them"
    )
    try:
        with tempfile.TemporaryDirectory() as folder:
            # A throwaway store: its key lives only as long as this run.
            store = open_store(Path(folder) / "eval.db", VoiceprintCipher(os.urandom(32)))
            try:
                for amount in needed:
                    results = run(files, store, analyser, detector, config.enrollment, amount)
                    print(summary(results, amount))
            finally:
                store.close()
    finally:
        presentation.close()
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0
