"""Score normalisation, calibration and thresholds set by a false-match rate."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from models.embedder import Embedding
from models.manifest import ECAPA_MANIFEST
from server.config import ScoringPolicy, ServerConfig
from server.errors import ConfigurationError
from server.pipeline.channel import Channel
from server.scoring.calibration import (
    Calibration,
    Condition,
    ConditionCalibration,
    DecidedBy,
    LinearInQuality,
    ScoreModel,
    TailModel,
    fit_condition,
    fit_tail,
)
from server.scoring.normalization import (
    CohortStatistics,
    as_norm,
    cosine_for,
    top_n_statistics,
)
from server.scoring.scorer import Scorer, ScoringModel, default_scoring_dir
from server.storage.interface import Voiceprint
from server.tools.calibrate import is_calibration_speaker
from tests.clock import ManualClock
from tests.support import (
    OTHER_1,
    OTHER_2,
    SHORT_CLIP,
    SPEAKER_A,
    SPEAKER_B,
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
    fitted = fit_condition(
        target,
        seconds_t,
        impostor,
        seconds_i,
        target_enrollment_seconds=RNG.uniform(3, 20, len(target)),
        impostor_enrollment_seconds=RNG.uniform(3, 20, len(impostor)),
    )
    return Calibration(
        "test-model", top_n, True, dict.fromkeys(Condition, fitted), {"speakers": []}
    )


def test_as_norm_measures_the_score_against_both_sides_cohort_statistics() -> None:
    enrollment, test = CohortStatistics(0.2, 0.05), CohortStatistics(0.1, 0.1)
    assert as_norm(0.6, enrollment, test) == pytest.approx(0.5 * (0.4 / 0.05 + 0.5 / 0.1))
    # The per-check cosine threshold is the exact inverse.
    assert as_norm(cosine_for(3.72, enrollment, test), enrollment, test) == pytest.approx(3.72)


def test_top_n_statistics_take_the_closest_voices_and_leave_out_the_excluded() -> None:
    scores = np.array([[0.9, 0.1, 0.5, 0.3]])
    means, stds = top_n_statistics(scores, 2)
    assert means[0] == pytest.approx(0.7) and stds[0] == pytest.approx(0.2)
    means, _ = top_n_statistics(scores, 2, np.array([[True, False, False, False]]))
    assert means[0] == pytest.approx(0.4)


def test_calibrated_llr_and_threshold_follow_the_score_distributions() -> None:
    calibration = synthetic_calibration()[Condition.WIDEBAND]
    for score in (0.0, 1.5, 3.0, 5.0):
        assert calibration.llr(score, 8.0, 20.0) == pytest.approx(3 * score - 4.5, abs=0.35)
    threshold = calibration.threshold(1e-4)
    assert threshold == pytest.approx(NormalDist().inv_cdf(1 - 1e-4), abs=0.15)
    assert calibration.false_non_match_rate(threshold, 8.0, 20.0) == pytest.approx(
        NormalDist(3.0, 1.0).cdf(threshold), abs=0.05
    )
    # A stricter false-match rate costs false non-matches.
    assert calibration.threshold(1e-5) > threshold


def impostor_trials(
    speakers: int, trials_per_pair: int, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """Impostor scores N(0, 1) plus an offset N(0, 1) per pair of speakers (some pairs sound
    alike), with each trial's two speakers: N(0, 2) in all."""
    names = np.array([f"s{i}" for i in range(speakers)])
    enrolled, tested = (a.ravel() for a in np.meshgrid(names, names, indexing="ij"))
    other = enrolled != tested
    enrolled, tested = enrolled[other], tested[other]
    offsets = rng.normal(0.0, 1.0, len(enrolled))
    scores = np.repeat(offsets, trials_per_pair) + rng.normal(
        0.0, 1.0, len(enrolled) * trials_per_pair
    )
    return (
        scores,
        np.repeat(enrolled, trials_per_pair),
        np.repeat(tested, trials_per_pair),
    )


