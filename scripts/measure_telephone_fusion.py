"""Measures whether fusing a telephone check's two comparisons lowers its false non-matches at
the service's bound: the check against the telephone companion voiceprint (the service's
`telephone` condition) and against the wideband voiceprint (`wideband-to-telephone`). The
figures behind the README's "Telephone checks: one comparison or two" (Accuracy).

    PYTHONPATH=$PWD:$PWD/proto .venv/bin/python scripts/measure_telephone_fusion.py \
        /work/shared/data/librispeech-train-clean-100

The fused score is w * s_companion + (1 - w) * s_wideband, both AS-norm scores as the service
computes them. Everything is fitted on the calibration speakers as `voxauth calibrate` fits
the shipped calibration (same cohort, trials, LLR fit, bootstrapped tail): the weight w by
the least minDCF(0.01) of the halves' trials, then for each w reported the calibration of
the fused score. The held-out speakers (`voxauth eval`'s) are scored with it at the service's
bound for 1 in 10,000 (false-match threshold and LLR floor) for 3 s, full-half and long
tests. Prints FMR, FNMR (95% Wilson intervals), ACCEPTs with a negative LLR, and, against
the companion alone, the paired count of genuine checks that change their decision (with
the two-sided sign-test p-value). Uses `voxauth eval`'s embedding cache (`--cache`); with an
empty cache it embeds for about 15 minutes on two cores.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.ecapa import EcapaEmbedder
from models.fetch import default_model_dir
from server.config import ServerConfig
from server.pipeline import silero
from server.pipeline.silero import SileroSpeechDetector
from server.scoring.calibration import Condition, ConditionCalibration, fit_condition, fit_tail
from server.scoring.scorer import ScoringModel
from server.tools.calibrate import (
    HALVES_PLAN,
    UNEVEN_PLAN,
    WHOLE_PLAN,
    Plan,
    Setting,
    _joined,
    calibration_trials,
    cohort_voices,
    is_calibration_speaker,
)
from server.tools.corpus import SpeechCorpus, recordings
from server.tools.evaluation import Rate, Trials, accepted_by, equal_error_rate, evaluate, min_dcf

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Weights of the companion comparison tried; 1 is the service's telephone condition."""
Pair = tuple[Trials, Trials]


def fused(pair: Pair, weight: float) -> Trials:
    companion, wideband = pair
    return companion.with_scores(
        weight * companion.target + (1 - weight) * wideband.target,
        weight * companion.impostor + (1 - weight) * wideband.impostor,
    )


def same_trials(companion: Trials, wideband: Trials) -> None:
    """The two conditions' trials must be the same pairs in the same order to be fused."""
    if len(companion.target) != len(wideband.target) or not np.allclose(
        companion.target_seconds, wideband.target_seconds
    ):
        raise SystemExit("the two conditions' target trials differ: cannot fuse")
    if len(companion.impostor) != len(wideband.impostor) or not np.allclose(
        companion.impostor_seconds, wideband.impostor_seconds
    ):
        raise SystemExit("the two conditions' impostor trials differ: cannot fuse")


