"""The Countermeasure for AASIST: windows of the check, the network on each (in OpenVINO from
the export made at setup, or in torch as the reference), one score for the whole check.

AASIST was trained on windows of 64,600 samples (about 4 s). A check is covered by the fewest
such windows, spread evenly (models.countermeasure.window_starts); the check's score is the
mean of the windows' bona-fide logits, so every part of the check counts and one odd window
moves it only by its share. Audio shorter than a window is repeated to fill one, as the
network's authors evaluate short utterances.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import openvino as ov
import torch

from models.aasist import (
    BONA_FIDE_CLASS,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    build_network,
    exported_network,
)
from models.countermeasure import (
    CountermeasureEvidence,
    WindowBatch,
    judged_audio,
    judged_id,
    windows_of,
)
from models.embedder import Waveform
from models.errors import UnusableWaveformError
from models.manifest import AASIST_MANIFEST, verify_model_dir
from models.openvino_runtime import stream_settings, warm_up
from models.pad_backend import PadBackEnd, check_features

WindowLogits = npt.NDArray[np.float32]
"""(windows, 2): spoof and bona-fide logits of each window."""
WindowReadouts = npt.NDArray[np.float32]
"""(windows, READOUT_DIM): the readout each window's logits are a linear function of."""
WindowOutputs = tuple[WindowLogits, WindowReadouts]

_MAX_BATCH_WINDOWS = 2
# Below a second, the window would be the same few syllables repeated four times or more.
_MIN_SECONDS = 1.0


class AasistCountermeasure:
    """AASIST behind the Countermeasure interface. Build it with `load` (OpenVINO, the
    service's path) or `load_torch` (the torch network, the reference)."""

    def __init__(
        self, infer: Callable[[WindowBatch], WindowOutputs], backend: PadBackEnd | None = None
    ) -> None:
        self._infer = infer
        self._backend = backend

    def with_backend(self, backend: PadBackEnd | None) -> AasistCountermeasure:
        """The same network, its checks scored by `backend` (None: by the raw logit)."""
        return AasistCountermeasure(self._infer, backend)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        workers: int = 1,
        threads: int = 1,
        precision: str | None = None,
    ) -> AasistCountermeasure:
        """Verify the checkpoint in `model_dir`, then compile its export for `workers`
        concurrent callers with `threads` intra-op threads each, in `precision` ("f32" or
        "bf16"; default: bfloat16 where the CPU computes in it natively)."""
        verify_model_dir(model_dir, AASIST_MANIFEST)
        core = ov.Core()
        chosen = precision or _native_precision(core)
        compiled = core.compile_model(
            core.read_model(exported_network(model_dir)),
            "CPU",
            {**stream_settings(workers, threads), "INFERENCE_PRECISION_HINT": chosen},
        )
        return cls(_OpenVinoWindows(compiled))

    @classmethod
    def load_torch(cls, model_dir: Path) -> AasistCountermeasure:
        """The torch network on the verified checkpoint: the reference the export is held to
        and the baseline the benchmark compares with."""
        verify_model_dir(model_dir, AASIST_MANIFEST)
        network = build_network(model_dir)

        def infer(windows: WindowBatch) -> WindowOutputs:
            with torch.inference_mode():
                logits, readout = network.logits_and_readout(torch.from_numpy(windows))
            return logits.numpy(), readout.numpy()

        return cls(infer)

    @property
    def model_id(self) -> str:
        """The checkpoint's id, with the back-end's where there is one: a PAD calibration
        holds for exactly the scores it was measured on."""
        return (
            judged_id(AASIST_MANIFEST.model_id) if self._backend is None else self._backend.model_id
        )

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def min_samples(self) -> int:
        return int(_MIN_SECONDS * SAMPLE_RATE)

    def score(self, waveform: Waveform) -> float:
        """Mean bona-fide logit over the windows that cover the check as the countermeasure
        judges it (models.countermeasure.judged_audio: its long pauses shortened)."""
        self._check(waveform)
        logits, _ = self._window_outputs(judged_audio(waveform))
        return float(np.mean(logits[:, BONA_FIDE_CLASS]))

    def evidence(self, waveform: Waveform) -> CountermeasureEvidence:
        """The mean bona-fide logit and the back-end's input (the windows' readouts with the
        check's spectral statistics), from one pass over the windows."""
        self._check(waveform)
        judged = judged_audio(waveform)
        logits, readouts = self._window_outputs(judged)
        return CountermeasureEvidence(
            float(np.mean(logits[:, BONA_FIDE_CLASS])), check_features(readouts, judged)
        )

    def channel_score(self, evidence: CountermeasureEvidence, channel: str) -> float:
        if self._backend is None:
            return evidence.raw_score
        return self._backend.score(channel, evidence.features, evidence.raw_score)

    def window_logits(self, waveform: Waveform) -> WindowLogits:
        """Logits of each window that covers the waveform, in order."""
        return self.window_outputs(waveform)[0]

    def window_outputs(self, waveform: Waveform) -> WindowOutputs:
        """Logits and readouts of each window that covers the waveform as it is, in order:
        the network's own outputs (`score` and `evidence` judge a check as
        models.countermeasure.judged_audio gives it)."""
        self._check(waveform)
        return self._window_outputs(waveform)

    def _check(self, waveform: Waveform) -> None:
        if waveform.ndim != 1:
            raise UnusableWaveformError(f"expected mono audio (1-D), got shape {waveform.shape}")
        if waveform.shape[0] < self.min_samples:
            raise UnusableWaveformError(
                f"audio too short for the countermeasure: {waveform.shape[0] / SAMPLE_RATE:.2f}"
                f" s, need at least {_MIN_SECONDS} s"
            )
        if not np.isfinite(waveform).all():
            raise UnusableWaveformError("audio contains NaN or infinite samples")

    def _window_outputs(self, waveform: Waveform) -> WindowOutputs:
        windows = windows_of(waveform, WINDOW_SAMPLES)
        # A few windows at a time: the network's activations grow with the batch, and a
        # minute of audio is 15 windows (tests/e2e/test_upload_memory.py bounds the RSS).
        parts = [
            self._infer(windows[start : start + _MAX_BATCH_WINDOWS])
            for start in range(0, len(windows), _MAX_BATCH_WINDOWS)
        ]
        return (
            np.concatenate([logits for logits, _ in parts]),
            np.concatenate([readout for _, readout in parts]),
        )


class _OpenVinoWindows:
    """The compiled network, with one infer request per calling thread (a request is not
    thread-safe; each runs on its own stream)."""

    def __init__(self, compiled: ov.CompiledModel) -> None:
        warm_up(compiled, np.zeros((1, WINDOW_SAMPLES), dtype=np.float32))
        self._compiled = compiled
        self._requests = threading.local()

    def __call__(self, windows: WindowBatch) -> WindowOutputs:
        request: ov.InferRequest | None = getattr(self._requests, "request", None)
        if request is None:
            request = self._compiled.create_infer_request()
            self._requests.request = request
        request.infer({0: windows})
        logits: WindowLogits = np.array(request.get_output_tensor(0).data, dtype=np.float32)
        readout: WindowReadouts = np.array(request.get_output_tensor(1).data, dtype=np.float32)
        return logits, readout


def _native_precision(core: ov.Core) -> str:
    """bfloat16 where the CPU computes in it natively, float32 elsewhere."""
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"
