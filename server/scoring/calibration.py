"""Calibration: what a normalised score means, made from measurement (`voxauth calibrate`).

For each scoring condition (wideband voiceprint and test, wideband voiceprint and telephone
test, telephone companion voiceprint and telephone test) the calibration holds:

- a logistic regression from the AS-norm score and the trial's net speech to a calibrated
  log-likelihood ratio (natural log): llr = w0 + w1 s + w2 q + w3 s q + w4 e + w5 s e, with q
  the log of the test's net speech and e that of the voiceprint's. The two lengths enter
  apart because the calibration set has one file per speaker: no target trial is long on
  both sides, but cut unevenly a file gives long tests against short enrollments and long
  enrollments against short tests (server/tools/calibrate.py), so each length is measured
  over a wider range than the shorter side of any trial could be (format 1 took the shorter
  side alone and is still read that way);
- the upper tail of the impostor AS-norm scores, from which a target false-match rate
  becomes a threshold: the scores of the top 1% of impostor trials against their normal
  deviates (a straight line on a DET plot's axis), extrapolated below what the trials can
  show. AS-norm makes the impostor scores nearly independent of the speech's length (see
  models/scoring/README.md), so one threshold holds for every length; the tail is fitted
  rather than taken as Gaussian because it is heavier (skew 0.2-0.4: a Gaussian fit puts
  the threshold for 1 in 10,000 where 1 in 1,000 impostors pass);
- a Gaussian model of the target AS-norm scores, mean and standard deviation linear in q
  and e, from which the expected false-non-match rate at that threshold follows.

q and e are each held to the range of the target trials the calibration saw (the longest
test and the longest voiceprint calibrated from data, recorded in the file). A test longer
than the longest measured gets the lesser of that test's LLR and the fitted trend continued
to its own length (`ConditionCalibration.llr`): never more evidence than measured, and at
least the measured fall of a fixed score's evidence with the length. A voiceprint longer
than the longest measured is judged as that long.
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

FORMAT = "voxauth-calibration/2"
READABLE_FORMATS = ("voxauth-calibration/1", FORMAT)
"""Format 1 has no enrollment terms: its quality is the shorter side's net speech."""
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
    """intercept + slope * q + enrollment_slope * e."""

    intercept: float
    slope: float
    enrollment_slope: float = 0.0

    def at(self, quality: float, enrollment_quality: float = 0.0) -> float:
        return self.intercept + self.slope * quality + self.enrollment_slope * enrollment_quality


