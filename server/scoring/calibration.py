"""Calibration: what a normalised score means, made from measurement (`voxauth calibrate`).

For each scoring condition (wideband voiceprint and test, wideband voiceprint and telephone
test, telephone companion voiceprint and telephone test) the calibration holds:

- a logistic regression from the AS-norm score and the trial's net speech to a calibrated
  log-likelihood ratio (natural log): llr = w0 + w1 s + w2 q + w3 s q, with q the log of the
  shorter side's net speech, so a 3 s check and a 20 s check are both calibrated;
- the upper tail of the impostor AS-norm scores, from which a target false-match rate
  becomes a threshold: the scores of the top 1% of impostor trials against their normal
  deviates (a straight line on a DET plot's axis), extrapolated below what the trials can
  show. AS-norm makes the impostor scores nearly independent of the speech's length (see
  models/scoring/README.md), so one threshold holds for every length; the tail is fitted
  rather than taken as Gaussian because it is heavier (skew 0.2-0.4: a Gaussian fit puts
  the threshold for 1 in 10,000 where 1 in 1,000 impostors pass);
- a Gaussian model of the target AS-norm scores, mean and standard deviation linear in q,
  from which the expected false-non-match rate at that threshold follows.

q is held to the range the calibration saw: longer speech is judged as the longest measured.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from server.errors import ConfigurationError
from server.pipeline.channel import Channel

Vector = npt.NDArray[np.float64]

FORMAT = "voxauth-calibration/1"
_STANDARD_NORMAL = NormalDist()
# A Gaussian's standard deviation fitted over q must stay positive where it is used.
_MIN_STD = 1e-3
TAIL_FRACTION = 0.01
"""The share of impostor trials, highest first, that the tail model is fitted on."""


class Condition(enum.Enum):
    """Which voiceprint meets which test."""

    WIDEBAND = "wideband"
    """The wideband voiceprint and a wideband test."""
    WIDEBAND_TO_TELEPHONE = "wideband-to-telephone"
    """The wideband voiceprint and a telephone test: a voiceprint without a companion."""
    TELEPHONE = "telephone"
    """The telephone companion voiceprint and a telephone test."""

    @property
    def enrollment_channel(self) -> Channel:
        return Channel.TELEPHONE if self is Condition.TELEPHONE else Channel.WIDEBAND

    @property
    def test_channel(self) -> Channel:
        return Channel.WIDEBAND if self is Condition.WIDEBAND else Channel.TELEPHONE


@dataclass(frozen=True)
class LinearInQuality:
    """intercept + slope * q."""

    intercept: float
    slope: float

    def at(self, quality: float) -> float:
        return self.intercept + self.slope * quality


@dataclass(frozen=True)
class ScoreModel:
    """A Gaussian whose mean and standard deviation depend on q."""

    mean: LinearInQuality
    std: LinearInQuality

    def at(self, quality: float) -> tuple[float, float]:
        return self.mean.at(quality), max(self.std.at(quality), _MIN_STD)


@dataclass(frozen=True)
class TailModel:
    """score = intercept + slope * z at the false-match rate p with z = Phi^-1(1 - p), and
    the same line refitted on bootstrap samples of the speakers: the threshold is the upper
    confidence bound over those, so it is conservative where the tail rests on few voices."""

    intercept: float
    slope: float
    fitted_below: float
    """The largest p of the impostor trials it was fitted on."""
    replicates: tuple[tuple[float, float], ...] = ()
    """(intercept, slope) of each bootstrap sample; none: the point fit alone."""
    confidence: float = 0.95
    """The share of the bootstrap thresholds that the threshold is at least."""

    def point_at(self, false_match_rate: float) -> float:
        return self.intercept + self.slope * _STANDARD_NORMAL.inv_cdf(1.0 - false_match_rate)

    def score_at(self, false_match_rate: float) -> float:
        point = self.point_at(false_match_rate)
        if not self.replicates:
            return point
        z = _STANDARD_NORMAL.inv_cdf(1.0 - false_match_rate)
        sampled = [intercept + slope * z for intercept, slope in self.replicates]
        return max(point, float(np.quantile(sampled, self.confidence)))


class DecidedBy(enum.Enum):
    """Which of the bounds an ACCEPT must clear was the highest, and so decided."""

    FMR_THRESHOLD = "FMR_THRESHOLD"
    """The score that impostors reach at the target false-match rate."""
    LOCAL_FMR_THRESHOLD = "LOCAL_FMR_THRESHOLD"
    """The score the enrolled agents reach against each other at the target rate, where it
    is above the shipped one (ScoringPolicy.local_threshold_min_agents)."""
    LLR_FLOOR = "LLR_FLOOR"
    """The policy's least LLR (ScoringPolicy.min_llr): no ACCEPT against the evidence."""
    DURATION_FLOOR = "DURATION_FLOOR"
    """The LLR a check of ScoringPolicy.evidence_from_seconds needs at the false-match
    threshold, where that ordering is on: a longer check never needs a lower LLR."""


