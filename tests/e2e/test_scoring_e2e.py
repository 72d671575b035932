"""Score normalisation, calibration and thresholds set by a false-match rate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from models.embedder import Embedding
from server.config import ScoringPolicy
from server.errors import ConfigurationError
from server.pipeline.channel import Channel
from server.scoring.calibration import Calibration, Condition, fit_condition
from server.scoring.scorer import ScoringModel
from server.storage.interface import Voiceprint
from tests.support import (
    RunningServer,
    make_config,
)

DIMENSION = 192
RNG = np.random.default_rng(7)


def unit(vector: np.ndarray) -> Embedding:
    result: Embedding = (vector / np.linalg.norm(vector)).astype(np.float32)
    return result


def random_voices(count: int) -> np.ndarray:
    return np.array([unit(RNG.normal(size=DIMENSION)) for _ in range(count)], dtype=np.float64)


def synthetic_calibration(top_n: int = 10) -> Calibration:
    """Impostors score N(0, 1) and targets N(3, 1) at every length: the true LLR is
    3 s - 4.5."""
    target = RNG.normal(3.0, 1.0, 4000)
    impostor = RNG.normal(0.0, 1.0, 40000)
    seconds_t = RNG.uniform(3, 20, len(target))
    seconds_i = RNG.uniform(3, 20, len(impostor))
    fitted = fit_condition(target, seconds_t, impostor, seconds_i)
    return Calibration(
        "test-model", top_n, True, dict.fromkeys(Condition, fitted), {"speakers": []}
    )












def test_server_refuses_to_start_without_its_calibration(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    config = replace(make_config(tmp_path), scoring=ScoringPolicy(scoring_dir=tmp_path / "none"))
    with pytest.raises(ConfigurationError, match="no score calibration"):
        start_server(config)


def voiceprint(agent_id: str, embedding: Embedding, telephone: Embedding | None) -> Voiceprint:
    return Voiceprint(
        agent_id,
        "test-model",
        embedding,
        datetime(2026, 1, 1, tzinfo=UTC),
        2,
        20.0,
        telephone_embedding=telephone,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scoring_model() -> ScoringModel:
    return ScoringModel({c: random_voices(40) for c in Channel}, synthetic_calibration())








