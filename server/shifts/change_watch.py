"""The change watch: between a shift's random checkpoints, a cheap look at the agent's newest
speech every so often, so that a change of voice (someone else took over the headset) starts a
checkpoint at once instead of waiting up to a quarter of an hour for the random one.

Each look embeds one stretch of the newest speech (a few seconds, from the audio since the
previous look) and compares it, by cosine, with the agent's voiceprint and with the speech
that passed the last checkpoint (the same headset, room and day as now): a stretch unlike
both is a suspected change. The watch decides nothing itself. A suspected change starts a
checkpoint on the speech from that stretch on (the ordinary checkpoint: Silero, the speaker
model, the countermeasure, the policy's threshold), and if that checkpoint fails another
follows at once on fresh speech, so that an impostor meets the existing rule, two
consecutive failures, within a minute or two. A random checkpoint's failure alone is not
followed up at once: the agent's own failures come in runs (the same bad line, the same
cold), and two quick checks would turn one into a lock. The random schedule continues
unchanged.

The look is the cost, so it is kept small: the speech is picked by level (the louder 20 ms
frames of audio that has both speech and pauses), not by Silero, and one stretch is embedded
per interval (VOXAUTH_CHANGE_WATCH_INTERVAL_SECONDS) whatever the agent says in it.

Speech unlike the agent's followed, within a window, by the agent's voice again is a second
voice on the agent's leg (someone prompting or answering beside the agent): reported as its
own event, locking only if the policy says so.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.embedder import Embedding, SpeakerEmbedder, Waveform
from server.config import ShiftPolicy
from server.pipeline.decode import TARGET_RATE
from server.records import Voiceprint
from server.shifts.buffer import ShiftAudioBuffer

_FRAME = 320  # 20 ms at 16 kHz
# A frame is speech when it is within this of the window's loud level (its 95th percentile)...
_SPEECH_RANGE_DB = 20.0
# ...and the window holds speech at all: a loud level at least this (as the quality check's
# -40 dBFS for the speech's level), and pauses at least this far below it (stationary noise
# has none; speech always has them between words).
_MIN_LOUD_DBFS = -40.0
_MIN_DYNAMIC_RANGE_DB = 12.0
_LOOK_WINDOW_FACTOR = 3.0
"""A look examines at most this many times its stretch of the newest audio."""


class CheckpointTrigger(enum.Enum):
    """Why a checkpoint ran."""

    SCHEDULED = "SCHEDULED"
    CHANGE_WATCH = "CHANGE_WATCH"
    FOLLOW_UP = "FOLLOW_UP"
    """The previous checkpoint failed: fresh speech is checked at once."""


@dataclass(frozen=True)
class Cause:
    """What started a checkpoint."""

    trigger: CheckpointTrigger
    since: float | None = None
    """CHANGE_WATCH: the clock time the suspected change's audio starts; the checkpoint
    judges the speech from there on."""
    similarity: float = 0.0
    """CHANGE_WATCH: the similarity of the stretch that triggered it."""


SCHEDULED = Cause(CheckpointTrigger.SCHEDULED)


@dataclass(frozen=True)
class Look:
    """One look at a stretch of the newest speech."""

    start: float
    end: float
    """Clock times of the audio the stretch came from."""
    similarity: float
    """The higher of the stretch's cosines to the voiceprint and to the last passed speech."""
    suspected: bool
    last_block: int
    """The buffer's newest block it looked at: the next look takes the audio after it."""


@dataclass(frozen=True)
class SecondVoice:
    start: float
    end: float
    """Clock times of the audio unlike the agent's."""
    similarity: float
    """The lowest similarity among its looks."""


