"""The attack corpus's transforms on small synthetic signals: each does what its attack stands
for, and the same seed gives the same audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.embedder import Waveform
from server.pipeline.channel import Channel
from server.tools import attack_corpus as corpus
from server.tools.attack_corpus import Split, item_rng, split_of
from server.tools.calibrate import is_calibration_speaker

RATE = 16_000


def _voiced(seconds: float = 1.0, f0: float = 140.0) -> Waveform:
    """A vowel-like signal: harmonics of `f0` under a falling envelope, with a little noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    harmonics = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 25) if k * f0 < 7000)
    noise = np.random.default_rng(1).normal(size=len(t)) * 0.01
    signal: Waveform = (0.1 * harmonics + noise).astype(np.float32)
    return signal


def _tone(hz: float, seconds: float = 1.0) -> Waveform:
    t = np.arange(int(seconds * RATE)) / RATE
    tone: Waveform = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return tone


def _band_energy(x: Waveform, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_splits_are_fixed_by_speaker_and_test_is_what_eval_holds_out() -> None:
    speakers = [str(n) for n in range(1, 400)]
    splits = {s: split_of(s) for s in speakers}
    assert all((splits[s] is Split.TEST) == (not is_calibration_speaker(s)) for s in speakers)
    counts = {split: list(splits.values()).count(split) for split in Split}
    assert all(count > 80 for count in counts.values())
    # Pinned: the splits of the shared LibriSpeech set must not move between versions.
    assert [split_of(s) for s in ("103", "1034", "1040")] == [
        Split.CALIBRATION,
        Split.TEST,
        Split.TEST,
    ]


def test_each_item_has_its_own_reproducible_random_choices() -> None:
    first = item_rng(0, "103", "replay").random(4)
    np.testing.assert_array_equal(first, item_rng(0, "103", "replay").random(4))
    assert not np.array_equal(first, item_rng(0, "103", "world").random(4))
    assert not np.array_equal(first, item_rng(1, "103", "replay").random(4))


@pytest.mark.parametrize(
    "attack",
    [corpus.replay, corpus.world_resynthesis, corpus.griffin_lim, corpus.voice_conversion],
    ids=lambda a: a.__name__,
)
def test_signal_attacks_keep_the_length_and_repeat_exactly(attack: corpus.Attack) -> None:
    speech = _voiced()
    first, params = attack(speech, item_rng(0, "1", "x"))
    again, same_params = attack(speech, item_rng(0, "1", "x"))
    assert first.shape == speech.shape
    assert first.dtype == np.float32
    assert np.isfinite(first).all()
    assert corpus.rms(first) > 0.1 * corpus.rms(speech)
    np.testing.assert_array_equal(first, again)
    assert params == same_params


def test_loudspeaker_loses_the_low_band() -> None:
    low, mid = _tone(60.0), _tone(1000.0)
    rng = item_rng(0, "1", "speaker")
    played_low, _ = corpus.loudspeaker(low + mid, rng)
    before = _band_energy(low + mid, 40, 80) / _band_energy(low + mid, 900, 1100)
    after = _band_energy(played_low, 40, 80) / _band_energy(played_low, 900, 1100)
    assert 10 * np.log10(after / before) < -20


def test_room_capture_adds_a_reverberant_tail() -> None:
    click = np.zeros(RATE, np.float32)
    click[1000] = 1.0
    captured, params = corpus.room_capture(click, item_rng(0, "1", "room"))
    tail = captured[1000 + int(0.05 * RATE) : 1000 + int(0.3 * RATE)]
    # 50 ms to 300 ms after the click: reflections, well above the microphone noise floor.
    noise_floor = corpus.rms(captured[-2000:])
    assert corpus.rms(tail) > 3 * noise_floor
    assert 0.15 <= params["rt60_s"] <= 0.7


@pytest.mark.parametrize("codec", ["mp3", "opus"])
def test_codecs_keep_the_signal_and_its_length(codec: str) -> None:
    speech = _voiced()
    decoded, params = corpus.coded(speech, codec, item_rng(0, "1", codec))
    assert decoded.shape == speech.shape
    assert params["codec"] == codec
    spectrum = np.abs(np.fft.rfft(decoded))
    original = np.abs(np.fft.rfft(speech))
    # Codec delay shifts the waveform; the magnitude spectrum stays.
    assert np.corrcoef(spectrum, original)[0, 1] > 0.9


def test_envelope_warp_moves_formants_by_the_factor() -> None:
    envelope = np.ones((3, 101))
    envelope[:, 20] = 10.0
    np.testing.assert_array_equal(corpus.warp_envelope(envelope, 1.0), envelope)
    assert np.argmax(corpus.warp_envelope(envelope, 1.5)[0]) == 30
    assert np.argmax(corpus.warp_envelope(envelope, 0.5)[0]) == 10


def test_conversion_shifts_the_pitch_by_its_semitones() -> None:
    import pyworld

    speech = _voiced(seconds=1.0, f0=140.0)
    converted, params = corpus.voice_conversion(speech, item_rng(0, "1", "conversion"))
    f0, _ = pyworld.dio(converted.astype(np.float64), RATE)
    measured = np.median(f0[f0 > 0])
    assert measured == pytest.approx(140.0 * 2 ** (params["semitones"] / 12), rel=0.05)


def test_level_is_matched_and_limited() -> None:
    loud = _tone(440.0) * 3
    matched = corpus.at_level(loud, 0.05)
    assert corpus.rms(matched) == pytest.approx(0.05, rel=1e-3)
    assert np.abs(corpus.at_level(loud, 2.0)).max() <= 1.0


def test_sentences_are_distinct_and_enough_for_the_length() -> None:
    text = corpus.sentences(item_rng(0, "1", "espeak"), 8.0)
    chosen = [s for s in corpus.SENTENCES if s in text]
    assert len(chosen) == 3
    assert text == corpus.sentences(item_rng(0, "1", "espeak"), 8.0)


def test_phoneme_ids_frame_each_symbol_and_keep_punctuation() -> None:
    symbols = {"_": [0], "^": [1], "$": [2], " ": [3], ",": [8], ".": [10], "a": [20], "b": [21]}
    ids = corpus.phoneme_ids("ab x, ba.", symbols, lambda clause: clause.strip().replace("x", "?"))
    # "ab x" -> a b (space) and "?" unknown to the voice; "," then a space; "ba"; ".".
    assert ids == [1, 0, 20, 0, 21, 0, 3, 0, 8, 0, 3, 0, 21, 0, 20, 0, 10, 0, 3, 0, 2]


def _source(folder: Path) -> Path:
    folder.mkdir()
    for speaker, f0 in (("103", 120.0), ("1034", 210.0)):
        sf.write(folder / f"{speaker}-1-0000.flac", _voiced(1.5, f0), RATE, subtype="PCM_16")
    return folder


def test_build_makes_every_kind_in_both_channels_reproducibly(tmp_path: Path) -> None:
    source = _source(tmp_path / "source")
    kinds = ("replay", "world", "griffin-lim", "conversion")
    first = corpus.build(
        source, tmp_path / "a", seed=3, max_seconds=1.0, kinds=kinds, line_share=0.0
    )
    corpus.build(source, tmp_path / "b", seed=3, max_seconds=1.0, kinds=kinds, line_share=0.0)
    # Per speaker: genuine, genuine sent as MP3 or Opus, and each attack, in both channels.
    assert len(first) == 2 * (2 + len(kinds)) * 2
    assert {(i.speaker, i.split) for i in first} == {
        ("103", Split.CALIBRATION),
        ("1034", Split.TEST),
    }
    assert {(i.kind, i.channel) for i in first} == {
        (kind, channel) for kind in (*corpus.GENUINE_KINDS, *kinds) for channel in Channel
    }
    assert [i.as_json() for i in corpus.load_items(tmp_path / "a")] == [i.as_json() for i in first]
    for item in first:
        audio, rate = sf.read(tmp_path / "a" / item.path, dtype="float32")
        assert rate == RATE
        assert len(audio) == RATE  # cut to max_seconds
        assert (tmp_path / "a" / item.path).read_bytes() == (
            tmp_path / "b" / item.path
        ).read_bytes()
    telephone = next(i for i in first if i.channel is Channel.TELEPHONE and i.kind == "world")
    audio, _ = sf.read(tmp_path / "a" / telephone.path, dtype="float32")
    assert _band_energy(audio, 4200, 8000) < 1e-4 * _band_energy(audio, 0, 4000)


def test_line_conditions_fall_on_genuine_items_and_attacks_alike(tmp_path: Path) -> None:
    source = _source(tmp_path / "source")
    kinds = ("replay", "world")
    plain = corpus.build(
        source, tmp_path / "plain", seed=3, max_seconds=1.0, kinds=kinds, line_share=0.0
    )
    lined = corpus.build(
        source, tmp_path / "lined", seed=3, max_seconds=1.0, kinds=kinds, line_share=0.5
    )
    again = corpus.build(
        source, tmp_path / "again", seed=3, max_seconds=1.0, kinds=kinds, line_share=0.5
    )
    assert [i.path for i in plain] == [i.path for i in lined]
    with_line = [i for i in lined if "line" in i.params]
    # Both sides carry conditions (8 of 16 items here with this seed).
    assert {i.kind in corpus.GENUINE_KINDS for i in with_line} == {True, False}
    for before, after, repeat in zip(plain, lined, again, strict=True):
        made = (tmp_path / "lined" / after.path).read_bytes()
        assert made == (tmp_path / "again" / repeat.path).read_bytes()
        # An item without a condition is the item of a corpus without any.
        if "line" not in after.params:
            assert made == (tmp_path / "plain" / before.path).read_bytes()
            assert after.params == before.params
        else:
            assert after.params["line"]["condition"] in corpus.LINE_CONDITIONS


@pytest.mark.parametrize("condition", corpus.LINE_CONDITIONS)
def test_each_line_condition_adds_what_it_names(condition: str) -> None:
    speech = np.concatenate([_voiced(1.0), np.zeros(RATE // 4, np.float32), _voiced(1.0, 180.0)])
    rng = next(
        item_rng(0, "s", f"line{n}")
        for n in range(200)
        if str(item_rng(0, "s", f"line{n}").choice(corpus.LINE_CONDITIONS)) == condition
    )
    out, params = corpus.line_condition(speech, rng)
    assert params["condition"] == condition
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    if condition == "pauses":
        added = sum(params["pause_seconds"])
        assert len(out) == len(speech) + sum(int(s * RATE) for s in params["pause_seconds"])
        assert 1.5 <= added <= 15.0
        return
    assert len(out) == len(speech)
    added_signal = out - speech
    if condition == "hum":
        mains = params["mains_hz"]
        assert _band_energy(added_signal, mains - 2, mains + 2) > 0.2 * _band_energy(
            added_signal, 0, 8000
        )
    elif condition == "rumble":
        assert _band_energy(added_signal, 0, 300) > 0.95 * _band_energy(added_signal, 0, 8000)
    elif condition == "hiss":
        assert _band_energy(added_signal, 2000, 8000) > 0.95 * _band_energy(added_signal, 0, 8000)
    # The level follows the draw: at least 6 dB under the speech.
    assert corpus.rms(added_signal) < 0.51 * corpus.rms(speech)


def test_summary_rates_each_attack_against_bona_fide_of_its_channel(tmp_path: Path) -> None:
    def item(kind: str, channel: Channel, n: int) -> corpus.Item:
        return corpus.Item(f"{kind}/{n}", str(n), Split.CALIBRATION, channel, kind, "x", {})

    scores = {item(corpus.BONA_FIDE, Channel.WIDEBAND, n): 1.0 + n for n in range(4)}
    scores |= {item("replay", Channel.WIDEBAND, n): -1.0 - n for n in range(4)}
    scores |= {item("espeak", Channel.WIDEBAND, n): 2.0 + n for n in range(4)}
    rows = {row.kind: row for row in corpus.summarise(scores)}
    assert rows["replay"].eer == 0.0
    assert rows["espeak"].eer is not None and rows["espeak"].eer > 0.5
    assert rows[corpus.BONA_FIDE].eer is None
    assert rows["replay"].below_zero.errors == 4
    assert "replay" in corpus.report(list(rows.values()))


@pytest.mark.parametrize("share", ["-0.1", "1.5", "nan", "half"])
def test_a_line_share_outside_0_to_1_is_refused_before_anything_is_built(
    share: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        corpus.main(["build", str(tmp_path), str(tmp_path / "out"), "--line-share", share])
    assert exited.value.code == 2
    assert "--line-share" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
