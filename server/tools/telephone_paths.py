"""Ways a 16 kHz recording reaches the service as a G.711 call, for the attack corpus.

Why more than one: a PAD back-end fitted on items that all passed one simulated call
(`server.pipeline.decode.telephone_channel`: the service's own resampler, mu-law, at the item's
level) learnt that simulation. A genuine recording brought to 8 kHz by another resampler and
sent as real u-law scored -6.7 against a threshold of -2.3 (README, "Why telephone keeps the raw
score"). Real calls differ in exactly those steps: the phone or gateway's anti-alias filter,
the network's 300-3400 Hz channel filter (ITU-T G.712), mu-law or A-law, and the level the line
carries. So a "varied" corpus draws each telephone item's path at random from several of each,
the same odds for genuine items and attacks, and a "held-out" corpus uses resamplers the varied
one never does, to measure what a back-end fitted on the varied one does on paths it never saw.

Every path ends as the service decodes a call: G.711 bytes at 8 kHz through
`server.pipeline.decode.decode_audio`, so the upsampling back to 16 kHz is always the service's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.embedder import Waveform
from server.pipeline.decode import (
    G711_RATE,
    TARGET_RATE,
    AudioEncoding,
    decode_audio,
    encode_alaw,
    encode_mulaw,
    resampled,
    telephone_channel,
)

Rng = np.random.Generator

SIMULATED = "simulated"
"""The one path of corpus formats 1 and 2: `telephone_channel`, unchanged."""
VARIED = "varied"
HELD_OUT = "held-out"
PATH_SETS = (SIMULATED, VARIED, HELD_OUT)

VARIED_DOWNSAMPLERS = ("service", "torchaudio-hann", "scipy-kaiser", "scipy-iir")
HELD_OUT_DOWNSAMPLERS = ("scipy-poly", "fft")
"""scipy's `resample_poly` with its default window (how the project's end-to-end tests make a
call, and the case that refused the earlier telephone back-end) and an FFT resampler: neither is
drawn for a varied corpus."""


def downsampled(waveform: Waveform, method: str, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """`waveform` (16 kHz) at 8 kHz by `method`, and the parameters drawn for it."""
    from scipy import signal

    samples = waveform.astype(np.float64)
    params: dict[str, Any] = {"downsampler": method}
    if method == "service":
        out = resampled(np.ascontiguousarray(waveform, np.float32), TARGET_RATE, G711_RATE)
    elif method == "torchaudio-hann":
        import torch
        import torchaudio.functional

        width = int(rng.integers(6, 33))
        rolloff = float(rng.uniform(0.85, 0.99))
        out = torchaudio.functional.resample(
            torch.from_numpy(samples.astype(np.float32)),
            TARGET_RATE,
            G711_RATE,
            lowpass_filter_width=width,
            rolloff=rolloff,
            resampling_method="sinc_interp_hann",
        ).numpy()
        params |= {"width": width, "rolloff": round(rolloff, 3)}
    elif method == "scipy-kaiser":
        beta = float(rng.uniform(3.0, 10.0))
        out = signal.resample_poly(samples, 1, 2, window=("kaiser", beta))
        params["beta"] = round(beta, 2)
    elif method == "scipy-iir":
        order = int(rng.integers(4, 9))
        out = signal.decimate(samples, 2, n=order, ftype="iir", zero_phase=True)
        params["order"] = order
    elif method == "scipy-poly":
        out = signal.resample_poly(samples, 1, 2)
    elif method == "fft":
        out = signal.resample(samples, len(samples) // 2)
    else:
        raise ValueError(f"unknown downsampler {method!r}")
    result: Waveform = np.clip(out, -1.0, 1.0).astype(np.float32)
    return result, params


def channel_filter(waveform: Waveform, rng: Rng) -> tuple[Waveform, dict[str, Any]]:
    """The network's voice-band filter (ITU-T G.712: about 300-3400 Hz), at 16 kHz."""
    from scipy.signal import butter, sosfilt

    low = float(rng.uniform(200, 320))
    high = float(rng.uniform(3300, 3700))
    order = int(rng.integers(2, 6))
    sos = np.concatenate(
        [
            butter(order, low, "highpass", fs=TARGET_RATE, output="sos"),
            butter(order * 2, high, "lowpass", fs=TARGET_RATE, output="sos"),
        ]
    )
    out: Waveform = sosfilt(sos, waveform.astype(np.float64)).astype(np.float32)
    return out, {"band_hz": [round(low), round(high)], "order": order}


def telephone_path(
    waveform: Waveform, path_set: str, rng: Rng
) -> tuple[Waveform, dict[str, Any] | None]:
    """`waveform` (16 kHz) as the service hears it after a G.711 call of `path_set`, and the
    path drawn (None for SIMULATED, whose items are those of corpus formats 1 and 2)."""
    if path_set == SIMULATED:
        return telephone_channel(waveform), None
    if path_set not in PATH_SETS:
        raise ValueError(f"unknown telephone paths {path_set!r}")
    methods = VARIED_DOWNSAMPLERS if path_set == VARIED else HELD_OUT_DOWNSAMPLERS
    params: dict[str, Any] = {}
    # The line's level: a call is rarely at the recording's; mu-law and A-law quantise
    # relative to full scale, so the level changes what the codec does.
    gain_db = float(rng.uniform(-12.0, 4.0))
    audio = np.clip(waveform * np.float32(10 ** (gain_db / 20)), -1.0, 1.0).astype(np.float32)
    params["gain_db"] = round(gain_db, 1)
    if rng.random() < 0.5:
        audio, params["channel_filter"] = channel_filter(audio, rng)
    narrowband, params["resampling"] = downsampled(audio, str(rng.choice(methods)), rng)
    law = str(rng.choice(["mulaw", "alaw"]))
    if law == "mulaw":
        data, encoding = encode_mulaw(narrowband), AudioEncoding.MULAW
    else:
        data, encoding = encode_alaw(narrowband), AudioEncoding.ALAW
    params["codec"] = law
    seconds = len(narrowband) / G711_RATE + 1.0
    decoded = decode_audio(data, encoding, G711_RATE, max_seconds=seconds)
    return decoded.waveform, params