def speech_by_level(waveform: Waveform, seconds: float) -> Waveform | None:
    """The newest `seconds` of speech in a 16 kHz waveform, picked by level: the 20 ms frames
    within 20 dB of the window's loud level, in a window that holds speech and pauses. None
    when there is less. A screen, not a speech detector: what it lets through only decides
    whether a real checkpoint runs."""
    count = len(waveform) // _FRAME
    needed = round(seconds * TARGET_RATE / _FRAME)
    if count < needed:
        return None
    frames = waveform[len(waveform) - count * _FRAME :].reshape(count, _FRAME)
    power = np.mean(np.square(frames, dtype=np.float64), axis=1)
    level = 10 * np.log10(np.maximum(power, 1e-12))
    loud = float(np.percentile(level, 95))
    quiet = float(np.percentile(level, 10))
    if loud < _MIN_LOUD_DBFS or loud - quiet < _MIN_DYNAMIC_RANGE_DB:
        return None
    speech = np.flatnonzero(level >= loud - _SPEECH_RANGE_DB)
    if len(speech) < needed:
        return None
    picked: Waveform = frames[speech[-needed:]].reshape(-1)
    return picked


class ChangeWatch:
    """One shift's watch. `heard`, `record`, `restart` and `passed` run on the event loop,
    `look` on a worker thread: it only reads what they write, whole references at a time."""

    def __init__(self, policy: ShiftPolicy, embedder: SpeakerEmbedder) -> None:
        self._policy = policy
        self._embedder = embedder
        self._since_look = 0.0
        self._looked_until = 0
        self._passed: Embedding | None = None
        self._looks: deque[Look] = deque()

    @property
    def enabled(self) -> bool:
        return self._policy.change_watch

    def heard(self, seconds: float) -> bool:
        """Counts audio that arrived; True when a look is due."""
        self._since_look += seconds
        return self.due

    @property
    def due(self) -> bool:
        return self.enabled and self._since_look >= self._policy.change_watch_interval_seconds

    def begin(self) -> None:
        """A look starts (on the event loop): audio from now on counts toward the next."""
        self._since_look = 0.0

    def restart(self) -> None:
        """A new stream: the audio before it is gone, and a look waits for a full interval."""
        self._since_look = 0.0
        self._looked_until = 0
        self._looks.clear()

    def passed(self, embedding: Embedding | None) -> None:
        """A checkpoint passed on speech with this embedding: the agent's voice as it is now."""
        if embedding is not None:
            self._passed = embedding

    def look(
        self, buffer: ShiftAudioBuffer, voiceprint_of: Callable[[], Voiceprint]
    ) -> Look | None:
        """Blocking (the speaker model; `voiceprint_of` may read the store): embeds the newest
        stretch of speech that arrived since the previous look and compares it. None while
        there is not enough speech: the next look comes after more audio, at no model or
        store cost now."""
        policy = self._policy
        window = policy.change_watch_speech_seconds * _LOOK_WINDOW_FACTOR
        audio = buffer.audio_after(self._looked_until, window)
        if audio is None:
            return None
        speech = speech_by_level(audio.waveform, policy.change_watch_speech_seconds)
        if speech is None:
            return None
        embedding = self._embedder.embed(speech)
        voiceprint = voiceprint_of()
        telephone = buffer.format.sample_rate_hz < TARGET_RATE
        reference = (
            voiceprint.telephone_embedding
            if telephone and voiceprint.telephone_embedding is not None
            else voiceprint.embedding
        )
        similarity = _cosine(embedding, reference)
        passed = self._passed
        if passed is not None:
            similarity = max(similarity, _cosine(embedding, passed))
        suspected = similarity < policy.change_watch_threshold
        return Look(audio.start, audio.end, similarity, suspected, audio.last_block)

    def record(self, look: Look | None) -> SecondVoice | None:
        """After a look (on the event loop): when the next one is due, and the looks of the
        window. A second voice when this look is the agent's and looks unlike the agent's came
        before it within the window."""
        if look is None:
            # Too little speech: look again after a quarter of an interval more audio, not a
            # whole one (the agent may only have been listening); no model ran.
            self._since_look += 0.75 * self._policy.change_watch_interval_seconds
            return None
        self._looked_until = look.last_block
        window = self._policy.second_voice_window_seconds
        while self._looks and self._looks[0].end < look.end - window:
            self._looks.popleft()
        if look.suspected:
            self._looks.append(look)
            return None
        unlike = list(self._looks)
        self._looks.clear()
        if not unlike:
            return None
        return SecondVoice(unlike[0].start, unlike[-1].end, min(u.similarity for u in unlike))


def _cosine(a: Embedding, b: Embedding) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
