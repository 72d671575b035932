"""A folder of speakers' recordings as `voxauth eval` and `voxauth calibrate` use it: each file
cut into speech segments, seen through each channel, embedded once and cached on disk.

Layouts: one file per speaker named SPEAKER-... (LibriSpeech's SPEAKER-CHAPTER-UTTERANCE), or
one folder per speaker holding any number of files.

Each segment is taken from the speech the service itself would find: the file (or one half of
it) is decoded, passed through the channel, and searched by the same VAD; `start` and
`seconds` count net speech. A telephone test is the audio after a simulated G.711 call. A
telephone enrollment is made as enrollment makes its companion voiceprint: the wideband
speech passed through the simulated call.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from server.pipeline.decode import TARGET_RATE, AudioEncoding, decode, telephone_channel
from server.pipeline.speech import QualityThresholds, SpeechDetector, analyse
from server.tools.distortions import Distortion

AUDIO_SUFFIXES = {".flac": AudioEncoding.FLAC, ".wav": AudioEncoding.WAV}


class Side(enum.Enum):
    """How a segment reaches the model."""

    WIDEBAND = "wideband"
    """The recording as it is."""
    TELEPHONE = "telephone"
    """The recording after a simulated telephone call, then the VAD: a telephone test."""
    COMPANION = "companion"
    """The recording's wideband speech after a simulated call: a telephone enrollment."""


class Part(enum.Enum):
    FIRST_HALF = 0
    SECOND_HALF = 1
    WHOLE = 2


@dataclass(frozen=True)
class Segment:
    part: Part
    start: float = 0.0
    """Seconds of net speech skipped."""
    seconds: float | None = None
    """Seconds of net speech taken; None: all that is left."""


@dataclass(frozen=True)
class Recording:
    path: Path
    speaker: str


@dataclass(frozen=True, eq=False)
class Embedded:
    embedding: Embedding | None
    """None when the segment holds less speech than asked for, or too little to embed."""
    net_speech_seconds: float


def recordings(root: Path) -> list[Recording]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    return [Recording(path, speaker_of(path, root)) for path in files]


def speaker_of(path: Path, root: Path) -> str:
    if path.parent != root:
        return path.parent.relative_to(root).parts[0]
    return path.stem.split("-", 1)[0]


class SpeechCorpus:
    """Embeddings of segments of recordings, computed at most once: in memory for this run
    and in `cache_dir` (one .npz per recording, keyed by the model) for later runs."""

    def __init__(
        self,
        embedder: SpeakerEmbedder,
        detector: SpeechDetector,
        *,
        max_seconds: float,
        cache_dir: Path | None,
        detector_version: str,
    ) -> None:
        """`detector_version` names what the detector finds: segments found by another
        detector, and so their embeddings, are cached apart."""
        self._embedder = embedder
        self._detector = detector
        self._max_seconds = max_seconds
        self._cache_dir = (
            cache_dir / re.sub(r"[^A-Za-z0-9._-]", "_", f"{embedder.model_id}+{detector_version}")
            if cache_dir
            else None
        )
        self._entries: dict[Path, dict[str, Embedded]] = {}
        self._speech: dict[tuple[Path, Side, Part, Distortion | None], Waveform] = {}
        self.computed = 0
        """Segments embedded in this run (not found in the cache)."""

    @property
    def dimension(self) -> int:
        return self._embedder.dimension

    def embed(
        self,
        recording: Recording,
        side: Side,
        segment: Segment,
        distortion: Distortion | None = None,
    ) -> Embedded:
        """`distortion`: what the audio goes through first (a test of `voxauth eval`'s
        domain shifts); its channel, not `side`, then says whether a call follows."""
        entries = self._load(recording.path)
        key = _key(side, segment, distortion)
        if key not in entries:
            entries[key] = self._compute(recording.path, side, segment, distortion)
            self.computed += 1
            self._save(recording.path, entries)
        return entries[key]

    def _compute(
        self, path: Path, side: Side, segment: Segment, distortion: Distortion | None
    ) -> Embedded:
        speech = self._speech_of(path, side, segment.part, distortion)
        first = int(segment.start * TARGET_RATE)
        taken = (
            speech[first:]
            if segment.seconds is None
            else speech[first:][: int(segment.seconds * TARGET_RATE)]
        )
        net = len(taken) / TARGET_RATE
        if segment.seconds is not None and len(taken) < int(segment.seconds * TARGET_RATE):
            return Embedded(None, net)
        if len(taken) < self._embedder.min_samples:
            return Embedded(None, net)
        return Embedded(self._embedder.embed(taken), net)

    def _speech_of(
        self, path: Path, side: Side, part: Part, distortion: Distortion | None = None
    ) -> Waveform:
        cached = self._speech.get((path, side, part, distortion))
        if cached is not None:
            return cached
        waveform = decode(
            path.read_bytes(), AUDIO_SUFFIXES[path.suffix.lower()], 0, max_seconds=1e9
        )
        half = len(waveform) // 2
        audio = {
            Part.FIRST_HALF: waveform[:half],
            Part.SECOND_HALF: waveform[half:],
            Part.WHOLE: waveform,
        }[part]
        if distortion is not None:
            seed = int(
                hashlib.sha256(f"{path.name}:{distortion.value}".encode()).hexdigest()[:8], 16
            )
            audio = distortion.apply(audio, self._detector.segments(audio), seed)
        elif side is Side.TELEPHONE:
            audio = telephone_channel(audio)
        speech = (
            analyse(audio, self._detector, QualityThresholds(), min_net_speech_seconds=0.0).speech
            if len(audio)
            else audio
        )
        if side is Side.COMPANION:
            speech = telephone_channel(speech) if len(speech) else speech
        # Only the last recording's speech is kept: files are visited one after another.
        self._speech = {k: v for k, v in self._speech.items() if k[0] == path}
        self._speech[(path, side, part, distortion)] = speech
        return speech

    def _cache_file(self, path: Path) -> Path | None:
        if self._cache_dir is None:
            return None
        stat = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}".encode()).hexdigest()[:16]
        return self._cache_dir / f"{path.stem}.{tag}.npz"

    def _load(self, path: Path) -> dict[str, Embedded]:
        entries = self._entries.get(path)
        if entries is not None:
            return entries
        entries = {}
        cache_file = self._cache_file(path)
        if cache_file is not None and cache_file.exists():
            with np.load(cache_file) as stored:
                for name in stored.files:
                    if name.startswith("net:"):
                        key = name[4:]
                        vector = stored[f"emb:{key}"]
                        entries[key] = Embedded(
                            vector.astype(np.float32) if vector.size else None,
                            float(stored[name]),
                        )
        self._entries[path] = entries
        return entries

    def _save(self, path: Path, entries: dict[str, Embedded]) -> None:
        cache_file = self._cache_file(path)
        if cache_file is None:
            return
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for key, entry in entries.items():
            arrays[f"net:{key}"] = np.array(entry.net_speech_seconds)
            arrays[f"emb:{key}"] = (
                entry.embedding if entry.embedding is not None else np.zeros(0, np.float32)
            )
        partial = cache_file.with_suffix(".tmp.npz")
        np.savez(partial, **arrays)  # type: ignore[arg-type]
        partial.replace(cache_file)


def _key(side: Side, segment: Segment, distortion: Distortion | None = None) -> str:
    seconds = "all" if segment.seconds is None else f"{segment.seconds:g}"
    key = f"{side.value}/{segment.part.name}/{segment.start:g}/{seconds}"
    return key if distortion is None else f"{distortion.value}+{key}"
