"""Building a voiceprint from enrollment utterances: consistency check, then aggregation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.embedder import Embedding
from server.storage.interface import UtteranceRecord


@dataclass(frozen=True)
class RejectedUtterance:
    utterance: UtteranceRecord
    reason: str


@dataclass(frozen=True)
class ConsistencyResult:
    accepted: list[UtteranceRecord]
    rejected: list[RejectedUtterance]
    undecided: bool
    """True when two utterances disagree and nothing tells which one is the agent."""


def mean_embedding(utterances: list[UtteranceRecord]) -> Embedding:
    """L2-normalised mean of the embeddings, weighted by net speech: a long utterance carries
    more evidence about the voice than a short one."""
    return _weighted_mean([u.embedding for u in utterances], utterances)


def companion_embedding(utterances: list[UtteranceRecord]) -> Embedding | None:
    """The telephone-band companion of `mean_embedding(utterances)`, made the same way from
    the utterances' telephone embeddings; None if one of them has none (stored before
    companions existed), as a companion of part of the speech would not match."""
    telephone = [u.telephone_embedding for u in utterances]
    if not telephone or any(e is None for e in telephone):
        return None
    return _weighted_mean([e for e in telephone if e is not None], utterances)


def _weighted_mean(embeddings: list[Embedding], utterances: list[UtteranceRecord]) -> Embedding:
    weights = np.array([u.net_speech_seconds for u in utterances], dtype=np.float64)
    stacked = np.stack([e.astype(np.float64) for e in embeddings])
    mean = (weights[:, None] * stacked).sum(axis=0) / weights.sum()
    norm = float(np.linalg.norm(mean))
    voiceprint: Embedding = (mean / norm if norm > 0.0 else mean).astype(np.float32)
    return voiceprint


def check_consistency(utterances: list[UtteranceRecord], threshold: float) -> ConsistencyResult:
    """Drops, one at a time, the utterance that agrees least with the mean of the others, while
    that agreement is below `threshold`.

    Removing the worst one first matters: an impostor's utterance drags the mean of the others
    down for every genuine utterance, so judging all of them in one pass would reject good ones.
    """
    remaining = list(utterances)
    rejected: list[RejectedUtterance] = []
    while len(remaining) >= 2:
        scores = [
            float(np.dot(u.embedding, mean_embedding(remaining[:i] + remaining[i + 1 :])))
            for i, u in enumerate(remaining)
        ]
        worst = int(np.argmin(scores))
        if scores[worst] >= threshold:
            break
        if len(remaining) == 2:
            # Two voices that disagree: either could be the agent's. Keep both and ask for
            # more speech rather than guess.
            return ConsistencyResult(accepted=remaining, rejected=rejected, undecided=True)
        outlier = remaining.pop(worst)
        rejected.append(
            RejectedUtterance(
                outlier,
                f"does not match the agent's other utterances (similarity {scores[worst]:.2f} "
                f"< {threshold:.2f}): most likely another speaker",
            )
        )
    return ConsistencyResult(accepted=remaining, rejected=rejected, undecided=False)