def test_the_threshold_is_an_upper_bound_that_widens_where_there_are_few_voices() -> None:
    rng = np.random.default_rng(5)
    true_threshold = np.sqrt(2.0) * NormalDist().inv_cdf(1 - 1e-4)
    margins = []
    for speakers, per_pair in ((100, 2), (40, 12)):
        scores, enrolled, tested = impostor_trials(speakers, per_pair, rng)
        tail = fit_tail(scores, enrolled, tested, replicates=100)
        assert len(tail.replicates) == 100
        # The bound holds the true rate where the point fit need not.
        assert tail.score_at(1e-4) >= true_threshold
        margins.append(tail.score_at(1e-4) - tail.point_at(1e-4))
    # About as many trials either way; the bound is further above the point fit when they
    # come from fewer voices.
    assert 0 < margins[0] < margins[1]


def one_file_per_speaker_trials(rng: np.random.Generator, uneven: bool) -> dict[str, np.ndarray]:
    """Trials as one file of up to 16 s per speaker gives them: halves (both sides 2-8 s),
    and with `uneven` also long tests against a 4 s voiceprint and long voiceprints against
    a 3 s test (up to 12 s). Impostors score N(0, 1) at every length; targets N(mu, 1) with
    mu = 1 + 1.5 ln(test) + 0.8 ln(voiceprint), so the true LLR is mu s - mu^2 / 2."""
    n = 3000
    tests = [rng.uniform(2, 8, n)]
    voiceprints = [rng.uniform(2, 8, n)]
    if uneven:
        tests += [rng.uniform(3, 12, n), np.full(n, 3.0)]
        voiceprints += [np.full(n, 4.0), rng.uniform(3, 12, n)]
    t, e = np.concatenate(tests), np.concatenate(voiceprints)
    mu = true_target_mean(t, e)
    impostors = 10 * len(t)
    return {
        "target": rng.normal(mu, 1.0),
        "target_seconds": t,
        "target_enrollment_seconds": e,
        "impostor": rng.normal(0.0, 1.0, impostors),
        "impostor_seconds": np.tile(t, 10),
        "impostor_enrollment_seconds": np.tile(e, 10),
    }


def true_target_mean(test: np.ndarray | float, voiceprint: np.ndarray | float) -> np.ndarray:
    return np.asarray(1.0 + 1.5 * np.log(test) + 0.8 * np.log(voiceprint))


def fitted_on(trials: dict[str, np.ndarray]) -> ConditionCalibration:
    return fit_condition(
        trials["target"],
        trials["target_seconds"],
        trials["impostor"],
        trials["impostor_seconds"],
        target_enrollment_seconds=trials["target_enrollment_seconds"],
        impostor_enrollment_seconds=trials["impostor_enrollment_seconds"],
    )


def test_uneven_cuts_calibrate_long_tests_that_halves_cannot() -> None:
    rng = np.random.default_rng(3)
    uneven = fitted_on(one_file_per_speaker_trials(rng, uneven=True))
    halves = fitted_on(one_file_per_speaker_trials(rng, uneven=False))
    longest_test, longest_voiceprint = uneven.longest_calibrated
    assert 11.9 < longest_test <= 12.0 and 11.9 < longest_voiceprint <= 12.0
    assert halves.longest_calibrated[0] <= 8.0
    # An 11 or 12 s test against a 4 s voiceprint: the score whose LLR is the default floor
    # (2.3), where the true LLR mu s - mu^2 / 2 reaches it. The uneven trials measure it.
    # Held at the halves' longest test, as format 1 held it, it asks too little; the halves'
    # fit continued beyond its range asks more than held.
    held = halves.score_for_llr(2.3, halves.longest_calibrated[0], 4.0)
    for test in (11.0, 12.0):
        mu = float(true_target_mean(test, 4.0))
        true = 2.3 / mu + mu / 2
        assert uneven.score_for_llr(2.3, test, 4.0) == pytest.approx(true, abs=0.12)
        assert held < true - 0.15
        assert halves.score_for_llr(2.3, test, 4.0) > held
    # The LLR rises with the score at every calibrated length pair.
    for t in (2.0, 4.0, 8.0, 12.0):
        for e in (2.0, 4.0, 8.0, 12.0):
            assert uneven.llr(5.0, t, e) > uneven.llr(4.0, t, e)


