"""The countermeasure's own code without its weights: how a check is covered by windows, the
AASIST adapter's handling of audio it cannot score, and the network's fixed sinc front end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.aasist import (
    READOUT_DIM,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    Aasist,
    _pooled_bands,
    exported_network,
    sinc_filter_bank,
)
from models.aasist_countermeasure import AasistCountermeasure, WindowOutputs
from models.countermeasure import (
    LONGEST_PAUSE_SECONDS,
    CountermeasureEvidence,
    WindowBatch,
    judged_audio,
    judged_id,
    on_pcm16_grid,
    pause_runs,
    shortened_pauses,
    window_starts,
    windows_of,
)
from models.errors import ModelFilesError, UnusableWaveformError
from models.manifest import AASIST_MANIFEST
from models.pad_backend import (
    BACKEND_FORMAT,
    SPECTRAL_DIM,
    LinearModel,
    PadBackEnd,
    spectral_features,
)


@pytest.mark.parametrize(
    ("samples", "window", "starts"),
    [
        (10, 10, [0]),
        (4, 10, [0]),
        (11, 10, [0, 1]),
        (20, 10, [0, 10]),
        (25, 10, [0, 8, 15]),
        (128_000, WINDOW_SAMPLES, [0, 63_400]),
    ],
)
def test_fewest_windows_cover_the_audio_evenly(
    samples: int, window: int, starts: list[int]
) -> None:
    assert window_starts(samples, window) == starts


def test_every_sample_is_in_some_window() -> None:
    for samples in range(10, 200):
        covered = np.zeros(samples, bool)
        for start in window_starts(samples, 10):
            assert 0 <= start <= samples - 10
            covered[start : start + 10] = True
        assert covered.all()


def test_short_audio_is_repeated_to_fill_one_window() -> None:
    audio = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(windows_of(audio, 10), [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]])


def test_windows_are_the_audio_at_their_starts() -> None:
    audio = np.arange(25, dtype=np.float32)
    batch = windows_of(audio, 10)
    assert batch.dtype == np.float32
    assert batch.shape == (3, 10)
    np.testing.assert_array_equal(batch[:, 0], [0, 8, 15])
    np.testing.assert_array_equal(batch[-1], audio[15:])


class _RecordingNetwork:
    """Stands in for the network: bona-fide logit = the window's first sample; the readout
    is that sample too, READOUT_DIM times."""

    def __init__(self) -> None:
        self.batches: list[WindowBatch] = []

    def __call__(self, windows: WindowBatch) -> WindowOutputs:
        self.batches.append(windows)
        logits = np.stack([-windows[:, 0], windows[:, 0]], axis=1).astype(np.float32)
        readouts = np.repeat(windows[:, :1], READOUT_DIM, axis=1).astype(np.float32)
        return logits, readouts


def test_score_is_the_mean_bona_fide_logit_over_the_windows() -> None:
    network = _RecordingNetwork()
    countermeasure = AasistCountermeasure(network)
    audio = np.zeros(2 * WINDOW_SAMPLES + 1, np.float32)
    audio[0], audio[-WINDOW_SAMPLES] = 0.3, 0.9  # the first and the last window's first samples
    # The fake network's logit is a window's first sample; the windows are those of the audio
    # as the countermeasure judges it (its long pauses shortened).
    firsts = windows_of(judged_audio(audio), WINDOW_SAMPLES)[:, 0]
    assert countermeasure.score(audio) == pytest.approx(float(np.mean(firsts)))
    assert firsts == pytest.approx([0.3, 0.0, 0.9], abs=0.05)
    # In batches of at most two windows, which bounds the network's memory on long audio.
    assert [batch.shape for batch in network.batches] == [
        (2, WINDOW_SAMPLES),
        (1, WINDOW_SAMPLES),
    ]


def test_evidence_carries_the_raw_score_and_the_backends_input() -> None:
    audio = np.zeros(2 * WINDOW_SAMPLES + 1, np.float32)
    audio[0], audio[-WINDOW_SAMPLES] = 0.3, 0.9
    evidence = AasistCountermeasure(_RecordingNetwork()).evidence(audio)
    mean_first = float(np.mean(windows_of(judged_audio(audio), WINDOW_SAMPLES)[:, 0]))
    assert evidence.raw_score == pytest.approx(mean_first)
    assert evidence.features.shape == (READOUT_DIM + SPECTRAL_DIM,)
    # The readout part is the mean over the windows.
    assert evidence.features[:READOUT_DIM] == pytest.approx(np.full(READOUT_DIM, mean_first))


DIM = READOUT_DIM + SPECTRAL_DIM


def _model(weight: float, bias: float) -> dict[str, object]:
    return LinearModel(np.zeros(DIM), np.ones(DIM), np.full(DIM, weight), bias).as_json()


def _backend_document(**channels: dict[str, dict[str, object]]) -> dict[str, object]:
    return {
        "format": BACKEND_FORMAT,
        "countermeasure_id": AASIST_MANIFEST.model_id,
        "channels": channels,
    }


def test_a_backend_scores_the_lowest_kind_per_channel_and_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "backend.json"
    document = _backend_document(
        wideband={"replay": _model(1.0, 0.5), "world": _model(2.0, 0.0)},
        telephone={"replay": _model(-1.0, 0.5)},
    )
    path.write_text(json.dumps(document))
    backend = PadBackEnd.load(path, AASIST_MANIFEST.model_id, DIM)
    countermeasure = AasistCountermeasure(_RecordingNetwork()).with_backend(backend)
    assert countermeasure.model_id.startswith(AASIST_MANIFEST.model_id + "+pad-backend@")
    evidence = CountermeasureEvidence(0.0, np.full(DIM, -0.01))
    total = -0.01 * DIM
    # The check is as genuine as its worst kind says: world's 2 x total is below replay's.
    assert backend.scores("wideband", evidence.features) == pytest.approx(
        {"replay": total + 0.5, "world": 2 * total}
    )
    assert countermeasure.channel_score(evidence, "wideband") == pytest.approx(2 * total)
    assert countermeasure.channel_score(evidence, "telephone") == pytest.approx(-total + 0.5)
    # Without one, the raw score is the channel's score.
    assert AasistCountermeasure(_RecordingNetwork()).channel_score(evidence, "wideband") == 0.0
    # Another file is another model id, so a calibration made for this one cannot load.
    document["channels"]["wideband"]["replay"]["bias"] = 0.6  # type: ignore[index]
    path.write_text(json.dumps(document))
    assert PadBackEnd.load(path, AASIST_MANIFEST.model_id, DIM).model_id != backend.model_id


@pytest.mark.parametrize(
    "change",
    [
        {"format": "other"},
        {"countermeasure_id": "someone/else@1"},
        {"channels": {"wideband": {"replay": {}}}},
        {"channels": {"wideband": {}, "telephone": {}}},
        {"channels": "x"},
    ],
)
def test_a_broken_or_foreign_backend_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    kinds = {"replay": _model(0.0, 0.0)}
    path = tmp_path / "backend.json"
    path.write_text(json.dumps({**_backend_document(wideband=kinds, telephone=kinds), **change}))
    with pytest.raises(ModelFilesError):
        PadBackEnd.load(path, AASIST_MANIFEST.model_id, DIM)


def test_a_backend_with_a_wrong_width_or_non_finite_values_is_refused(tmp_path: Path) -> None:
    entry = _model(0.0, 0.0)
    weights = entry["weights"]
    assert isinstance(weights, list)
    for broken in (
        {**entry, "weights": weights[:-1]},
        {**entry, "scale": [0.0] * DIM},
        {**entry, "mean": ["nan"] * DIM},
    ):
        path = tmp_path / "backend.json"
        document = _backend_document(wideband={"replay": entry}, telephone={"replay": broken})
        path.write_text(json.dumps(document))
        with pytest.raises(ModelFilesError):
            PadBackEnd.load(path, AASIST_MANIFEST.model_id, DIM)


def test_spectral_features_are_finite_and_blind_to_the_level() -> None:
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(3 * SAMPLE_RATE).astype(np.float32) * 0.1
    loud, quiet = spectral_features(noise), spectral_features(noise * 0.01)
    assert loud.shape == (SPECTRAL_DIM,)
    assert np.isfinite(loud).all()
    # Only the first cepstrum (the level) moves with the gain; the shapes do not.
    assert loud[1:] == pytest.approx(quiet[1:], abs=1e-3)
    for hostile in (np.zeros(10, np.float32), np.zeros(SAMPLE_RATE, np.float32)):
        assert np.isfinite(spectral_features(hostile)).all()
    # A long upload is summarised by its first 20 s: bounded memory per call.
    minute = rng.standard_normal(60 * SAMPLE_RATE).astype(np.float32) * 0.1
    assert spectral_features(minute) == pytest.approx(spectral_features(minute[: 20 * SAMPLE_RATE]))


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros(SAMPLE_RATE - 1, np.float32), "too short for the countermeasure"),
        (np.zeros((2, SAMPLE_RATE), np.float32), "mono"),
        (np.full(SAMPLE_RATE, np.nan, np.float32), "NaN"),
    ],
)
def test_unusable_audio_is_refused_before_the_network(audio: np.ndarray, message: str) -> None:
    network = _RecordingNetwork()
    with pytest.raises(UnusableWaveformError, match=message):
        AasistCountermeasure(network).score(audio)
    assert network.batches == []


def _gain_db(taps: np.ndarray, hz: float) -> float:
    response = np.abs(np.sum(taps * np.exp(-2j * np.pi * hz / SAMPLE_RATE * np.arange(len(taps)))))
    return float(20 * np.log10(max(response, 1e-12)))


def test_sinc_filters_pass_their_own_mel_band_and_stop_distant_ones() -> None:
    bank = sinc_filter_bank().numpy().astype(np.float64)
    assert bank.shape == (70, 129)
    np.testing.assert_allclose(bank, bank[:, ::-1], atol=1e-7)  # symmetric: linear phase
    mel_edges = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 71)
    edges = 700 * (10 ** (mel_edges / 2595) - 1)
    grid = np.arange(0.0, 8000.0, 5.0)
    for index in (5, 35, 60):
        response = [_gain_db(bank[index], hz) for hz in grid]
        # The peak is at the filter's own band (within what 129 taps resolve, about 120 Hz),
        # and ten bands higher the filter is far below it.
        assert edges[index] - 120 <= grid[int(np.argmax(response))] <= edges[index + 1] + 120
        assert _gain_db(bank[index], edges[index + 10]) < max(response) - 40
    assert _gain_db(bank[60], (edges[60] + edges[61]) / 2) > -3


@pytest.mark.parametrize("shape", [(2, 70, 64_472), (1, 70, 301), (1, 6, 9), (3, 8, 10)])
def test_front_end_pooling_is_the_published_3_by_3_pool(shape: tuple[int, int, int]) -> None:
    """The export's time-first pooling (format 4) gives exactly the published network's
    2-D pool, also where the filters or the samples do not divide by 3."""
    torch.manual_seed(1)
    bank = torch.randn(*shape).abs()
    expected = torch.nn.functional.max_pool2d(bank.unsqueeze(1), (3, 3))
    assert torch.equal(_pooled_bands(bank), expected)


def test_network_maps_a_batch_of_windows_to_two_logits_each() -> None:
    torch.manual_seed(0)
    network = Aasist().eval()
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    with torch.no_grad():
        logits = network(torch.randn(2, WINDOW_SAMPLES) * 0.1)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_missing_export_names_the_command_that_makes_it(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError) as raised:
        exported_network(tmp_path)
    assert "countermeasure network" in raised.value.message
    assert f"voxauth fetch-model --countermeasure-dir {tmp_path}" in raised.value.message


# --- long pauses ------------------------------------------------------------------------------


def _talk(*parts: tuple[str, float], seed: int = 0) -> np.ndarray:
    """Speech-like bursts ("speech": loud noise modulated at a syllable rate) and pauses
    ("pause": faint line noise), in order, at 16 kHz."""
    rng = np.random.default_rng(seed)
    pieces = []
    for kind, seconds in parts:
        n = int(seconds * SAMPLE_RATE)
        if kind == "speech":
            syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * np.arange(n) / SAMPLE_RATE)
            pieces.append(0.1 * rng.standard_normal(n) * syllables)
        else:
            pieces.append(10 ** (-65 / 20) * rng.standard_normal(n))
    return np.concatenate(pieces).astype(np.float32)


def test_a_check_without_long_pauses_is_judged_as_it_is() -> None:
    audio = _talk(("speech", 3.0), ("pause", 0.8), ("speech", 3.0))
    assert shortened_pauses(audio) is audio
    # Nothing but noise (no spread between quiet and loud) and digital silence: unchanged.
    noise = _talk(("speech", 5.0))
    assert shortened_pauses(noise) is noise
    silence = np.zeros(5 * SAMPLE_RATE, np.float32)
    assert shortened_pauses(silence) is silence


def test_long_pauses_are_cut_to_the_longest_kept_and_the_speech_stays() -> None:
    first, second = _talk(("speech", 3.0), seed=1), _talk(("speech", 2.0), seed=2)
    pause = _talk(("pause", 6.0), seed=3)
    lead = _talk(("pause", 3.0), seed=4)
    audio = np.concatenate([lead, first, pause, second])
    judged = shortened_pauses(audio)
    longest = max(end - start for start, end in pause_runs(judged))
    assert longest <= LONGEST_PAUSE_SECONDS * SAMPLE_RATE + 320
    # Two pauses (the leading one and the middle one) of 3 s and 6 s, each now about 1 s.
    assert len(judged) / SAMPLE_RATE == pytest.approx(len(audio) / SAMPLE_RATE - 7.0, abs=0.1)
    # Every speech sample is still there, in order: the cuts fall inside the pauses.
    assert np.isin(first, judged).all() and np.isin(second, judged).all()
    start = int(np.flatnonzero(judged == first[0])[0])
    np.testing.assert_array_equal(judged[start : start + len(first)], first)


def test_the_countermeasure_judges_a_check_with_its_pauses_shortened() -> None:
    network = _RecordingNetwork()
    countermeasure = AasistCountermeasure(network)
    audio = np.concatenate(
        [_talk(("speech", 2.5)), _talk(("pause", 8.0)), _talk(("speech", 2.5), seed=5)]
    )
    evidence = countermeasure.evidence(audio)
    judged = judged_audio(audio)
    # 13 s as it arrived would be four windows; with the pause at 1 s, 6 s are two.
    assert sum(len(batch) for batch in network.batches) == len(windows_of(judged, WINDOW_SAMPLES))
    assert sum(len(batch) for batch in network.batches) == 2
    assert countermeasure.score(audio) == pytest.approx(evidence.raw_score)
    assert evidence.features[READOUT_DIM:] == pytest.approx(spectral_features(judged))
    # The network's own outputs stay those of the audio as given (its reference tests).
    assert len(countermeasure.window_outputs(audio)[0]) == 4


def test_scores_judged_another_way_have_another_id(tmp_path: Path) -> None:
    """A back-end fitted on checks judged with their pauses (the id without the suffix) is
    refused: its scores were measured on audio of another form."""
    assert judged_id(AASIST_MANIFEST.model_id) != AASIST_MANIFEST.model_id
    path = tmp_path / "backend.json"
    path.write_text(json.dumps(_backend_document(wideband={"replay": _model(1.0, 0.0)})))
    with pytest.raises(ModelFilesError, match="fitted on"):
        PadBackEnd.load(path, judged_id(AASIST_MANIFEST.model_id), DIM)


def test_the_countermeasure_judges_audio_on_the_16_bit_grid() -> None:
    """A G.711 call decoded and resampled in floating point holds almost nothing in its quiet
    frames and top band, where every corpus item holds 16-bit rounding noise; the back-end read
    that as an attack (a genuine recording sent as u-law scored -36.6 against -2.36). On the
    grid, 16-bit audio is unchanged and decoded audio carries the same rounding as the corpus."""
    from server.pipeline.decode import AudioEncoding, decode_audio, encode_mulaw

    rng = np.random.default_rng(3)
    pcm16 = (rng.integers(-3000, 3000, 16_000) / 32768).astype(np.float32)
    assert np.array_equal(on_pcm16_grid(pcm16), pcm16)
    narrowband = (0.1 * np.sin(np.arange(8_000) * 0.3)).astype(np.float32)
    call = decode_audio(encode_mulaw(narrowband), AudioEncoding.MULAW, 8_000, max_seconds=2)
    assert not np.array_equal(np.round(call.waveform * 32768), call.waveform * 32768)
    judged = judged_audio(call.waveform)
    assert np.array_equal(np.round(judged * 32768), judged * 32768)
    assert np.abs(judged - call.waveform).max() <= 0.5 / 32768 + 1e-9
    assert judged_id("w").endswith("+pcm16")
