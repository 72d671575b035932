"""The audio a shift's stream delivers: validated 20 ms frames, held in a bounded buffer of
one-second blocks, from which a checkpoint takes the most recent net speech.

Frames are kept as they arrived (encoded) and decoded only when a checkpoint looks at them:
most audio is never looked at, and decoding a run of blocks at once resamples G.711 without
seams. Speech detection results are kept per block, so a checkpoint that waits for more
speech only analyses the audio that arrived since it last looked.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from models.embedder import Waveform
from server.errors import InvalidAudioError
from server.pipeline.decode import TARGET_RATE, AudioEncoding, decode, to_target_rate
from server.pipeline.opus import (
    OPUS_RATE,
    decode_packets,
    frame_packets,
    packet_bandwidth,
    packet_samples,
)
from server.pipeline.speech import Segment, SpeechDetector

FRAME_SECONDS = 0.02
MAX_FRAMES_PER_MESSAGE = 50
_BLOCK_FRAMES = 50  # one second
# Speech detection looks at up to this many blocks at once, newest first: in conversation,
# 8 s of the agent's speech usually lies within the newest 10-20 s.
_ANALYSIS_RUN_BLOCKS = 10


_SUPPORTED = {
    (AudioEncoding.PCM16LE, 16_000),
    (AudioEncoding.PCM16LE, 8_000),
    (AudioEncoding.MULAW, 8_000),
    (AudioEncoding.ALAW, 8_000),
    (AudioEncoding.OPUS, OPUS_RATE),
}
_OPUS_FRAME_SAMPLES = round(OPUS_RATE * FRAME_SECONDS)


@dataclass(frozen=True)
class StreamFormat:
    """The audio format a stream declared in its header."""

    encoding: AudioEncoding
    sample_rate_hz: int

    @classmethod
    def declared(cls, encoding: AudioEncoding, sample_rate_hz: int) -> StreamFormat:
        if encoding is AudioEncoding.OPUS and sample_rate_hz == 0:
            sample_rate_hz = OPUS_RATE  # Opus has one clock rate (RFC 7587)
        if (encoding, sample_rate_hz) not in _SUPPORTED:
            raise InvalidAudioError(
                f"shift audio must be PCM16LE at 16000 or 8000 Hz, MULAW or ALAW at 8000 Hz, "
                f"or OPUS at 48000 Hz; got {encoding.name} at {sample_rate_hz} Hz",
                field="header.encoding",
            )
        return cls(encoding, sample_rate_hz)

    @property
    def frame_bytes(self) -> int:
        """Bytes per 20 ms frame of the fixed-size encodings (Opus packets vary)."""
        bytes_per_sample = 2 if self.encoding is AudioEncoding.PCM16LE else 1
        return round(self.sample_rate_hz * FRAME_SECONDS) * bytes_per_sample

    def frame_count(self, data: bytes) -> int:
        """Whole frames in one message; anything else is refused."""
        if self.encoding is AudioEncoding.OPUS:
            frames, remainder = divmod(packet_samples(data), _OPUS_FRAME_SAMPLES)
            if remainder:
                raise InvalidAudioError(
                    "each message must carry one Opus packet of 20 to 120 ms in whole 20 ms "
                    f"(WebRTC's default ptime is 20); got one of {frames * 20 + remainder / 48:g}"
                    " ms",
                    field="frames",
                )
            return frames
        frames, remainder = divmod(len(data), self.frame_bytes)
        if remainder or not 1 <= frames <= MAX_FRAMES_PER_MESSAGE:
            raise InvalidAudioError(
                f"each message must carry 1 to {MAX_FRAMES_PER_MESSAGE} whole 20 ms frames "
                f"({self.frame_bytes} bytes each for {self.encoding.name} at "
                f"{self.sample_rate_hz} Hz); got {len(data)} bytes",
                field="frames",
            )
        return frames

    def stored(self, data: bytes) -> bytes:
        """A message's audio as a block keeps it: Opus packets with their lengths, so a run of
        them can be split again; other audio as it came."""
        return frame_packets(data) if self.encoding is AudioEncoding.OPUS else data

    def bandwidth_hz(self, data: bytes) -> int:
        """The rate that carries the message's audio band: for Opus the bandwidth its encoder
        chose (narrowband Opus is telephone band), else the declared rate."""
        if self.encoding is AudioEncoding.OPUS:
            return int(packet_bandwidth(data))
        return self.sample_rate_hz

    def decode(self, stored: bytes, max_seconds: float) -> Waveform:
        """Blocks' audio, as `stored` kept it, at TARGET_RATE."""
        if self.encoding is AudioEncoding.OPUS:
            return to_target_rate(decode_packets(stored), OPUS_RATE)
        return decode(stored, self.encoding, self.sample_rate_hz, max_seconds=max_seconds)