def sign_test(fewer: int, more: int) -> float:
    """Two-sided exact sign test of `fewer` against `more` discordant pairs."""
    n = fewer + more
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fewer, more) + 1)) / float(2**n)
    return min(1.0, 2 * tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("var/eval-cache"))
    args = parser.parse_args()

    config = ServerConfig.from_environment()
    policy = config.scoring
    embedder = EcapaEmbedder.load(config.model_dir or default_model_dir())
    scoring = ScoringModel.load(policy, embedder.model_id)
    corpus = SpeechCorpus(
        embedder,
        SileroSpeechDetector(),
        max_seconds=config.audio.max_seconds,
        cache_dir=args.cache,
        detector_version=silero.VERSION,
    )
    every = recordings(args.directory)
    calibration_files = [r for r in every if is_calibration_speaker(r.speaker)]
    fitted_on = set(scoring.calibration.provenance.get("speakers", []))
    held_out = [r for r in every if r.speaker not in fitted_on]
    cohort = cohort_voices(corpus, calibration_files)
    calibration = scoring.calibration
    trials_of = functools.partial(
        calibration_trials,
        corpus,
        calibration_files,
        cohort,
        setting=Setting(calibration.centring, calibration.cohort_top_n),
        min_enrollment_seconds=config.enrollment.min_utterance_net_speech_seconds,
        min_test_seconds=config.verification.min_net_speech_seconds,
    )

    def pair(plan: Plan) -> Pair:
        companion = trials_of(Condition.TELEPHONE, plan=plan)
        wideband = trials_of(Condition.WIDEBAND_TO_TELEPHONE, plan=plan)
        same_trials(companion, wideband)
        return companion, wideband

    halves, uneven, whole = pair(HALVES_PLAN), pair(UNEVEN_PLAN), pair(WHOLE_PLAN)
    costs = {w: min_dcf(fused(halves, w)) for w in WEIGHTS}
    print(
        "calibration speakers, halves: minDCF(0.01) / EER by companion weight: "
        + "; ".join(
            f"{w:g}: {costs[w]:.4f} / {equal_error_rate(fused(halves, w))[0]:.3%}" for w in WEIGHTS
        )
    )
    best = min(costs.values())
    chosen = [w for w in WEIGHTS if costs[w] <= best + 1e-9]
    print(f"least minDCF at companion weight {', '.join(f'{w:g}' for w in chosen)}")

    def calibrated(weight: float) -> ConditionCalibration:
        fit = _joined([fused(halves, weight), fused(uneven, weight)])
        impostors = _joined([fit, fused(whole, weight)])
        assert fit.target_enrollment_seconds is not None
        assert fit.impostor_enrollment_seconds is not None
        assert impostors.impostor_enrolled is not None and impostors.impostor_tested is not None
        return replace(
            fit_condition(
                fit.target,
                fit.target_seconds,
                fit.impostor,
                fit.impostor_seconds,
                target_enrollment_seconds=fit.target_enrollment_seconds,
                impostor_enrollment_seconds=fit.impostor_enrollment_seconds,
            ),
            impostor=fit_tail(
                impostors.impostor, impostors.impostor_enrolled, impostors.impostor_tested
            ),
        )

    reported = sorted({0.0, 1.0, *chosen})
    calibrations = {w: calibrated(w) for w in reported}
    for duration in ("3", "full", "long"):
        results = {
            condition: evaluate(
                corpus,
                held_out,
                scoring,
                condition,
                duration,
                policy=policy,
                min_enrollment_seconds=config.enrollment.min_utterance_net_speech_seconds,
                min_test_seconds=config.verification.min_net_speech_seconds,
            ).normalized
            for condition in (Condition.TELEPHONE, Condition.WIDEBAND_TO_TELEPHONE)
        }
        held = (results[Condition.TELEPHONE], results[Condition.WIDEBAND_TO_TELEPHONE])
        same_trials(*held)
        reference: np.ndarray | None = None
        for weight in reported:
            trials = fused(held, weight)
            fitted = calibrations[weight]
            assert trials.target_enrollment_seconds is not None
            assert trials.impostor_enrollment_seconds is not None
            target_seconds = (trials.target_seconds, trials.target_enrollment_seconds)
            impostor_seconds = (trials.impostor_seconds, trials.impostor_enrollment_seconds)
            accepted_target = accepted_by(fitted, policy, trials.target, *target_seconds)
            accepted_impostor = accepted_by(fitted, policy, trials.impostor, *impostor_seconds)
            llr = np.vectorize(fitted.llr, otypes=[np.float64])
            against = int(
                (accepted_target & (llr(trials.target, *target_seconds) < 0)).sum()
                + (accepted_impostor & (llr(trials.impostor, *impostor_seconds) < 0)).sum()
            )
            if weight == 1.0:
                reference = accepted_target
            line = (
                f"held out, {duration} test, companion weight {weight:g}: "
                f"threshold {fitted.threshold(policy.target_fmr):.2f}, "
                f"EER {equal_error_rate(trials)[0]:.2%}, "
                f"FMR {Rate(int(accepted_impostor.sum()), len(trials.impostor))}, "
                f"FNMR {Rate(int((~accepted_target).sum()), len(trials.target))}, "
                f"ACCEPT with LLR < 0: {against}"
            )
            print(line)
        assert reference is not None
        for weight in reported:
            if weight == 1.0:
                continue
            trials = fused(held, weight)
            fitted = calibrations[weight]
            assert trials.target_enrollment_seconds is not None
            accepted = accepted_by(
                fitted,
                policy,
                trials.target,
                trials.target_seconds,
                trials.target_enrollment_seconds,
            )
            rescued = int((accepted & ~reference).sum())
            lost = int((~accepted & reference).sum())
            print(
                f"  {duration} test, weight {weight:g} against the companion alone: "
                f"{rescued} genuine checks accepted that it rejects, {lost} rejected that it "
                f"accepts (sign test p = {sign_test(rescued, lost):.3f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
