"""Cohort and calibration files for a fake speaker model, so a server with a fake embedder can
start (the shipped ones are for the real model, and a server refuses files of another)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.config import ScoringPolicy
from server.scoring.calibration import (
    Calibration,
    Condition,
    ConditionCalibration,
    LinearInQuality,
    ScoreModel,
    TailModel,
)
from server.scoring.scorer import CALIBRATION_FILE, COHORT_FILE


def fake_scoring(directory: Path, model_id: str, dimension: int) -> ScoringPolicy:
    directory.mkdir(parents=True, exist_ok=True)
    condition = ConditionCalibration(
        llr_weights=(-4.0, 1.0, 0.0, 0.0),
        impostor=TailModel(0.0, 1.0, 0.01),
        target=ScoreModel(LinearInQuality(8.0, 0.0), LinearInQuality(1.0, 0.0)),
        quality_range=(1.0, 3.0),
        target_trials=1,
        impostor_trials=1,
    )
    calibration = Calibration(model_id, 2, False, dict.fromkeys(Condition, condition), {})
    (directory / CALIBRATION_FILE).write_text(calibration.to_json())
    voices = np.eye(dimension, dtype=np.float32)[:3]
    np.savez(
        directory / COHORT_FILE,
        model_id=np.array(model_id),
        wideband=voices,
        telephone=voices,
    )
    return ScoringPolicy(scoring_dir=directory)