# eq=False: a block is found by identity (list.index in _latest_speech); compared by value,
# two blocks received at the same clock reading would compare their waveforms, which raises.
@dataclass(eq=False)
class _Block:
    data: bytearray
    frames: int
    start: float
    end: float
    sealed: bool = False
    """Taken for analysis: new frames go to a new block."""
    bandwidth_hz: int = 0
    """The widest audio band among the block's frames (see StreamFormat.bandwidth_hz)."""
    waveform: Waveform | None = None
    speech: list[Segment] | None = None
    """Speech within `waveform`; None until analysed."""
    number: int = 0
    """Blocks are numbered in the order they arrived (clock times may repeat)."""


@dataclass(frozen=True)
class RecentSpeech:
    speech: Waveform
    """The most recent speech, silence excluded, oldest first."""
    start: float
    end: float
    """Clock times of the blocks the speech came from."""
    stretch: Waveform | None = None
    """The audio of those blocks as it arrived, pauses included: what the countermeasure
    judges (it reads silence, and was calibrated on audio with its pauses)."""
    source_rate_hz: int = TARGET_RATE
    """The rate that carried the widest band of those blocks: 8000 means telephone band."""

    @property
    def net_seconds(self) -> float:
        return len(self.speech) / TARGET_RATE


@dataclass(frozen=True)
class NewAudio:
    waveform: Waveform
    start: float
    end: float
    """Clock times of the blocks it came from."""
    last_block: int
    """The number of its newest block."""