def test_beyond_the_longest_measured_test_the_evidence_never_grows() -> None:
    calibration = fitted_on(one_file_per_speaker_trials(np.random.default_rng(4), uneven=True))
    longest_test, longest_voiceprint = calibration.longest_calibrated
    w0, w1, w2, w3 = calibration.llr_weights
    w4, w5 = calibration.enrollment_weights or (0.0, 0.0)
    policy = ScoringPolicy()

    def fitted(score: float, test: float, voiceprint: float) -> float:
        q, e = np.log(test), np.log(voiceprint)
        return float(w0 + w1 * score + w2 * q + w3 * score * q + w4 * e + w5 * score * e)

    def needed(test: float, voiceprint: float) -> float:
        return calibration.bound(
            policy.target_fmr,
            test,
            enrollment_seconds=voiceprint,
            min_llr=policy.min_llr,
            evidence_from_seconds=0.0,
        ).normalized

    for score in (1.0, 3.0, 6.0, 9.0):
        for test in (longest_test * 1.01, 20.0, 60.0):
            held = calibration.llr(score, longest_test, longest_voiceprint)
            # A voiceprint longer than measured is judged as the longest measured; a test
            # longer than measured gets no more evidence than the longest measured test, and
            # where the fitted line falls with the length it goes on falling.
            assert calibration.llr(score, test, 90.0) == pytest.approx(
                min(held, fitted(score, test, longest_voiceprint))
            )
            assert calibration.llr(score, test, 90.0) <= held
        # Shorter than measured: held to the shortest.
        shortest = [
            float(np.exp(r[0]))
            for r in (calibration.quality_range, calibration.enrollment_quality_range)
        ]
        assert calibration.llr(score, 0.5, 0.5) == calibration.llr(score, *shortest)
    # Where a score's evidence falls with the length (the synthetic targets score higher the
    # longer the test), a 60 s test has less of it than the longest measured.
    assert calibration.llr(3.0, 60.0, 20.0) < calibration.llr(3.0, longest_test, 20.0) - 0.5
    # The score a check needs never falls with its length, within the range or beyond.
    lengths = [3.0, 5.0, 8.0, longest_test, 15.0, 30.0, 60.0]
    for voiceprint in (4.0, 20.0):
        scores = [needed(t, voiceprint) for t in lengths]
        assert scores == sorted(scores)
        for t, score in zip(lengths, scores, strict=True):
            assert calibration.llr(score, t, voiceprint) >= policy.min_llr - 1e-9
    assert calibration.false_non_match_rate(4.0, 60.0, 90.0) == calibration.false_non_match_rate(
        4.0, longest_test, longest_voiceprint
    )


def test_the_shipped_calibration_measures_long_tests_and_never_asks_less_of_them() -> None:
    model = ScoringModel.load(ScoringPolicy(), ECAPA_MANIFEST.model_id)
    policy = ScoringPolicy()
    lengths = [3.0, 4.0, 6.0, 7.6, 9.0, 10.0, 12.0, 20.0, 30.0, 60.0]
    for condition in Condition:
        calibration = model.calibration[condition]
        longest_test, longest_voiceprint = calibration.longest_calibrated
        # Uneven cuts of one file per speaker: tests and voiceprints beyond half a file.
        assert longest_test > 10.0 and longest_voiceprint > 10.0
        trials = model.calibration.provenance["trials"][condition.value]
        assert trials["target_tests_longer_than_7.6_s"] >= 40
        for voiceprint in (4.0, 11.0, 20.0):
            bounds = [
                calibration.bound(
                    policy.target_fmr,
                    t,
                    enrollment_seconds=voiceprint,
                    min_llr=policy.min_llr,
                    evidence_from_seconds=0.0,
                )
                for t in lengths
            ]
            needed = [b.normalized for b in bounds]
            assert needed == sorted(needed), (condition, voiceprint, needed)
            assert min(b.llr for b in bounds) >= policy.min_llr - 1e-9
            # The bound is at least the false-match threshold, whatever the length.
            assert min(needed) >= calibration.threshold(policy.target_fmr) - 1e-9
            # A higher score is more evidence at every length.
            for t in lengths:
                assert calibration.llr(7.0, t, voiceprint) > calibration.llr(6.0, t, voiceprint)
            # At the floor's score the evidence falls with the test's length, within the
            # data and, by the rule, beyond it: a longer test is not credited with more.
            at_floor = calibration.score_for_llr(policy.min_llr, longest_test, voiceprint)
            assert calibration.llr(at_floor, longest_test / 2, voiceprint) > policy.min_llr
            assert calibration.llr(at_floor, longest_test * 2, voiceprint) < policy.min_llr