@dataclass(frozen=True)
class Bound:
    """What an ACCEPT of one length needs: `normalized` on the AS-norm scale, `llr` on the
    calibrated one (the same point), and which bound set them."""

    normalized: float
    llr: float
    decided_by: DecidedBy


@dataclass(frozen=True)
class ConditionCalibration:
    llr_weights: tuple[float, float, float, float]
    """w0..w3 of llr = w0 + w1 s + w2 q + w3 s q."""
    impostor: TailModel
    target: ScoreModel
    quality_range: tuple[float, float]
    """The q the calibration trials covered; q outside is held to it."""
    target_trials: int
    impostor_trials: int

    def quality(self, net_speech_seconds: float) -> float:
        low, high = self.quality_range
        return min(max(math.log(max(net_speech_seconds, 1e-3)), low), high)

    def llr(self, score: float, net_speech_seconds: float) -> float:
        q = self.quality(net_speech_seconds)
        w0, w1, w2, w3 = self.llr_weights
        return w0 + w1 * score + w2 * q + w3 * score * q

    def score_for_llr(self, llr: float, net_speech_seconds: float) -> float:
        """The normalised score whose calibrated LLR is `llr` at this length (the LLR rises
        with the score at every calibrated length: `load` refuses a calibration where not)."""
        q = self.quality(net_speech_seconds)
        w0, w1, w2, w3 = self.llr_weights
        return (llr - w0 - w2 * q) / (w1 + w3 * q)

    def threshold(self, target_fmr: float) -> float:
        """The normalised score that impostors reach with probability `target_fmr`."""
        return self.impostor.score_at(target_fmr)

    def bound(
        self,
        target_fmr: float,
        net_speech_seconds: float,
        *,
        min_llr: float,
        evidence_from_seconds: float,
        local_fmr_threshold: float | None = None,
    ) -> Bound:
        """The highest of the false-match threshold, the LLR floor, and (unless
        `evidence_from_seconds` is 0) the LLR a check of `evidence_from_seconds` needs at the
        false-match threshold. The LLR at a fixed score
        is linear in q, so the most any length between `evidence_from_seconds` and this one
        needs there is at one of the two ends."""
        fmr_threshold = self.threshold(target_fmr)
        by = DecidedBy.FMR_THRESHOLD
        # The deployment's own impostors, where they are stricter than the shipped tail.
        if local_fmr_threshold is not None and local_fmr_threshold > fmr_threshold:
            fmr_threshold, by = local_fmr_threshold, DecidedBy.LOCAL_FMR_THRESHOLD
        floors = [
            (self.llr(fmr_threshold, net_speech_seconds), by),
            (min_llr, DecidedBy.LLR_FLOOR),
        ]
        if 0 < evidence_from_seconds < net_speech_seconds:
            floors.append(
                (self.llr(fmr_threshold, evidence_from_seconds), DecidedBy.DURATION_FLOOR)
            )
        # Ties go to the false-match threshold: a floor decides only where it asks for more.
        llr, decided_by = max(floors, key=lambda floor: floor[0])
        if decided_by is by:
            return Bound(fmr_threshold, llr, decided_by)
        return Bound(self.score_for_llr(llr, net_speech_seconds), llr, decided_by)

    def false_non_match_rate(self, threshold: float, net_speech_seconds: float) -> float:
        """Expected share of genuine checks of this length scoring below `threshold`."""
        mean, std = self.target.at(self.quality(net_speech_seconds))
        return _STANDARD_NORMAL.cdf((threshold - mean) / std)


