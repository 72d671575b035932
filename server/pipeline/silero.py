"""Silero VAD: the SpeechDetector the server and the tools use, in torch."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import torch

# Importing silero_vad calls torch.set_num_threads(1) for the whole process; the server wants
# that anyway, and sets its own count after (server/runtime/inference.py), but a tool that
# wants more threads must set them after importing this module.
from silero_vad import get_speech_timestamps, load_silero_vad

from models.embedder import Waveform
from server.pipeline.decode import TARGET_RATE
from server.pipeline.speech import Segment

# Silero's speech probability falls with the input level (real speech at -80 dBFS loses 60% of
# its detected speech), so the detector sees the audio at a fixed level: the louder half of its
# 20 ms frames (the speech, in anything a caller says) at -20 dBFS. The level, not the peak:
# one click on a quiet line (-44 dBFS) would otherwise hold the words far below where Silero
# hears them, and such lines lost most of their speech (measured in README, "Accuracy"). The
# gain is capped: a signal 60 dB below that is within a few 16-bit steps of silence.
_DETECTION_LEVEL_DBFS = -20.0
_MAX_DETECTION_GAIN = 1000.0
_FRAME = 320
VERSION = "level-normalised/1"
"""Changes whenever what the detector finds changes, so that caches of its segments do."""

_LOAD_LOCK = threading.Lock()


class SileroSpeechDetector:
    """Silero VAD (the model ships inside the silero-vad package, so it loads offline).

    The model keeps recurrent state between calls, and sharing one instance between threads
    corrupts the heap; each thread gets its own (about 4 MB, 30 ms to load), which on two
    cores doubles throughput compared with one model behind a lock.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._model()  # Loaded now so a broken installation fails at startup.

    def segments(self, waveform: Waveform) -> list[Segment]:
        stamps = get_speech_timestamps(
            torch.from_numpy(_at_detection_level(waveform)),
            self._model(),
            sampling_rate=TARGET_RATE,
        )
        return [(int(s["start"]), int(s["end"])) for s in stamps]

    def _model(self) -> Any:
        model = getattr(self._local, "model", None)
        if model is None:
            # catch_warnings swaps process-wide state: threads loading at once must take turns.
            with _LOAD_LOCK, warnings.catch_warnings():
                # silero-vad ships a TorchScript model; torch's notice that torch.jit.load is
                # deprecated is for silero's maintainers, not for our operators' logs.
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                model = self._local.model = load_silero_vad()
        return model


def _at_detection_level(waveform: Waveform) -> Waveform:
    if len(waveform) == 0:
        return waveform
    frames = waveform[: len(waveform) // _FRAME * _FRAME].reshape(-1, _FRAME)
    if len(frames) == 0:
        frames = waveform.reshape(1, -1)
    power = np.mean(np.square(frames, dtype=np.float64), axis=1)
    loud = power[power >= np.median(power)]
    level = float(np.sqrt(loud.mean())) if len(loud) else 0.0
    target = 10 ** (_DETECTION_LEVEL_DBFS / 20)
    gain = min(target / level, _MAX_DETECTION_GAIN) if level > 0 else 1.0
    # Peaks above full scale clip: the detector needs the speech's level, not its peaks.
    levelled: Waveform = np.clip(waveform * np.float32(gain), -1.0, 1.0)
    return levelled