def test_a_format_1_calibration_is_still_read_with_the_shorter_side(tmp_path: Path) -> None:
    document = json.loads(synthetic_calibration().to_json())
    document["format"] = "voxauth-calibration/1"
    for fields in document["conditions"].values():
        del fields["enrollment_weights"], fields["enrollment_quality_range"]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(document))
    calibration = Calibration.load(path, "test-model")[Condition.WIDEBAND]
    assert calibration.enrollment_weights is None
    # As format 1 was used: the quality is the shorter side's, whichever side that is.
    assert calibration.llr(3.0, 5.0, 20.0) == calibration.llr(3.0, 20.0, 5.0)
    assert calibration.llr(3.0, 5.0, 20.0) == calibration.llr(3.0, 5.0, 5.0)
    assert calibration.llr(3.0, 5.0, 20.0) != calibration.llr(3.0, 8.0, 20.0)
    longest = float(np.exp(calibration.quality_range[1]))
    assert calibration.longest_calibrated == (longest, longest)


def test_a_calibration_whose_llr_falls_with_the_score_at_a_long_voiceprint_is_refused(
    tmp_path: Path,
) -> None:
    document = json.loads(synthetic_calibration().to_json())
    fields = document["conditions"]["wideband"]
    fields["llr_weights"] = [0.0, 1.0, 0.0, 0.0]
    # Rising with the score at the shortest voiceprint, falling at the longest.
    fields["enrollment_quality_range"] = [0.5, 3.0]
    fields["enrollment_weights"] = [0.0, -0.5]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigurationError, match="wideband: the LLR falls with the score"):
        Calibration.load(path, "test-model")


def test_calibration_round_trips_and_refuses_another_model(tmp_path: Path) -> None:
    calibration = synthetic_calibration()
    bootstrapped = replace(
        calibration[Condition.WIDEBAND].impostor, replicates=((0.1, 1.0), (0.2, 1.1))
    )
    calibration = replace(
        calibration,
        conditions={
            c: replace(k, impostor=bootstrapped) for c, k in calibration.conditions.items()
        },
    )
    path = tmp_path / "calibration.json"
    path.write_text(calibration.to_json())
    loaded = Calibration.load(path, "test-model")
    assert loaded == calibration
    assert loaded.cohort_top_n == 10
    assert loaded[Condition.TELEPHONE].llr(2.0, 5.0, 9.0) == calibration[Condition.TELEPHONE].llr(
        2.0, 5.0, 9.0
    )
    with pytest.raises(ConfigurationError, match=r"made for model test-model.*voxauth calibrate"):
        Calibration.load(path, "other-model@v2")
    with pytest.raises(ConfigurationError, match="no score calibration"):
        Calibration.load(tmp_path / "missing.json", "test-model")
    document = json.loads(path.read_text())
    del document["conditions"]["telephone"]
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigurationError, match="incomplete"):
        Calibration.load(path, "test-model")


def test_shipped_scoring_files_match_the_model_and_the_split() -> None:
    model = ScoringModel.load(ScoringPolicy(), ECAPA_MANIFEST.model_id)
    speakers = model.calibration.provenance["speakers"]
    assert speakers and all(is_calibration_speaker(s) for s in speakers)
    # The tests' own speakers are held out: the e2e tests never meet their voice in the cohort.
    tests_data = [SPEAKER_A, SPEAKER_B, OTHER_1, OTHER_2, SHORT_CLIP]
    assert not any(is_calibration_speaker(name.split("-")[0]) for name in tests_data)
    for channel in Channel:
        # One voice per calibration speaker whose halves could both be embedded.
        assert 0.9 * len(speakers) <= len(model.cohort(channel)) <= len(speakers)
    with pytest.raises(ConfigurationError, match="made for model"):
        ScoringModel.load(ScoringPolicy(scoring_dir=default_scoring_dir()), "another-model@1")


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