@dataclass(frozen=True)
class Calibration:
    model_id: str
    cohort_top_n: int
    centring: bool
    """Embeddings are centred on their channel's mean cohort voice before scoring."""
    conditions: dict[Condition, ConditionCalibration]
    provenance: dict[str, Any]
    """How it was made: command, data, split, trial counts. Informational."""

    def __getitem__(self, condition: Condition) -> ConditionCalibration:
        return self.conditions[condition]

    def to_json(self) -> str:
        document = {
            "format": FORMAT,
            "model_id": self.model_id,
            "cohort_top_n": self.cohort_top_n,
            "centring": self.centring,
            "conditions": {c.value: asdict(cal) for c, cal in self.conditions.items()},
            "provenance": self.provenance,
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path, model_id: str) -> Calibration:
        """Raises ConfigurationError when the file is missing, unreadable, or made for
        another speaker model (its scores would mean nothing for this one)."""
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(
                f"no score calibration at {path}: it ships with voxauth (models/scoring/); "
                "`voxauth calibrate` remakes it"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the score calibration {path}: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConfigurationError(f"{path} is not a voxauth calibration ({FORMAT})")
        if document["model_id"] != model_id:
            raise ConfigurationError(
                f"the score calibration {path} was made for model {document['model_id']}, "
                f"but this server runs {model_id}: run `voxauth calibrate` for this model"
            )
        try:
            conditions = {
                condition: _condition_from(document["conditions"][condition.value])
                for condition in Condition
            }
            for condition, calibrated in conditions.items():
                w1, w3 = calibrated.llr_weights[1], calibrated.llr_weights[3]
                # A higher score must always mean more evidence, or no LLR floor is a score.
                if min(w1 + w3 * q for q in calibrated.quality_range) <= 0:
                    raise ValueError(f"{condition.value}: the LLR falls with the score")
            return cls(
                model_id=model_id,
                cohort_top_n=int(document["cohort_top_n"]),
                centring=bool(document["centring"]),
                conditions=conditions,
                provenance=dict(document.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"the score calibration {path} is incomplete: {exc}") from exc


def _condition_from(fields: dict[str, Any]) -> ConditionCalibration:
    target = ScoreModel(
        mean=LinearInQuality(**fields["target"]["mean"]),
        std=LinearInQuality(**fields["target"]["std"]),
    )

    w0, w1, w2, w3 = (float(w) for w in fields["llr_weights"])
    low, high = (float(q) for q in fields["quality_range"])
    return ConditionCalibration(
        llr_weights=(w0, w1, w2, w3),
        impostor=_tail_from(fields["impostor"]),
        target=target,
        quality_range=(low, high),
        target_trials=int(fields["target_trials"]),
        impostor_trials=int(fields["impostor_trials"]),
    )


def _tail_from(fields: dict[str, Any]) -> TailModel:
    return TailModel(
        intercept=float(fields["intercept"]),
        slope=float(fields["slope"]),
        fitted_below=float(fields["fitted_below"]),
        replicates=tuple((float(a), float(b)) for a, b in fields.get("replicates", ())),
        confidence=float(fields.get("confidence", 0.95)),
    )


# --- fitting (voxauth calibrate) ---------------------------------------------------------------


def fit_condition(
    target: Vector, target_seconds: Vector, impostor: Vector, impostor_seconds: Vector
) -> ConditionCalibration:
    """Calibration from normalised scores of target and impostor trials and each trial's
    shorter net speech."""
    q_target, q_impostor = np.log(target_seconds), np.log(impostor_seconds)
    quality_range = (
        float(min(q_target.min(), q_impostor.min())),
        float(max(q_target.max(), q_impostor.max())),
    )
    return ConditionCalibration(
        llr_weights=_logistic_regression(target, q_target, impostor, q_impostor),
        impostor=_tail_model(impostor),
        target=_score_model(target, q_target),
        quality_range=quality_range,
        target_trials=len(target),
        impostor_trials=len(impostor),
    )


def _features(scores: Vector, quality: Vector) -> Vector:
    return np.stack([np.ones_like(scores), scores, quality, scores * quality], axis=1)


def _logistic_regression(
    target: Vector, q_target: Vector, impostor: Vector, q_impostor: Vector
) -> tuple[float, float, float, float]:
    """Weighted so that targets and impostors weigh the same in total: the fitted log odds
    are then log-likelihood ratios (a prior of 1/2 adds nothing to them). Newton's method on
    the convex cross-entropy, with a light ridge so that it always converges."""
    x = np.concatenate([_features(target, q_target), _features(impostor, q_impostor)])
    y = np.concatenate([np.ones(len(target)), np.zeros(len(impostor))])
    weights = np.concatenate(
        [np.full(len(target), 0.5 / len(target)), np.full(len(impostor), 0.5 / len(impostor))]
    )
    w = np.zeros(x.shape[1])
    ridge = 1e-6
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (weights * (p - y)) + ridge * w
        hessian = (x * (weights * p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(w[0]), float(w[1]), float(w[2]), float(w[3])


def _tail_model(impostor: Vector, fitted_below: float = TAIL_FRACTION) -> TailModel:
    """Least-squares line of the highest impostor scores against their normal deviates."""
    ranked = np.sort(impostor)[::-1]
    survival = (np.arange(1, len(ranked) + 1) - 0.5) / len(ranked)
    tail = survival <= fitted_below
    deviates = np.array([_STANDARD_NORMAL.inv_cdf(1.0 - p) for p in survival[tail]])
    slope, intercept = np.polyfit(deviates, ranked[tail], 1)
    return TailModel(float(intercept), float(slope), fitted_below)


def fit_tail(
    impostor: Vector,
    enrolled: npt.NDArray[np.str_],
    tested: npt.NDArray[np.str_],
    *,
    replicates: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> TailModel:
    """The tail line of `impostor` (each trial's enrolled and tested speaker given) with its
    bootstrap over speakers: each sample draws the speakers with replacement, and a trial
    counts as often as both its speakers were drawn. Trials of one pair of speakers are not
    independent, so resampling trials would claim more certainty than the voices give."""
    point = _tail_model(impostor)
    speakers = np.unique(np.concatenate([enrolled, tested]))
    e_index = np.searchsorted(speakers, enrolled)
    t_index = np.searchsorted(speakers, tested)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(replicates):
        drawn = rng.multinomial(len(speakers), np.full(len(speakers), 1.0 / len(speakers)))
        weights = drawn[e_index] * drawn[t_index]
        sample = np.repeat(impostor, weights)
        if len(sample) * TAIL_FRACTION < 2:
            continue
        fitted = _tail_model(sample)
        fits.append((fitted.intercept, fitted.slope))
    return TailModel(point.intercept, point.slope, point.fitted_below, tuple(fits), confidence)


def _score_model(scores: Vector, quality: Vector) -> ScoreModel:
    """Least-squares line for the mean; the spread is fitted to the absolute residuals
    (scaled by sqrt(pi/2), the ratio of a Gaussian's std to its mean absolute deviation)."""
    design = np.stack([np.ones_like(quality), quality], axis=1)
    (m0, m1), *_ = np.linalg.lstsq(design, scores, rcond=None)
    residual = np.abs(scores - design @ np.array([m0, m1])) * math.sqrt(math.pi / 2)
    (s0, s1), *_ = np.linalg.lstsq(design, residual, rcond=None)
    return ScoreModel(LinearInQuality(float(m0), float(m1)), LinearInQuality(float(s0), float(s1)))
