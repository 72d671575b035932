"""Scoring a test against a voiceprint: cosine, AS-norm against the cohort of the channel,
calibrated log-likelihood ratio, and the threshold the policy's false-match rate sets.

The cohort and the calibration ship in models/scoring/ (made by `voxauth calibrate`); the
cohort can be extended with the enrolled agents' own voiceprints, the contact centre's own
population (ScoringPolicy.cohort_includes_agents).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import models
from models.embedder import Embedding
from server.config import ScoringPolicy
from server.errors import ConfigurationError
from server.pipeline.channel import Channel
from server.scoring.calibration import Calibration, Condition, DecidedBy, fit_tail
from server.scoring.normalization import (
    Cohort,
    CohortStatistics,
    Matrix,
    as_norm,
    as_norm_matrix,
    centre,
    cosine_for,
    top_n_statistics,
)
from server.storage.interface import Voiceprint

COHORT_FILE = "cohort.npz"
MAX_LOCAL_AGENTS = 400
"""400 agents give 159,600 comparisons, enough for a tail at 1 in 10,000."""
LOCAL_BOOTSTRAP_REPLICATES = 100
"""Fewer than calibrate's 200: the local fit reruns in the service as agents come and go."""
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Score:
    condition: Condition
    cosine: float
    normalized: float
    """AS-norm score."""
    llr: float
    """Calibrated log-likelihood ratio (natural log): > 0 favours the agent's voice."""
    normalized_threshold: float
    """The AS-norm score this check needed: the one the target false-match rate sets, or
    higher where an LLR floor asks for more (`decided_by`)."""
    decided_by: DecidedBy
    threshold: float
    """The cosine that reaches `normalized_threshold` for this voiceprint and this test: the
    decision is `cosine >= threshold`."""
    llr_threshold: float
    """The calibrated LLR at the threshold, at least the floors: the decision is also
    `llr >= llr_threshold`."""
    expected_false_non_match_rate: float
    """Share of the agent's own checks of this length expected to fall below the threshold."""

    @property
    def accepted(self) -> bool:
        return self.normalized >= self.normalized_threshold


class ScoringModel:
    """The shipped cohort (one per channel) and calibration."""

    def __init__(self, raw_cohorts: dict[Channel, Matrix], calibration: Calibration) -> None:
        """`raw_cohorts`: the cohort voices of each channel as the model embeds them."""
        self.calibration = calibration
        self._centres = {
            channel: voices.mean(axis=0) if calibration.centring else None
            for channel, voices in raw_cohorts.items()
        }
        self._cohorts = {
            channel: Cohort(self.prepare(voices, channel), calibration.cohort_top_n)
            for channel, voices in raw_cohorts.items()
        }

    def cohort(self, channel: Channel) -> Cohort:
        """The channel's cohort, prepared (see `prepare`)."""
        return self._cohorts[channel]

    def prepare(self, embeddings: npt.NDArray[np.floating[Any]], channel: Channel) -> Matrix:
        """Embeddings (rows, or one) as the scoring compares them: centred on the channel's
        mean cohort voice when the calibration was made so."""
        centre_of_channel = self._centres[channel]
        if centre_of_channel is None:
            return embeddings.astype(np.float64)
        return centre(embeddings.astype(np.float64), centre_of_channel)

    @classmethod
    def load(cls, policy: ScoringPolicy, model_id: str) -> ScoringModel:
        """Raises ConfigurationError when the files are missing or made for another model."""
        directory = policy.scoring_dir or default_scoring_dir()
        calibration = Calibration.load(directory / CALIBRATION_FILE, model_id)
        cohorts = load_cohorts(directory / COHORT_FILE, model_id)
        return cls(cohorts, calibration)


def default_scoring_dir() -> Path:
    """models/scoring/, where the shipped cohort and calibration live."""
    return Path(models.__file__).resolve().parent / "scoring"