def scoring_model() -> ScoringModel:
    return ScoringModel({c: random_voices(40) for c in Channel}, synthetic_calibration())


def test_telephone_checks_use_the_companion_or_else_the_cross_channel_calibration() -> None:
    model = scoring_model()
    scorer = Scorer(model, ScoringPolicy(), voiceprints=list)
    wideband, telephone = unit(RNG.normal(size=DIMENSION)), unit(RNG.normal(size=DIMENSION))
    test = unit(telephone + 0.3 * RNG.normal(size=DIMENSION))

    both = voiceprint("a", wideband, telephone)
    with_companion = scorer.score(both, test, 8.0, Channel.TELEPHONE)
    assert with_companion.condition is Condition.TELEPHONE

    def cosine(a: Embedding, b: Embedding, channel: Channel) -> float:
        return float(np.dot(model.prepare(a, channel), model.prepare(b, channel)))

    assert with_companion.cosine == pytest.approx(cosine(test, telephone, Channel.TELEPHONE))

    without = scorer.score(voiceprint("a", wideband, None), test, 8.0, Channel.TELEPHONE)
    assert without.condition is Condition.WIDEBAND_TO_TELEPHONE
    assert without.cosine == pytest.approx(
        float(
            np.dot(
                model.prepare(test, Channel.TELEPHONE), model.prepare(wideband, Channel.WIDEBAND)
            )
        )
    )

    wide = scorer.score(both, test, 8.0, Channel.WIDEBAND)
    assert wide.condition is Condition.WIDEBAND


def test_decision_agrees_on_every_scale_and_follows_the_target_fmr() -> None:
    model = scoring_model()
    enrolled = unit(RNG.normal(size=DIMENSION))
    strict = Scorer(model, ScoringPolicy(target_fmr=1e-6), voiceprints=list)
    lenient = Scorer(model, ScoringPolicy(target_fmr=1e-2), voiceprints=list)
    for noise in (0.2, 0.6, 1.0, 1.5, 3.0):
        test = unit(enrolled + noise * RNG.normal(size=DIMENSION) / np.sqrt(DIMENSION))
        for scorer in (strict, lenient):
            score = scorer.score(voiceprint("a", enrolled, None), test, 5.0, Channel.WIDEBAND)
            assert score.accepted == (score.cosine >= score.threshold - 1e-9)
            assert score.accepted == (score.llr >= score.llr_threshold - 1e-9)
        stricter = strict.score(voiceprint("a", enrolled, None), test, 5.0, Channel.WIDEBAND)
        looser = lenient.score(voiceprint("a", enrolled, None), test, 5.0, Channel.WIDEBAND)
        assert stricter.threshold > looser.threshold
        assert stricter.expected_false_non_match_rate > looser.expected_false_non_match_rate


def weak_evidence_calibration(llr_weights: tuple[float, float, float, float]) -> Calibration:
    """Impostors N(0, 1), so 1 in 10,000 is a normalised score of 3.72, and an LLR that the
    test chooses: one under which that threshold is weak evidence."""
    condition = ConditionCalibration(
        llr_weights=llr_weights,
        impostor=TailModel(0.0, 1.0, 0.01),
        target=ScoreModel(LinearInQuality(8.0, 0.0), LinearInQuality(1.0, 0.0)),
        quality_range=(float(np.log(2.0)), float(np.log(20.0))),
        target_trials=100,
        impostor_trials=10000,
    )
    return Calibration("test-model", 10, True, dict.fromkeys(Condition, condition), {})


