"""Score normalisation: adaptive symmetric normalisation (AS-norm) against a cohort.

A raw cosine means different things for different voices: some voiceprints sit close to many
other voices, some tests sound like many people. AS-norm measures each side against the
cohort voices it is most similar to (the top N) and expresses the score in those units, from
both sides:

    s = ((cos - mean_e) / std_e + (cos - mean_t) / std_t) / 2

where mean_e, std_e are the mean and standard deviation of the voiceprint's N highest cosines
with the cohort, and mean_t, std_t the same for the test. Impostor scores then have roughly
the same distribution for every voiceprint and every test, so one threshold sets one
false-match rate (Matejka et al., "Analysis of score normalization in multilingual speaker
recognition", Interspeech 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]

# A voice whose top-N cosines are all equal would divide by zero; no real cohort gets here.
_MIN_STD = 1e-3


@dataclass(frozen=True)
class CohortStatistics:
    """Where one embedding stands against the cohort."""

    mean: float
    std: float


class Cohort:
    """The cohort voices of one channel, as L2-normalised embeddings (rows)."""

    def __init__(self, embeddings: Matrix, top_n: int) -> None:
        if embeddings.ndim != 2 or len(embeddings) < 2:
            raise ValueError("a cohort needs at least two embeddings")
        self.embeddings = embeddings
        self.top_n = min(top_n, len(embeddings))

    def __len__(self) -> int:
        return len(self.embeddings)

    def extended(self, more: Matrix) -> Cohort:
        """This cohort with more voices (the enrolled agents'), same top N."""
        if len(more) == 0:
            return self
        return Cohort(np.concatenate([self.embeddings, more]), self.top_n)

    def statistics(self, embedding: npt.NDArray[np.floating[Any]]) -> CohortStatistics:
        means, stds = top_n_statistics(
            embedding[None, :].astype(np.float64) @ self.embeddings.T, self.top_n
        )
        return CohortStatistics(float(means[0]), float(stds[0]))


def centre(embeddings: Matrix, mean: Matrix) -> Matrix:
    """Embeddings (rows, or one vector) less the channel's mean voice, L2-normalised again.

    Every embedding of a channel shares a component that is the channel's, not the voice's
    (strongest in the telephone band, where all voices sound more alike to the model);
    removing it before the cosine leaves more of what tells voices apart."""
    shifted = embeddings - mean
    centred: Matrix = shifted / np.linalg.norm(shifted, axis=-1, keepdims=True)
    return centred


def top_n_statistics(
    cohort_scores: Matrix, top_n: int, exclude: npt.NDArray[np.bool_] | None = None
) -> tuple[Matrix, Matrix]:
    """Mean and standard deviation of each row's `top_n` highest cosines with the cohort,
    leaving out the entries marked in `exclude` (a cohort voice of the same speaker)."""
    scores = cohort_scores if exclude is None else np.where(exclude, -np.inf, cohort_scores)
    top = -np.partition(-scores, top_n - 1, axis=1)[:, :top_n]
    return top.mean(axis=1), np.maximum(top.std(axis=1), _MIN_STD)


def as_norm(cosine: float, enrollment: CohortStatistics, test: CohortStatistics) -> float:
    return 0.5 * ((cosine - enrollment.mean) / enrollment.std + (cosine - test.mean) / test.std)


def cosine_for(normalized: float, enrollment: CohortStatistics, test: CohortStatistics) -> float:
    """The cosine whose AS-norm score is `normalized`, for this voiceprint and this test:
    `as_norm` solved for the cosine (it is linear in it)."""
    slope = 0.5 * (1 / enrollment.std + 1 / test.std)
    offset = 0.5 * (enrollment.mean / enrollment.std + test.mean / test.std)
    return (normalized + offset) / slope


def as_norm_matrix(
    cosines: Matrix,
    enrollment: tuple[Matrix, Matrix],
    test: tuple[Matrix, Matrix],
) -> Matrix:
    """`as_norm` for every (enrollment row, test column) of a score matrix."""
    (mean_e, std_e), (mean_t, std_t) = enrollment, test
    normalized: Matrix = 0.5 * (
        (cosines - mean_e[:, None]) / std_e[:, None] + (cosines - mean_t[None, :]) / std_t[None, :]
    )
    return normalized