def load_cohorts(path: Path, model_id: str) -> dict[Channel, Matrix]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_model = str(stored["model_id"])
            embeddings = {c: stored[c.value].astype(np.float64) for c in Channel}
    except FileNotFoundError:
        raise ConfigurationError(
            f"no score-normalisation cohort at {path}: it ships with voxauth (models/scoring/); "
            "`voxauth calibrate` remakes it"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigurationError(f"cannot read the cohort {path}: {exc}") from exc
    if stored_model != model_id:
        raise ConfigurationError(
            f"the cohort {path} was made with model {stored_model}, but this server runs "
            f"{model_id}: run `voxauth calibrate` for this model"
        )
    return embeddings


@dataclass(frozen=True, eq=False)
class _AgentVoices:
    """The enrolled agents' voiceprints of one channel."""

    agent_ids: npt.NDArray[np.str_]
    embeddings: Matrix


@dataclass(frozen=True, eq=False)
class _AgentCohort:
    voices: dict[Channel, _AgentVoices]
    loaded_at: float
    generation: int
    """Changes with every reload, so statistics against an older cohort are not reused."""


@dataclass(frozen=True)
class LocalThreshold:
    """The false-match threshold that the enrolled agents' own cross-comparisons set."""

    condition: Condition
    agents: int
    comparisons: int
    """Ordered pairs of different agents: N (N - 1)."""
    shipped: float
    """The shipped calibration's normalised threshold for the target false-match rate."""
    local: float | None
    """The upper bound from the agents' tail; None with fewer agents than the policy asks."""

    @property
    def applied(self) -> float:
        return self.shipped if self.local is None else max(self.shipped, self.local)


@dataclass(frozen=True, eq=False)
class _LocalThresholds:
    by_condition: dict[Condition, LocalThreshold]
    loaded_at: float


class Scorer:
    """Scores tests against voiceprints by the policy. Thread-safe.

    A voiceprint's cohort statistics depend only on the voiceprint and the cohort, so they are
    computed once and kept until either changes; a test's cost against the cohort is one
    cosine per cohort voice."""

    def __init__(
        self,
        model: ScoringModel,
        policy: ScoringPolicy,
        voiceprints: Callable[[], list[Voiceprint]],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model = model
        self._policy = policy
        self._voiceprints = voiceprints
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._agent_cohort: _AgentCohort | None = None
        self._local: _LocalThresholds | None = None
        self.target_fmr = policy.target_fmr
        self._enrollment_statistics: dict[
            tuple[str, Condition], tuple[tuple[datetime, int], CohortStatistics]
        ] = {}

    def score(
        self,
        voiceprint: Voiceprint,
        test: Embedding,
        test_net_speech_seconds: float,
        channel: Channel,
    ) -> Score:
        condition, enrolled = _condition(voiceprint, channel)
        reference = self._model.prepare(enrolled, condition.enrollment_channel)
        prepared = self._model.prepare(test, condition.test_channel)
        enrollment_cohort, test_cohort, generation = self._cohort_for(
            condition, voiceprint.agent_id
        )
        # One entry per agent and condition: a new voiceprint or cohort replaces it.
        key = (voiceprint.agent_id, condition)
        version = (voiceprint.created_at, generation)
        with self._lock:
            cached = self._enrollment_statistics.get(key)
        if cached is not None and cached[0] == version:
            enrollment = cached[1]
        else:
            enrollment = enrollment_cohort.statistics(reference)
            with self._lock:
                self._enrollment_statistics[key] = (version, enrollment)
        test_statistics = test_cohort.statistics(prepared)
        cosine = float(np.clip(np.dot(prepared, reference), -1.0, 1.0))
        normalized = as_norm(cosine, enrollment, test_statistics)
        calibration = self._model.calibration[condition]
        # Both sides' lengths limit how much the comparison can tell.
        seconds, enrolled_seconds = test_net_speech_seconds, voiceprint.net_speech_seconds
        local = self.local_thresholds()[condition]
        bound = calibration.bound(
            self._policy.target_fmr,
            seconds,
            enrollment_seconds=enrolled_seconds,
            min_llr=self._policy.min_llr,
            evidence_from_seconds=self._policy.evidence_from_seconds,
            local_fmr_threshold=local.local,
        )
        return Score(
            condition=condition,
            cosine=cosine,
            normalized=normalized,
            llr=calibration.llr(normalized, seconds, enrolled_seconds),
            normalized_threshold=bound.normalized,
            decided_by=bound.decided_by,
            threshold=cosine_for(bound.normalized, enrollment, test_statistics),
            llr_threshold=bound.llr,
            expected_false_non_match_rate=calibration.false_non_match_rate(
                bound.normalized, seconds, enrolled_seconds
            ),
        )

    def longest_calibrated(self, condition: Condition) -> tuple[float, float]:
        """(test, voiceprint): the longest net speech of each side the shipped calibration
        measured; longer speech is judged by its rule (server/scoring/calibration.py)."""
        return self._model.calibration[condition].longest_calibrated

    def normalized_threshold_at(self, condition: Condition, false_match_rate: float) -> float:
        """The AS-norm score the shipped calibration's impostor tail reaches with probability
        `false_match_rate` (its bootstrap upper bound): a 1:N search's per-comparison bound."""
        return self._model.calibration[condition].threshold(false_match_rate)

    def local_thresholds(self) -> dict[Condition, LocalThreshold]:
        """Per condition, the shipped threshold and the one from the enrolled agents' own
        voices (the contact centre's language, headsets and codecs): every agent's
        voiceprint scored as a test against every other agent's, AS-norm as a check is
        scored, the tail fitted and bounded as `voxauth calibrate` does. Recomputed from the
        current voiceprints at most every `cohort_refresh_seconds`; the scores themselves
        are dropped once fitted, so only the fitted lines stay in memory."""
        now = self._monotonic()
        with self._lock:
            current = self._local
        if current is not None and now - current.loaded_at < self._policy.cohort_refresh_seconds:
            return current.by_condition
        voiceprints = self._voiceprints() if self._policy.local_threshold_min_agents else []
        computed = _LocalThresholds(
            {c: self._local_threshold(c, voiceprints) for c in Condition}, now
        )
        with self._lock:
            self._local = computed
        return computed.by_condition

    def _local_threshold(
        self, condition: Condition, voiceprints: list[Voiceprint]
    ) -> LocalThreshold:
        calibration = self._model.calibration[condition]
        shipped = calibration.threshold(self._policy.target_fmr)

        def side(telephone: bool) -> list[tuple[str, Embedding]]:
            if telephone:
                return [
                    (v.agent_id, v.telephone_embedding)
                    for v in voiceprints
                    if v.telephone_embedding is not None
                ]
            return [(v.agent_id, v.embedding) for v in voiceprints]

        enrolled = dict(side(condition is Condition.TELEPHONE))
        tested = dict(side(condition is not Condition.WIDEBAND))
        # A fixed sample past MAX_LOCAL_AGENTS bounds the work (the bootstrap refits the tail
        # a hundred times); chosen by a hash so that it does not follow enrollment order.
        agents = sorted(
            enrolled.keys() & tested.keys(),
            key=lambda a: hashlib.sha256(a.encode()).digest(),
        )[:MAX_LOCAL_AGENTS]
        comparisons = len(agents) * (len(agents) - 1)
        if not agents or len(agents) < self._policy.local_threshold_min_agents:
            return LocalThreshold(condition, len(agents), comparisons, shipped, None)
        dimension = self._model.cohort(Channel.WIDEBAND).embeddings.shape[1]

        def prepared(voices: dict[str, Embedding], channel: Channel) -> Matrix:
            matrix = np.array([voices[a] for a in agents], dtype=np.float64)
            return self._model.prepare(matrix.reshape(len(agents), dimension), channel)

        e = prepared(enrolled, condition.enrollment_channel)
        t = prepared(tested, condition.test_channel)
        top_n = self._model.calibration.cohort_top_n
        e_stats = top_n_statistics(
            e @ self._model.cohort(condition.enrollment_channel).embeddings.T, top_n
        )
        t_stats = top_n_statistics(
            t @ self._model.cohort(condition.test_channel).embeddings.T, top_n
        )
        scores = as_norm_matrix(e @ t.T, e_stats, t_stats)
        names = np.array(agents, dtype=np.str_)
        others = ~np.eye(len(agents), dtype=bool)
        tail = fit_tail(
            scores[others],
            np.broadcast_to(names[:, None], scores.shape)[others],
            np.broadcast_to(names[None, :], scores.shape)[others],
            replicates=LOCAL_BOOTSTRAP_REPLICATES,
        )
        return LocalThreshold(
            condition, len(agents), comparisons, shipped, tail.score_at(self._policy.target_fmr)
        )

    def _cohort_for(self, condition: Condition, agent_id: str) -> tuple[Cohort, Cohort, int]:
        """The enrollment-side and test-side cohorts, and a number that changes whenever they
        do. With the agents' voiceprints included, the claimed agent's own is left out: it
        is not a stranger to its own voice."""
        shipped_enrollment = self._model.cohort(condition.enrollment_channel)
        shipped_test = self._model.cohort(condition.test_channel)
        if not self._policy.cohort_includes_agents:
            return shipped_enrollment, shipped_test, 0
        agents = self._agents()

        def extended(shipped: Cohort, channel: Channel) -> Cohort:
            voices = agents.voices[channel]
            return shipped.extended(voices.embeddings[voices.agent_ids != agent_id])

        return (
            extended(shipped_enrollment, condition.enrollment_channel),
            extended(shipped_test, condition.test_channel),
            agents.generation,
        )

    def _agents(self) -> _AgentCohort:
        now = self._monotonic()
        with self._lock:
            current = self._agent_cohort
        if current is not None and now - current.loaded_at < self._policy.cohort_refresh_seconds:
            return current
        voiceprints = self._voiceprints()
        dimension = self._model.cohort(Channel.WIDEBAND).embeddings.shape[1]

        def voices(pairs: list[tuple[str, Embedding]], channel: Channel) -> _AgentVoices:
            matrix = np.array([e for _, e in pairs], dtype=np.float64)
            return _AgentVoices(
                np.array([agent for agent, _ in pairs], dtype=np.str_),
                self._model.prepare(matrix.reshape(len(pairs), dimension), channel),
            )

        generation = current.generation + 1 if current is not None else 1
        agents = _AgentCohort(
            voices={
                Channel.WIDEBAND: voices(
                    [(v.agent_id, v.embedding) for v in voiceprints], Channel.WIDEBAND
                ),
                Channel.TELEPHONE: voices(
                    [
                        (v.agent_id, v.telephone_embedding)
                        for v in voiceprints
                        if v.telephone_embedding is not None
                    ],
                    Channel.TELEPHONE,
                ),
            },
            loaded_at=now,
            generation=generation,
        )
        with self._lock:
            self._agent_cohort = agents
        return agents


def _condition(voiceprint: Voiceprint, channel: Channel) -> tuple[Condition, Embedding]:
    if channel is Channel.WIDEBAND:
        return Condition.WIDEBAND, voiceprint.embedding
    if voiceprint.telephone_embedding is not None:
        return Condition.TELEPHONE, voiceprint.telephone_embedding
    # Enrolled before companion voiceprints existed: scored across channels, calibrated so.
    return Condition.WIDEBAND_TO_TELEPHONE, voiceprint.embedding
