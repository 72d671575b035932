"""The PAD back-end's recipe: logistic regression that finds the boundary, models put on the
genuine items' scale out of fold, folds by speaker, fitting on the fit split only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.pipeline.channel import Channel
from server.tools.attack_corpus import BONA_FIDE, CORPUS_FILE, Item, Split
from server.tools.pad_backend_fit import (
    ItemFeatures,
    fit_backend,
    fit_channel,
    fit_logistic,
    fold_of,
)


def test_logistic_regression_finds_a_known_boundary() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 3))
    truth = np.array([2.0, -1.0, 0.0])
    y = (rng.random(2000) < 1 / (1 + np.exp(-(x @ truth + 0.5)))).astype(float)
    weights, bias = fit_logistic(x, y, np.ones(len(y)), penalty=1e-6)
    assert weights == pytest.approx(truth, abs=0.25)
    assert bias == pytest.approx(0.5, abs=0.2)


def _items(speakers: int, rng: np.random.Generator) -> list[tuple[Item, ItemFeatures]]:
    """Genuine items around +1 and replays around -1 in the first feature, noise elsewhere."""
    examples = []
    for n in range(speakers):
        for kind, centre in ((BONA_FIDE, 1.0), ("replay", -1.0)):
            item = Item(f"fit/wideband/{kind}/{n}.flac", f"s{n}", Split.FIT, Channel.WIDEBAND,
                        kind, "", {})  # fmt: skip
            features = rng.standard_normal(4) + np.array([centre, 0, 0, 0]) * 2
            examples.append((item, ItemFeatures(0.0, features)))
    return examples


def test_a_channel_model_is_on_the_genuine_scale_and_separates() -> None:
    examples = _items(200, np.random.default_rng(1))
    model, details = fit_channel(examples)
    scores = np.array([model.score(f.features) for _, f in examples])
    genuine = np.array([i.kind == BONA_FIDE for i, _ in examples])
    # Standardised on held-out genuine scores: about mean 0, sd 1 on genuine items.
    assert np.mean(scores[genuine]) == pytest.approx(0.0, abs=0.3)
    assert np.std(scores[genuine]) == pytest.approx(1.0, abs=0.3)
    assert np.mean(scores[~genuine]) < -2
    assert details["speakers"] == 200
    assert set(details["cross_validated_loss"]) == {"0.3", "1", "3", "10", "30", "100"}


def test_folds_keep_a_speaker_together_and_are_spread() -> None:
    folds = [fold_of(f"s{n}") for n in range(500)]
    assert fold_of("s7") == fold_of("s7")
    assert set(folds) == {0, 1, 2, 3, 4}
    assert min(folds.count(k) for k in range(5)) > 60


def test_the_backend_is_fitted_on_the_fit_split_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    examples = _items(60, rng)
    items = [i for i, _ in examples]
    found = {i.path: f for i, f in examples}
    # Calibration and test items that would wreck the model if they were fitted on.
    for n in range(60):
        for split in (Split.CALIBRATION, Split.TEST):
            item = Item(f"{split.value}/wideband/replay/{n}.flac", f"o{n}", split,
                        Channel.WIDEBAND, "replay", "", {})  # fmt: skip
            items.append(item)
            found[item.path] = ItemFeatures(0.0, np.array([50.0, 0, 0, 0]))
    # The telephone channel: the same items again.
    for item, features in examples:
        copy = Item(item.path.replace("wideband", "telephone"), item.speaker, Split.FIT,
                    Channel.TELEPHONE, item.kind, "", {})  # fmt: skip
        items.append(copy)
        found[copy.path] = features
    document = {
        "format": 1,
        "seed": 0,
        "max_seconds": 8.0,
        "source": "x",
        "items": [i.as_json() for i in items],
    }
    (tmp_path / CORPUS_FILE).write_text(json.dumps(document))
    fitted = fit_backend(tmp_path, [found], "aasist@test")
    assert set(fitted["channels"]) == {"wideband", "telephone"}
    assert set(fitted["channels"]["wideband"]) == {"replay"}
    assert len(fitted["provenance"]["speakers"]) == 60
    assert fitted["provenance"]["fit"]["wideband"]["replay"]["items"] == 120
