"""The attack corpus's telephone paths: the simulated one is the call formats 1 and 2 made,
the varied ones differ from it and from each other, none leaves anything above the telephone
band, and the held-out resamplers are never drawn for a varied corpus."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.embedder import Waveform
from server.pipeline.channel import Channel
from server.pipeline.decode import telephone_channel
from server.tools import attack_corpus as corpus
from server.tools import telephone_paths as paths

RATE = 16_000


def _speechlike(seconds: float = 1.0) -> Waveform:
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * RATE)) / RATE
    harmonics = sum(np.sin(2 * np.pi * k * 130.0 * t) / k for k in range(1, 60))
    signal: Waveform = (0.05 * harmonics + 0.01 * rng.normal(size=len(t))).astype(np.float32)
    return signal


def _band_energy(x: Waveform, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_the_simulated_path_is_the_call_of_earlier_corpora() -> None:
    audio = _speechlike()
    made, params = paths.telephone_path(audio, paths.SIMULATED, np.random.default_rng(0))
    assert params is None
    assert np.array_equal(made, telephone_channel(audio))


@pytest.mark.parametrize("path_set", [paths.VARIED, paths.HELD_OUT])
def test_a_drawn_path_is_a_band_limited_call_of_the_same_length_and_repeats(
    path_set: str,
) -> None:
    audio = _speechlike()
    for seed in range(8):
        made, params = paths.telephone_path(audio, path_set, np.random.default_rng(seed))
        again, same = paths.telephone_path(audio, path_set, np.random.default_rng(seed))
        assert params == same and np.array_equal(made, again)
        assert len(made) == len(audio) and made.dtype == np.float32
        assert np.abs(made).max() <= 1.0
        assert params is not None and params["codec"] in ("mulaw", "alaw")
        # Nothing above the 8 kHz call's band but the upsampler's leakage.
        assert _band_energy(made, 4200, 8000) < 1e-3 * _band_energy(made, 0, 4000)


def test_varied_paths_differ_and_never_use_the_held_out_resamplers() -> None:
    audio = _speechlike()
    drawn = {
        paths.VARIED: set[str](),
        paths.HELD_OUT: set[str](),
    }
    outputs = []
    for seed in range(40):
        for path_set, methods in drawn.items():
            made, params = paths.telephone_path(audio, path_set, np.random.default_rng(seed))
            assert params is not None
            methods.add(params["resampling"]["downsampler"])
            if path_set == paths.VARIED and seed < 4:
                outputs.append(made)
    assert drawn[paths.VARIED] == set(paths.VARIED_DOWNSAMPLERS)
    assert drawn[paths.HELD_OUT] == set(paths.HELD_OUT_DOWNSAMPLERS)
    assert not set(paths.VARIED_DOWNSAMPLERS) & set(paths.HELD_OUT_DOWNSAMPLERS)
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(outputs))


def test_an_unknown_path_set_or_resampler_is_refused() -> None:
    with pytest.raises(ValueError, match="telephone paths"):
        paths.telephone_path(_speechlike(), "satellite", np.random.default_rng(0))
    with pytest.raises(ValueError, match="downsampler"):
        paths.downsampled(_speechlike(), "nearest", np.random.default_rng(0))


def test_a_varied_corpus_changes_only_its_telephone_items(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for speaker in ("103", "1034"):
        sf.write(source / f"{speaker}-1-0000.flac", _speechlike(1.5), RATE, subtype="PCM_16")
    kinds = ("world",)
    plain = corpus.build(source, tmp_path / "plain", seed=3, max_seconds=1.0, kinds=kinds)
    varied = corpus.build(
        source,
        tmp_path / "varied",
        seed=3,
        max_seconds=1.0,
        kinds=kinds,
        telephone_paths=paths.VARIED,
    )
    assert [i.path for i in plain] == [i.path for i in varied]
    for before, after in zip(plain, varied, strict=True):
        made = (tmp_path / "varied" / after.path).read_bytes()
        if after.channel is Channel.WIDEBAND:
            assert made == (tmp_path / "plain" / before.path).read_bytes()
            assert after.params == before.params
        else:
            assert made != (tmp_path / "plain" / before.path).read_bytes()
            assert after.params["telephone"]["codec"] in ("mulaw", "alaw")
            assert "telephone" not in before.params
