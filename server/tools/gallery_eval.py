"""voxauth eval gallery: the duplicate-identity (1:N) search's false-alarm rate and detection
rate for galleries of enrolled voices, measured with the service's own search
(server/scoring/gallery.py) on speakers held out of the calibration.

A folder of one recording per speaker (the shared LibriSpeech set: 251 speakers, 135 held out
of the calibration) has too few voices for a gallery of 1,000, so each held-out speaker also
lends voices played faster or slower (speed perturbation, which moves pitch and formants
together: speaker-recognition training takes such copies for new speakers). Each voice
enrolls from the first half of its recording and searches with the second half, as a new
enrollment would.

- False alarm: a natural voice (speed 1.0) searches a gallery of N voices none of which is
  its own speaker (no copy at any speed); a match is a false alarm. A few searches per voice,
  each gallery drawn at random. The copies at other speeds are close to each other, so a
  gallery of 1,000 holds fewer independent voices than 1,000 people: the one-to-one rate on
  natural voices (every pair of held-out speakers at the bound) is printed beside it.
- Detection: the same, with the voice's own first half in the gallery: is its own voiceprint
  found (matched above the bound)? This is a second agent enrolled with the first one's voice
  from another utterance of the same session, harder than the same recording again.

    voxauth eval gallery ../shared/data/librispeech-train-clean-100 --sizes 100 1000
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from server.pipeline.decode import TARGET_RATE, decode
from server.pipeline.speech import QualityThresholds, SpeechDetector, analyse
from server.records import Voiceprint
from server.scoring.gallery import GallerySearch, Probe, per_comparison_rate
from server.tools.corpus import AUDIO_SUFFIXES, Recording, recordings

# Played at these speeds, each recording lends nine voices (1.0 is the speaker's own). Not
# beyond 0.94-1.1: copies at 0.85-0.9 or 1.15-1.2 false-match each other far more often than
# natural voices do (at the 1,000-voice bound, 1.2 against 1.2: 12% of pairs, 1.0 against 1.0:
# none of 1,056, on 40 speakers), so they would measure the augmentation, not the search.
SPEEDS = (1.0, 0.94, 0.96, 0.98, 1.02, 1.04, 1.06, 1.08, 1.1)
MIN_HALF_SECONDS = 2.0
"""The service's minimum net speech per enrollment utterance."""
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Voice:
    speaker: str
    speed: float
    enrolled: Voiceprint
    """From the first half."""
    probe: Probe
    """From the second half."""


@dataclass(frozen=True)
class SearchRates:
    gallery_size: int
    searches: int
    false_alarms: int
    detections: int
    detection_trials: int
    per_comparison_rate: float


def speed_changed(waveform: Waveform, factor: float) -> Waveform:
    """`waveform` played `factor` times as fast (pitch and formants move with it)."""
    if factor == 1.0:
        return waveform
    up, down = 100, round(100 * factor)
    changed: Waveform = resample_poly(waveform, up, down).astype(np.float32)
    return changed


def embed_voices(
    files: list[Recording],
    embedder: SpeakerEmbedder,
    detector: SpeechDetector,
    cache: Path | None,
    speeds: tuple[float, ...] = SPEEDS,
) -> list[Voice]:
    voices = []
    for number, recording in enumerate(files, 1):
        waveform = decode(
            recording.path.read_bytes(),
            AUDIO_SUFFIXES[recording.path.suffix.lower()],
            0,
            max_seconds=1e9,
        )
        for factor in speeds:
            halves = _halves(recording, waveform, factor, embedder, detector, cache)
            if halves is None:
                continue
            (first, first_net), (second, second_net) = halves
            voice_id = f"{recording.speaker}x{factor:g}"
            voices.append(
                Voice(
                    recording.speaker,
                    factor,
                    Voiceprint(voice_id, embedder.model_id, first, _EPOCH, 1, first_net),
                    Probe(second, second_net),
                )
            )
        if number % 20 == 0:
            print(f"  embedded {number}/{len(files)} recordings", file=sys.stderr)
    return voices


def _halves(
    recording: Recording,
    waveform: Waveform,
    factor: float,
    embedder: SpeakerEmbedder,
    detector: SpeechDetector,
    cache: Path | None,
) -> tuple[tuple[Embedding, float], tuple[Embedding, float]] | None:
    cache_file = None
    if cache is not None:
        tag = hashlib.sha256(
            f"{embedder.model_id}:{recording.path.resolve()}:{factor:g}".encode()
        ).hexdigest()[:20]
        cache_file = cache / f"{tag}.npz"
        if cache_file.exists():
            with np.load(cache_file) as stored:
                if stored["first"].size == 0:
                    return None
                return (
                    (stored["first"].astype(np.float32), float(stored["first_net"])),
                    (stored["second"].astype(np.float32), float(stored["second_net"])),
                )
    audio = speed_changed(waveform, factor)
    half = len(audio) // 2
    embedded: list[tuple[Embedding, float] | None] = []
    for part in (audio[:half], audio[half:]):
        speech = analyse(part, detector, QualityThresholds(), min_net_speech_seconds=0.0).speech
        net = len(speech) / TARGET_RATE
        if net < MIN_HALF_SECONDS or len(speech) < embedder.min_samples:
            embedded.append(None)
            break
        embedded.append((embedder.embed(speech), net))
    result = None
    if len(embedded) == 2 and embedded[0] is not None and embedded[1] is not None:
        result = (embedded[0], embedded[1])
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        empty = np.zeros(0, np.float32)
        np.savez(
            cache_file,
            first=result[0][0] if result else empty,
            first_net=np.array(result[0][1] if result else 0.0),
            second=result[1][0] if result else empty,
            second_net=np.array(result[1][1] if result else 0.0),
        )
    return result


