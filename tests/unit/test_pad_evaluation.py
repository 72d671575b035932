"""The PAD figures of `voxauth attacks calibrate` and `evaluate`: thresholds from the
calibration split's genuine items only, and APCER/BPCER counted at the per-channel threshold."""

from __future__ import annotations

import pytest

from server.pipeline.channel import Channel
from server.tools.attack_corpus import BONA_FIDE, Item, Split
from server.tools.pad_backend_fit import pad_calibration
from server.tools.pad_evaluation import line_rates, pad_rates


def item(n: int, split: Split, channel: Channel, kind: str, line: str | None = None) -> Item:
    params = {} if line is None else {"line": {"condition": line}}
    return Item(
        f"{split.value}/{channel.value}/{kind}/{n}.flac", str(n), split, channel, kind, "", params
    )


def test_calibration_uses_only_the_genuine_items_of_the_calibration_split() -> None:
    scores = {}
    for n, value in enumerate([1.0, 2.0, 3.0]):
        for channel in Channel:
            scores[item(n, Split.CALIBRATION, channel, BONA_FIDE)] = value
            # Neither attacks nor other splits may move the thresholds.
            scores[item(n, Split.CALIBRATION, channel, "replay")] = -50.0
            scores[item(n, Split.TEST, channel, BONA_FIDE)] = 99.0
    document = pad_calibration(scores, "model", {}, score="test")
    for channel in Channel:
        entry = document["channels"][channel.value]
        assert entry["count"] == 3
        assert entry["genuine_mean"] == pytest.approx(2.0)
        assert entry["genuine_sd"] == pytest.approx(1.0)


def test_apcer_and_bpcer_are_counted_at_the_channels_threshold() -> None:
    thresholds = {Channel.WIDEBAND: 0.0, Channel.TELEPHONE: -1.0}
    scores = {
        item(1, Split.TEST, Channel.WIDEBAND, BONA_FIDE): -0.5,  # refused
        item(2, Split.TEST, Channel.WIDEBAND, BONA_FIDE): 0.0,  # at the threshold: passes
        item(3, Split.TEST, Channel.WIDEBAND, "world"): 0.5,  # an attack that passes
        item(4, Split.TEST, Channel.WIDEBAND, "world"): -3.0,
        item(5, Split.TEST, Channel.TELEPHONE, BONA_FIDE): -0.5,  # passes on the telephone
    }
    rows = {(r.channel, r.kind): r.rate for r in pad_rates(scores, thresholds)}
    assert (rows[Channel.WIDEBAND, BONA_FIDE].errors, rows[Channel.WIDEBAND, BONA_FIDE].trials) == (
        1,
        2,
    )
    assert (rows[Channel.WIDEBAND, "world"].errors, rows[Channel.WIDEBAND, "world"].trials) == (
        1,
        2,
    )
    assert rows[Channel.TELEPHONE, BONA_FIDE].errors == 0


def test_line_conditions_are_counted_on_both_sides_apart() -> None:
    thresholds = {Channel.WIDEBAND: 0.0, Channel.TELEPHONE: 0.0}
    scores = {
        item(1, Split.TEST, Channel.WIDEBAND, BONA_FIDE, "hum"): -0.5,  # refused for its hum
        item(2, Split.TEST, Channel.WIDEBAND, BONA_FIDE, "hum"): 1.0,
        item(3, Split.TEST, Channel.WIDEBAND, "replay", "hum"): 0.5,  # hum hid a replay
        item(4, Split.TEST, Channel.WIDEBAND, "world", "hum"): -1.0,
        item(5, Split.TEST, Channel.WIDEBAND, BONA_FIDE): 1.0,
        item(6, Split.TEST, Channel.WIDEBAND, "world"): -1.0,
    }
    rows = {(r.channel, r.condition): r for r in line_rates(scores, thresholds)}
    assert set(rows) == {(Channel.WIDEBAND, "hum"), (Channel.WIDEBAND, "none")}
    hum = rows[Channel.WIDEBAND, "hum"]
    assert (hum.bpcer.errors, hum.bpcer.trials, hum.apcer.errors, hum.apcer.trials) == (1, 2, 1, 2)
    plain = rows[Channel.WIDEBAND, "none"]
    assert (plain.bpcer.errors, plain.apcer.errors) == (0, 0)