class ShiftAudioBuffer:
    """Bounded: audio older than `max_age_seconds`, or beyond that many seconds in all, is
    dropped as new audio arrives.

    `append` is called on the event loop; `recent_speech` from a worker thread.
    """

    def __init__(self, stream_format: StreamFormat, max_age_seconds: float) -> None:
        self.format = stream_format
        self._max_age = max_age_seconds
        self._blocks: deque[_Block] = deque()
        self._lock = threading.Lock()
        self._frames_since_mark = 0
        self._frames = 0
        self._max_frames = round(max_age_seconds / FRAME_SECONDS)
        self._blocks_made = 0

    def append(self, data: bytes, at: float) -> None:
        """Adds validated frames received at clock time `at`."""
        frames = self.format.frame_count(data)
        with self._lock:
            last = self._blocks[-1] if self._blocks else None
            if last is None or last.frames >= _BLOCK_FRAMES or last.sealed:
                start = max(at - frames * FRAME_SECONDS, last.end if last else at - 1e9)
                self._blocks_made += 1
                last = _Block(bytearray(), 0, start, at, number=self._blocks_made)
                self._blocks.append(last)
            last.data += self.format.stored(data)
            last.bandwidth_hz = max(last.bandwidth_hz, self.format.bandwidth_hz(data))
            last.frames += frames
            last.end = at
            self._frames_since_mark += frames
            self._frames += frames
            # By age for a client streaming in real time; by amount for one sending faster.
            while self._blocks and (
                self._blocks[0].end < at - self._max_age or self._frames > self._max_frames
            ):
                self._frames -= self._blocks.popleft().frames

    @property
    def seconds_since_mark(self) -> float:
        """Audio received since the last `mark()`."""
        return self._frames_since_mark * FRAME_SECONDS

    def mark(self) -> None:
        self._frames_since_mark = 0

    @property
    def buffered_seconds(self) -> float:
        return self._frames * FRAME_SECONDS

    def clear(self) -> None:
        """Discards everything: used audio is not kept."""
        with self._lock:
            self._blocks.clear()
            self._frames = 0

    def discard_before(self, at: float) -> None:
        """Drops the blocks that ended before clock time `at`: a checkpoint the change watch
        started judges the speech from the suspected change on, not the agent's before it."""
        with self._lock:
            while self._blocks and self._blocks[0].end < at:
                self._frames -= self._blocks.popleft().frames

    def audio_after(self, number: int, max_seconds: float) -> NewAudio | None:
        """The audio that arrived after block number `number` (0: all of it), at most the
        newest `max_seconds`, decoded to 16 kHz; None if none. Blocking (decoding); for the
        change watch, which looks without detecting speech."""
        with self._lock:
            blocks = [b for b in self._blocks if b.number > number]
            for block in blocks:
                block.sealed = True
        taken: list[_Block] = []
        frames = 0
        for block in reversed(blocks):
            if frames * FRAME_SECONDS >= max_seconds:
                break
            taken.append(block)
            frames += block.frames
        if not taken:
            return None
        taken.reverse()
        data = b"".join(bytes(b.data) for b in taken)
        waveform = decode(
            data,
            self.format.encoding,
            self.format.sample_rate_hz,
            max_seconds=frames * FRAME_SECONDS + 1,
        )
        return NewAudio(waveform, taken[0].start, taken[-1].end, taken[-1].number)

    def recent_speech(self, detector: SpeechDetector, needed_seconds: float) -> RecentSpeech | None:
        """The most recent `needed_seconds` of speech, or None if the buffer holds less.

        Detection works backwards from the newest audio, a run of blocks at a time, and stops
        once enough speech is found: older audio is only analysed if it is needed.
        """
        with self._lock:
            blocks = list(self._blocks)
            for block in blocks:
                block.sealed = True
        needed = int(needed_seconds * TARGET_RATE)
        found = 0
        end = len(blocks)
        while end > 0 and found < needed:
            start = end - 1
            if blocks[start].speech is None:
                while (
                    start > 0
                    and blocks[start - 1].speech is None
                    and end - start < _ANALYSIS_RUN_BLOCKS
                ):
                    start -= 1
                self._analyse(blocks[start:end], detector)
            found += sum(e - s for b in blocks[start:end] for s, e in b.speech or [])
            end = start
        if found < needed:
            return None
        return _latest_speech(blocks, needed)

    def _analyse(self, blocks: list[_Block], detector: SpeechDetector) -> None:
        """Decodes and runs speech detection over a run of consecutive blocks at once."""
        if not blocks:
            return
        data = b"".join(bytes(b.data) for b in blocks)
        seconds = sum(b.frames for b in blocks) * FRAME_SECONDS
        waveform = self.format.decode(data, max_seconds=seconds + 1)
        segments = detector.segments(waveform)
        offset = 0
        for block in blocks:
            length = round(block.frames * FRAME_SECONDS * TARGET_RATE)
            block.waveform = waveform[offset : offset + length]
            block.speech = [
                (max(start, offset) - offset, min(end, offset + length) - offset)
                for start, end in segments
                if end > offset and start < offset + length
            ]
            offset += length


def _latest_speech(blocks: list[_Block], needed: int) -> RecentSpeech:
    """The newest `needed` samples of speech in analysed blocks, oldest first."""
    pieces: list[Waveform] = []
    collected = 0
    first: _Block | None = None
    last: _Block | None = None
    for block in reversed(blocks):
        if block.waveform is None or block.speech is None:
            break
        for start, end in reversed(block.speech):
            take = min(end - start, needed - collected)
            if take <= 0:
                break
            pieces.append(block.waveform[end - take : end])
            collected += take
            first = block
            last = last or block
        if collected >= needed:
            break
    assert first is not None and last is not None
    covering = blocks[blocks.index(first) : blocks.index(last) + 1]
    stretch = np.concatenate([b.waveform for b in covering if b.waveform is not None])
    return RecentSpeech(
        np.concatenate(pieces[::-1]),
        first.start,
        last.end,
        stretch,
        source_rate_hz=max(b.bandwidth_hz for b in covering),
    )