@dataclass(frozen=True)
class ScoreModel:
    """A Gaussian whose mean and standard deviation depend on q and e."""

    mean: LinearInQuality
    std: LinearInQuality

    def at(self, quality: float, enrollment_quality: float = 0.0) -> tuple[float, float]:
        return (
            self.mean.at(quality, enrollment_quality),
            max(self.std.at(quality, enrollment_quality), _MIN_STD),
        )


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
    """w0..w3 of llr = w0 + w1 s + w2 q + w3 s q (+ the enrollment terms)."""
    impostor: TailModel
    target: ScoreModel
    quality_range: tuple[float, float]
    """The q (log of the test's net speech) the target trials covered; q outside is held
    to it. Format 1: the log of the shorter side's."""
    target_trials: int
    impostor_trials: int
    enrollment_weights: tuple[float, float] | None = None
    """w4, w5 of + w4 e + w5 s e; None: format 1, whose q is the shorter side's."""
    enrollment_quality_range: tuple[float, float] = (0.0, 0.0)
    """The e (log of the voiceprint's net speech) the target trials covered; e outside is
    held to it."""

    def qualities(
        self, net_speech_seconds: float, enrollment_seconds: float
    ) -> tuple[float, float]:
        """(q, e) of a trial, each held to the range the calibration measured."""
        low, high = self.quality_range
        if self.enrollment_weights is None:
            shorter = min(net_speech_seconds, enrollment_seconds)
            return min(max(math.log(max(shorter, 1e-3)), low), high), 0.0
        e_low, e_high = self.enrollment_quality_range
        return (
            min(max(math.log(max(net_speech_seconds, 1e-3)), low), high),
            min(max(math.log(max(enrollment_seconds, 1e-3)), e_low), e_high),
        )

    def _line(self, q: float, e: float) -> tuple[float, float]:
        """(offset, slope) of the fitted LLR as a line in the score at (q, e)."""
        w0, w1, w2, w3 = self.llr_weights
        w4, w5 = self.enrollment_weights or (0.0, 0.0)
        return w0 + w2 * q + w4 * e, w1 + w3 * q + w5 * e

    def _lines(
        self, net_speech_seconds: float, enrollment_seconds: float
    ) -> list[tuple[float, float]]:
        """The lines in the score whose least is the LLR at these lengths: the fitted one at
        the lengths held to the measured range and, for a test longer than the longest
        measured, the fitted one continued to the test's own length wherever it still rises
        with the score. So a test beyond the range never gets more evidence than the longest
        measured test, and where the measured trend is for the evidence of a score to fall
        with the test's length (at the LLR floor's score it is, in every shipped condition:
        longer genuine tests score higher, impostors do not), it goes on falling as measured."""
        q, e = self.qualities(net_speech_seconds, enrollment_seconds)
        lines = [self._line(q, e)]
        if self.enrollment_weights is not None:
            own = math.log(max(net_speech_seconds, 1e-3))
            if own > q:
                continued = self._line(own, e)
                if continued[1] > 0:
                    lines.append(continued)
        return lines

    def llr(self, score: float, net_speech_seconds: float, enrollment_seconds: float) -> float:
        """The calibrated LLR of a normalised score, for a test of `net_speech_seconds`
        against a voiceprint of `enrollment_seconds` of net speech."""
        return min(
            offset + slope * score
            for offset, slope in self._lines(net_speech_seconds, enrollment_seconds)
        )

    def score_for_llr(
        self, llr: float, net_speech_seconds: float, enrollment_seconds: float
    ) -> float:
        """The normalised score whose calibrated LLR is `llr` at these lengths (the LLR rises
        with the score at every calibrated length: `load` refuses a calibration where not;
        the least of rising lines reaches `llr` where the last of them does)."""
        return max(
            (llr - offset) / slope
            for offset, slope in self._lines(net_speech_seconds, enrollment_seconds)
        )

    @property
    def longest_calibrated(self) -> tuple[float, float]:
        """(test, voiceprint): the longest net speech of each side that target trials of the
        calibration covered; longer is judged as `llr` says. Format 1: the shorter side's,
        for both."""
        longest_test = math.exp(self.quality_range[1])
        if self.enrollment_weights is None:
            return longest_test, longest_test
        return longest_test, math.exp(self.enrollment_quality_range[1])

    def threshold(self, target_fmr: float) -> float:
        """The normalised score that impostors reach with probability `target_fmr`."""
        return self.impostor.score_at(target_fmr)

    def bound(
        self,
        target_fmr: float,
        net_speech_seconds: float,
        *,
        enrollment_seconds: float,
        min_llr: float,
        evidence_from_seconds: float,
        local_fmr_threshold: float | None = None,
    ) -> Bound:
        """The highest of the false-match threshold, the LLR floor, and (unless
        `evidence_from_seconds` is 0) the LLR a check of `evidence_from_seconds` needs at the
        false-match threshold, against the same voiceprint. The LLR at a fixed score is linear
        in q, so the most any length between `evidence_from_seconds` and this one needs there
        is at one of the two ends."""
        fmr_threshold = self.threshold(target_fmr)
        by = DecidedBy.FMR_THRESHOLD
        # The deployment's own impostors, where they are stricter than the shipped tail.
        if local_fmr_threshold is not None and local_fmr_threshold > fmr_threshold:
            fmr_threshold, by = local_fmr_threshold, DecidedBy.LOCAL_FMR_THRESHOLD
        floors = [
            (self.llr(fmr_threshold, net_speech_seconds, enrollment_seconds), by),
            (min_llr, DecidedBy.LLR_FLOOR),
        ]
        if 0 < evidence_from_seconds < net_speech_seconds:
            floors.append(
                (
                    self.llr(fmr_threshold, evidence_from_seconds, enrollment_seconds),
                    DecidedBy.DURATION_FLOOR,
                )
            )
        # Ties go to the false-match threshold: a floor decides only where it asks for more.
        llr, decided_by = max(floors, key=lambda floor: floor[0])
        if decided_by is by:
            return Bound(fmr_threshold, llr, decided_by)
        return Bound(
            self.score_for_llr(llr, net_speech_seconds, enrollment_seconds), llr, decided_by
        )

    def false_non_match_rate(
        self, threshold: float, net_speech_seconds: float, enrollment_seconds: float
    ) -> float:
        """Expected share of genuine checks of these lengths scoring below `threshold`."""
        mean, std = self.target.at(*self.qualities(net_speech_seconds, enrollment_seconds))
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
        if not isinstance(document, dict) or document.get("format") not in READABLE_FORMATS:
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
                w5 = (calibrated.enrollment_weights or (0.0, 0.0))[1]
                # A higher score must always mean more evidence, or no LLR floor is a score;
                # the slope is linear in q and e, so its least is at a corner of their ranges.
                corners = [
                    w1 + w3 * q + w5 * e
                    for q in calibrated.quality_range
                    for e in calibrated.enrollment_quality_range
                ]
                if min(corners) <= 0:
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
    if low > high:
        raise ValueError("quality_range is empty")
    enrollment_weights = None
    e_low = e_high = 0.0
    if fields.get("enrollment_weights") is not None:
        w4, w5 = (float(w) for w in fields["enrollment_weights"])
        enrollment_weights = (w4, w5)
        e_low, e_high = (float(e) for e in fields["enrollment_quality_range"])
        if e_low > e_high:
            raise ValueError("enrollment_quality_range is empty")
    return ConditionCalibration(
        llr_weights=(w0, w1, w2, w3),
        impostor=_tail_from(fields["impostor"]),
        target=target,
        quality_range=(low, high),
        target_trials=int(fields["target_trials"]),
        impostor_trials=int(fields["impostor_trials"]),
        enrollment_weights=enrollment_weights,
        enrollment_quality_range=(e_low, e_high),
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
    target: Vector,
    target_seconds: Vector,
    impostor: Vector,
    impostor_seconds: Vector,
    *,
    target_enrollment_seconds: Vector,
    impostor_enrollment_seconds: Vector,
) -> ConditionCalibration:
    """Calibration from normalised scores of target and impostor trials, each trial's test
    and voiceprint net speech. The lengths are held to the range of the target trials: an
    LLR needs both kinds of trial, and only impostor trials are longer."""
    q_target, q_impostor = np.log(target_seconds), np.log(impostor_seconds)
    e_target, e_impostor = np.log(target_enrollment_seconds), np.log(impostor_enrollment_seconds)
    w = _logistic_regression(
        _features(target, q_target, e_target), _features(impostor, q_impostor, e_impostor)
    )
    return ConditionCalibration(
        llr_weights=(w[0], w[1], w[2], w[3]),
        impostor=_tail_model(impostor),
        target=_score_model(target, q_target, e_target),
        quality_range=(float(q_target.min()), float(q_target.max())),
        target_trials=len(target),
        impostor_trials=len(impostor),
        enrollment_weights=(w[4], w[5]),
        enrollment_quality_range=(float(e_target.min()), float(e_target.max())),
    )


