"""Silero VAD: the SpeechDetector the server and the tools use, its sequence model in OpenVINO.

Silero's streaming model reads 32 ms frames one call at a time, its recurrent state carried
between calls in a Python loop; that loop held the GIL for most of a check's speech detection
(57 ms of an 8 s check, `voxauth bench --check`), and beside it the countermeasure's thread
waited for the GIL, so a Verify took about the sum of the two rather than the longer. The
silero-vad package also ships the same network as a "sequence" model, which runs up to 512
frames in one call with the state as an input; its per-frame probabilities go through the
package's own state machine (`get_speech_timestamps_from_probs`). On 768 recordings (the 251
of the shared LibriSpeech set and tests/data, each as recorded, through the simulated G.711
call and 40 dB down in noise) it found exactly the segments the streaming torch model found,
in a twelfth of the time, so VERSION and caches of segments stay valid.
"""

from __future__ import annotations

import threading
from importlib import resources

import numpy as np
import openvino as ov

# Importing silero_vad (its package imports torch) calls torch.set_num_threads(1) for the
# whole process; the server wants that anyway and sets its own count after
# (server/runtime/inference.py), but a tool that wants more torch threads must set them after
# importing this module. Its sequence module is numpy only (its onnxruntime session class is
# not used here).
from silero_vad import get_speech_timestamps_from_probs
from silero_vad.sequence_vad import frame_blocks

from models.embedder import Waveform
from models.openvino_runtime import stream_settings
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

_MODEL_FILE = "silero_vad_16k_sequence.onnx"
_FRAME_SAMPLES = 512  # 32 ms at 16 kHz: the model's frame
_CONTEXT_SAMPLES = 64  # the end of the previous frame, prefixed to each
_BLOCK_FRAMES = 512  # frames per call: about 16 s
_STATE_SHAPE = (1, 1, 128)


class SileroSpeechDetector:
    """Silero VAD (the model ships inside the silero-vad package, so it loads offline).

    One compiled model for the process, one infer request per calling thread (a request is
    not thread-safe); the recurrent state is an input of each call, so nothing is shared
    between checks. `streams`: how many threads may detect at once, each on its own core.
    """

    def __init__(self, *, streams: int = 2) -> None:
        path = resources.files("silero_vad").joinpath("data", _MODEL_FILE)
        with resources.as_file(path) as model_file:
            # The file leaves the frame count's rank open, which OpenVINO's ONNX reader
            # refuses; given the inputs' shapes, with the frame count dynamic, it converts.
            network = ov.convert_model(
                model_file,
                input=[
                    ("input", [-1, _CONTEXT_SAMPLES + _FRAME_SAMPLES]),
                    ("h", list(_STATE_SHAPE)),
                    ("c", list(_STATE_SHAPE)),
                ],
            )
        self._compiled = ov.Core().compile_model(
            network,
            "CPU",
            {
                **stream_settings(streams, 1),
                # Float32 everywhere: the segments are the streaming model's only in float32
                # (on CPUs with AMX the default would be bfloat16).
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        self._local = threading.local()
        # Loaded and run once now: a broken installation fails at startup, and no two
        # workers make the process's first inference at once (models/openvino_runtime.py).
        self.segments(np.zeros(TARGET_RATE, dtype=np.float32))

    def segments(self, waveform: Waveform) -> list[Segment]:
        levelled = _at_detection_level(np.ascontiguousarray(waveform, dtype=np.float32))
        if len(levelled) == 0:
            return []
        stamps = get_speech_timestamps_from_probs(
            self._probabilities(levelled).tolist(),
            sampling_rate=TARGET_RATE,
            audio_length_samples=len(levelled),
        )
        return [(int(s["start"]), int(s["end"])) for s in stamps]

    def _probabilities(self, waveform: Waveform) -> np.ndarray:
        """Silero's speech probability of each 32 ms frame, the state carried across blocks."""
        request = self._request()
        h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        found = []
        for block in frame_blocks(waveform, _FRAME_SAMPLES, _CONTEXT_SAMPLES, _BLOCK_FRAMES):
            request.infer({0: block, 1: h, 2: c})
            found.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
            h = np.array(request.get_output_tensor(1).data, dtype=np.float32)
            c = np.array(request.get_output_tensor(2).data, dtype=np.float32)
        return np.concatenate(found)

    def _request(self) -> ov.InferRequest:
        request: ov.InferRequest | None = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return request


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