def measure(
    voices: list[Voice],
    search: GallerySearch,
    gallery_size: int,
    false_alarm: float,
    rng: np.random.Generator,
    draws: int,
) -> SearchRates:
    """Per natural voice (speed 1.0: a real person enrolling), `draws` false-alarm searches
    and as many detection searches, over galleries of `gallery_size` voices drawn at random
    from the other speakers' voices (at any speed)."""
    false_alarms = detections = detection_trials = searches = 0
    for voice in (v for v in voices if v.speed == 1.0):
        others = [v for v in voices if v.speaker != voice.speaker]
        if len(others) < gallery_size:
            raise ValueError(
                f"{len(others)} voices of other speakers, fewer than a gallery of {gallery_size}"
            )
        for _ in range(draws):
            drawn = rng.choice(len(others), size=gallery_size, replace=False)
            gallery = [others[int(i)].enrolled for i in drawn]
            searches += 1
            if search.search(voice.probe, gallery, false_alarm) is not None:
                false_alarms += 1
            # Its own voiceprint in place of one of the others.
            with_own = [voice.enrolled, *gallery[1:]]
            match = search.search(voice.probe, with_own, false_alarm)
            detection_trials += 1
            if match is not None and match.reference_id == voice.enrolled.agent_id:
                detections += 1
    return SearchRates(
        gallery_size,
        searches,
        false_alarms,
        detections,
        detection_trials,
        per_comparison_rate(false_alarm, gallery_size),
    )


def pairwise(
    voices: list[Voice], search: GallerySearch, gallery_size: int, false_alarm: float
) -> tuple[int, int]:
    """Every natural voice searched against every other speaker's natural voice, one at a
    time, at the bound for `gallery_size`: (false matches, comparisons), the per-comparison
    rate the bound is derived for."""
    natural = [v for v in voices if v.speed == 1.0]
    rate = per_comparison_rate(false_alarm, gallery_size)
    matches = comparisons = 0
    for voice in natural:
        for other in natural:
            if other.speaker == voice.speaker:
                continue
            comparisons += 1
            # A gallery of one held to the per-comparison rate of the full gallery.
            if search.search(voice.probe, [other.enrolled], rate) is not None:
                matches += 1
    return matches, comparisons


def report(rates: SearchRates, false_alarm: float) -> str:
    fa = rates.false_alarms / rates.searches
    found = rates.detections / rates.detection_trials
    return (
        f"gallery of {rates.gallery_size:5d}: per-comparison bound p = "
        f"{rates.per_comparison_rate:.2e} (1-(1-p)^N = {false_alarm:g}); "
        f"false alarms {rates.false_alarms}/{rates.searches} = {fa:.2%} "
        f"({rates.searches * rates.gallery_size:,} comparisons); "
        f"duplicates found {rates.detections}/{rates.detection_trials} = {found:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth eval gallery", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", type=Path, help="folder of speakers' audio (FLAC or WAV)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--false-alarm",
        type=float,
        help="target false-alarm rate of a whole search (default: config)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("var/gallery-cache"), help="embedding cache folder"
    )
    parser.add_argument("--model-dir", type=Path, help="verified model files")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--draws", type=int, default=3, help="random galleries per voice")
    parser.add_argument("--limit", type=int, help="at most this many held-out speakers")
    parser.add_argument(
        "--speeds", type=float, nargs="+", default=list(SPEEDS), help="speeds lending voices"
    )
    args = parser.parse_args(argv)

    from models.ecapa import EcapaEmbedder
    from models.fetch import default_model_dir
    from server.config import ServerConfig
    from server.pipeline.silero import SileroSpeechDetector
    from server.scoring.scorer import Scorer, ScoringModel

    config = ServerConfig.from_environment()
    false_alarm = (
        config.enrollment.duplicate_false_alarm if args.false_alarm is None else args.false_alarm
    )
    all_files = recordings(args.directory)
    if not all_files:
        print(f"voxauth eval gallery: no audio files under {args.directory}", file=sys.stderr)
        return 2
    embedder = EcapaEmbedder.load(args.model_dir or config.model_dir or default_model_dir())
    scoring = ScoringModel.load(config.scoring, embedder.model_id)
    fitted_on = set(scoring.calibration.provenance.get("speakers", []))
    files = [r for r in all_files if r.speaker not in fitted_on][: args.limit]
    started = time.perf_counter()
    speeds = tuple(args.speeds)
    voices = embed_voices(files, embedder, SileroSpeechDetector(), args.cache, speeds)
    print(f"model: {embedder.model_id}")
    print(
        f"voices: {len(voices)} from {len({v.speaker for v in voices})} held-out speakers "
        f"(speeds {', '.join(f'{s:g}' for s in speeds)}), of {len(all_files)} files"
    )
    search = GallerySearch(Scorer(scoring, config.scoring, voiceprints=list))
    rng = np.random.default_rng(args.seed)
    for size in args.sizes:
        print(report(measure(voices, search, size, false_alarm, rng, args.draws), false_alarm))
        matches, comparisons = pairwise(voices, search, size, false_alarm)
        print(
            f"  natural voices one to one at this bound: {matches}/{comparisons:,} false matches "
            f"(the bound: {per_comparison_rate(false_alarm, size):.1e})"
        )
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0