def test_a_score_over_the_fmr_threshold_with_a_negative_llr_is_not_accepted() -> None:
    # llr = s - 8: the false-match threshold (3.72) is evidence of 100 to 1 for an impostor.
    model = ScoringModel(
        {c: random_voices(40) for c in Channel}, weak_evidence_calibration((-8.0, 1.0, 0.0, 0.0))
    )
    scorer = Scorer(model, ScoringPolicy(), voiceprints=list)
    rng = np.random.default_rng(11)
    enrolled = unit(rng.normal(size=DIMENSION))
    fmr_threshold = model.calibration[Condition.WIDEBAND].threshold(1e-4)
    between = []
    for noise in np.linspace(3.5, 9.0, 40):
        test = unit(enrolled + noise * rng.normal(size=DIMENSION) / np.sqrt(DIMENSION))
        score = scorer.score(voiceprint("a", enrolled, None), test, 5.0, Channel.WIDEBAND)
        if fmr_threshold <= score.normalized and score.llr < 0:
            between.append(score)
    assert between, "no test scored between the false-match threshold and an LLR of 0"
    for score in between:
        assert not score.accepted
        assert score.decided_by is DecidedBy.LLR_FLOOR
        assert score.llr_threshold == pytest.approx(ScoringPolicy().min_llr)
        assert score.cosine < score.threshold
    # An operator who asks for evidence of 20 to 1 gets it.
    demanding = Scorer(model, ScoringPolicy(min_llr=3.0), voiceprints=list)
    test = unit(enrolled + 0.5 * RNG.normal(size=DIMENSION) / np.sqrt(DIMENSION))
    score = demanding.score(voiceprint("a", enrolled, None), test, 5.0, Channel.WIDEBAND)
    assert score.accepted == (score.llr >= 3.0)
    assert score.normalized_threshold == pytest.approx(11.0)


def test_a_longer_check_never_needs_weaker_evidence_than_a_shorter_one() -> None:
    # llr = s - 2 q: at the false-match threshold the LLR falls with the length, from
    # +1.5 at 3 s to -2.3 at 20 s.
    model = ScoringModel(
        {c: random_voices(40) for c in Channel}, weak_evidence_calibration((0.0, 1.0, -2.0, 0.0))
    )
    policy = ScoringPolicy(min_llr=0.0, evidence_from_seconds=3.0)
    scorer = Scorer(model, policy, voiceprints=list)
    enrolled = unit(RNG.normal(size=DIMENSION))
    test = unit(enrolled + RNG.normal(size=DIMENSION) / np.sqrt(DIMENSION))
    scores = [
        scorer.score(voiceprint("a", enrolled, None), test, seconds, Channel.WIDEBAND)
        for seconds in (3.0, 4.0, 6.0, 8.0, 12.0, 20.0)
    ]
    assert scores[0].decided_by is DecidedBy.FMR_THRESHOLD
    assert all(s.decided_by is DecidedBy.DURATION_FLOOR for s in scores[1:])
    needed = [s.llr_threshold for s in scores]
    assert needed == pytest.approx([needed[0]] * len(needed))
    assert needed[0] == pytest.approx(3.719 - 2 * np.log(3.0), abs=1e-3)
    for score in scores:
        assert score.accepted == (score.llr >= score.llr_threshold - 1e-9)
    # By default the ordering is on the score: a longer check never needs a lower one, and
    # never less evidence than the LLR floor.
    default = Scorer(model, ScoringPolicy(), voiceprints=list)
    bounds = [
        default.score(voiceprint("a", enrolled, None), test, seconds, Channel.WIDEBAND)
        for seconds in (3.0, 4.0, 6.0, 8.0, 12.0, 20.0)
    ]
    needed_scores = [b.normalized_threshold for b in bounds]
    assert needed_scores == sorted(needed_scores)
    assert min(b.llr_threshold for b in bounds) == pytest.approx(ScoringPolicy().min_llr)