def _features(scores: Vector, quality: Vector, enrollment_quality: Vector) -> Vector:
    return np.stack(
        [
            np.ones_like(scores),
            scores,
            quality,
            scores * quality,
            enrollment_quality,
            scores * enrollment_quality,
        ],
        axis=1,
    )


def _logistic_regression(target: Vector, impostor: Vector) -> tuple[float, ...]:
    """Weighted so that targets and impostors weigh the same in total: the fitted log odds
    are then log-likelihood ratios (a prior of 1/2 adds nothing to them). Newton's method on
    the convex cross-entropy, with a light ridge so that it always converges."""
    x = np.concatenate([target, impostor])
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
    return tuple(float(v) for v in w)


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


def _score_model(scores: Vector, quality: Vector, enrollment_quality: Vector) -> ScoreModel:
    """Least-squares plane in (q, e) for the mean; the spread is fitted to the absolute
    residuals (scaled by sqrt(pi/2), the ratio of a Gaussian's std to its mean absolute
    deviation)."""
    design = np.stack([np.ones_like(quality), quality, enrollment_quality], axis=1)
    mean, *_ = np.linalg.lstsq(design, scores, rcond=None)
    residual = np.abs(scores - design @ mean) * math.sqrt(math.pi / 2)
    std, *_ = np.linalg.lstsq(design, residual, rcond=None)
    return ScoreModel(
        LinearInQuality(*(float(m) for m in mean)), LinearInQuality(*(float(s) for s in std))
    )