def test_lookalike_agents_raise_the_threshold_once_there_are_enough_of_them() -> None:
    model = scoring_model()
    shipped = model.calibration[Condition.WIDEBAND].threshold(1e-4)
    # A contact centre whose agents sound more alike than the shipped impostors do: one
    # accent, one headset.
    accent = unit(RNG.normal(size=DIMENSION))
    stored = [
        voiceprint(f"a{i}", voice, voice)
        for i, voice in enumerate(
            unit(accent + 1.2 * RNG.normal(size=DIMENSION) / np.sqrt(DIMENSION)) for _ in range(40)
        )
    ]
    clock = ManualClock()
    policy = ScoringPolicy(cohort_refresh_seconds=60)
    scorer = Scorer(model, policy, voiceprints=lambda: list(stored), monotonic=clock.monotonic)
    local = scorer.local_thresholds()[Condition.WIDEBAND]
    assert (local.agents, local.comparisons) == (40, 40 * 39)
    assert local.shipped == pytest.approx(shipped)
    assert local.local is not None and local.local > shipped
    assert local.applied == local.local
    # A check the shipped threshold would pass but the agents' own impostors would not.
    claimed = stored[0]
    lookalike = stored[1].embedding
    score = scorer.score(claimed, lookalike, 3.0, Channel.WIDEBAND)
    assert shipped <= score.normalized < local.local
    assert not score.accepted
    assert score.decided_by is DecidedBy.LOCAL_FMR_THRESHOLD

    # Erasures that leave too few agents: the local threshold is gone at the next refresh.
    del stored[20:]
    assert scorer.local_thresholds()[Condition.WIDEBAND].agents == 40
    clock.advance(61.0)
    after = scorer.local_thresholds()[Condition.WIDEBAND]
    assert (after.agents, after.local) == (20, None)
    assert after.applied == pytest.approx(shipped)
    assert scorer.score(claimed, lookalike, 3.0, Channel.WIDEBAND).accepted


def test_agents_join_the_cohort_except_the_claimed_one_and_are_reread() -> None:
    model = scoring_model()
    enrolled = unit(RNG.normal(size=DIMENSION))
    test = unit(enrolled + 0.5 * RNG.normal(size=DIMENSION) / np.sqrt(DIMENSION))
    claimed = voiceprint("a", enrolled, enrolled)
    # Another agent who sounds like the test: in the cohort, it raises the test's statistics.
    lookalike = voiceprint("b", test, test)
    stored: list[Voiceprint] = [claimed]
    clock = ManualClock()
    policy = ScoringPolicy(cohort_includes_agents=True, cohort_refresh_seconds=60)
    scorer = Scorer(model, policy, voiceprints=lambda: list(stored), monotonic=clock.monotonic)
    shipped_only = Scorer(model, ScoringPolicy(), voiceprints=lambda: list(stored))

    alone = scorer.score(claimed, test, 8.0, Channel.WIDEBAND)
    # The claimed agent's own voiceprint is no part of its cohort.
    assert alone.normalized == pytest.approx(
        shipped_only.score(claimed, test, 8.0, Channel.WIDEBAND).normalized
    )
    stored.append(lookalike)
    clock.advance(30.0)
    assert scorer.score(claimed, test, 8.0, Channel.WIDEBAND).normalized == alone.normalized
    clock.advance(31.0)
    joined = scorer.score(claimed, test, 8.0, Channel.WIDEBAND)
    assert joined.normalized < alone.normalized


def test_scoring_policy_from_the_environment() -> None:
    assert ServerConfig.from_environment({}).scoring == ScoringPolicy()
    assert ScoringPolicy().target_fmr == 1e-4
    config = ServerConfig.from_environment(
        {
            "VOXAUTH_TARGET_FMR": "0.001",
            "VOXAUTH_COHORT_AGENTS": "1",
            "VOXAUTH_SCORING_DIR": "/opt/scoring",
            "VOXAUTH_MIN_LLR": "2.3",
            "VOXAUTH_LOCAL_THRESHOLD_MIN_AGENTS": "0",
        }
    )
    assert config.scoring == replace(
        ScoringPolicy(),
        target_fmr=0.001,
        cohort_includes_agents=True,
        scoring_dir=Path("/opt/scoring"),
        min_llr=2.3,
        local_threshold_min_agents=0,
    )
    for name, value in (
        ("VOXAUTH_TARGET_FMR", "0"),
        ("VOXAUTH_TARGET_FMR", "1e-4x"),
        ("VOXAUTH_TARGET_FMR", "0.7"),
        ("VOXAUTH_COHORT_AGENTS", "yes"),
        # Accepting on evidence for an impostor is no policy.
        ("VOXAUTH_MIN_LLR", "-1"),
    ):
        with pytest.raises(ConfigurationError, match=name):
            ServerConfig.from_environment({name: value})
